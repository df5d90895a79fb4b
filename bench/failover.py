#!/usr/bin/env python3
"""Benchmark: failover on the chaos suite's 3-node testbed (lease TTL 5 s).

Reuses tests/chaoslib.py (deploy/testbed.py: three network namespaces, each
with its own address, libvirtd and cuttable etcd path; a private Ceph; three
agents) and the independent checker (tests/chaoscheck.py, 250 ms samples).
Three tiny guests; between measurements every fault is healed and every VM
settled again. Measures:
  1. kill -9 of the agent running the most guests, --runs times (default
     10): seconds from the kill until each of its VMs has a QEMU on another
     node and its actual key says running there (p50 / p99 / max over all
     moved VMs); the agent is restarted after each run.
  2. etcd frozen (SIGSTOP) for 3x TTL: how many VMs were restarted (a new
     QEMU process for the VM) within TTL + 3 s after etcd resumed.
  3. a node cut off (veth down): time from its fence (the first range
     blocklist entry for its address, or else the first blocklisting of its
     QEMU's client) to its stale guests being stopped once it can see the
     fence (link up again); also from the link coming back.
  4. an agent stalled (SIGSTOP): time until its guests' QEMUs on that node
     are gone (its watchdog stopping them), watched for up to 3x TTL.
Prints a table; asserts nothing. Everything started here is stopped here.
Needs root. Do not run it next to the test suite on a small machine.

Usage: .venv/bin/python bench/failover.py [--runs 10]
"""
from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from chaoslib import ChaosCluster  # noqa: E402


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return float("nan")
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def kill9_runs(cc: ChaosCluster, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        cc.baseline()
        victim = cc.busiest()
        vms = cc.vms_on(victim)
        t0 = cc.checker.mark(f"bench run {i + 1}: kill -9 agent {victim}")
        cc.agent(victim).kill()
        res = cc.wait_moved(vms, victim, t0)
        got = [r[0] for r in res.values() if r]
        times += got
        print(f"  run {i + 1}: kill -9 {victim} ({', '.join(vms)}): "
              + ", ".join(f"{vm} {r[0]:.2f} s -> {r[1]}" if r else f"{vm} not moved" for vm, r in res.items()),
              flush=True)
        cc.agent(victim).start()
    return times


def etcd_freeze(cc: ChaosCluster) -> tuple[int, int]:
    cc.baseline()
    t0 = cc.checker.mark("bench: SIGSTOP etcd for 3x TTL")
    cc.bed.etcd.freeze()
    time.sleep(3 * cc.ttl)
    cc.bed.etcd.thaw()
    cc.observe(cc.ttl + 3)
    restarted = sum(1 for vm in cc.vms if cc.checker.restarts(vm, t0)[0] > 0)
    return restarted, len(cc.vms)


def fence_to_stale_stop(cc: ChaosCluster) -> tuple[Optional[float], Optional[float], str]:
    cc.baseline()
    victim = cc.busiest()
    vms = cc.vms_on(victim)
    t0 = cc.checker.mark(f"bench: cut {victim} off")
    cc.bed.isolate(victim)
    cc.wait_moved(vms, victim, t0)
    time.sleep(1.0)
    t_up = cc.checker.mark(f"bench: {victim} back")
    cc.bed.rejoin(victim)
    address = cc.bed.node(victim).address
    deadline = time.monotonic() + 30
    t_gone = None
    while time.monotonic() < deadline:
        s = cc.checker.wait_sample_after(time.monotonic())
        if not any(q.node == victim for vm in vms for q in s.qemus.get(vm, [])):
            t_gone = s.t
            break
    # When was the node fenced? The first range entry covering its address,
    # else the first sample where one of its QEMUs counted as fenced.
    t_fence, how = None, "no fence seen"
    for s in cc.checker.window(t0):
        if cc.checker.node_fenced(s, victim):
            t_fence, how = s.t, "range blocklist"
            break
        if any(cc.checker.qemu_fenced(s, q) for vm in vms for q in s.qemus.get(vm, []) if q.node == victim):
            t_fence, how = s.t, "client blocklist"
            break
    if t_gone is None:
        return None, None, f"{how}; stale guests not stopped within 30 s of the link coming back"
    gone_before_up = t_gone <= t_up + cc.checker.interval
    if t_fence is None:
        note = "guests already stopped before the fence" if gone_before_up else how
        return None, t_gone - t_up, note
    return t_gone - t_fence, t_gone - t_up, how + ("; stopped before the link came back" if gone_before_up else "")


def stall_to_watchdog(cc: ChaosCluster) -> tuple[Optional[float], str]:
    cc.baseline()
    victim = cc.busiest()
    vms = cc.vms_on(victim)
    agent = cc.agent(victim)
    watchdog = agent.watchdog_pid()
    t0 = cc.checker.mark(f"bench: SIGSTOP agent {victim}")
    agent.signal(signal.SIGSTOP)
    try:
        deadline = t0 + 3 * cc.ttl
        while time.monotonic() < deadline:
            s = cc.checker.wait_sample_after(time.monotonic())
            if not any(q.node == victim for vm in vms for q in s.qemus.get(vm, [])):
                return s.t - t0, f"watchdog pid {watchdog}" if watchdog else "no watchdog pid file"
        return None, (f"guests still running {3 * cc.ttl} s after the stall"
                      + ("" if watchdog else " (no watchdog pid file)"))
    finally:
        agent.signal(signal.SIGCONT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="kill -9 runs (default 10)")
    a = ap.parse_args()
    guest = ROOT / ".cache" / "guest"
    subprocess.run(["bash", str(ROOT / "deploy" / "build-guest.sh"), str(guest)], check=True,
                   stdout=subprocess.DEVNULL)
    t_start = time.monotonic()
    cc = ChaosCluster.create(guest)
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        print(f"testbed up with {len(cc.vms)} guests in {time.monotonic() - t_start:.1f} s; lease TTL {cc.ttl} s",
              flush=True)
        times = kill9_runs(cc, a.runs)
        rows.append((f"kill -9 agent -> VM running elsewhere ({a.runs} runs)", str(len(times)),
                     f"{pct(times, 50):.2f} s", f"{pct(times, 99):.2f} s", f"max {max(times, default=float('nan')):.2f} s"))
        restarted, total = etcd_freeze(cc)
        rows.append((f"etcd frozen {3 * cc.ttl} s (3x TTL): VMs restarted", "1", f"{restarted}/{total}", "", ""))
        from_fence, from_up, note = fence_to_stale_stop(cc)
        rows.append(("node cut off: fence -> its stale guests stopped", "1",
                     f"{from_fence:.2f} s" if from_fence is not None else "-", "", note))
        rows.append(("node cut off: link back -> stale guests stopped", "1",
                     f"{from_up:.2f} s" if from_up is not None else "-", "", ""))
        stall, note = stall_to_watchdog(cc)
        rows.append(("agent SIGSTOP -> watchdog stopped its guests", "1",
                     f"{stall:.2f} s" if stall is not None else "-", "", note))
    finally:
        problems = cc.close()
        for p in problems:
            print(f"teardown: {p}", file=sys.stderr)
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'measurement':{w}s}  {'n':>3s}  {'p50/value':>10s}  {'p99':>8s}  notes")
    for name, n, p50, p99, note in rows:
        print(f"{name:{w}s}  {n:>3s}  {p50:>10s}  {p99:>8s}  {note}")
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
