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
    assert "lost=node2: node seen dead" in a1.log()
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


def test_wait_options_exit_codes(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    cluster.flavour("huge", 64, 512)
    cluster.agent("node1", vcpus=2)
    cluster.wait_hosts("node1")
    r = ctl("create", "w1", "--flavour", "small", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "w1 is running on node1" in r.output, r.output
    assert cluster.states()["w1"] == ("running", "node1")
    r = ctl("stop", "w1", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "w1 is stopped on node1" in r.output
    r = ctl("start", "w1", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "w1 is running on node1" in r.output
    r = ctl("create", "w2", "--flavour", "huge", "--wait", "--timeout", "1")
    assert r.exit_code == 4 and "not running after 1s (now pending)" in r.output
    # lands in error: exit 1 with the reason
    store.put(store.keys.desired("bad"), json.dumps({"flavour": "nope"}).encode())
    r = ctl("start", "bad", "--wait", "--timeout", "30")
    assert r.exit_code == 1 and "bad is in error on node1" in r.output and "unknown flavour" in r.output
    r = ctl("destroy", "w1", "--yes", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "w1 is removed" in r.output
    assert "w1" not in cluster.actual()


def test_list_watch_events_and_console_follow_and_version(ctl, cluster: Cluster, store) -> None:
    import threading
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    t = threading.Timer(0.5, lambda: ctl("create", "f1", "--flavour", "small"))
    t.start()
    r = ctl("list", "--watch", "-o", "json", "--max-updates", "3")
    t.join()
    assert r.exit_code == 0, r.output
    lists = [json.loads(line) for line in r.stdout.splitlines()]
    assert lists[0] == [] and any(lst and lst[0]["name"] == "f1" for lst in lists[1:]), lists
    cluster.wait_running(["f1"])
    r = ctl("events", "f1", "--follow", "-o", "json", "--max-updates", "1")
    assert r.exit_code == 0 and {json.loads(line)["event"] for line in r.stdout.splitlines()} >= {"claimed", "started"}
    # the console: its owner publishes the last 4 KiB; --follow prints what is added
    store.put(store.keys.console("f1"), b"boot 1\n")
    t = threading.Timer(0.5, lambda: store.put(store.keys.console("f1"), b"boot 1\nlogin: \n"))
    t.start()
    r = ctl("console", "f1", "--follow", "--max-updates", "2")
    t.join()
    assert r.exit_code == 0 and r.stdout == "boot 1\nlogin: \n", repr(r.stdout)
    r = ctl("--version")
    assert r.exit_code == 0 and r.stdout.startswith("metastackctl ") and r.stdout.strip().split()[-1][0].isdigit()


@pytest.mark.parametrize("old,new,added", [
    ("", "abc", "abc"), ("abc", "abcdef", "def"), ("abcdef", "cdefgh", "gh"), ("abc", "xyz", "xyz"),
    ("abc", "abc", ""),
])
def test_new_console_text(old, new, added) -> None:
    from metastackctl import new_console_text
    assert new_console_text(old, new) == added
