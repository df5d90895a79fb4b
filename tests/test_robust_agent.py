"""Issue #6 at the agent level: one bad key stays one VM's problem, and
console tails do not wake the agents. Real etcd, real agent processes on
libvirt test:/// hosts."""
from __future__ import annotations

import json
import re
import time

from harness import AgentProc, Cluster, wait_for


def claims(cluster: Cluster) -> dict[str, dict]:
    """vm -> actual record, skipping values that are not JSON objects (the
    test itself plants one)."""
    _, entries = cluster.store.list_prefix(cluster.keys.shards)
    out = {}
    for key, entry in entries.items():
        if (cluster.keys.split(key) or ("",))[0] != "actual":
            continue  # the shards hold desired entries too
        try:
            obj = json.loads(entry.value)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out[key.rsplit("/", 1)[1]] = obj
    return out


def debug_agent(cluster: Cluster, name: str, **kw: int) -> AgentProc:
    """An agent logging at DEBUG: one 'view snapshot' line per snapshot
    (a reconcile tick takes one or two)."""
    agent = cluster.agent(name, start=False, **kw)
    agent.config.write_text(agent.config.read_text().replace("[logging]\n", "[logging]\nlevel = DEBUG\n"))
    return agent.start()


def test_hostile_values_affect_only_their_own_key(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.agent("node2")
    cluster.wait_hosts("node1", "node2")
    deep = b"[" * 100_000
    s, k = cluster.store, cluster.keys
    s.put(k.desired("bad"), deep)
    s.put(k.desired("badtyped"), b'{"flavour": ["small"], "state": {"x": 1}, "host": 5, "image": []}')
    s.put(k.desired("usesbadflavour"), b'{"flavour": "badflav"}')
    s.put(k.desired("usesbadimage"), b'{"flavour": "small", "image": "badimg"}')
    s.put(k.flavour("badflav"), deep)
    s.put(k.image("badimg"), deep)
    s.put(k.actual("badactual"), deep)
    s.put(k.host("ghost"), deep)
    s.put(k.host("ghost2"), b'{"vcpus": "8", "ram_mb": {}, "vms": -1}')
    cluster.desire("good")
    good = wait_for(lambda: claims(cluster).get("good", {}).get("state") == "running" and claims(cluster)["good"],
                    30, what="good running")
    assert good["host"] in ("node1", "node2")

    def errors() -> dict:
        return {vm: a["reason"] for vm, a in claims(cluster).items() if a["state"] == "error"}
    errs = wait_for(lambda: len(e := errors()) >= 4 and e, 20, what="4 error states")
    assert "nested too deeply" in errs["bad"]
    assert "'flavour' must be a flavour name" in errs["badtyped"]
    assert "flavour 'badflav' is malformed" in errs["usesbadflavour"]
    assert "image 'badimg' is malformed" in errs["usesbadimage"]
    assert all(len(r) < 300 for r in errs.values())
    for a in cluster.agents:
        assert a.alive()
        assert "unexpected error" not in a.log()


def test_console_tails_do_not_wake_the_agent(cluster: Cluster) -> None:
    """Console keys live under the watched prefix; putting many of them must
    not make the agent reconcile (each reconcile takes one view snapshot,
    logged at DEBUG)."""
    cluster.ttl = 12  # few keep-alive driven wake-ups during the measurement
    cluster.flavour("small", 1, 512)
    agent = debug_agent(cluster, "node1")
    cluster.wait_hosts("node1")
    cluster.desire("vm1")
    cluster.wait_running(["vm1"])
    time.sleep(0.5)

    def snapshots() -> int:
        return len(re.findall(r"DEBUG view snapshot at revision", agent.log()))
    before = snapshots()
    assert before > 0, agent.log()
    for i in range(100):
        cluster.store.put(cluster.keys.console(f"vm{i % 3}"), f"line {i}\n".encode())
        time.sleep(0.01)
    time.sleep(0.5)
    woken = snapshots() - before
    assert woken <= 6, f"{woken} snapshots during 100 console puts"
    # a real change still wakes it at once
    cluster.desire("vm2")
    cluster.wait_running(["vm1", "vm2"], 5)


def test_a_burst_of_claims_takes_no_snapshot_per_claim(cluster: Cluster) -> None:
    """40 VMs wait when the agent starts: its first tick claims them all.
    Working out the claim spread must not take a view snapshot per claim."""
    cluster.flavour("small", 1, 128)
    vms = [f"b{i}" for i in range(40)]
    for vm in vms:
        cluster.desire(vm)
    agent = debug_agent(cluster, "node1", vcpus=64, ram_mb=65536)
    cluster.wait_running(vms, 60)
    snapshots = len(re.findall(r"DEBUG view snapshot at revision", agent.log()))
    assert snapshots < 25, f"{snapshots} snapshots for 40 claims"
