"""The cluster view parses each key once per revision and keeps no console
tails (issue #6, finding 10). Pure: no etcd, no libvirt."""
from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import metastack as ms
from metastack import ActualVM, DesiredVM, Entry, Flavour, HostState, Image, KeyEvent

# -- the cluster view: parse each key once per revision, ignore consoles ----------

class Counting:
    """Counts calls of the parse classmethods while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for cls in (DesiredVM, ActualVM, Flavour, Image, HostState):
            orig = cls.parse

            def counted(*args: object, _orig=orig) -> object:
                self.calls += 1
                return _orig(*args)
            monkeypatch.setattr(cls, "parse", counted)


def test_view_parses_each_key_once_per_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ms.Keys("/ms")
    entries = {keys.desired(f"vm{i}"): Entry(json.dumps({"flavour": "small"}).encode(), 10 + i, 0, 10 + i)
               for i in range(1000)}
    entries[keys.flavour("small")] = Entry(b'{"vcpus": 1, "ram_mb": 512}', 5, 0, 5)
    entries[keys.actual("vm0")] = Entry(ActualVM("n1", "running", vcpus=1, ram_mb=512).encode(), 2000, 7, 2000)
    entries[keys.host("n1")] = Entry(ms.HostState(4, 4096).encode(), 1999, 7, 1999)  # the claim's lease is n1's
    view = ms.ClusterView(keys)
    counter = Counting(monkeypatch)
    view.load(2000, entries)  # claims are parsed as they come (the index of use per node needs them)
    first = view.snapshot()
    assert counter.calls == 1003 and len(first.desired) == 1000
    counter.calls = 0
    view.snapshot()
    assert counter.calls == 0
    assert view.apply(2001, [KeyEvent(keys.desired("vm5"), b'{"flavour": "small", "state": "stopped"}', 2001, 0, 15)])
    assert view.apply(2002, [KeyEvent(keys.desired("vm6"), None, 2002)])
    snap = view.snapshot()
    assert counter.calls == 1
    assert snap.desired["vm5"].state == "stopped" and snap.desired["vm5"].generation == 15
    assert "vm6" not in snap.desired and snap.desired["vm7"].generation == 17
    assert ms.usage("n1", snap.actual) == (1, 512, 1)
    # our own write is parsed once, by whichever reader comes first
    view.note(keys.actual("vm1"), ActualVM("n1", "starting", vcpus=2, ram_mb=256).encode(), 2003, 7)
    assert view.usage("n1", 7) == (3, 768, 2)
    assert view.usage("n1", 7) == (3, 768, 2)
    assert view.usage("n1", 8) == (0, 0, 0)  # claims on another lease are not that lease's holder's
    assert view.snapshot().actual["vm1"].state == "starting"
    assert counter.calls == 2
    # a full re-list of unchanged keys parses nothing again
    now = {k: e for k in [*entries, keys.actual("vm1")] if (e := view.entry(k)) is not None}
    view.load(2003, now)
    counter.calls = 0
    assert len(view.snapshot().desired) == 999 and counter.calls == 0


def test_a_snapshot_gives_each_host_the_use_of_its_trusted_claims_as_they_change() -> None:
    """Host records carry no use: the snapshot sums the trusted claims,
    after every change, though the host record itself did not change."""
    keys = ms.Keys("/ms")
    view = ms.ClusterView(keys)
    view.load(10, {keys.host("n1"): Entry(HostState(8, 4096).encode(), 9, 7, 9),
                   keys.host("n2"): Entry(HostState(8, 4096).encode(), 9, 8, 9)})
    claim = ActualVM("n1", "running", vcpus=2, ram_mb=256).encode()
    use = lambda: {n: (h.vcpus_used, h.ram_mb_used, h.vms) for n, h in view.snapshot().hosts.items()}  # noqa: E731
    assert use() == {"n1": (0, 0, 0), "n2": (0, 0, 0)}
    view.apply(11, [KeyEvent(keys.actual("vm1"), claim, 11, 7, 11)])
    assert use() == {"n1": (2, 256, 1), "n2": (0, 0, 0)}
    view.apply(12, [KeyEvent(keys.actual("vm2"), claim, 12, 7, 12),
                    KeyEvent(keys.actual("vm3"), claim, 12, 8, 12)])  # on n2's lease, naming n1: untrusted
    assert use() == {"n1": (4, 512, 2), "n2": (0, 0, 0)}
    view.apply(13, [KeyEvent(keys.actual("vm1"), None, 13)])
    assert use() == {"n1": (2, 256, 1), "n2": (0, 0, 0)}
    assert HostState.parse(view.entry(keys.host("n1")).value).vcpus_used == 0  # the record itself: no use


def test_view_ignores_console_keys() -> None:
    keys = ms.Keys("/ms")
    view = ms.ClusterView(keys)
    view.load(10, {keys.console("vm1"): Entry(b"boot log", 9, 7, 9),
                   keys.desired("vm1"): Entry(b'{"flavour": "small"}', 8, 0, 8)})
    assert view.entry(keys.console("vm1")) is None
    assert view.apply(11, [KeyEvent(keys.console("vm1"), b"more", 11, 7, 9)]) is False
    assert view.apply(12, [KeyEvent(keys.console("vm2"), b"x", 12, 7, 12)]) is False
    assert view.entry(keys.console("vm2")) is None and view.revision == 12
    assert view.apply(13, [KeyEvent(keys.console("vm2"), b"y", 13, 7, 12),
                           KeyEvent(keys.desired("vm2"), b'{"flavour": "small"}', 13, 0, 13)]) is True
    assert view.apply(14, [KeyEvent(keys.desired("vm2"), b'{"flavour": "old"}', 12, 0, 12)]) is False  # stale
    assert view.snapshot().desired["vm2"].flavour == "small"
    assert set(view.snapshot().desired) == {"vm1", "vm2"}
    # History and consoles where agents before the side folder (~/) wrote them: not kept, no change.
    assert view.changes(15, [KeyEvent("/ms/console/vm1", b"old agent", 15, 7, 15),
                             KeyEvent("/ms/events/vm1/00000000000000000001-n1", b"{}", 15, 8, 15),
                             KeyEvent(keys.event("vm1", 2, "n1"), b"{}", 15, 8, 15)]) == []
    assert view.entry("/ms/console/vm1") is None and view.entry("/ms/events/vm1/00000000000000000001-n1") is None


# -- the incremental index (issue #7: work per event proportional to the change) ---

OPS = st.lists(st.tuples(st.sampled_from(["desired", "actual", "hosts", "relist"]), st.integers(0, 5),
                         st.sampled_from(["n1", "n2", "n3"]), st.integers(1, 3), st.booleans()),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
@example([("desired", 0, "n1", 1, False), ("actual", 0, "n1", 1, False), ("actual", 0, "n1", 1, True)])
@example([("hosts", 0, "n1", 1, False), ("actual", 1, "n1", 1, False), ("actual", 1, "n2", 1, False),
          ("actual", 1, "n2", 1, True), ("hosts", 0, "n1", 2, False)])
def test_the_index_agrees_with_a_full_snapshot_after_any_changes(ops) -> None:
    """unclaimed VMs, use per live host and the light snapshot, kept per
    change, equal what a full snapshot computes from scratch, whatever the
    order of creates, updates, deletes and re-lists."""
    keys = ms.Keys("/ms")
    view = ms.ClusterView(keys)
    view.load(1, {keys.flavour("small"): Entry(b'{"vcpus": 1, "ram_mb": 512}', 1, 0, 1)})
    rev = 1
    for kind, i, node, lease, delete in ops:
        rev += 1
        if kind == "relist":
            view.load(rev, {k: e for k in [keys.flavour("small")] + [keys.desired(f"vm{j}") for j in range(6)]
                            + [keys.actual(f"vm{j}") for j in range(6)] + [keys.host(n) for n in ("n1", "n2", "n3")]
                            if (e := view.entry(k)) is not None})
            continue
        key = {"desired": keys.desired(f"vm{i}"), "actual": keys.actual(f"vm{i}"), "hosts": keys.host(node)}[kind]
        value = {"desired": json.dumps({"flavour": "small"}).encode(),
                 "actual": ActualVM(node, "running", vcpus=i + 1, ram_mb=100 * (i + 1)).encode(),
                 "hosts": HostState(8, 4096 + i).encode()}[kind]
        view.apply(rev, [KeyEvent(key, None if delete else value, rev, lease if kind != "desired" else 0, rev)])
    snap = view.snapshot()
    claimed = set(snap.actual) | set(snap.untrusted)
    assert view.unclaimed() == set(snap.desired) - claimed
    light, use = view.light()
    assert set(light.desired) == set(snap.desired) - claimed and not light.actual
    # The light snapshot holds the offers; the full one adds the use of the trusted claims.
    assert {n: h.with_use(0, 0, 0) for n, h in light.hosts.items()} == \
        {n: h.with_use(0, 0, 0) for n, h in snap.hosts.items()}
    for n, h in snap.hosts.items():
        cpu, ram, vms = ms.usage(n, snap.actual)
        assert use[n] == (cpu, ram), n
        assert (h.vcpus_used, h.ram_mb_used, h.vms) == (cpu, ram, vms), n
    created = {n: e.create_revision for n in snap.desired if (e := view.entry(keys.desired(n))) is not None}
    for pending in (set(light.desired), set(light.desired) | set(list(snap.desired)[:2])):
        oldest = min(((created[n], n) for n in pending), default=None)
        expect = [] if oldest is None else sorted(
            (created[vm], vm, c.host, c.vcpus, c.ram_mb) for vm, c in snap.actual.items()
            if vm in created and (created[vm], vm) > oldest)
        assert view.recent_claims(pending, snap.hosts) == expect


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(st.booleans(), min_size=60, max_size=60))
def test_a_snapshot_kept_per_change_equals_one_taken_from_scratch(ops, look) -> None:
    """snapshot() looks only at the keys changed since the last one; after
    any creates, updates, deletes and re-lists, with snapshots taken in
    between or not, it equals the snapshot of a fresh view that lists the
    same keys."""
    keys = ms.Keys("/ms")
    view = ms.ClusterView(keys)
    view.load(1, {keys.flavour("small"): Entry(b'{"vcpus": 1, "ram_mb": 512}', 1, 0, 1)})
    every = [keys.flavour("small")] + [keys.desired(f"vm{j}") for j in range(6)] \
        + [keys.actual(f"vm{j}") for j in range(6)] + [keys.host(n) for n in ("n1", "n2", "n3")]
    rev = 1
    for (kind, i, node, lease, delete), now in zip(ops, look):
        rev += 1
        if kind == "relist":
            view.load(rev, {k: e for k in every if (e := view.entry(k)) is not None and (i % 2 or "desired" not in k)})
        else:
            key = {"desired": keys.desired(f"vm{i}"), "actual": keys.actual(f"vm{i}"), "hosts": keys.host(node)}[kind]
            value = {"desired": json.dumps({"flavour": "small", "state": ["running", "stopped"][lease % 2]}).encode(),
                     "actual": ActualVM(node, "running", vcpus=i + 1, ram_mb=100 * (i + 1)).encode(),
                     "hosts": HostState(8, 4096 + i).encode()}[kind]
            view.apply(rev, [KeyEvent(key, None if delete else value, rev, lease if kind != "desired" else 0, rev)])
        if now:
            fresh = ms.ClusterView(keys)
            fresh.load(rev, {k: e for k in every if (e := view.entry(k)) is not None})
            assert view.snapshot() == fresh.snapshot()
