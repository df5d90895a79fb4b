"""metastackctl for issue #7 (operations) through CliRunner, against a real
etcd and agents on test:/// hosts."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import metastack as ms
from harness import Cluster, EtcdServer, wait_for
from metastackctl import cli


@pytest.fixture
def ctl(etcd: EtcdServer, prefix: str):
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", prefix, *args], input=input)
    return run


def rows_of(ctl) -> dict[str, dict]:
    r = ctl("list", "-o", "json")
    assert r.exit_code == 0, r.output
    return {row["name"]: row for row in json.loads(r.stdout)}


def test_list_and_show_say_why_a_vm_waits(ctl, cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.flavour("huge", 64, 512)
    cluster.agent("node1", vcpus=2)
    cluster.wait_hosts("node1")
    assert ctl("create", "big", "--flavour", "huge").exit_code == 0
    assert ctl("create", "away", "--flavour", "small", "--host", "node9").exit_code == 0
    assert ctl("create", "ok", "--flavour", "small").exit_code == 0
    cluster.wait_running(["ok"])
    rows = rows_of(ctl)
    assert rows["big"]["state"] == "pending"
    assert rows["big"]["reason"] == ("0/1 live node(s) can take it: too small: node1 (needs 64 vcpus and "
                                     "512 MiB RAM; largest free: 1 vcpus on node1, 15872 MiB on node1)")
    assert rows["away"]["reason"] == "pinned to node9, which is not a known node"
    assert rows["ok"]["reason"] == ""
    show = json.loads(ctl("show", "big", "-o", "json").stdout)
    assert show["reason"] == rows["big"]["reason"]
    table = ctl("list").stdout
    assert "too small: node1" in table
