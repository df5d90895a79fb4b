"""MetaStack: a lean VM cloud with no central scheduler.

Installs the agent (``metastack``), the admin CLI (``metastackctl``) and the
web console (``metastack-web``, with its page under share/metastack/web).
Dependencies are pinned: these versions are the ones the test suite runs.
Ceph's ``rados``/``rbd`` bindings are not on PyPI; they come from Debian's
python3-rados/python3-rbd, seen through a ``--system-site-packages`` venv.
"""
from setuptools import setup

setup(
    name="metastack",
    version="0.1.0",
    description="A lean VM cloud with no central scheduler (etcd + libvirt + Ceph)",
    py_modules=["metastack", "metastackctl", "metastackweb"],
    data_files=[("share/metastack/web", ["metastackweb_static/index.html", "metastackweb_static/app.js",
                                         "metastackweb_static/app.css"])],
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
        # The web console (metastackweb.py): aiohttp's own server, and what it needs.
        "aiohttp==3.14.5",
        "aiohappyeyeballs==2.7.1",
        "aiosignal==1.4.0",
        "attrs==26.1.0",
        "frozenlist==1.8.0",
        "multidict==7.2.1",
        "propcache==0.5.4",
        "yarl==1.25.1",
    ],
    extras_require={
        # selenium drives Debian's chromium through chromium-driver in the web tests
        # (4.51.0: 4.52 needs a certifi newer than the index has).
        "test": ["pytest==9.2.0", "hypothesis==6.170.15", "selenium==4.51.0"],
    },
    entry_points={
        "console_scripts": [
            "metastack=metastack:main",
            "metastackctl=metastackctl:main",
            "metastack-web=metastackweb:main",
        ],
    },
)
