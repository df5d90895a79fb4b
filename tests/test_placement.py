"""Pure layer for issue #7 (placement at scale): Placement (the placement
every agent computes the same way) and ClaimTurns (whose turn it is to
claim). Tables and properties, no I/O, no clock."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import metastack as ms
from metastack import ActualVM, DesiredVM, Flavour, HostState, MoveRequest, NodeRecord, Snapshot, SpecError

FLAVOURS = {"small": Flavour(1, 1024), "big": Flavour(4, 4096)}


def hosts(n: int, cpu: int = 16, ram: int = 32768, **over: HostState) -> dict[str, HostState]:
    out = {f"n{i}": HostState(cpu, ram, lease=100 + i) for i in range(1, n + 1)}
    out.update(over)
    return out


def cluster(n_hosts: int, vms: int, flavour: str = "small", actual=None, **kw) -> Snapshot:
    desired = {f"vm{i:03d}": DesiredVM(f"vm{i:03d}", flavour, generation=10 + i) for i in range(vms)}
    s = Snapshot(desired, dict(actual or {}), dict(FLAVOURS), kw.pop("hs", None) or hosts(n_hosts))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def claim(host: str, lease: int, flavour: Flavour = FLAVOURS["small"]) -> ActualVM:
    return ActualVM(host, "running", vcpus=flavour.vcpus, ram_mb=flavour.ram_mb, lease=lease)


def test_spread_gives_equal_nodes_equal_shares_and_every_agent_agrees() -> None:
    s = cluster(6, 60)
    chosen = ms.Placement(s, "spread").assign()
    assert len(chosen) == 60
    assert sorted(Counter(chosen.values()).values()) == [10] * 6
    # another agent with the same view (a fresh object, another order of dict keys) gets the same answer
    s2 = Snapshot(dict(reversed(list(s.desired.items()))), {}, dict(FLAVOURS), dict(reversed(list(s.hosts.items()))))
    assert ms.Placement(s2, "spread").assign() == chosen


def test_spread_starts_from_what_claims_reserve_and_fills_the_emptiest_first() -> None:
    actual = {f"old{i}": claim("n1", 101) for i in range(8)}
    s = cluster(2, 4, actual=actual)
    for i in range(8):
        s.desired[f"old{i}"] = DesiredVM(f"old{i}", "small", generation=1)
    assert set(ms.Placement(s, "spread").assign().values()) == {"n2"}


def test_pack_fills_the_fullest_node_that_fits_first() -> None:
    s = cluster(3, 20, hs=hosts(3, cpu=8, ram=65536))
    counts = Counter(ms.Placement(s, "pack").assign().values())
    assert sorted(counts.values()) == [4, 8, 8]  # two full nodes, the rest on the third


def test_nothing_is_assigned_beyond_capacity() -> None:
    s = cluster(2, 10, flavour="big", hs=hosts(2, cpu=8, ram=65536))
    chosen = ms.Placement(s, "spread").assign()
    assert sorted(Counter(chosen.values()).values()) == [2, 2]
    assert set(chosen) == {"vm000", "vm001", "vm002", "vm003"}  # the oldest first


def test_pins_cannot_moves_cordon_fenced_and_strict_groups_are_honoured() -> None:
    hs = hosts(4)
    hs["n2"] = HostState(16, 32768, cannot=(("vm001", "no ceph"),), lease=102)
    hs["n4"] = HostState(16, 32768, state="fenced", lease=104)
    s = Snapshot({"vm000": DesiredVM("vm000", "small", host="n3", generation=1),
                  "vm001": DesiredVM("vm001", "small", generation=2),
                  "vm002": DesiredVM("vm002", "small", generation=3),
                  "g1": DesiredVM("g1", "small", generation=4, group="db", strict=True),
                  "g2": DesiredVM("g2", "small", generation=5, group="db", strict=True),
                  "g3": DesiredVM("g3", "small", generation=6, group="db", strict=True),
                  "g4": DesiredVM("g4", "small", generation=7, group="db", strict=True)},
                 {}, dict(FLAVOURS), hs)
    s.nodes = {"n1": NodeRecord(cordon=True)}
    s.moves = {"vm002": MoveRequest("n2")}
    chosen = ms.Placement(s, "spread").assign()
    assert chosen["vm000"] == "n3"
    assert chosen["vm001"] == "n3" and chosen["vm002"] == "n3"  # n1 cordoned, n2 cannot / is the move's source
    groups = [chosen.get(g) for g in ("g1", "g2", "g3", "g4")]
    assert sorted(g for g in groups if g) == ["n2", "n3"] and groups.count(None) == 2  # one per schedulable node


def test_a_malformed_entry_goes_to_one_ready_node() -> None:
    s = cluster(5, 0)
    s.desired["bad"] = SpecError("'state' must be 'running' or 'stopped'")
    a = ms.Placement(s, "spread").assign()["bad"]
    assert a in s.hosts and ms.Placement(s, "pack").assign()["bad"] == a
    assert ms.Placement(s).backups("bad", a) and a not in ms.Placement(s).backups("bad", a)


@pytest.mark.parametrize("which", ["first", "last", "scattered"])
def test_claims_made_as_assigned_in_any_order_leave_the_rest_of_the_assignment_unchanged(which: str) -> None:
    """Agents see claims in different orders and at different moments: as
    long as each VM went where the placement said, the placement of the
    rest is the same (claims are replayed in creation order for ranking)."""
    s = cluster(5, 50)
    chosen = ms.Placement(s, "spread").assign()
    order = {"first": sorted(chosen), "last": sorted(chosen, reverse=True),
             "scattered": sorted(chosen, key=lambda vm: hash(vm) % 7)}[which]
    done = Counter[str]()
    for vm in order:  # each node claims two of its VMs, in that order
        if done[chosen[vm]] < 2:
            done[chosen[vm]] += 1
            s.actual[vm] = claim(chosen[vm], int(chosen[vm][1:]) + 100)
    again = ms.Placement(s, "spread").assign()
    assert again == {vm: n for vm, n in chosen.items() if vm not in s.actual}
    # the look from the view's index (use and recent claims instead of snap.actual) agrees
    light = Snapshot({vm: d for vm, d in s.desired.items() if vm not in s.actual}, {}, dict(FLAVOURS), s.hosts)
    use = {n: (sum(c.vcpus for c in s.actual.values() if c.host == n),
               sum(c.ram_mb for c in s.actual.values() if c.host == n)) for n in s.hosts}
    oldest = min(d.generation for d in light.desired.values())
    recent = [(s.desired[vm].generation, vm, c.host, c.vcpus, c.ram_mb) for vm, c in s.actual.items()
              if s.desired[vm].generation > oldest]
    assert ms.Placement(light, "spread", use, recent).assign() == again


def test_turns_the_chosen_node_at_once_backups_one_step_apart() -> None:
    s = cluster(4, 1)
    chosen = ms.Placement(s, "spread").assign()["vm000"]
    backups = ms.Placement(s).backups("vm000", chosen)
    assert len(backups) == 3 and chosen not in backups
    turns = {n: ms.ClaimTurns(n, 1.0) for n in s.hosts}
    at0 = {n: t.due(s, "spread", (), 100.0) for n, t in turns.items()}
    assert {n for n, (mine, _) in at0.items() if mine} == {chosen}
    assert at0[backups[0]][1] == 101.0 and at0[backups[2]][1] == 101.0  # wake at the first step to look again
    assert turns[backups[0]].due(s, "spread", (), 100.9)[0] == set()
    assert turns[backups[0]].due(s, "spread", (), 101.0)[0] == {"vm000"}
    mine, nxt = turns[backups[2]].due(s, "spread", (), 101.5)
    assert mine == set() and nxt == 103.0
    assert turns[backups[2]].due(s, "spread", (), 103.0)[0] == {"vm000"}
    # held VMs are nobody's turn; step 0: everyone tries at once (the old race)
    assert ms.ClaimTurns(chosen, 1.0).due(s, "spread", {"vm000"}, 0.0)[0] == set()
    assert ms.ClaimTurns(backups[1], 0.0).due(s, "spread", (), 0.0)[0] == {"vm000"}


def test_backups_leave_a_chosen_node_that_still_claims_its_queue() -> None:
    """The chosen node's progress (its claims' reservation changing) pushes
    the backups' turn to one step after its last progress (at most PATIENCE
    steps after the VM was first seen once it claimed a newer VM); a node
    that stops claiming is stepped over one step later."""
    s = cluster(3, 1)
    chosen = ms.Placement(s, "pack").assign()["vm000"]
    first = ms.Placement(s).backups("vm000", chosen)[0]
    turns = ms.ClaimTurns(first, 1.0)
    use = {n: (0, 0) for n in s.hosts}

    def due(now: float) -> tuple[set[str], object]:
        return turns.due(s, "pack", (), now, dict(use), [])

    assert due(100.0) == (set(), 101.0)
    use[chosen] = (2, 2048)  # the chosen node claimed two other VMs at 100.8: it works through its queue
    assert due(100.8) == (set(), 101.8)
    assert due(101.0)[0] == set()
    assert due(101.8)[0] == {"vm000"}  # no progress for a step: the backup steps in
    # a chosen node that keeps claiming VMs created before this one (its
    # queue, however long) is left to it, past PATIENCE steps ...
    turns = ms.ClaimTurns(first, 1.0)
    due(200.0)
    for i, now in enumerate((200.5, 201.5, 203.5, 205.5, 207.5, 209.5, 211.5, 213.5)):
        use[chosen] = (3 + i, 1024 * (3 + i))
        assert due(now)[0] == set(), now
    # ... but once it claimed one created after this VM (it passed this one
    # by), the backups step in PATIENCE steps after they first saw it
    newer = [(s.desired["vm000"].generation + 1, "later", chosen, 1, 1024)]
    assert turns.due(s, "pack", (), 209.9, dict(use), newer)[0] == set()
    assert turns.due(s, "pack", (), 210.0, dict(use), newer)[0] == {"vm000"}


def test_plan_claims_only_what_is_its_turn_but_always_re_claims_its_running_domain() -> None:
    s = cluster(2, 3)
    acts = ms.plan("n1", ms.Capacity(16, 32768), s, {"vm002": "running"}, claimable={"vm000"})
    assert sorted(a.vm for a in acts if a.kind == "claim") == ["vm000", "vm002"]
    acts = ms.plan("n1", ms.Capacity(16, 32768), s, {}, claimable=set())
    assert not acts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 8)), min_size=1, max_size=12),
       st.lists(st.sampled_from(["small", "big"]), max_size=60), st.sampled_from(["spread", "pack"]))
def test_at_time_zero_each_vm_is_exactly_one_nodes_turn_and_fits_there(nodes, flavours, policy) -> None:
    hs = {f"n{i}": HostState(cpu, gb * 1024, lease=100 + i) for i, (cpu, gb) in enumerate(nodes)}
    desired = {f"vm{i:03d}": DesiredVM(f"vm{i:03d}", f, generation=i + 1) for i, f in enumerate(flavours)}
    s = Snapshot(desired, {}, dict(FLAVOURS), hs)
    mine = {n: ms.ClaimTurns(n, 1.0).due(s, policy, (), 0.0)[0] for n in hs}
    owners = Counter(vm for vms in mine.values() for vm in vms)
    assert all(c == 1 for c in owners.values())
    for n, vms in mine.items():
        assert sum(FLAVOURS[desired[v].flavour].vcpus for v in vms) <= hs[n].vcpus
        assert sum(FLAVOURS[desired[v].flavour].ram_mb for v in vms) <= hs[n].ram_mb
    # a VM nobody got found no room in the simulation, and rooms only shrink: no node has room for it now
    for vm in set(desired) - set(owners):
        f = FLAVOURS[desired[vm].flavour]
        room = [n for n in hs if hs[n].vcpus - sum(FLAVOURS[desired[v].flavour].vcpus for v in mine[n]) >= f.vcpus
                and hs[n].ram_mb - sum(FLAVOURS[desired[v].flavour].ram_mb for v in mine[n]) >= f.ram_mb]
        assert not room, (vm, room)


STEPS = st.lists(st.one_of(
    st.tuples(st.just("arrive"), st.integers(1, 6), st.sampled_from(["small", "big"])),
    st.tuples(st.just("arrive claimed"), st.integers(1, 4), st.sampled_from(["small", "big"])),
    st.tuples(st.just("claim as placed, then arrive"), st.integers(0, 30), st.sampled_from(["small", "big"])),
    st.tuples(st.just("claim as placed"), st.integers(0, 30)),
    st.tuples(st.just("claim elsewhere"), st.integers(0, 30), st.integers(1, 4)),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("cordon"), st.integers(1, 4)),
    st.tuples(st.just("resize the big flavour"), st.integers(2, 6)),
    st.tuples(st.just("pin"), st.integers(0, 30), st.integers(1, 4)),
    st.tuples(st.just("look"),)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(STEPS, st.sampled_from(["spread", "pack"]))
@example([("arrive", 1, "small"), ("arrive claimed", 2, "big"), ("claim as placed, then arrive", 0, "small"),
          ("look",)], "spread")  # a claim newer than the last VM looked at, made before any look saw it waiting
def test_the_memo_answers_exactly_what_a_fresh_assignment_would(steps: list[tuple], policy: str) -> None:
    """Whatever happens between two looks (arrivals, arrivals claimed before
    any look saw them, claims as placed or elsewhere, deletions, a node
    cordoned, a pending VM's entry changed),
    the memo's answer equals a fresh Placement.assign on the same view, by
    the full snapshot and by the view's index (use and recent claims)."""
    s = cluster(4, 0, hs=hosts(4, cpu=12, ram=24576))
    turns = ms.ClaimTurns("n1", 1.0)
    gen = 10
    for step in steps:
        pending = sorted((vm for vm in s.desired if vm not in s.actual), key=lambda vm: s.desired[vm].generation)
        last = turns.last_chosen
        if step[0] == "arrive":
            for _ in range(step[1]):
                gen += 1
                s.desired[f"vm{gen:03d}"] = DesiredVM(f"vm{gen:03d}", step[2], generation=gen)
        elif step[0] == "arrive claimed":  # claimed before any look saw it waiting
            gen += 1
            s.desired[f"vm{gen:03d}"] = DesiredVM(f"vm{gen:03d}", step[2], generation=gen)
            node = f"n{step[1]}"
            s.actual[f"vm{gen:03d}"] = claim(node, s.hosts[node].lease, FLAVOURS[step[2]])
        elif step[0] == "claim as placed, then arrive":  # two changes before the next look
            if pending and last.get(vm := pending[step[1] % len(pending)]) is not None:
                node = last[vm]
                s.actual[vm] = claim(node, s.hosts[node].lease, FLAVOURS[s.desired[vm].flavour])
            gen += 1
            s.desired[f"vm{gen:03d}"] = DesiredVM(f"vm{gen:03d}", step[2], generation=gen)
        elif step[0] in ("claim as placed", "claim elsewhere") and pending:
            vm = pending[step[1] % len(pending)]
            node = last.get(vm) if step[0] == "claim as placed" else f"n{step[2]}"
            if node is not None:
                s.actual[vm] = claim(node, s.hosts[node].lease, FLAVOURS[s.desired[vm].flavour])
        elif step[0] == "delete" and pending:
            del s.desired[pending[step[1] % len(pending)]]
        elif step[0] == "resize the big flavour":
            s.flavours = {**s.flavours, "big": Flavour(step[1], step[1] * 1024)}
        elif step[0] == "cordon":
            s.nodes = {**s.nodes, f"n{step[1]}": NodeRecord(cordon=True)}
        elif step[0] == "pin" and pending:
            vm = pending[step[1] % len(pending)]
            s.desired[vm] = DesiredVM(vm, s.desired[vm].flavour, host=f"n{step[2]}", generation=s.desired[vm].generation)
        else:
            light = Snapshot({vm: d for vm, d in s.desired.items() if vm not in s.actual}, {}, s.flavours, s.hosts,
                             nodes=s.nodes)
            use = {n: (sum(c.vcpus for c in s.actual.values() if c.host == n),
                       sum(c.ram_mb for c in s.actual.values() if c.host == n)) for n in s.hosts}
            oldest = min(((d.generation, vm) for vm, d in light.desired.items()), default=None)
            recent = [] if oldest is None else sorted(
                (s.desired[vm].generation, vm, c.host, c.vcpus, c.ram_mb) for vm, c in s.actual.items()
                if vm in s.desired and (s.desired[vm].generation, vm) > oldest)
            turns.due(light, policy, (), 100.0, use, recent)
            assert turns.last_chosen == ms.Placement(s, policy).assign()
            continue
        turns.due(s, policy, (), 100.0)
        assert turns.last_chosen == ms.Placement(s, policy).assign()


def test_the_memo_is_reused_when_claims_go_where_they_were_placed() -> None:
    s = cluster(6, 60)
    turns = ms.ClaimTurns("n1", 1.0)
    turns.due(s, "spread", (), 100.0)
    first = dict(turns.last_chosen)
    for vm in sorted(first)[::3]:
        s.actual[vm] = claim(first[vm], s.hosts[first[vm]].lease)
    turns.due(s, "spread", (), 100.5)
    assert turns.memo.reused == 1
    assert turns.last_chosen == {vm: n for vm, n in first.items() if vm not in s.actual}
    s.actual["vm001"] = claim("n1" if first["vm001"] != "n1" else "n2", 101 if first["vm001"] != "n1" else 102)
    turns.due(s, "spread", (), 101.0)
    assert turns.memo.reused == 1  # a claim elsewhere: assigned afresh


def test_the_memo_places_new_arrivals_from_where_it_ended() -> None:
    """A burst: between two looks VMs arrive (newer than every pending
    one) and some are claimed where they were placed. The answer is a
    fresh assignment's, yet only the arrivals are simulated; a VM that is
    not the newest (seen late) makes a fresh assignment."""
    s = cluster(6, 30, hs=hosts(6, cpu=16, ram=32768))
    turns = ms.ClaimTurns("n1", 1.0)
    gen = 10 + 30
    for round_ in range(6):
        turns.due(s, "spread", (), 100.0 + round_)
        assert turns.last_chosen == ms.Placement(s, "spread").assign()
        placed = dict(turns.last_chosen)
        for vm in sorted(placed)[:4]:  # the chosen nodes claim the oldest ones
            s.actual[vm] = claim(placed[vm], s.hosts[placed[vm]].lease)
        for _ in range(5):
            gen += 1
            s.desired[f"vm{gen:03d}"] = DesiredVM(f"vm{gen:03d}", "small", generation=gen)
    assert turns.memo.extended == 5 and turns.memo.reused == 5
    # nodes fill up: arrivals beyond the capacity wait, and the answer still is a fresh one's
    for _ in range(30):
        gen += 1
        s.desired[f"vm{gen:03d}"] = DesiredVM(f"vm{gen:03d}", "big", generation=gen)
    turns.due(s, "spread", (), 110.0)
    assert turns.memo.extended == 6
    assert turns.last_chosen == ms.Placement(s, "spread").assign()
    assert len(turns.last_chosen) < len([vm for vm in s.desired if vm not in s.actual])
    # a VM created before the last one looked at (it was not pending then): assigned afresh
    s.desired["late"] = DesiredVM("late", "small", generation=45)
    turns.due(s, "spread", (), 111.0)
    assert turns.memo.extended == 6 and turns.last_chosen == ms.Placement(s, "spread").assign()


def test_the_memo_places_afresh_when_every_vm_it_looked_at_is_claimed() -> None:
    """Every VM of the last look claimed, and a VM newer than all of them
    claimed before it was seen: the next arrival is placed afresh (its
    ranking must count that claim), not from where the last look ended."""
    s = Snapshot({"o1": DesiredVM("o1", "small", generation=1), "o2": DesiredVM("o2", "small", generation=2),
                  "a": DesiredVM("a", "small", generation=10), "b": DesiredVM("b", "big", generation=11)},
                 {"o1": claim("n1", 101), "o2": claim("n1", 101), "b": claim("n2", 102, FLAVOURS["big"])},
                 dict(FLAVOURS), hosts(2, cpu=8, ram=8192))
    turns = ms.ClaimTurns("n1", 1.0)
    turns.due(s, "spread", (), 100.0)
    assert turns.last_chosen == {"a": "n2"}
    s.actual["a"] = claim("n2", 102)
    s.desired["c"] = DesiredVM("c", "small", generation=12)
    turns.due(s, "spread", (), 101.0)
    assert turns.last_chosen == ms.Placement(s, "spread").assign() == {"c": "n1"}
    assert turns.memo.extended == 0


def test_the_memo_is_not_reused_when_two_claims_swapped_nodes() -> None:
    """Two VMs of the same size claimed each where the other was placed:
    every node's reservation is as if placed, but the ranking replay differs."""
    s = cluster(6, 60)
    turns = ms.ClaimTurns("n1", 1.0)
    turns.due(s, "spread", (), 100.0)
    first = dict(turns.last_chosen)
    a, b = "vm010", next(vm for vm in sorted(first) if vm > "vm030" and first[vm] != first["vm010"])
    s.actual[a] = claim(first[b], s.hosts[first[b]].lease)
    s.actual[b] = claim(first[a], s.hosts[first[a]].lease)
    turns.due(s, "spread", (), 100.5)
    fresh = ms.Placement(s, "spread").assign()
    assert turns.last_chosen == fresh and turns.memo.reused == 0
    assert fresh != {vm: n for vm, n in first.items() if vm not in s.actual}  # reusing would have been wrong


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 8)), min_size=1, max_size=10),
       st.lists(st.sampled_from(["small", "big"]), max_size=40), st.integers(0, 20),
       st.sampled_from(["small", "big"]), st.sampled_from(["spread", "pack"]), st.integers(1, 3))
def test_the_forecast_names_the_node_that_gets_the_next_arrival(nodes, flavours, claimed, arriving, policy,
                                                                count) -> None:
    """ClaimTurns.expected (the nodes that look at new work at once) holds
    the node a fresh placement gives the next VM to arrive (unpinned, in no
    group), whatever the pending VMs and claims before it."""
    hs = {f"n{i}": HostState(cpu, gb * 1024, lease=100 + i) for i, (cpu, gb) in enumerate(nodes)}
    desired = {f"vm{i:03d}": DesiredVM(f"vm{i:03d}", f, generation=i + 1) for i, f in enumerate(flavours)}
    s = Snapshot(desired, {}, dict(FLAVOURS), hs)
    placed = ms.Placement(s, policy).assign()
    for vm in sorted(placed)[:claimed]:  # some of them claimed as placed (the rest still pending)
        f = FLAVOURS[desired[vm].flavour]
        s.actual[vm] = ActualVM(placed[vm], "running", vcpus=f.vcpus, ram_mb=f.ram_mb, lease=hs[placed[vm]].lease)
    turns = ms.ClaimTurns("n0", 1.0)
    turns.FORECAST = count
    turns.due(s, policy, (), 0.0)
    assert turns.expected is not None and len(turns.expected) <= count * len(FLAVOURS)
    s.desired["new"] = DesiredVM("new", arriving, generation=1000)
    taker = ms.Placement(s, policy).assign().get("new")
    if taker is None:
        return  # no node has room for it: nobody need look at once
    assert taker in turns.expected


def test_the_forecast_skips_the_node_the_pending_vms_fill() -> None:
    """The forecast counts what the last assignment gave each node: with
    two equal nodes and one VM pending for n1, the next VM is n2's."""
    s = cluster(2, 1)
    turns = ms.ClaimTurns("n1", 1.0)
    turns.FORECAST = 1
    mine, _ = turns.due(s, "spread", (), 0.0)
    given_to = ms.Placement(s, "spread").assign()["vm000"]
    other = "n2" if given_to == "n1" else "n1"
    assert turns.expected == frozenset({other})
    race = ms.ClaimTurns("n1", 0.0)  # step 0: every node tries at once, so every node looks at once
    race.expected = frozenset({"n2"})
    race.due(s, "spread", (), 0.0)
    assert race.expected is None
