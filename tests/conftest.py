"""pytest fixtures built on tests/harness.py; everything started is stopped."""
from __future__ import annotations

import shutil
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from harness import ROOT, Cluster, EtcdMembers, EtcdServer
import metastack as ms


@pytest.fixture(scope="session")
def workroot() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="metastack-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd(workroot: Path) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run bash deploy/setup.sh (Debian etcd-server)")
    server = EtcdServer(workroot)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test: tests share one etcd but not keys."""
    return f"/mstest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(etcd: EtcdServer, prefix: str) -> Iterator[ms.Store]:
    s = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=prefix, timeout=2.0))
    yield s
    s.close()


@pytest.fixture
def cluster(etcd: EtcdServer, prefix: str, store: ms.Store, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(etcd, prefix, store, tmp_path)
    yield c
    c.stop_all()


# -- end to end: real QEMU guests on libvirtd, disks in a real Ceph ------------

sys_path_deploy = str(ROOT / "deploy")


def _deploy_module(name: str):
    import importlib
    import sys
    if sys_path_deploy not in sys.path:
        sys.path.insert(0, sys_path_deploy)
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def e2e_root() -> Iterator[Path]:
    """A work dir QEMU (running as libvirt-qemu) can traverse: consoles and
    kernel caches live below it."""
    d = Path(tempfile.mkdtemp(prefix="metastack-e2e-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def guest() -> Path:
    """The tiny guest (kernel, initrd, disk with a boot counter), built once
    from Debian packages by deploy/build-guest.sh into .cache/guest."""
    import subprocess
    out = ROOT / ".cache" / "guest"
    subprocess.run(["bash", str(ROOT / "deploy" / "build-guest.sh"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def ceph(e2e_root: Path):
    """A private single-node Ceph (mon, mgr, one memstore OSD, cephx)."""
    cephdev = _deploy_module("cephdev")
    info = cephdev.start(e2e_root / "ceph", pool="metastack")
    yield info
    cephdev.stop(e2e_root / "ceph")


@pytest.fixture(scope="session")
def libvirtd(e2e_root: Path) -> Iterator[str]:
    """qemu:///system, started here (and stopped by pid) unless one runs."""
    lvd = _deploy_module("libvirtd")
    pid = lvd.start(e2e_root / "libvirtd")
    yield "qemu:///system"
    if pid:
        lvd.stop(e2e_root / "libvirtd")


@pytest.fixture
def real_cluster(etcd: EtcdServer, prefix: str, store: ms.Store, e2e_root: Path, ceph, libvirtd: str,
                 request) -> Iterator[Cluster]:
    """Agents on the shared libvirtd with QEMU (TCG) guests and Ceph disks."""
    name = request.node.name  # short (socket paths), and distinct for each parametrised case
    d = e2e_root / (name if len(name) <= 40 else f"{name[:31]}-{zlib.crc32(name.encode()):08x}")
    d.mkdir(mode=0o755)
    c = Cluster(etcd, prefix, store, d)
    c.libvirt_uri, c.domain_type = libvirtd, "qemu"
    c.ttl, c.etcd_timeout = 4, 0.5
    c.ceph_section = (f"[ceph]\nconf = {ceph.conf}\nclient = {ceph.client}\n"
                      f"keyring = {ceph.keyring}\npool = {ceph.pool}\n")
    yield c
    c.stop_all()
    _deploy_module("cephdev").clear_blocklist(ceph)


# -- order: fast layers first, so a failure shows early ------------------------

LAYERS = ("test_plan", "test_ops_plan", "test_placement", "test_robust", "test_view_cache", "test_store_watch", "test_chaoscheck", "test_packaging",
          "test_ansible", "test_cli", "test_image_import", "test_etcd_security", "test_agent", "test_robust_agent",
          "test_ops_agent", "test_web", "test_ceph_caps", "test_e2e", "test_chaos", "test_install_testbed")


def _layer(item: pytest.Item) -> int:
    name = Path(str(item.fspath)).stem
    for i, prefix in sorted(enumerate(LAYERS), key=lambda p: -len(p[1])):  # longest prefix wins
        if name.startswith(prefix):
            return i
    return len(LAYERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Pure tests, then the CLI, agents on test:/// hosts, the web, real
    guests, and the multi-node chaos suite last (stable within a file)."""
    items.sort(key=_layer)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "chaos: the chaos suite (tests/test_chaos.py): a 3-node testbed with real etcd, Ceph, "
                   "per-node libvirtd and QEMU guests, faults injected for real; root, about 10 minutes. "
                   "Select with -m chaos, skip with -m 'not chaos'.")


def pytest_terminal_summary(terminalreporter) -> None:
    """The chaos suite's measurements (tests/chaoslib.py MEASURED) and the
    install testbed's (tests/test_install_testbed.py MEASURED), if they ran."""
    import sys
    lib = sys.modules.get("chaoslib")
    if lib is not None and lib.MEASURED:
        terminalreporter.section("chaos: measured")
        for test, what, value, unit in lib.MEASURED:
            terminalreporter.write_line(f"{test:58s} {what:28s} {value:6.2f} {unit}")
    bed = sys.modules.get("test_install_testbed")
    if bed is not None and bed.MEASURED:
        terminalreporter.section("install testbed: measured")
        for what, seconds in bed.MEASURED:
            terminalreporter.write_line(f"{what:64s} {seconds:7.1f} s")


@pytest.fixture
def members(tmp_path: Path) -> Iterator[EtcdMembers]:
    """A throw-away 3-member etcd cluster on loopback (SIGKILLed at the end,
    SIGSTOPped members included)."""
    m = EtcdMembers(tmp_path)
    try:
        m.start()
        yield m
    finally:
        m.stop()
