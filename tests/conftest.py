"""pytest fixtures built on tests/harness.py; everything started is stopped."""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from harness import ROOT, AgentProc, Cluster, EtcdServer, free_port, wait_for  # noqa: F401  (re-exported)
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
