"""Issue #6 at the agent level: one bad key stays one VM's problem. Real
etcd, real agent processes on libvirt test:/// hosts."""
from __future__ import annotations

import json

from harness import Cluster, wait_for


def claims(cluster: Cluster) -> dict[str, dict]:
    """vm -> actual record, skipping values that are not JSON objects (the
    test itself plants one)."""
    _, entries = cluster.store.list_prefix(cluster.keys.dir("actual"))
    out = {}
    for key, entry in entries.items():
        try:
            obj = json.loads(entry.value)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out[key.rsplit("/", 1)[1]] = obj
    return out


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
