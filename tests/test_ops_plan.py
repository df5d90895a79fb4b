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


# -- the planner's new inputs: cordon, drain, moves, resize ---------------------

CAP = ms.Capacity(4, 8192)


def kinds(actions) -> dict[str, str]:
    return {a.vm: a.kind for a in actions}


def claim(host_: str = "n1", cpu: int = 1, ram: int = 512, state: str = "running") -> ActualVM:
    return ActualVM(host=host_, state=state, vcpus=cpu, ram_mb=ram, lease=7)


def two_nodes(desired, actual=None, nodes=None, moves=None, other_free=(4, 8192)) -> Snapshot:
    s = snap(desired, {"n1": host(), "n2": host(4, 8192, 4 - other_free[0], 8192 - other_free[1])},
             nodes, actual)
    s.moves = dict(moves or {})
    return s


def test_cordoned_node_claims_nothing_new_but_keeps_and_re_claims_its_own() -> None:
    s = two_nodes({"a": DesiredVM("a", "small"), "b": DesiredVM("b", "small"), "c": DesiredVM("c", "small")},
                  {"c": claim()})
    acts = kinds(ms.plan("n1", CAP, s, {"b": "running", "c": "running"}, cordoned=True))
    assert acts == {"b": "claim", "c": "run"}  # b: our running domain (a lease lost in an outage)
    assert kinds(ms.plan("n1", CAP, s, {"c": "running"})) == {"a": "claim", "b": "claim", "c": "run"}


@pytest.mark.parametrize("handing,other_free,expected", [
    # one at a time: the first VM in name order is released, the rest run on
    ((), (4, 8192), {"a": "release", "b": "run", "p": "run"}),
    # one handed over and not yet claimed elsewhere: wait for it
    (("x",), (4, 8192), {"a": "run", "b": "run", "p": "run"}),
    # no room elsewhere: keep them all
    ((), (0, 0), {"a": "run", "b": "run", "p": "run"}),
])
def test_draining_node_hands_vms_over_one_at_a_time(handing, other_free, expected) -> None:
    desired = {n: DesiredVM(n, "small") for n in ("a", "b", "x")}
    desired["p"] = DesiredVM("p", "small", host="n1")  # pinned here: stays
    s = two_nodes(desired, {"a": claim(), "b": claim(), "p": claim()}, other_free=other_free)
    acts = ms.plan("n1", CAP, s, {"a": "running", "b": "running", "p": "running"}, draining=True, handing=handing)
    assert {k: v for k, v in kinds(acts).items() if k != "x"} == expected
    assert "x" not in kinds(acts)  # draining: no new claim
    assert all(a.reason == "node is draining: handed over" for a in acts if a.kind == "release")


def test_move_request_hands_the_vm_over_and_keeps_it_from_coming_back() -> None:
    move = ms.MoveRequest("n1")
    s = two_nodes({"a": DesiredVM("a", "small")}, {"a": claim()}, moves={"a": move})
    assert kinds(ms.plan("n1", CAP, s, {"a": "running"})) == {"a": "release"}
    s.actual = {}
    assert kinds(ms.plan("n1", CAP, s, {})) == {}  # released: n1 does not claim it back
    assert kinds(ms.plan("n2", CAP, s, {})) == {"a": "claim"}
    # no room elsewhere: it stays where it is
    s = two_nodes({"a": DesiredVM("a", "small")}, {"a": claim()}, moves={"a": move}, other_free=(0, 0))
    assert kinds(ms.plan("n1", CAP, s, {"a": "running"})) == {"a": "run"}
    # a mode this agent does not know (a future live migration) is left alone
    s = two_nodes({"a": DesiredVM("a", "small")}, {"a": claim()}, moves={"a": ms.MoveRequest("n1", "live")})
    assert kinds(ms.plan("n1", CAP, s, {"a": "running"})) == {"a": "run"}


def test_resize_takes_effect_when_the_domain_is_not_running() -> None:
    s = two_nodes({"a": DesiredVM("a", "big")}, {"a": claim(cpu=1, ram=512)})
    # running: keeps what it reserved
    [act] = ms.plan("n1", CAP, s, {"a": "running"})
    assert (act.kind, act.vcpus, act.ram_mb) == ("run", 1, 512)
    # stopped (or gone): the new size, since the difference fits
    [act] = ms.plan("n1", CAP, s, {"a": "stopped"})
    assert (act.kind, act.vcpus, act.ram_mb) == ("run", 4, 4096)
    # does not fit here any more: released to a node with room
    [act] = ms.plan("n1", ms.Capacity(2, 8192), s, {"a": "stopped"})
    assert (act.kind, act.reason) == ("release", "resized: does not fit here")


def test_move_request_parse() -> None:
    m = ms.MoveRequest.parse("a", b'{"from": "n1", "by": "ops@x", "at": "t"}')
    assert (m.from_node, m.mode) == ("n1", "cold") and ms.MoveRequest.parse("a", m.encode()) == m
    with pytest.raises(SpecError):
        ms.MoveRequest.parse("a", b'{"from": "N 1"}')
    assert ms.Keys("/p").split("/p/moves/a") == ("moves", "a")


# -- overcommit, anti-affinity groups, placement ------------------------------

def test_cluster_config_parse_and_effective_capacity() -> None:
    assert ms.ClusterConfig.parse(b"{}") == ms.ClusterConfig(1.0, 1.0, "spread")
    c = ms.ClusterConfig.parse(b'{"cpu_allocation_ratio": 4, "ram_allocation_ratio": 1.5, "placement": "pack"}')
    assert c == ms.ClusterConfig(4.0, 1.5, "pack")
    for bad in (b'{"cpu_allocation_ratio": 0}', b'{"ram_allocation_ratio": "2"}', b'{"placement": "random"}',
                b'{"cpu_allocation_ratio": true}'):
        with pytest.raises(SpecError):
            ms.ClusterConfig.parse(bad)
    assert ms.effective_capacity(4, 1000, 2.5, 1.5) == (10, 1500)


def test_ini_allocation_ratio_override(tmp_path) -> None:
    p = tmp_path / "a.ini"
    p.write_text("[node]\nname = n1\ncpu_allocation_ratio = 3\n")
    cfg = ms.load_config(str(p))
    assert cfg.cpu_allocation_ratio == 3.0 and cfg.ram_allocation_ratio is None
    p.write_text("[node]\nname = n1\nram_allocation_ratio = 0\n")
    with pytest.raises(ms.ConfigError, match=r"\[node\] ram_allocation_ratio"):
        ms.load_config(str(p))


def test_desired_group_fields() -> None:
    d = DesiredVM.parse("a", b'{"flavour": "small", "group": "db", "strict": true}')
    assert (d.group, d.strict) == ("db", True) and d.to_json() == {"flavour": "small", "state": "running",
                                                                   "group": "db", "strict": True}
    for bad, why in ((b'{"flavour": "small", "strict": true}', "needs a 'group'"),
                     (b'{"flavour": "small", "group": "DB"}', "'group' must be"),
                     (b'{"flavour": "small", "group": "db", "strict": 1}', "'strict' must be")):
        with pytest.raises(SpecError, match=why):
            DesiredVM.parse("a", bad)


def grouped(strict: bool, n: int = 3) -> dict[str, DesiredVM]:
    return {f"g{i}": DesiredVM(f"g{i}", "small", group="db", strict=strict) for i in range(n)}


def test_strict_group_claims_one_per_node_even_when_room_is_plenty() -> None:
    s = two_nodes(grouped(True))
    assert list(kinds(ms.plan("n1", CAP, s, {})).values()) == ["claim"]
    s.actual = {"g0": claim("n1")}
    assert kinds(ms.plan("n1", CAP, s, {"g0": "running"})) == {"g0": "run"}
    assert len([k for k in kinds(ms.plan("n2", CAP, s, {})).values() if k == "claim"]) == 1
    # its own running domain is re-claimed all the same: the claim's guard key decides
    s.actual = {}
    assert kinds(ms.plan("n1", CAP, s, {"g0": "running", "g1": "running"})) == {"g0": "claim", "g1": "claim"}
    why = ms.pending_reason("g2", two_nodes(grouped(True), {"g0": claim("n1"), "g1": claim("n2")}))
    assert why == "0/2 live node(s) can take it: strict group db already there: n1 (g0), n2 (g1)"


def test_non_strict_group_prefers_spreading_but_doubles_up_when_it_must() -> None:
    s = two_nodes(grouped(False), {"g0": claim("n1")})
    # n2 has none of the group and room: n1 leaves the others to it
    assert kinds(ms.plan("n1", CAP, s, {"g0": "running"})) == {"g0": "run"}
    # n2 takes both: after its first, no node holds fewer of the group than it does
    assert kinds(ms.plan("n2", CAP, s, {})) == {"g1": "claim", "g2": "claim"}
    s = two_nodes(grouped(False, 4), {"g0": claim("n1")})
    s.hosts["n3"] = host()
    # n2 after one claim holds as many as n1, but n3 holds none: n2 claims one, leaves the rest
    assert list(kinds(ms.plan("n2", CAP, s, {})).values()) == ["claim"]
    # n2 is full: n1 takes them
    s = two_nodes(grouped(False), {"g0": claim("n1")}, other_free=(0, 0))
    assert kinds(ms.plan("n1", CAP, s, {"g0": "running"})) == {"g0": "run", "g1": "claim", "g2": "claim"}
