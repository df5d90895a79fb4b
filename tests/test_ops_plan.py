"""Pure layer for issue #7 (operations): why a VM waits, node records with
cordon/drain state. Tables, no I/O."""
from __future__ import annotations

import json

import pytest

import metastack as ms
from metastack import ActualVM, DesiredVM, Flavour, HostState, NodeRecord, Snapshot, SpecError

FLAVOURS = {"small": Flavour(1, 512), "big": Flavour(4, 4096)}


def host(cpu: int = 4, ram: int = 8192, used_cpu: int = 0, used_ram: int = 0, state: str = "ready",
         cannot=()) -> HostState:
    return HostState(cpu, ram, used_cpu, used_ram, 0, state, "", tuple(cannot), lease=7)


def snap(desired, hosts, nodes=None, actual=None, images=None) -> Snapshot:
    s = Snapshot(dict(desired), dict(actual or {}), dict(FLAVOURS), dict(hosts))
    s.nodes = dict(nodes or {})
    s.images = dict(images or {})
    return s


def vm(flavour: str = "small", **kw) -> DesiredVM:
    return DesiredVM("a", flavour, **kw)


@pytest.mark.parametrize("desired,hosts,nodes,expected", [
    # no live node at all; the lost ones are named
    (vm(), {}, {"n1": NodeRecord()}, "no live node (known but lost: n1)"),
    (vm(), {}, {}, "no live node"),
    # flavour or image missing
    (vm("huge"), {"n1": host()}, {}, "unknown flavour 'huge'"),
    (vm(image="deb"), {"n1": host()}, {}, "unknown image 'deb'"),
    # a malformed entry
    (SpecError("'state' must be 'running' or 'stopped', got 'x'"), {"n1": host()}, {}, "'state' must be"),
    # no node has the room: the largest free amounts, with where
    (vm("big"), {"n1": host(4, 8192, 2, 0), "n2": host(8, 8192, 0, 6144)}, {},
     "0/2 live node(s) can take it: too small: n1, n2 (needs 4 vcpus and 4096 MiB RAM; "
     "largest free: 8 vcpus on n2, 8192 MiB on n1)"),
    # pin to a node that is not there, that is lost, that is cordoned
    (vm(host="n9"), {"n1": host()}, {}, "pinned to n9, which is not a known node"),
    (vm(host="n2"), {"n1": host()}, {"n2": NodeRecord(lost_at="2026-11-25T23:00:00Z")},
     "pinned to n2, which is not live, lost since 2026-11-25T23:00:00Z"),
    (vm(host="n1"), {"n1": host(), "n2": host()}, {"n1": NodeRecord(cordon=True, reason="disk swap")},
     "0/1 live node(s) can take it (pinned to n1): cordoned: n1 (disk swap)"),
    # every node is cordoned, draining, fenced or gave it up
    (vm(), {"n1": host(), "n2": host(), "n3": host(state="fenced"), "n4": host(cannot=[("a", "no ceph")])},
     {"n1": NodeRecord(cordon=True), "n2": NodeRecord(drain=True, reason="kernel")},
     "0/4 live node(s) can take it: cordoned: n1; draining: n2 (kernel); fenced: n3; gave it up: n4 (no ceph)"),
    # a node has room: nobody refused, a claim is due
    (vm(), {"n1": host(), "n2": host(1, 512, 1, 512)}, {}, "not claimed yet: n1 has room"),
])
def test_pending_reason_table(desired, hosts, nodes, expected) -> None:
    why = ms.pending_reason("a", snap({"a": desired}, hosts, nodes))
    assert why.startswith(expected), why


def test_pending_reason_is_empty_for_claimed_and_unknown_vms() -> None:
    s = snap({"a": vm()}, {"n1": host()}, actual={"a": ActualVM(host="n1", state="running", lease=7)})
    assert ms.pending_reason("a", s) == ""
    assert ms.pending_reason("nope", s) == ""


def test_node_record_keeps_every_field_and_unknown_keys() -> None:
    raw = json.dumps({"address": "10.0.0.1", "first_seen": "t0", "cordon": True, "reason": "r", "by": "ops",
                      "since": "t1", "rack": 4}).encode()
    rec = NodeRecord.parse("n1", raw)
    assert rec.cordon and not rec.drain and rec.unschedulable and rec.by == "ops"
    assert json.loads(rec.encode()) == json.loads(raw)
    assert NodeRecord.parse("n1", b'{"cordon": "yes"}').cordon is False  # only a real true counts
    assert json.loads(NodeRecord(address="a", first_seen="t").encode()) == {"address": "a", "first_seen": "t"}
