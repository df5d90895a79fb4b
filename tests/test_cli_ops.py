"""metastackctl for issue #7 (operations) through CliRunner, against a real
etcd and agents on test:/// hosts."""
from __future__ import annotations

import json
import signal

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


def test_hosts_show_a_lost_node_with_when_it_was_seen_to_die_and_free_capacity(ctl, cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    a1, a2 = cluster.agent("node1", vcpus=4, ram_mb=4096), cluster.agent("node2", vcpus=4, ram_mb=4096)
    cluster.wait_hosts("node1", "node2")
    assert ctl("create", "w1", "--flavour", "small", "--host", "node1").exit_code == 0
    cluster.wait_running(["w1"])
    hosts = {r["node"]: r for r in json.loads(ctl("hosts", "-o", "json").stdout)}
    assert (hosts["node1"]["free_vcpus"], hosts["node1"]["free_ram_mb"], hosts["node1"]["vms"]) == (3, 3584, 1)
    assert hosts["node2"]["lost_at"] is None and hosts["node2"]["scheduling"] is None
    a2.signal(signal.SIGKILL)
    a2.stop_watchdog()
    wait_for(lambda: json.loads(cluster.store.get(cluster.store.keys.node("node2")).value).get("lost_at"),
             timeout=15, what="lost_at recorded by node1")
    hosts = {r["node"]: r for r in json.loads(ctl("hosts", "-o", "json").stdout)}
    assert hosts["node2"]["state"] == "lost" and hosts["node2"]["lost_at"].endswith("Z")
    assert "node=node2 lost" in a1.log()
    table = ctl("hosts").stdout
    assert table.splitlines()[0].split()[-4:] == ["FREE_VCPUS", "FREE_RAM_MB", "SCHEDULING", "LOST_AT"]
    # it comes back: the record is live again and lost_at is cleared
    cluster.agent("node2", vcpus=4, ram_mb=4096)
    wait_for(lambda: not json.loads(cluster.store.get(cluster.store.keys.node("node2")).value).get("lost_at"),
             timeout=20, what="lost_at cleared")


def test_show_gives_domain_reservation_times_and_clean_json(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    assert ctl("create", "w1", "--flavour", "small").exit_code == 0
    cluster.wait_running(["w1"])
    s = json.loads(ctl("show", "w1", "-o", "json").stdout)
    assert s["domain"] == "w1.node1" and s["reserved"] == {"vcpus": 1, "ram_mb": 512}
    assert s["spec"]["flavour"] == "small" and s["created"] == s["spec"]["created"]
    assert s["updated"] and json.loads(s["desired_entry"]) == s["spec"]
    # a malformed entry: null, not "?"; the raw text kept, no spec
    store.put(store.keys.desired("bad"), b"not json")
    s = json.loads(ctl("show", "bad", "-o", "json").stdout)
    assert s["flavour"] is None and s["desired"] is None and s["spec"] is None and s["desired_entry"] == "not json"
    table = ctl("show", "w1").stdout
    assert "w1.node1" in table and "vcpus=1,ram_mb=512" in table
    assert any(line.split()[0] == "age" and line.split()[1][-1] in "smhd" for line in table.splitlines()[1:])
