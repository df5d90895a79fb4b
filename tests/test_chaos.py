"""The chaos suite (issue #6): real etcd, a real Ceph, three nodes each with
its own network namespace, address, libvirtd and cuttable path to etcd
(deploy/testbed.py), three agents with lease_ttl 5 and [node] address set,
three tiny QEMU guests booted from RBD clones. Faults are injected for real,
one at a time and then overlapping, and an independent checker
(tests/chaoscheck.py, sampling every 250 ms) asserts, over each test's
window:

  * never two unfenced writers of one disk;
  * for a fault that requires a move: every affected VM's domain running on
    its new node within TTL + 3 s of the fault, its disk fenced first, the
    guest's boot counter going on (same disk);
  * zero restarts for faults that do not require one (etcd outages, quick
    agent restarts, libvirtd restarts);
  * no desired entry lost; no stale domain left once the node is back.

Run:   .venv/bin/python -m pytest -p no:cacheprovider -q tests/test_chaos.py
       (or -m chaos; skip the layer elsewhere with -m 'not chaos').
Needs root. MSC_CHAOS_KEEP=1 keeps the work dir (logs) after the run.
Each test starts from a baseline: every fault healed, every agent up, every
VM running once on its actual host (chaoslib.ChaosCluster.baseline).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from chaoslib import ETCD_ELECTION, FIRST_RETRY, ChaosCluster

pytestmark = pytest.mark.chaos

VMS = ["c1", "c2", "c3"]


@pytest.fixture(scope="module")
def cc(guest: Path) -> Iterator[ChaosCluster]:
    if os.geteuid() != 0:
        pytest.skip("the chaos testbed needs root (network namespaces, bridges, bind mounts)")
    c = ChaosCluster.create(guest, VMS)
    try:
        yield c
    finally:
        problems = c.close()
        assert not problems, f"testbed teardown: {problems}"


@pytest.fixture(autouse=True)
def baseline(cc: ChaosCluster) -> Iterator[None]:
    cc.baseline()
    yield
    cc.bed.heal()  # a failed test must not leave its fault to the next one


def move_fault(cc: ChaosCluster, label: str, inject, recover, victim: str | None = None,
               min_down: float = 0.0) -> str:
    """Inject a fault on the busiest node that requires its VMs to move;
    assert the move, then recover (not before min_down s after the fault)
    and assert nothing stale is left."""
    victim = victim or cc.busiest()
    vms = cc.vms_on(victim)
    others = [v for v in cc.vms if v not in vms]
    assert vms, f"{victim} runs no VM: {cc.checker.placement()}"
    before, disks = cc.boots(), cc.disks()
    t0 = cc.checker.mark(f"{label} on {victim} (runs {vms})")
    inject(victim)
    cc.assert_moved(vms, victim, t0)
    cc.assert_boots_continue(vms, before, disks)
    time.sleep(max(0.0, t0 + min_down - time.monotonic()))
    cc.checker.mark(f"recover {victim}")
    recover(victim)
    cc.assert_no_stale(t0)
    cc.assert_safe(t0)
    cc.assert_no_restarts(others, t0)
    return victim


def quiet_fault(cc: ChaosCluster, label: str, inject, recover, hold: float) -> None:
    """A fault that must not restart or move anything: inject, hold, recover,
    then watch for TTL + 3 s more."""
    placement = cc.checker.placement()
    t0 = cc.checker.mark(label)
    inject()
    time.sleep(hold)
    cc.checker.mark(f"recover from {label}")
    recover()
    cc.observe(cc.ttl + 3)
    cc.assert_safe(t0)
    cc.assert_no_restarts(cc.vms, t0)
    assert cc.checker.placement() == placement, cc.explain(t0, "VMs moved")
    assert all(cc.agent(n.name).alive() for n in cc.bed.nodes), cc.explain(t0, "an agent exited")


# -- the testbed itself -------------------------------------------------------------


def test_each_node_has_its_own_address_libvirtd_and_etcd_path(cc: ChaosCluster) -> None:
    s = cc.checker.latest()
    for vm in cc.vms:
        (q,) = s.qemus[vm]
        node = cc.bed.node(q.node)
        assert s.actual[vm]["host"] == q.node
        # The QEMU runs in its node's network namespace, so its RBD client
        # (the disk's watcher) has the node's own address.
        assert [w.ip for w in s.watchers[vm]] == [node.address], (vm, s.watchers[vm])
    doms = cc.domains()
    for n in cc.bed.nodes:
        assert all(d.endswith(f".{n.name}") for d in doms[n.name]), doms  # one libvirtd per node
        assert cc.bed.etcd_mode(n.name) == "open"


def test_checker_sees_an_unfenced_second_writer(cc: ChaosCluster) -> None:
    """Negative control: a second client opens a running VM's disk
    read-write from another node, unfenced; the checker must report it."""
    vm = cc.vms[0]
    host = cc.checker.placement()[vm]
    other = next(n.name for n in cc.bed.nodes if n.name != host)
    t0 = cc.checker.mark(f"open {vm}'s disk read-write from {other}")
    cc.intrude(vm, other, 2.0)
    found = cc.checker.unfenced_writers(t0)
    assert any(f" {vm}: 2 unfenced watchers" in f and cc.bed.node(other).address in f for f in found), \
        cc.explain(t0, f"the checker missed the second writer: {found}")
    cc.assert_no_restarts(cc.vms, t0)


# -- one fault at a time: fast and reliable first -------------------------------------


def test_agent_kill9_moves_its_vms(cc: ChaosCluster) -> None:
    move_fault(cc, "kill -9 agent", lambda n: cc.agent(n).kill(), lambda n: cc.agent(n).start())


def test_dead_node_is_fenced_by_address_and_unfenced_once_clean(cc: ChaosCluster) -> None:
    """The taker fences the dead node as a whole (`osd blocklist range add
    IP/32`, recorded under <prefix>/fences/<node>); once the node is back
    and its stale copies are gone, the fence is lifted."""
    victim = cc.busiest()
    vms = cc.vms_on(victim)
    address = cc.bed.node(victim).address
    t0 = cc.checker.mark(f"kill -9 agent {victim} (runs {vms})")
    cc.agent(victim).kill()
    cc.assert_moved(vms, victim, t0)
    s = cc.checker.latest()
    fence = (s.fences or {}).get(victim) or {}
    assert cc.checker.node_fenced(s, victim), cc.explain(t0, f"no range blocklist entry for {address}")
    assert (fence.get("mode"), fence.get("address"), fence.get("state")) == ("range", address, "fenced"), \
        cc.explain(t0, f"fences/{victim} = {fence}")
    # Finding 6: a client of the fenced node that opens only now (a slow QEMU start) cannot write.
    late = cc.late_write(victim)
    assert late != "written" and ("108" in late or "Shutdown" in late or "locklist" in late), late
    cc.checker.mark(f"start agent {victim}")
    cc.agent(victim).start()
    cc.assert_no_stale(t0)
    cc.checker.wait_for(lambda s: not cc.checker.node_fenced(s, victim)
                        and ((s.fences or {}).get(victim) or {}).get("state", "clean") == "clean",
                        30, f"{victim}'s fence lifted once it is clean")
    cc.assert_safe(t0)


def test_libvirtd_restart_restarts_nothing(cc: ChaosCluster) -> None:
    node = cc.busiest()
    vms = cc.vms_on(node)
    quiet_fault(cc, f"restart libvirtd of {node}", lambda: cc.bed.restart_libvirtd(node), lambda: None, 0)
    # The new libvirtd re-attached to the QEMUs that kept running.
    assert cc.domains(active_only=True)[node] == sorted(f"{vm}.{node}" for vm in vms)


def test_etcd_kill9_and_restart_restarts_nothing(cc: ChaosCluster) -> None:
    quiet_fault(cc, "kill -9 etcd", cc.bed.etcd.kill, cc.bed.etcd.start, 2.0)


def test_agent_restart_at_once_restarts_nothing(cc: ChaosCluster) -> None:
    node = cc.busiest()

    def restart() -> None:
        cc.agent(node).stop()  # SIGTERM; on_stop = keep (the default) leaves the guests running
        cc.agent(node).start()
    quiet_fault(cc, f"restart agent of {node} at once", restart, lambda: None, 0)


def test_agent_kill9_and_restart_at_once_restarts_nothing(cc: ChaosCluster) -> None:
    node = cc.busiest()

    def restart() -> None:
        cc.agent(node).kill()  # its QEMUs keep running; the restarted agent adopts them
        cc.agent(node).start()
    quiet_fault(cc, f"kill -9 agent of {node}, start it at once", restart, lambda: None, 0)


def test_agent_sigstop_past_ttl_moves_its_vms(cc: ChaosCluster) -> None:
    move_fault(cc, "SIGSTOP agent", lambda n: cc.agent(n).signal(signal.SIGSTOP),
               lambda n: cc.agent(n).signal(signal.SIGCONT), min_down=cc.ttl + 3)


def test_agent_etcd_cut_moves_its_vms(cc: ChaosCluster) -> None:
    move_fault(cc, "cut the agent's etcd path (Ceph reachable)", lambda n: cc.bed.cut_etcd(n),
               lambda n: cc.bed.restore_etcd(n))


def test_node_cut_off_moves_its_vms(cc: ChaosCluster) -> None:
    move_fault(cc, "cut the node off (veth down)", cc.bed.isolate, cc.bed.rejoin)


def test_agent_restart_after_ttl_moves_its_vms(cc: ChaosCluster) -> None:
    move_fault(cc, "stop the agent (SIGTERM), start it after the TTL", lambda n: cc.agent(n).stop(),
               lambda n: cc.agent(n).start(), min_down=cc.ttl + 3)


def test_etcd_frozen_3x_ttl_restarts_nothing(cc: ChaosCluster) -> None:
    quiet_fault(cc, "SIGSTOP etcd for 3x TTL", cc.bed.etcd.freeze, cc.bed.etcd.thaw, 3 * cc.ttl)


# -- overlapping faults -------------------------------------------------------------------


def test_overlap_agent_kill9_and_another_agents_etcd_cut(cc: ChaosCluster) -> None:
    a = cc.busiest()
    b = cc.busiest(exclude=[a])
    vms_a, vms_b = cc.vms_on(a), cc.vms_on(b)
    before, disks = cc.boots(), cc.disks()
    t0 = cc.checker.mark(f"kill -9 agent {a} (runs {vms_a})")
    cc.agent(a).kill()
    time.sleep(1.0)
    t1 = cc.checker.mark(f"cut etcd path of {b} (runs {vms_b})")
    cc.bed.cut_etcd(b)
    cc.assert_moved(vms_a, a, t0)
    if vms_b:
        cc.assert_moved(vms_b, b, t1)
    cc.assert_boots_continue(vms_a + vms_b, before, disks)
    cc.checker.mark("recover both")
    cc.bed.restore_etcd(b)
    cc.agent(a).start()
    cc.assert_no_stale(t0)
    cc.assert_safe(t0)


def test_overlap_node_cut_off_while_another_nodes_libvirtd_restarts(cc: ChaosCluster) -> None:
    a = cc.busiest()
    b = cc.busiest(exclude=[a])
    vms_a = cc.vms_on(a)
    others = [v for v in cc.vms if v not in vms_a]
    before, disks = cc.boots(), cc.disks()
    t0 = cc.checker.mark(f"cut {a} off (runs {vms_a})")
    cc.bed.isolate(a)
    time.sleep(cc.ttl - 1.0)  # just before a's lease expires: the takeover meets a restarting libvirtd
    cc.checker.mark(f"restart libvirtd of {b}")
    cc.bed.restart_libvirtd(b)
    # b may have claimed a's VMs just before its libvirtd went: their start
    # then fails once and is retried after the first back-off; b boots
    # them one after another (seen in CI: 5.97, 6.97, 8.22 s).
    cc.assert_moved(vms_a, a, t0, extra=FIRST_RETRY)
    cc.assert_boots_continue(vms_a, before, disks)
    cc.checker.mark(f"{a} back")
    cc.bed.rejoin(a)
    cc.assert_no_stale(t0)
    cc.assert_safe(t0)
    cc.assert_no_restarts(others, t0)


def test_overlap_etcd_restart_during_a_failover(cc: ChaosCluster) -> None:
    a = cc.busiest()
    vms_a = cc.vms_on(a)
    others = [v for v in cc.vms if v not in vms_a]
    before, disks = cc.boots(), cc.disks()
    t0 = cc.checker.mark(f"kill -9 agent {a} (runs {vms_a})")
    cc.agent(a).kill()
    time.sleep(1.0)
    cc.checker.mark("kill -9 etcd")
    cc.bed.etcd.kill()
    time.sleep(2.0)
    cc.bed.etcd.start()
    t_back = cc.checker.mark("etcd back")
    # etcd extends every lease on restart (by TTL + an election timeout):
    # the clock for the move starts again when etcd is back.
    cc.assert_moved(vms_a, a, t0, t_ref=t_back, extra=ETCD_ELECTION)
    cc.assert_boots_continue(vms_a, before, disks)
    cc.agent(a).start()
    cc.assert_no_stale(t0)
    cc.assert_safe(t0)
    cc.assert_no_restarts(others, t0)
