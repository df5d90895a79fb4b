"""MetaStack: a lean VM cloud with no central scheduler.

Installs the agent (``metastack``), the admin CLI (``metastackctl``) and the
web console (``metastack-web``, with its page under share/metastack/web),
plus, under share/metastack/, the example configuration
(``config.example.ini``, every key with its default) and the systemd units
(``systemd/metastack.service``, ``systemd/metastack-watchdog.service``).

``install_requires`` states compatible version ranges; the exact versions
the test suite runs are pinned in ``constraints.txt``, which deploy/setup.sh,
CI and the playbook use (``pip install -c constraints.txt .``).
Ceph's ``rados``/``rbd`` bindings are not on PyPI; they come from Debian's
python3-rados/python3-rbd, seen through a ``--system-site-packages`` venv.
"""
from setuptools import setup

setup(
    name="metastack",
    version="0.1.0",
    description="A lean VM cloud with no central scheduler (etcd + libvirt + Ceph)",
    py_modules=["metastack", "metastackctl", "metastackweb"],
    data_files=[
        ("share/metastack/web", ["metastackweb_static/index.html", "metastackweb_static/app.js",
                                 "metastackweb_static/app.css"]),
        ("share/metastack", ["config.example.ini", "constraints.txt"]),
        ("share/metastack/systemd", ["deploy/systemd/metastack.service",
                                     "deploy/systemd/metastack-watchdog.service"]),
    ],
    python_requires=">=3.11",
    install_requires=[
        # python-etcd3's API, maintained fork (same ``etcd3`` module name; never
        # next to the unmaintained ``etcd3`` package, which owns the same module).
        "cslab-etcd3>=0.12.1,<0.13",
        "grpcio>=1.60,<2",
        "protobuf>=5.27,<8",
        "six>=1.16",
        "click>=8.1,<9",
        # Built against the host's libvirt (Debian 12: libvirt-dev 9.0.0).
        "libvirt-python>=9.0",
        # The web console (metastackweb.py): aiohttp's own server.
        "aiohttp>=3.9,<4",
    ],
    extras_require={
        # selenium drives Debian's chromium through chromium-driver in the web tests.
        "test": ["pytest>=8", "hypothesis>=6.100", "selenium>=4.20,<5"],
    },
    entry_points={
        "console_scripts": [
            "metastack=metastack:main",
            "metastackctl=metastackctl:main",
            "metastack-web=metastackweb:main",
        ],
    },
)
