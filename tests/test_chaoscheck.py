"""The chaos checker's own logic on made-up timelines (fast, no testbed)."""
from __future__ import annotations

from pathlib import Path

from chaoscheck import NodeInfo, Qemu, Sample, Timeline, Watcher, addr_ip, in_ranges, parse_blocklist

NODES = [NodeInfo(f"node{i}", f"10.213.0.{10 + i}", 1000 + i, Path("/nonexistent")) for i in (1, 2, 3)]
A1, A2 = "10.213.0.11:0/111", "10.213.0.12:0/222"


def sample(t: float, qemus=(), watchers=(), blocklist=(), ranges=(), actual=None, desired=("vm1",), boots=1):
    qs: dict = {}
    for vm, node, pid in qemus:
        qs.setdefault(vm, []).append(Qemu(vm, node, pid, pid * 10))
    ws: dict = {}
    for vm, addr in watchers:
        ip = addr_ip(addr)
        ws.setdefault(vm, []).append(Watcher(addr, ip, addr in blocklist or in_ranges(ip, ranges)))
    return Sample(t, qs, {"vm1": "vm-vm1-g5"}, ws, frozenset(blocklist), tuple(ranges), True,
                  frozenset(desired), actual if actual is not None else {}, {}, {}, {"vm1": boots})


def timeline(*samples: Sample) -> Timeline:
    tl = Timeline(NODES)
    for s in samples:
        tl.add(s)
    return tl


def test_parse_blocklist_reads_clients_and_pacific_ranges() -> None:
    out = (b'[{"addr":"10.213.0.12:0/123","until":"2026-11-25T23:25:48.050308+0000"}]'
           b'[{"range":"10.213.0.11:0/32","until":"2026-11-25T23:25:47.771946+0000"}]')
    assert parse_blocklist(out) == ({"10.213.0.12:0/123"}, ["10.213.0.11/32"])
    assert parse_blocklist(b"[]") == (set(), [])
    assert addr_ip("v1:10.213.0.11:0/42") == addr_ip("10.213.0.11:0/42") == "10.213.0.11"
    assert in_ranges("10.213.0.11", ["10.213.0.11/32"]) and not in_ranges("10.213.0.12", ["10.213.0.11/32"])


def test_two_unfenced_watchers_held_for_two_samples_are_a_violation() -> None:
    both = [("vm1", A1), ("vm1", A2)]
    tl = timeline(sample(0.0, watchers=both), sample(0.25, watchers=both))
    assert tl.unfenced_writers() == ["t=0.25 vm1: 2 unfenced watchers ['10.213.0.11:0/111', '10.213.0.12:0/222']"]
    # A lock-break open seen in one sample only is not.
    tl = timeline(sample(0.0, watchers=[("vm1", A1)]), sample(0.25, watchers=both), sample(0.5, watchers=[("vm1", A2)]))
    assert tl.unfenced_writers() == []
    # A blocklisted old writer (client or whole node range) is fenced.
    tl = timeline(sample(0.0, watchers=both, blocklist=[A1]), sample(0.25, watchers=both, blocklist=[A1]))
    assert tl.unfenced_writers() == []
    tl = timeline(sample(0.0, watchers=both, ranges=["10.213.0.11/32"]),
                  sample(0.25, watchers=both, ranges=["10.213.0.11/32"]))
    assert tl.unfenced_writers() == []


def test_two_qemus_are_a_violation_unless_one_is_fenced() -> None:
    two = [("vm1", "node1", 11), ("vm1", "node2", 22)]
    # node1's QEMU was seen watching with A1; A1 is blocklisted later, and its watch vanishes.
    tl = timeline(sample(0.0, qemus=[("vm1", "node1", 11)], watchers=[("vm1", A1)]),
                  sample(0.25, qemus=two, blocklist=[A1]), sample(0.5, qemus=two, blocklist=[A1]))
    assert tl.unfenced_writers() == []
    tl = timeline(sample(0.0, qemus=[("vm1", "node1", 11)], watchers=[("vm1", A1)]),
                  sample(0.25, qemus=two), sample(0.5, qemus=two))
    assert tl.unfenced_writers() == ["t=0.50 vm1: unfenced QEMUs on ['node1', 'node2']"]


def test_gaps_in_the_timeline_are_reported() -> None:
    tl = timeline(sample(10.0), sample(10.25), sample(13.0))
    assert tl.blind_spots(10.0, 13.5) == ["no sample from t=10.25 to t=13.00 (2.8 s)"]
    assert tl.blind_spots(9.0, 10.25) == []


def test_move_time_restarts_lost_entries_and_stale_copies() -> None:
    on1 = {"vm1": {"host": "node1", "state": "running"}}
    on2 = {"vm1": {"host": "node2", "state": "running"}}
    tl = timeline(
        sample(10.0, qemus=[("vm1", "node1", 11)], watchers=[("vm1", A1)], actual=on1, boots=1),
        sample(15.0, qemus=[("vm1", "node1", 11), ("vm1", "node2", 22)], watchers=[("vm1", A2)],
               blocklist=[A1], actual={"vm1": {"host": "node2", "state": "starting"}}),
        sample(16.0, qemus=[("vm1", "node1", 11), ("vm1", "node2", 22)], watchers=[("vm1", A2)],
               blocklist=[A1], actual=on2, desired=(), boots=2),
        sample(17.0, qemus=[("vm1", "node2", 22)], watchers=[("vm1", A2)], blocklist=[A1], actual=on2, boots=2))
    assert tl.moved(["vm1"], "node1", 10.0) == {"vm1": (6.0, "node2")}
    assert tl.fenced_before_start(["vm1"], "node1", 10.0) == []
    assert tl.restarts("vm1", 10.0) == (1, 1)
    assert tl.restarts("vm1", 16.5) == (0, 0)
    assert tl.lost_desired(["vm1"]) == ["t=16.00 desired entries missing: ['vm1']"]
    assert tl.stale_qemus(tl.window(16.0, 16.0)[0]) == ["vm1: QEMU pid 11 on node1, actual host node2"]
    assert tl.stale_qemus() == [] and tl.settled(["vm1"])
