"""Cells over sharded claims: the key layout, the cell map, what an agent's
view keeps, and agents in two cells on a real etcd (libvirt test:/// hosts)."""
from __future__ import annotations

import dataclasses
import json
import time
import zlib

import pytest

import metastack as ms
from harness import Cluster, wait_for

KEYS = ms.Keys("/ms")


def vm_in(cells: int, cell: int, start: int = 0, prefix: str = "v") -> str:
    """A VM name whose shard's home cell is ``cell`` (of ``cells``)."""
    return next(f"{prefix}{i}" for i in range(start, 10000)
                if ms.CellMap(cells, frozenset(range(cells))).home(ms.Keys.shard(f"{prefix}{i}")) == cell)


# -- the key layout --------------------------------------------------------------

def test_a_vm_lives_in_the_shard_of_its_name_and_the_old_folders_still_read() -> None:
    shard = zlib.crc32(b"web1") % 64  # documented: tools may compute it
    assert ms.Keys.shard("web1") == shard
    assert KEYS.actual("web1") == f"/ms/shards/{shard:02x}/actual/web1"
    assert KEYS.desired("web1") == f"/ms/shards/{shard:02x}/desired/web1"
    assert KEYS.split(KEYS.actual("web1")) == ("actual", "web1")
    assert KEYS.split(KEYS.desired("web1")) == ("desired", "web1")
    assert KEYS.split("/ms/actual/web1") == ("actual", "web1")  # the layout of before
    assert KEYS.split("/ms/desired/web1") == ("desired", "web1")
    assert KEYS.split(KEYS.pin_hint("n1", "web1")) == ("pins", "n1/web1")
    wrong = (shard + 1) % 64
    for key in (f"/ms/shards/{wrong:02x}/actual/web1", f"/ms/shards/{shard:02x}/hosts/web1",
                f"/ms/shards/{shard:02x}/actual/", f"/ms/shards/{shard:02x}/actual/a/b",
                f"/ms/shards/{shard}x/actual/web1", "/ms/pins/n1", "/ms/pins/n1/a/b"):
        assert KEYS.split(key) is None, key


def test_every_kind_an_agent_watches_sorts_before_the_shards() -> None:
    """An agent in a cell watches [all, shards) and its shards: a kind that
    sorted after "shards" would be missed."""
    for kind in ms.Keys.KINDS:
        if kind not in ms.Keys.SIDE_KINDS:
            assert KEYS.dir(kind) < KEYS.shards, kind
    assert KEYS.config < KEYS.shards and KEYS.group_guard("g", "n1") < KEYS.shards
    assert KEYS.shards < KEYS.watched_end  # with one cell the single range holds the shards too
    start, end = KEYS.shard_range(0, 64)
    assert start.startswith(KEYS.shards) and all(start <= KEYS.actual(f"v{i}") < end for i in range(200))


# -- the cell map --------------------------------------------------------------------

def test_each_cell_serves_a_contiguous_range_and_a_cell_without_nodes_is_adopted() -> None:
    full = ms.CellMap(4, frozenset(range(4)))
    ranges = [sorted(full.shards_of(c)) for c in range(4)]
    assert [len(r) for r in ranges] == [16, 16, 16, 16]
    assert all(r == list(range(r[0], r[-1] + 1)) for r in ranges)
    assert sorted(s for r in ranges for s in r) == list(range(64))
    gap = ms.CellMap(4, frozenset({0, 1, 3}))  # cell 2 has no live node: cell 3 serves its shards too
    assert gap.shards_of(3) == full.shards_of(2) | full.shards_of(3)
    assert gap.shards_of(2) == frozenset()
    wrap = ms.CellMap(4, frozenset({1}))
    assert wrap.shards_of(1) == frozenset(range(64))
    assert ms.CellMap(4, frozenset()).serving(0) is None


def test_a_node_cell_comes_from_its_ini_or_a_hash_of_its_name() -> None:
    assert ms.node_cell("n1", 1, 5) == 0
    assert ms.node_cell("n1", 4, 5) == 1
    assert ms.node_cell("n1", 4, None) == ms.node_cell("n1", 4, None) < 4
    assert len({ms.node_cell(f"n{i}", 4, None) for i in range(40)}) == 4


def test_hostile_cell_values_are_refused_with_their_reason() -> None:
    for bad in (0, -1, 65, True, "2", 1.5):
        with pytest.raises(ms.SpecError, match="'cells'"):
            ms.ClusterConfig.parse(json.dumps({"cells": bad}).encode())
    assert ms.ClusterConfig.parse(b'{"cells": 8}').cells == 8
    for bad in ({"cell": -1}, {"cell": 64}, {"cell": "1"}, {"cell": False}, {"foreign": []},
                {"foreign": {"vcpus": -2}}, {"foreign": {"vms": "x"}}):
        with pytest.raises(ms.SpecError):
            ms.HostState.parse(json.dumps({"vcpus": 4, "ram_mb": 1024, **bad}).encode())
    host = ms.HostState(4, 1024, cell=3, foreign=(2, 512, 1))
    again = ms.HostState.parse(host.encode())
    assert (again.cell, again.foreign) == (3, (2, 512, 1))
    assert b"cell" not in ms.HostState(4, 1024).encode()  # with no cells the record is as before


# -- what a view keeps ----------------------------------------------------------------

def _entry(value: dict, lease: int = 0, rev: int = 5) -> ms.Entry:
    return ms.Entry(json.dumps(value).encode(), rev, lease, rev)


def _cell_view(interest: ms.Interest, entries: dict[str, ms.Entry], node: str = "a1") -> ms.ClusterView:
    view = ms.ClusterView(KEYS)
    view.interest, view.node = interest, node
    view.load(10, entries)
    return view


def test_a_view_in_a_cell_keeps_its_cells_vms_and_its_own_and_counts_only_its_cells_claims() -> None:
    """Cell 0 of 2 (nodes a1, a2) and cell 1 (b1): a1's view keeps the VMs of
    cell 0's shards and a1's own VM of cell 1, no other VM of cell 1; a2's
    claims count for placement in the cell, a1's claim outside it only
    through the "foreign" use its host record states."""
    cmap = ms.CellMap(2, frozenset({0, 1}))
    mine0, other0, theirs1, mine1 = vm_in(2, 0), vm_in(2, 0, 500), vm_in(2, 1), vm_in(2, 1, 500)
    interest = ms.Interest(0, cmap.shards_of(0), frozenset({mine1}))
    hosts = {"a1": ms.HostState(8, 16384, cell=0, foreign=(1, 1024, 1)), "a2": ms.HostState(8, 16384, cell=0),
             "b1": ms.HostState(8, 16384, cell=1)}
    entries = {KEYS.host(n): ms.Entry(h.encode(), 3, i + 1, 3) for i, (n, h) in enumerate(hosts.items())}
    entries[KEYS.flavour("small")] = _entry({"vcpus": 1, "ram_mb": 1024})
    for vm in (mine0, other0, theirs1, mine1):
        entries[KEYS.desired(vm)] = _entry({"flavour": "small"})
    entries[KEYS.actual(other0)] = _entry({"host": "a2", "state": "running", "vcpus": 1, "ram_mb": 1024}, lease=2)
    entries[KEYS.actual(theirs1)] = _entry({"host": "b1", "state": "running", "vcpus": 1, "ram_mb": 1024}, lease=3)
    entries[KEYS.actual(mine1)] = _entry({"host": "a1", "state": "running", "vcpus": 1, "ram_mb": 1024}, lease=1)
    view = _cell_view(interest, entries)
    snap = view.snapshot()
    assert set(snap.desired) == {mine0, other0, mine1}
    assert set(snap.actual) == {other0, mine1}
    assert view.unclaimed() == {mine0}
    assert view.usage("a2", 2) == (1, 1024, 1) and view.usage("a1", 1) == (0, 0, 0)  # mine1: outside the cell
    assert view.foreign_use("a1", 1) == (1, 1024, 1)
    assert (snap.hosts["a1"].vcpus_used, snap.hosts["a1"].vms) == (1, 1)  # through its record's "foreign"
    placement = ms.Placement(snap)
    assert set(placement.bins) == {"a1", "a2"}  # b1 is another cell's
    assert (placement.bins["a1"].cpu, placement.bins["a2"].cpu) == (1, 1)
    assert placement.assign() == {mine0: ms.Placement(snap).assign()[mine0]}
    light, use = view.light()
    assert use["a1"] == (1, 1024) and use["a2"] == (1, 1024)
    recent = view.recent_claims(light.desired, light.hosts)
    assert ms.Placement(light, use=use, recent=recent).assign() == placement.assign()


def test_a_view_notes_a_vm_of_another_cell_pinned_to_its_node() -> None:
    cmap = ms.CellMap(2, frozenset({0, 1}))
    view = _cell_view(ms.Interest(0, cmap.shards_of(0), frozenset()), {})
    away, pinned = vm_in(2, 1), vm_in(2, 1, 500)
    changed = view.changes(20, [ms.KeyEvent(KEYS.desired(away), b'{"flavour": "small", "host": "b1"}', 20, 0, 20),
                                ms.KeyEvent(KEYS.desired(pinned), b'{"flavour": "small", "host": "a1"}', 21, 0, 21)])
    assert changed == [] and view.missed == {pinned}


def test_a_claim_in_its_shard_wins_over_one_in_the_old_folder_and_counts_once() -> None:
    view = ms.ClusterView(KEYS)
    host = ms.HostState(8, 16384)
    claim = {"host": "n1", "state": "running", "vcpus": 2, "ram_mb": 1024}
    view.load(10, {KEYS.host("n1"): ms.Entry(host.encode(), 3, 7, 3), KEYS.desired("w"): _entry({"flavour": "s"}),
                   KEYS.legacy_actual("w"): _entry({**claim, "state": "stopped"}, lease=7)})
    assert view.snapshot().actual["w"].state == "stopped" and view.usage("n1", 7) == (2, 1024, 1)
    view.note(KEYS.actual("w"), json.dumps(claim).encode(), 11, 7)
    assert view.snapshot().actual["w"].state == "running" and view.usage("n1", 7) == (2, 1024, 1)
    assert view.claim("w")[0] == KEYS.actual("w")
    view.note(KEYS.actual("w"), None, 12)
    assert view.snapshot().actual["w"].state == "stopped" and view.usage("n1", 7) == (2, 1024, 1)
    view.note(KEYS.legacy_actual("w"), None, 13)
    assert "w" not in view.snapshot().actual and view.usage("n1", 7) == (0, 0, 0)
    assert view.unclaimed() == {"w"}


# -- agents in two cells on a real etcd ---------------------------------------------

def _agent_in_cell(cluster: Cluster, name: str, cell: int, **size: int) -> None:
    """An agent process whose ini names its cell ([node] cell)."""
    proc = cluster.agent(name, start=False, **size)
    proc.config.write_text(proc.config.read_text().replace("[libvirt]", f"cell = {cell}\n[libvirt]", 1))
    proc.start()


def _settled(cluster: Cluster, *shards: int) -> None:
    """Wait until every agent's last listing watched one of ``shards``
    shards (each saw the other cells live: no adoption left from start-up)."""
    def last(a: object) -> str:
        lines = [ln for ln in a.log().splitlines() if "shards and" in ln]  # type: ignore[attr-defined]
        return lines[-1] if lines else ""
    wait_for(lambda: all(any(f"watching {n} of 64 shards" in last(a) for n in shards) for a in cluster.agents), 20,
             what="every agent watches its own cell's shards")


def _cells(cluster: Cluster, cells: int) -> None:
    cluster.store.put(cluster.keys.config, json.dumps({"cells": cells}).encode())


def test_agents_place_each_vm_in_its_cell_and_a_pin_crosses_cells(cluster: Cluster) -> None:
    """Two cells of two nodes: every VM is claimed by a node of the cell
    its shard belongs to, and runs; a VM pinned to a node of the other
    cell is claimed by that node, which states it as its foreign use."""
    cluster.flavour("small", 1, 1024)
    _cells(cluster, 2)
    for name, cell in (("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)):
        _agent_in_cell(cluster, name, cell)
    cluster.wait_hosts("a1", "a2", "b1", "b2")
    _settled(cluster, 32)
    vms = [vm_in(2, c, 100 * i) for i in range(3) for c in (0, 1)]
    for vm in vms:
        cluster.desire(vm)
    pinned = vm_in(2, 0, 900, "p")
    cluster.desire(pinned, host="b2")
    states = cluster.wait_running(vms + [pinned], 40)
    for vm in vms:
        cell = ms.CellMap(2, frozenset({0, 1})).home(ms.Keys.shard(vm))
        assert states[vm][1][0] == "ab"[cell], (vm, states[vm])
    assert states[pinned][1] == "b2"
    wait_for(lambda: cluster.hosts()["b2"].get("foreign", {}).get("vms") == 1, 10, what="b2 states its foreign VM")
    assert all(h.get("cell", 0) == (0 if n[0] == "a" else 1) for n, h in cluster.hosts().items())
    hint = cluster.keys.pin_hint("b2", pinned)
    assert cluster.store.get(hint) is not None  # cell 0 told b2, which watches no shard of cell 0
    # written by hand the old way (etcdctl, <prefix>/desired/<vm>): placed by its cell as well
    by_hand = vm_in(2, 1, 700, "h")
    cluster.etcd.etcdctl("put", cluster.keys.legacy_desired(by_hand), '{"flavour": "small"}')
    assert cluster.wait_running([by_hand], 30)[by_hand][1][0] == "b"
    cluster.undesire(pinned)
    wait_for(lambda: pinned not in cluster.states(), 20, what=f"{pinned} removed")
    wait_for(lambda: cluster.store.get(hint) is None, 20, what="the pin hint deleted")


def test_a_cell_without_nodes_is_adopted_and_its_vms_stay_put_when_it_returns(cluster: Cluster) -> None:
    """Cell 1 has no node: cell 0 serves its shards, so its VMs run. When
    a node of cell 1 comes, new VMs of cell 1 go to it, and the VM cell 0
    took stays where it runs (its claim untouched, stated as foreign)."""
    cluster.flavour("small", 1, 1024)
    _cells(cluster, 2)
    _agent_in_cell(cluster, "a1", 0)
    cluster.wait_hosts("a1")
    early = vm_in(2, 1)
    cluster.desire(early)
    assert cluster.wait_running([early], 30)[early] == ("running", "a1")
    before = cluster.store.get(cluster.keys.actual(early))
    _agent_in_cell(cluster, "b1", 1)
    cluster.wait_hosts("b1")
    wait_for(lambda: cluster.hosts()["a1"].get("foreign", {}).get("vms") == 1, 15, what="a1 states its foreign VM")
    late = vm_in(2, 1, 500)
    cluster.desire(late)
    assert cluster.wait_running([late], 30)[late] == ("running", "b1")
    after = cluster.store.get(cluster.keys.actual(early))
    assert after is not None and after.lease == before.lease and json.loads(after.value)["host"] == "a1"


def test_a_claim_in_the_old_folder_on_no_live_lease_is_replaced_in_its_shard(cluster: Cluster) -> None:
    """A claim written where claims lived before shards, naming a node that
    is not there, holds nobody's VM: an agent claims the VM in its shard
    and deletes the old key in the same transaction; metastackctl reads
    claims from both places."""
    cluster.flavour("small", 1, 1024)
    cluster.store.put(cluster.keys.legacy_actual("old1"), json.dumps(
        {"host": "gone", "state": "running", "vcpus": 1, "ram_mb": 1024}).encode())
    assert cluster.store.get_claim("old1") is not None
    cluster.desire("old1")
    cluster.agent("n1")
    wait_for(lambda: cluster.states().get("old1") == ("running", "n1"), 30, what="old1 runs on n1")
    wait_for(lambda: cluster.store.get(cluster.keys.legacy_actual("old1")) is None, 10, what="old key gone")
    assert json.loads(cluster.store.get_claim("old1").value)["host"] == "n1"


def test_why_a_vm_waits_names_only_the_nodes_of_its_cell() -> None:
    """A reader (metastackctl list, the web page) with cells: a VM of cell
    0 waits for room in cell 0, whatever room cell 1 has."""
    vm = vm_in(2, 0)
    entries = {KEYS.config: _entry({"cells": 2}), KEYS.flavour("big"): _entry({"vcpus": 8, "ram_mb": 1024}),
               KEYS.desired(vm): _entry({"flavour": "big"}),
               KEYS.host("a1"): ms.Entry(ms.HostState(4, 16384).encode(), 3, 1, 3),
               KEYS.host("b1"): ms.Entry(ms.HostState(16, 16384, cell=1).encode(), 3, 2, 3)}
    view = ms.ClusterView(KEYS)
    view.load(10, entries)
    snap = view.snapshot()
    why = ms.pending_reason(vm, snap)
    assert "too small: a1" in why and "b1" not in why, why
    del entries[KEYS.host("a1")]  # cell 0 has no live node: cell 1 serves its shards
    view.load(11, entries)
    assert "has room" in ms.pending_reason(vm, view.snapshot()) and "b1" in ms.pending_reason(vm, view.snapshot())


def test_create_is_refused_while_an_agent_of_before_the_shards_is_live(cluster: Cluster) -> None:
    """An agent of before reads desired entries and claims only at the old
    place: it would not see a VM made in a shard, and could take its disk
    for an orphan. metastackctl create refuses while one is live, and
    writes nothing."""
    import metastackctl as ctl
    cluster.flavour("small", 1, 1024)
    lease = cluster.store.grant_lease(30)
    try:
        cluster.store.put(cluster.keys.host("old1"), b'{"vcpus": 4, "ram_mb": 4096, "state": "ready"}', lease)
        with pytest.raises(ctl.AdminError, match="old1 run an agent older than the sharded key layout"):
            ctl.create_vm(cluster.store, "new1", "small")
        assert cluster.store.get_desired("new1") is None
        cluster.store.put(cluster.keys.host("old1"), ms.HostState(4, 4096).encode(), lease)  # upgraded
        ctl.create_vm(cluster.store, "new1", "small")
        assert cluster.store.get(cluster.keys.desired("new1")) is not None
    finally:
        cluster.store.revoke_lease(lease)


def test_destroy_deletes_the_entry_in_its_shard_and_one_written_the_old_way(cluster: Cluster) -> None:
    import metastackctl as ctl
    cluster.flavour("small", 1, 1024)
    cluster.desire("twice")
    cluster.store.put(cluster.keys.legacy_desired("twice"), b'{"flavour": "small"}')
    ctl.destroy_vm(cluster.store, "twice")
    assert cluster.store.get(cluster.keys.desired("twice")) is None
    assert cluster.store.get(cluster.keys.legacy_desired("twice")) is None


def test_a_lapse_seen_in_pieces_is_confirmed_with_etcd(cluster: Cluster) -> None:
    """With cells a lease's expiry comes on two watches: the claims' shards
    and the host record's base range. An agent that saw only the claims go
    asks etcd, once per lease, whether their lease still exists: gone, it
    folds in the host record's deletion at the revision of the last claim
    seen to vanish (the expiry's), so after a correlated loss the node's
    VMs are held for it, as with one watch; alive, the claim was deleted by
    its holder (a release), which stays."""
    cluster.flavour("small", 1, 1024)
    _cells(cluster, 2)
    proc = cluster.agent("n1", start=False)
    agent = ms.Agent(ms.load_config(str(proc.config)))  # never started: the test feeds its view
    leases = {n: cluster.store.grant_lease(30) for n in ("dead", "alive")}
    try:
        claims = {"dead-1": "dead", "dead-2": "dead", "dead-released": "dead", "alive-released": "alive"}
        for node, lease in leases.items():
            cluster.store.put(cluster.keys.host(node), ms.HostState(8, 16384).encode(), lease)
        for vm, node in claims.items():
            cluster.desire(vm)
            cluster.store.put(cluster.keys.actual(vm), ms.ActualVM(host=node, state="running", vcpus=1,
                                                                   ram_mb=1024).encode(), leases[node])
        rev, entries = cluster.store.list_prefix(cluster.keys.all)
        agent.view.load(rev, entries, interest=ms.Interest(0, frozenset(range(64)), frozenset()))
        at = {}
        for vm in ("dead-released", "alive-released"):  # releases: their holders' leases live on
            cluster.store.delete(cluster.keys.actual(vm))
            at[vm] = cluster.store.list_prefix(cluster.keys.config)[0]  # nothing else writes meanwhile
        cluster.store.revoke_lease(leases["dead"])  # etcd deletes its host record and claims in one revision
        expiry = at["dead-1"] = at["dead-2"] = cluster.store.list_prefix(cluster.keys.config)[0]
        for vm, revision in at.items():  # only the claims' watch has delivered: the host records look live
            agent.view.apply(revision, [ms.KeyEvent(cluster.keys.actual(vm), None, revision)])
        assert set(agent.view.unconfirmed_departures()) == set(claims)
        asked: list[int] = []
        lease_ttl = agent.store.lease_ttl  # the real etcd call, counted
        agent.store.lease_ttl = lambda lease: asked.append(lease) or lease_ttl(lease)  # type: ignore[method-assign]
        agent._confirm_departures()
        assert sorted(asked) == sorted(leases.values())  # once per lease
        assert agent.view.entry(cluster.keys.host("dead")) is None
        assert agent.view.lapsed["dead"][0] == expiry  # the expiry's revision, not the earlier release's
        snap = agent.view.snapshot()
        assert "dead" not in snap.hosts and "alive" in snap.hosts
        assert set(agent.view.unconfirmed_departures()) == {"alive-released"}
        agent._confirm_departures()  # nothing new vanished: etcd is not asked again
        assert len(asked) == 2
        agent._doubt = [[time.monotonic() - 1.0, time.monotonic()]]  # our own lease was in doubt: a correlated loss
        assert agent._held(snap) == {"dead-1", "dead-2"}  # held for their owner; a release is not
        # the watch brings the host record's deletion: nothing changes
        assert not agent.view.apply(expiry, [ms.KeyEvent(cluster.keys.host("dead"), None, expiry)])
        assert agent.view.lapsed["dead"][0] == expiry
    finally:
        agent.store.close()
        cluster.store.revoke_lease(leases["alive"])


def test_a_nodes_first_host_record_names_its_cell(cluster: Cluster) -> None:
    """The host record an agent creates at start-up, before it lists the
    prefix, already names the cell of its ini (readers compute the cell
    map from it)."""
    _cells(cluster, 2)
    _agent_in_cell(cluster, "b1", 1)
    cluster.wait_hosts("b1")
    created = cluster.store.get(cluster.keys.host("b1")).create_revision
    first = cluster.etcd.etcdctl("get", cluster.keys.host("b1"), f"--rev={created}", "--print-value-only")
    assert json.loads(first.stdout)["cell"] == 1


def test_a_listing_while_libvirt_fails_keeps_the_vms_defined_here(cluster: Cluster) -> None:
    """A VM of another cell defined on this node's hypervisor stays in the
    agent's interest when libvirt fails during a re-list (its claim would
    otherwise drop out of the view while its domain runs here)."""
    _cells(cluster, 2)
    proc = cluster.agent("a1", start=False)
    proc.config.write_text(proc.config.read_text().replace("[libvirt]", "cell = 0\n[libvirt]", 1))
    agent = ms.Agent(ms.load_config(str(proc.config)))  # never started: the test lists for it
    lease = cluster.store.grant_lease(30)
    try:
        cluster.store.put(cluster.keys.host("b1"), ms.HostState(8, 16384, cell=1).encode(), lease)  # cell 1 is live
        there = vm_in(2, 1)
        assert agent.hv.ensure_running(ms.DomainSpec(vm=there, node="a1", domain_type="test", vcpus=1,
                                                     ram_mb=64, flavour="small"))
        _, entries = cluster.store.list_prefix(cluster.keys.all)
        assert agent._interest_from(entries).extra == frozenset({there})
        agent.hv.close()
        agent.hv._uri = f"test://{proc.config.parent}/no-such-node.xml"  # libvirt cannot be reached now
        with pytest.raises(ms.HypervisorError):
            agent.hv.domains()
        assert agent._interest_from(entries).extra == frozenset({there})
    finally:
        agent.store.close()
        cluster.store.revoke_lease(lease)


def test_a_cell_whose_nodes_take_no_work_is_adopted() -> None:
    """A cell counts as live only through a node that takes work: on a
    lease, not fenced, neither cordoned, draining nor evacuated (a node
    degraded or recovering for a moment still counts). The nodes of a cell
    that is not live watch the shards of the cell that adopted theirs, and
    leave the chores to that cell."""
    def host(cell: int, state: str = "ready", lease: int = 7) -> ms.HostState:
        return ms.HostState(8, 16384, state=state, cell=cell, lease=lease)
    hosts = {"a1": host(0), "b1": host(1), "c1": host(2, "recovering"), "d1": host(3, "fenced"),
             "e1": host(4, "degraded"), "f1": host(5, lease=0), "g1": host(6), "h1": host(7)}
    nodes = {"g1": ms.NodeRecord(cordon=True), "h1": ms.NodeRecord(drain=True), "b1": ms.NodeRecord(address="x")}
    assert ms.CellMap.of(8, hosts, nodes).live == frozenset({0, 1, 2, 4})
    assert ms.CellMap.of(8, hosts, {}).live == frozenset({0, 1, 2, 4, 6, 7})
    assert ms.CellMap.of(8, hosts, {"a1": ms.NodeRecord(evacuate=True)}).live == frozenset({1, 2, 4, 6, 7})
    cmap = ms.CellMap(4, frozenset({0, 1}))  # cells 2 and 3 take no work: cell 0 serves their shards
    assert cmap.watched_by(0) == frozenset(range(16)) | frozenset(range(32, 64)) == cmap.watched_by(2)
    assert cmap.watched_by(1) == frozenset(range(16, 32))
    assert ms.CellMap(4, frozenset()).watched_by(3) == frozenset(range(48, 64))  # no cell serves: its own
    snap = ms.Snapshot({}, {}, {}, {"d2": ms.HostState(8, 16384, cell=2, lease=7)},
                       interest=ms.Interest(2, cmap.watched_by(2), frozenset()), cells=cmap)
    assert ms.first_in_cell(snap) is None  # cell 0's first node does the chores of the shards
    assert ms.first_in_cell(dataclasses.replace(snap, cells=ms.CellMap(4, frozenset({2})))) == "d2"


def test_draining_the_only_node_of_a_cell_hands_its_vms_to_the_adopting_cell(cluster: Cluster, etcd, prefix) -> None:
    """Cell 1 has one node, b1: draining it leaves cell 1 without a node
    that takes work, so cell 0 adopts its shards and b1 watches cell 0's.
    While cell 0's only node is full, b1 sees that and releases nothing;
    once a2 joins cell 0, the drain hands b1's VMs to it, and a VM of cell
    1 created meanwhile goes there too. Once b1 is uncordoned, cell 1
    serves its shards again: a new VM of cell 1 goes to b1."""
    from click.testing import CliRunner
    from metastackctl import cli

    def ctl(*args: str):
        return CliRunner().invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", prefix, *args])
    cluster.flavour("small", 1, 1024)
    _cells(cluster, 2)
    proc = cluster.agent("a1", vcpus=1, ram_mb=4096, start=False)
    proc.config.write_text(proc.config.read_text().replace("[libvirt]", "cell = 0\n[libvirt]", 1))
    proc.start()
    _agent_in_cell(cluster, "b1", 1)
    cluster.wait_hosts("a1", "b1")
    _settled(cluster, 32)
    filler = vm_in(2, 0, 0, "f")
    vms = [vm_in(2, 1, 100 * i) for i in range(2)]
    for vm in [filler] + vms:
        cluster.desire(vm)
    states = cluster.wait_running([filler] + vms, 30)
    assert states[filler] == ("running", "a1") and all(states[vm] == ("running", "b1") for vm in vms)
    r = ctl("host", "drain", "b1", "--deadline", "5")
    assert r.exit_code == 4 and "2 to hand over" in r.output, r.output
    assert all(cluster.states()[vm] == ("running", "b1") for vm in vms)  # a1 is full: nothing was stopped
    _agent_in_cell(cluster, "a2", 0)
    cluster.wait_hosts("a2")
    r = ctl("host", "drain", "b1", "--deadline", "60")
    assert r.exit_code == 0, r.output
    assert set(cluster.wait_running(vms, 30)[vm] for vm in vms) == {("running", "a2")}
    late = vm_in(2, 1, 500)
    cluster.desire(late)
    assert cluster.wait_running([late], 30)[late] == ("running", "a2")
    assert ctl("host", "uncordon", "b1").exit_code == 0
    _settled(cluster, 32)
    newer = vm_in(2, 1, 700)
    cluster.desire(newer)
    assert cluster.wait_running([newer], 30)[newer] == ("running", "b1")
    assert all(cluster.states()[vm] == ("running", "a2") for vm in vms + [late])  # what moved stays put


# -- overflow between cells -------------------------------------------------------------

def test_hostile_overflow_records_are_refused_with_their_reason() -> None:
    good = ms.Spill(2, (0, 1), 2, 1024, "a1", "2026-11-27T08:00:00Z")
    assert ms.Spill.parse("v", good.encode()) == good
    assert ms.Spill.parse("v", b'{"cell": null, "tried": [0], "vcpus": 1, "ram_mb": 1}').cell is None
    for bad, what in (({"cell": -1}, "'cell'"), ({"cell": True}, "'cell'"), ({"cell": 64}, "'cell'"),
                      ({"cell": "1"}, "'cell'"), ({"tried": [0, "1"]}, "'tried'"), ({"tried": {}}, "'tried'"),
                      ({"tried": list(range(65))}, "'tried'"), ({"vcpus": 0}, "'vcpus'"), ({"ram_mb": None}, "'ram_mb'")):
        raw = json.dumps({"cell": 1, "tried": [0], "vcpus": 1, "ram_mb": 1, **bad}).encode()
        with pytest.raises(ms.SpecError, match=what):
            ms.Spill.parse("v", raw)
    assert KEYS.split(KEYS.overflow("v")) == ("overflow", "v") and KEYS.dir("overflow") < KEYS.shards


def test_an_offer_goes_round_the_live_cells_after_its_own() -> None:
    cells = ms.CellMap(4, frozenset({0, 1, 3}))
    assert ms.CellOverflow.next_cell(cells, 0, (0,)) == 1
    assert ms.CellOverflow.next_cell(cells, 1, (0, 1)) == 3  # cell 2 has no live node
    assert ms.CellOverflow.next_cell(cells, 3, (0, 1, 3)) is None  # round: every live cell said no
    assert ms.CellOverflow.next_cell(cells, 3, (1, 3)) == 0
    assert ms.CellOverflow.next_cell(ms.CellMap(4, frozenset({2})), 2, (2,)) is None


def test_why_a_vm_waits_names_the_cell_it_was_offered_to() -> None:
    """A reader with cells: a VM its cell has no room for, offered to cell
    1, waits for cell 1's nodes; once every cell said no, the reason says
    so and names its own cell's nodes."""
    vm = vm_in(2, 0)
    entries = {KEYS.config: _entry({"cells": 2}), KEYS.flavour("big"): _entry({"vcpus": 8, "ram_mb": 1024}),
               KEYS.desired(vm): _entry({"flavour": "big"}),
               KEYS.host("a1"): ms.Entry(ms.HostState(4, 16384).encode(), 3, 1, 3),
               KEYS.host("b1"): ms.Entry(ms.HostState(16, 16384, cell=1).encode(), 3, 2, 3),
               KEYS.overflow(vm): ms.Entry(ms.Spill(1, (0,), 8, 1024, "a1", "t0").encode(), 4, 0, 4)}
    view = ms.ClusterView(KEYS)
    view.load(10, entries)
    why = ms.pending_reason(vm, view.snapshot())
    assert why.startswith("cell 0 has no room for it, offered to cell 1: not claimed yet: b1 has room"), why
    entries[KEYS.overflow(vm)] = ms.Entry(ms.Spill(None, (0, 1), 8, 1024, "b1", "t1").encode(), 5, 0, 4)
    view.load(11, entries)
    why = ms.pending_reason(vm, view.snapshot())
    assert why.startswith("no cell had room (offered to cell(s) 1 since t1); 0/1 live node(s)") and "a1" in why, why


def test_a_vm_its_cell_has_no_room_for_runs_in_another_cell(cluster: Cluster, etcd, prefix) -> None:
    """Three cells of one node each: a1 (cell 0) and b1 (cell 1) have room
    for one small VM, c1 (cell 2) for four. Cell 0's third and fourth VMs
    wait in cell 0, are offered to cell 1, which is full and passes them
    on, and run on c1; their records are then gone. c1 watches them: their
    destroy stops them there. When no cell has room, the record says so,
    and so does ``metastackctl show``."""
    from click.testing import CliRunner
    from metastackctl import cli

    cluster.flavour("small", 1, 1024)
    _cells(cluster, 3)
    _agent_in_cell(cluster, "a1", 0, vcpus=1)
    _agent_in_cell(cluster, "b1", 1, vcpus=1)
    _agent_in_cell(cluster, "c1", 2, vcpus=3)
    cluster.wait_hosts("a1", "b1", "c1")
    _settled(cluster, 21, 22)  # 64 shards in 3 cells: 22, 21, 21
    home = [vm_in(3, 0, 100 * i) for i in range(4)]
    other = vm_in(3, 1, 0, "o")
    cluster.desire(other)
    assert cluster.wait_running([other], 30)[other] == ("running", "b1")
    for vm in home:
        cluster.desire(vm)
    states = cluster.wait_running(home, 60)
    where = sorted(states[vm][1] for vm in home)
    assert where == ["a1", "c1", "c1", "c1"], states
    wait_for(lambda: not cluster.store.list_prefix(cluster.keys.dir("overflow"))[1], 20, what="overflow records gone")
    logs = "\n".join(a.log() for a in cluster.agents)
    assert "decision=overflow: offered to cell 1" in logs and "decision=overflow: offered to cell 2" in logs, logs[-3000:]
    spilled = [vm for vm in home if states[vm][1] == "c1"]
    cluster.undesire(spilled[0])
    wait_for(lambda: spilled[0] not in cluster.states(), 20, what=f"{spilled[0]} destroyed on c1")
    # now every cell is full: a fifth and sixth VM of cell 0 go round the ring and wait, saying why
    late = [vm_in(3, 0, 700), vm_in(3, 0, 900)]
    for vm in late:
        cluster.desire(vm)

    def exhausted() -> bool:
        recs = [json.loads(e.value) for e in cluster.store.list_prefix(cluster.keys.dir("overflow"))[1].values()]
        return len(recs) == 1 and recs[0]["cell"] is None and recs[0]["tried"] == [0, 1, 2]
    wait_for(exhausted, 30, what="one VM offered round every cell without room")
    offers = sum(a.log().count("decision=overflow") for a in cluster.agents)
    time.sleep(2 * ms.CellOverflow.AFTER)  # no cell writes again before RETRY: no loop
    assert sum(a.log().count("decision=overflow") for a in cluster.agents) == offers
    waiting = [vm for vm in late if vm not in cluster.states()]
    assert len(waiting) == 1, cluster.states()
    r = CliRunner().invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", prefix, "show", waiting[0], "-o", "json"])
    assert r.exit_code == 0, r.output
    assert "no cell had room (offered to cell(s) 1, 2" in json.loads(r.output)["reason"], r.output


def test_an_offer_every_cell_refused_is_made_again_and_a_claimed_one_is_deleted(store: ms.Store) -> None:
    """CellOverflow of cell 0's first node, on a real etcd: a record that
    went round every cell is left alone for RETRY seconds, then offered
    again from the start of the ring; a record of a VM claimed meanwhile
    is deleted; a node that is not its cell's first writes nothing."""
    keys = store.keys
    waits, claimed = vm_in(2, 0), vm_in(2, 0, 500)
    for node, cell in (("a1", 0), ("a2", 0), ("b1", 1)):
        store.put(keys.host(node), ms.HostState(1, 1024, cell=cell).encode(), lease=store.grant_lease(30))
    store.put(keys.config, json.dumps({"cells": 2}).encode())
    store.put(keys.flavour("small"), json.dumps({"vcpus": 1, "ram_mb": 1024}).encode())
    for vm in (waits, claimed):
        store.put(keys.desired(vm), b'{"flavour": "small"}')
        store.put(keys.overflow(vm), ms.Spill(None, (0, 1), 1, 1024, "b1", "t0").encode())
    b1_lease = store.get(keys.host("b1")).lease
    store.put(keys.actual(claimed), json.dumps({"host": "b1", "state": "running", "vcpus": 1,
                                                "ram_mb": 1024}).encode(), lease=b1_lease)

    def tender(node: str) -> tuple[ms.CellOverflow, ms.Snapshot]:
        view = ms.ClusterView(keys)
        view.interest, view.node = ms.Interest(0, ms.CellMap(2, frozenset({0, 1})).shards_of(0), frozenset()), node
        view.load(*store.list_prefix(keys.all, until=keys.watched_end))
        return ms.CellOverflow(store, view, node), view.snapshot()
    second, snap = tender("a2")
    assert second.tend(snap, dict, {waits: 0.0}, (), 1000.0) is None and second.written == 0
    first, snap = tender("a1")
    assert set(snap.overflow) == {waits, claimed} and claimed in snap.actual
    again = first.tend(snap, dict, {waits: 0.0}, (), 1000.0)
    assert store.get(keys.overflow(claimed)) is None and first.written == 1
    assert again == 1000.0 + ms.CellOverflow.RETRY
    assert json.loads(store.get(keys.overflow(waits)).value)["cell"] is None  # round not over yet
    first.tend(first.view.snapshot(), dict, {waits: 0.0}, (), again)
    record = json.loads(store.get(keys.overflow(waits)).value)
    assert (record["cell"], record["tried"], record["by"]) == (1, [0], "a1")


def test_overflow_records_of_nobody_are_deleted_and_a_vm_waits_where_it_is_served(store: ms.Store) -> None:
    """CellOverflow on a real etcd: cell 0's first node deletes a malformed
    record of its cell's VM and one naming cell 0 itself (its shard was
    adopted), offers again at once a VM offered to a cell with no live
    node, writes at most BATCH records per call and asks to be called
    again at once for the rest; with one cell the first node deletes every
    record."""
    keys = store.keys
    for node, cell in (("a1", 0), ("b1", 1)):
        store.put(keys.host(node), ms.HostState(1, 1024, cell=cell).encode(), lease=store.grant_lease(30))
    store.put(keys.config, json.dumps({"cells": 3}).encode())  # cell 2 has no node
    store.put(keys.flavour("small"), json.dumps({"vcpus": 1, "ram_mb": 1024}).encode())
    bad, ours, dead = vm_in(3, 0, 0, "m"), vm_in(3, 0, 0, "o"), vm_in(3, 0, 0, "d")
    store.put(keys.overflow(bad), b'{"cell": "one"}')
    store.put(keys.overflow(ours), ms.Spill(0, (1,), 1, 1024, "b1", "t0").encode())
    store.put(keys.overflow(dead), ms.Spill(2, (0,), 1, 1024, "a1", "t0").encode())
    many = [vm_in(3, 0, 100 * i, "w") for i in range(ms.CellOverflow.BATCH + 3)]
    for vm in [ours, dead] + many:
        store.put(keys.desired(vm), b'{"flavour": "small"}')

    def tender(cells: int) -> ms.CellOverflow:
        view = ms.ClusterView(keys)
        live = ms.CellMap(cells, frozenset({0, 1}) if cells > 1 else frozenset({0}))
        view.interest = ms.Interest(0, live.watched_by(0), frozenset()) if cells > 1 else None
        view.node = "a1"
        view.load(*store.list_prefix(keys.all, until=keys.watched_end))
        return ms.CellOverflow(store, view, "a1")
    first = tender(3)
    snap = first.view.snapshot()
    assert set(snap.overflow) == {ours, dead} and bad in first.view.names_of("overflow")
    waiting = {vm: 0.0 for vm in many}
    again = first.tend(snap, dict, waiting, (), 100.0)
    assert store.get(keys.overflow(bad)) is None and store.get(keys.overflow(ours)) is None
    assert json.loads(store.get(keys.overflow(dead)).value)["cell"] == 1  # cell 2 has no node: round again
    offered = [vm for vm in many if store.get(keys.overflow(vm)) is not None]
    assert len(offered) == ms.CellOverflow.BATCH - 3  # the batch also deleted two records and offered one again
    assert again is not None and again <= 100.2
    first.tend(first.view.snapshot(), dict, waiting, (), again)
    assert all(store.get(keys.overflow(vm)) is not None for vm in many)
    written = first.written
    first.tend(first.view.snapshot(), dict, waiting, (), again + 1)  # nothing changed: nothing written
    assert first.written == written
    store.put(keys.config, json.dumps({"cells": 1}).encode())
    one = tender(1)
    assert one.tend(one.view.snapshot(), dict, {}, (), 200.0) == 200.1  # 20 records: a batch, and again at once
    assert len(store.list_prefix(keys.dir("overflow"))[1]) == 20 - ms.CellOverflow.BATCH
    assert one.tend(one.view.snapshot(), dict, {}, (), 200.1) is None
    assert store.list_prefix(keys.dir("overflow"))[1] == {}


def test_room_for_a_vm_of_another_cell_is_judged_by_the_cell_whose_use_is_known() -> None:
    """a1 (cell 0) holds a VM of cell 1's shards (offered to cell 0). Its
    view holds none of b1's claims, so b1 (cell 1, full) looks empty: the
    room a drain or a group's spreading looks for is in cell 0 (a2), never
    on b1; a VM of cell 0's shards is judged as before."""
    cmap = ms.CellMap(2, frozenset({0, 1}))
    away, home = vm_in(2, 1, 0, "x"), vm_in(2, 0, 0, "y")
    hosts = {"a1": ms.HostState(2, 4096, cell=0, foreign=(1, 1024, 1)), "a2": ms.HostState(2, 4096, cell=0),
             "b1": ms.HostState(2, 4096, cell=1)}
    entries = {KEYS.host(n): ms.Entry(h.encode(), 3, i + 1, 3) for i, (n, h) in enumerate(hosts.items())}
    entries[KEYS.config] = _entry({"cells": 2})
    entries[KEYS.flavour("small")] = _entry({"vcpus": 1, "ram_mb": 1024})
    for vm, lease in ((away, 1), (home, 1)):
        entries[KEYS.desired(vm)] = _entry({"flavour": "small"})
        entries[KEYS.actual(vm)] = _entry({"host": "a1", "state": "running", "vcpus": 1, "ram_mb": 1024}, lease=lease)
    snap = _cell_view(ms.Interest(0, cmap.shards_of(0), frozenset({away})), entries).snapshot()
    flav = ms.Flavour(1, 1024)
    assert ms.room_elsewhere("a1", away, flav, snap) == ["a2"]
    assert ms.room_elsewhere("a1", home, flav, snap) == ["a2"]
    assert not ms.places(snap, "b1", away) and ms.places(snap, "a2", away)
    full = dict(entries)
    full[KEYS.host("a2")] = ms.Entry(ms.HostState(0, 0, cell=0).encode(), 3, 2, 3)
    assert ms.room_elsewhere("a1", away, flav, _cell_view(ms.Interest(0, cmap.shards_of(0), frozenset({away})),
                                                          full).snapshot()) == []


def test_an_offer_its_cell_picks_but_never_claims_is_passed_on_and_names_the_last_holder(store: ms.Store) -> None:
    """The first node of the offered cell (b1, cell 1) leaves an offer its
    placement picks alone for PATIENCE seconds, then passes it on; the
    claimant of an offered VM fences the holder the offer names when that
    node is not live (with overflow it may be in any cell), and nobody
    when the disk is new or the holder is live."""
    import types
    keys = store.keys
    for node, cell in (("a1", 0), ("b1", 1), ("c1", 2)):
        store.put(keys.host(node), ms.HostState(2, 4096, cell=cell).encode(), lease=store.grant_lease(30))
    store.put(keys.config, json.dumps({"cells": 3}).encode())
    vm = vm_in(3, 0, 0, "p")
    store.put(keys.desired(vm), b'{"flavour": "small"}')
    store.put(keys.overflow(vm), ms.Spill(1, (0,), 1, 1024, "a1", "t0", holder="gone1").encode())
    view = ms.ClusterView(keys)
    view.interest = ms.Interest(1, ms.CellMap(3, frozenset({0, 1, 2})).shards_of(1), frozenset({vm}))
    view.node = "b1"
    view.load(*store.list_prefix(keys.all, until=keys.watched_end))
    b1 = ms.CellOverflow(store, view, "b1")
    snap = view.snapshot()
    picked = {vm: "b1"}
    assert b1.tend(snap, lambda: picked, {}, (), 50.0) == 50.0 + ms.CellOverflow.AFTER
    assert b1.tend(snap, lambda: picked, {}, (), 50.0 + ms.CellOverflow.AFTER) == 50.0 + ms.CellOverflow.PATIENCE
    assert b1.written == 0
    b1.tend(snap, lambda: picked, {}, (), 50.0 + ms.CellOverflow.PATIENCE)
    record = json.loads(store.get(keys.overflow(vm)).value)
    assert (record["cell"], record["tried"], record["holder"]) == (2, [0, 1], "gone1")
    claimant = types.SimpleNamespace(view=view, node="b1", _offer_holders={})
    snap = view.snapshot()
    assert ms.Executor._former_writers(claimant, vm, [], snap) == ["gone1"]
    assert ms.Executor._former_writers(claimant, vm, [], snap, fresh=True) == []
    store.put(keys.overflow(vm), ms.Spill(2, (0, 1), 1, 1024, "b1", "t1", holder="c1").encode())
    view.load(*store.list_prefix(keys.all, until=keys.watched_end))
    assert ms.Executor._former_writers(claimant, vm, [], view.snapshot()) == []  # c1 is live: it kills its copy
    store.put(keys.overflow(vm), ms.Spill(2, (0, 1), 1, 1024, "b1", "t2", holder="gone2").encode())
    view.load(*store.list_prefix(keys.all, until=keys.watched_end))
    assert ms.Executor._former_writers(claimant, vm, [], view.snapshot()) == ["gone2"]
    store.delete(keys.overflow(vm))  # claimed: the serving cell deleted the offer; a retried start still fences
    view.load(*store.list_prefix(keys.all, until=keys.watched_end))
    assert ms.Executor._former_writers(claimant, vm, [], view.snapshot()) == ["gone2"]
