"""The agent against a real etcd and libvirt's test:/// driver, as processes."""
from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import Cluster, wait_for


def test_smoke_two_agents_run_vms(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.agent("node2")
    cluster.wait_hosts("node1", "node2")
    for i in range(4):
        cluster.desire(f"vm{i}")
    states = cluster.wait_running([f"vm{i}" for i in range(4)])
    assert {h for _, h in states.values()} <= {"node1", "node2"}
