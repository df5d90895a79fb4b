"""MetaStack: a lean VM cloud with no central scheduler.

Installs the agent (``metastack``) and the admin CLI (``metastackctl``).
Dependencies are pinned: these versions are the ones the test suite runs.
Ceph's ``rados``/``rbd`` bindings are not on PyPI; they come from Debian's
python3-rados/python3-rbd, seen through a ``--system-site-packages`` venv.
"""
from setuptools import setup

setup(
    name="metastack",
    version="0.1.0",
    description="A lean VM cloud with no central scheduler (etcd + libvirt + Ceph)",
    py_modules=["metastack", "metastackctl"],
    python_requires=">=3.11",
    install_requires=[
        # python-etcd3's API, maintained fork (same ``etcd3`` module name).
        "cslab-etcd3==0.12.1",
        "grpcio==1.85.1",
        "protobuf==7.36.2",
        "six==1.16.0",
        "click==8.5.1",
        # Built against Debian 12's libvirt-dev 9.0.0.
        "libvirt-python==9.0.0",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "hypothesis==6.170.15"],
    },
    entry_points={
        "console_scripts": [
            "metastack=metastack:main",
            "metastackctl=metastackctl:main",
        ],
    },
)
