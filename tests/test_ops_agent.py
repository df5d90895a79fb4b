"""Agents on test:/// hosts for issue #7 (operations): cordon, drain (and a
drain interrupted then resumed), move, resize, driven by metastackctl."""
from __future__ import annotations

import json
import signal
from collections import Counter

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


def node_record(store: ms.Store, node: str) -> dict:
    return json.loads(store.get(store.keys.node(node)).value)


def test_cordon_stops_new_claims_and_keeps_the_agents_fields(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    first_seen = node_record(store, "node1")["first_seen"]
    r = ctl("host", "cordon", "node1", "--reason", "disk swap")
    assert r.exit_code == 0, r.output
    rec = node_record(store, "node1")
    assert rec["cordon"] is True and rec["reason"] == "disk swap" and rec["first_seen"] == first_seen
    assert "@" in rec["by"] and rec["since"].endswith("Z")
    assert ctl("create", "a1", "--flavour", "small").exit_code == 0
    wait_for(lambda: "cordoned: node1 (disk swap)" in json.loads(ctl("show", "a1", "-o", "json").stdout)["reason"],
             what="pending reason names the cordon")
    assert "a1" not in cluster.actual()
    hosts = {h["node"]: h for h in json.loads(ctl("hosts", "-o", "json").stdout)}
    assert hosts["node1"]["scheduling"]["cordon"] is True and hosts["node1"]["scheduling"]["reason"] == "disk swap"
    assert "cordon=yes" in ctl("hosts").stdout
    assert ctl("host", "uncordon", "node1").exit_code == 0
    cluster.wait_running(["a1"])
    assert node_record(store, "node1") == {"address": "", "first_seen": first_seen}
    assert ctl("host", "cordon", "nope").exit_code == 1


def test_drain_hands_vms_over_one_at_a_time_and_resumes_after_an_interruption(ctl, cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    vms = [f"d{i}" for i in range(4)]
    for vm in vms:
        assert ctl("create", vm, "--flavour", "small").exit_code == 0
    assert ctl("create", "pin", "--flavour", "small", "--host", "node1").exit_code == 0
    cluster.wait_running(vms + ["pin"])
    # the watch sees every claim change in order: how many VMs are between two nodes at once
    in_flight: set[str] = set()
    most = [0]

    def on_events(_rev: int, events: list) -> None:
        for ev in events:
            if (cluster.keys.split(ev.key) or ("",))[0] != "actual":
                continue  # the shards hold desired entries too
            vm = ev.key.rsplit("/", 1)[1]
            if ev.value is None:
                in_flight.add(vm)
            elif json.loads(ev.value)["host"] == "node2":
                in_flight.discard(vm)
            most[0] = max(most[0], len(in_flight))
    rev, _ = cluster.store.list_prefix(cluster.keys.shards)
    cancel = cluster.store.watch_prefix(cluster.keys.shards, rev + 1, on_events, lambda exc: None)
    # interrupted: nowhere to go yet, the first run gives up waiting (exit 4); nothing was stopped for nothing
    r = ctl("host", "drain", "node1", "--deadline", "2")
    assert r.exit_code == 4 and "4 to hand over" in r.output and "not handed over yet" in r.output, r.output
    assert all(cluster.states()[vm] == ("running", "node1") for vm in vms)
    cluster.agent("node2")
    cluster.wait_hosts("node2")
    r = ctl("host", "drain", "node1", "--deadline", "0")  # another early stop, or already done: both fine
    assert r.exit_code in (0, 4) and "draining node1" in r.output
    r = ctl("host", "drain", "node1", "--deadline", "60")  # re-run: it continues
    assert r.exit_code == 0, r.output
    states = cluster.states()
    assert all(states[vm] == ("running", "node2") for vm in vms), states
    assert states["pin"] == ("running", "node1")
    assert "stays: pinned here" in r.output
    wait_for(lambda: not in_flight, 5, what="the watch to see the last claim")
    cancel()
    assert most[0] == 1  # one at a time: the next VM left only once the previous one was claimed
    released = [e for e in cluster_events(cluster) if e["event"] == "released" and e["node"] == "node1"]
    assert sorted(e["vm"] for e in released) == vms


def cluster_events(cluster: Cluster) -> list[dict]:
    _, entries = cluster.store.list_prefix(cluster.keys.dir("events"))
    out = []
    for key, e in entries.items():
        ev = json.loads(e.value)
        ev["key"] = key.rsplit("/", 1)[1]
        out.append(ev)
    return out


def test_move_to_a_node_and_to_any_other(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    assert ctl("create", "m1", "--flavour", "small", "--host", "node1").exit_code == 0
    cluster.wait_running(["m1"])
    cluster.agent("node2")
    cluster.wait_hosts("node2")
    assert ctl("move", "m1").exit_code == 1  # pinned: use --to
    r = ctl("move", "m1", "--to", "node2", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "m1 is running on node2" in r.output, r.output
    assert cluster.states().get("m1") == ("running", "node2")
    assert json.loads(store.get(store.keys.desired("m1")).value)["host"] == "node2"
    assert ctl("move", "m1", "--to", "node9").exit_code == 1  # not a live node
    # unpin, then a cold move to any other node
    store.put(store.keys.desired("m1"), json.dumps(
        {k: v for k, v in json.loads(store.get(store.keys.desired("m1")).value).items() if k != "host"}).encode())
    r = ctl("move", "m1", "--wait", "--timeout", "30")
    assert r.exit_code == 0 and "moving off node2" in r.output and "m1 is running on node1" in r.output, r.output
    wait_for(lambda: store.get(store.keys.move("m1")) is None, what="the new owner deleted the request")


def test_resize_waits_for_the_next_start_or_restarts(ctl, cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.flavour("big", 2, 1024)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    assert ctl("create", "r1", "--flavour", "small").exit_code == 0
    cluster.wait_running(["r1"])
    r = ctl("resize", "r1", "--flavour", "big")
    assert r.exit_code == 1 and "use --restart" in r.output
    assert ctl("resize", "r1", "--flavour", "nope").exit_code == 1
    r = ctl("resize", "r1", "--flavour", "big", "--restart")
    assert r.exit_code == 0, r.output
    wait_for(lambda: cluster.actual()["r1"]["state"] == "running" and cluster.actual()["r1"]["vcpus"] == 2,
             what="r1 running with 2 vcpus")
    assert cluster.actual()["r1"]["ram_mb"] == 1024
    # stopped: accepted at once, effective at the next start
    assert ctl("stop", "r1").exit_code == 0
    wait_for(lambda: cluster.actual()["r1"]["state"] == "stopped", what="r1 stopped")
    assert ctl("resize", "r1", "--flavour", "small").exit_code == 0
    assert ctl("start", "r1").exit_code == 0
    wait_for(lambda: cluster.actual()["r1"]["state"] == "running" and cluster.actual()["r1"]["vcpus"] == 1,
             what="r1 running with 1 vcpu")


def test_overcommit_from_the_cluster_config_and_the_ini_override(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    store.put(store.keys.config, json.dumps({"cpu_allocation_ratio": 2.0}).encode())
    cluster.agent("node1", vcpus=2, ram_mb=8192)
    cluster.agent("node2", vcpus=2, ram_mb=8192)
    cluster.wait_hosts("node1", "node2")
    wait_for(lambda: cluster.hosts()["node1"]["vcpus"] == 4, what="node1 offers 2 x 2 vcpus")
    assert cluster.hosts()["node1"]["ram_mb"] == 8192
    vms = [f"o{i}" for i in range(8)]
    for vm in vms:
        assert ctl("create", vm, "--flavour", "small").exit_code == 0
    cluster.wait_running(vms)
    assert sorted(h["vcpus_used"] for h in cluster.hosts().values()) == [4, 4]
    # the ini overrides the cluster value on its node
    a3 = cluster.agent("node3", vcpus=2, ram_mb=8192, start=False)
    a3.config.write_text(a3.config.read_text().replace("[node]\n", "[node]\ncpu_allocation_ratio = 1.5\n"))
    a3.start()
    cluster.wait_hosts("node3")
    wait_for(lambda: cluster.hosts()["node3"]["vcpus"] == 3, what="node3 offers 2 x 1.5 vcpus")


@pytest.mark.parametrize("placement,expected", [("spread", [3, 3, 3]), ("pack", [0, 4, 5])])
def test_placement_spread_and_pack_with_three_agents(ctl, cluster: Cluster, store, placement: str,
                                                     expected: list[int]) -> None:
    """Every agent computes the same placement from its view: spread gives
    equal nodes equal shares, pack fills the fullest node that fits first;
    about one node tries each VM (no lost claim race here)."""
    cluster.flavour("small", 1, 512)
    store.put(store.keys.config, json.dumps({"placement": placement}).encode())
    for n in ("node1", "node2", "node3"):
        cluster.agent(n, vcpus=5, ram_mb=8192)
    cluster.wait_hosts("node1", "node2", "node3")
    vms = [f"p{i}" for i in range(9)]
    for vm in vms:
        assert ctl("create", vm, "--flavour", "small").exit_code == 0
    states = cluster.wait_running(vms)
    per_node = Counter(h for _, h in states.values())
    assert sorted(per_node.get(n, 0) for n in ("node1", "node2", "node3")) == expected, per_node
    assert sum(a.log().count("lost the claim race") for a in cluster.agents) == 0


def test_strict_anti_affinity_under_a_race(ctl, cluster: Cluster, store) -> None:
    cluster.flavour("small", 1, 512)
    vms = [f"s{i}" for i in range(10)]
    for vm in vms:
        assert ctl("create", vm, "--flavour", "small", "--group", "db", "--strict").exit_code == 0
    cluster.agent("node1"), cluster.agent("node2")  # both start on the full list at once
    cluster.wait_hosts("node1", "node2")
    wait_for(lambda: sorted(s for s, _ in cluster.states().values()) == ["running", "running"],
             what="one VM of the group per node")
    hosts = [h for _, h in cluster.states().values()]
    assert sorted(hosts) == ["node1", "node2"]
    guards = {k.rsplit("/", 1)[1]: json.loads(e.value)["vm"]
              for k, e in store.list_prefix(store.keys.dir("groups"))[1].items()}
    assert set(guards) == {"node1", "node2"} and all(cluster.states()[vm][1] == n for n, vm in guards.items())
    rows = {r["name"]: r for r in json.loads(ctl("list", "-o", "json").stdout)}
    waiting = [r for r in rows.values() if r["state"] == "pending"]
    assert len(waiting) == 8 and all("strict group db already there" in r["reason"] for r in waiting)
    # destroying one frees its node for the next one (its guard key goes with it)
    gone = next(vm for vm, (s, h) in cluster.states().items() if h == "node1")
    assert ctl("destroy", gone, "--yes", "--wait", "--timeout", "30").exit_code == 0
    wait_for(lambda: sorted(h for _, h in cluster.states().values()) == ["node1", "node2"],
             what="another VM of the group on node1")


def test_strict_group_guard_key_is_checked_in_the_claim_transaction(ctl, cluster: Cluster, store) -> None:
    """The planner does not see guard keys; the claim's transaction does: a
    guard naming another VM on node1 (here on a lease of the test's own)
    keeps node1 from claiming, whatever its view says."""
    cluster.flavour("small", 1, 512)
    lease = store.grant_lease(60)
    store.put(store.keys.group_guard("db", "node1"), json.dumps({"vm": "other"}).encode(), lease)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    assert ctl("create", "s1", "--flavour", "small", "--group", "db", "--strict").exit_code == 0
    wait_for(lambda: "strict group db already has a VM here" in cluster.agents[0].log(), what="claim refused")
    assert "s1" not in cluster.actual()
    store.revoke_lease(lease)
    cluster.wait_running(["s1"])


def test_syslog_lines_name_the_vm_and_the_node_and_a_node_seen_dead(ctl, cluster: Cluster) -> None:
    import signal
    import socket
    import threading
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    lines: list[str] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                lines.append(sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                continue
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    try:
        cluster.flavour("small", 1, 512)
        agents = []
        for n in ("node1", "node2"):
            a = cluster.agent(n, start=False)
            a.config.write_text(a.config.read_text().replace(
                "syslog = none", f"syslog = udp://127.0.0.1:{sock.getsockname()[1]}"))
            agents.append(a.start())
        cluster.wait_hosts("node1", "node2")
        assert ctl("create", "sl1", "--flavour", "small", "--host", "node2", "--wait", "--timeout", "30").exit_code == 0
        wait_for(lambda: any("vm=sl1 decision=run" in line for line in lines), 10, what="the VM decision lines")
        line = next(line for line in lines if "vm=sl1 decision=claim" in line)
        assert "node=node2" in line and "vm=sl1 decision=claim: claimed" in line
        line = next(line for line in lines if "vm=sl1 decision=run" in line)  # the start: a decision of its own
        assert "node=node2" in line and "vm=sl1 decision=run: started" in line
        agents[1].signal(signal.SIGKILL)
        wait_for(lambda: any("lost=node2: node seen dead" in line and "node=node1" in line for line in lines), 15,
                 what="node1 logs node2's death")
    finally:
        stop.set()
        t.join(2)
        sock.close()


def test_evacuate_fences_a_node_whose_agent_then_releases_its_vms(ctl, cluster: Cluster, store) -> None:
    """`host evacuate node1` is refused while the other nodes lack room
    (nothing written). With room, node2 (the first node that takes work)
    fences node1. node1's address is not its own here, so nothing
    blocklists its disks' clients: while its agent is stuck (SIGSTOP; its
    lease lives 60 s) nothing moves and its lease is not revoked (a stuck
    agent may be starting a VM). Once node1 answers, it sees its fence and
    releases its VMs itself (each domain removed first); they restart on
    the others, and the one pinned to node1 waits. node1 stays fenced and
    cordoned (unfence is refused) until `host uncordon`."""
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1", start=False)
    n1.config.write_text(n1.config.read_text().replace(f"lease_ttl = {cluster.ttl}", "lease_ttl = 60"))
    n1.start()
    cluster.wait_hosts("node1")
    vms = ["e0", "e1", "e2"]
    for vm in vms + ["pin"]:
        assert ctl("create", vm, "--flavour", "small", *(["--host", "node1"] if vm == "pin" else [])).exit_code == 0
    cluster.wait_running(vms + ["pin"])
    n2 = cluster.agent("node2", vcpus=2, ram_mb=4096)  # room for 2 of the 3
    cluster.wait_hosts("node2")
    before = node_record(store, "node1")
    r = ctl("host", "evacuate", "node1", "--yes")
    assert r.exit_code == 1 and "lack room for 1 of the 3 VM(s) on node1" in r.output, r.output
    assert node_record(store, "node1") == before
    cluster.agent("node3", vcpus=8, ram_mb=16384)
    cluster.wait_hosts("node3")
    lease = cluster.store.get(cluster.keys.host("node1")).lease
    n1.signal(signal.SIGSTOP)
    try:
        r = ctl("host", "evacuate", "node1", "--yes", "--reason", "bad DIMM", "--deadline", "2")
        assert r.exit_code == 4 and "3 VM(s) not claimed elsewhere yet" in r.output, r.output
        wait_for(lambda: "node=node1 evacuate: fenced" in n2.log(), 15, what="node2 to fence node1")
        assert "its agent releases its VMs when it sees the fence" in n2.log()
        assert json.loads(cluster.store.get(cluster.keys.fence("node1")).value)["by"] == "node2"
        assert cluster.store.lease_ttl(lease)[0] > 0  # not revoked: no blocklist guards its disks
        assert all(cluster.states()[vm][1] == "node1" for vm in vms)
        rec = node_record(store, "node1")
        assert rec["evacuate"] is True and rec["cordon"] is True and rec["reason"] == "bad DIMM"
        hosts = {h["node"]: h for h in json.loads(ctl("hosts", "-o", "json").stdout)}
        assert hosts["node1"]["scheduling"]["evacuate"] is True
        mark = len(n1.log())
    finally:
        n1.signal(signal.SIGCONT)

    def moved() -> dict:
        s = cluster.states()
        return s if all(s.get(vm, ("", ""))[0] == "running" and s[vm][1] in ("node2", "node3") for vm in vms) else {}
    states = wait_for(moved, 30, what="node1's VMs running on node2 and node3")
    assert "pin" not in states
    wait_for(lambda: "fenced (evacuated)" in n1.log()[mark:], 30, what="node1 to stay fenced")
    assert all(f"vm={vm} decision=release" in n1.log()[mark:] for vm in vms + ["pin"]), n1.log()[mark:]
    assert "decision=claim" not in n1.log()[mark:]
    assert "revoking its lease" not in n2.log() and cluster.store.lease_ttl(lease)[0] > 0
    r = ctl("host", "evacuate", "node1", "--yes", "--deadline", "5")  # re-run: follows, reports
    assert r.exit_code == 0 and "stays: pinned here (stopped while it is evacuated)" in r.output, r.output
    wait_for(lambda: json.loads(cluster.store.get(cluster.keys.fence("node1")).value)["state"] == "clean", 15,
             what="node1 to mark its fence clean")
    assert cluster.hosts()["node1"]["state"] == "fenced"
    r = ctl("host", "unfence", "node1", "--yes")
    assert r.exit_code == 1 and "is evacuated" in r.output, r.output
    assert ctl("host", "uncordon", "node1").exit_code == 0
    wait_for(lambda: cluster.store.get(cluster.keys.fence("node1")) is None, 30, what="node1 lifts its clean fence")
    wait_for(lambda: cluster.hosts()["node1"]["state"] == "ready", 30, what="node1 takes work again")
    assert cluster.wait_running(["pin"], 30)["pin"] == ("running", "node1")
    assert node_record(store, "node1").get("evacuate") is None
