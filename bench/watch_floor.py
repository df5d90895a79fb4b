#!/usr/bin/env python3
"""Benchmark: the floor of a placement's cost when every agent watches everything.

What a placement costs a cluster whose N agents each watch the whole
prefix, before any agent logic runs: N watcher processes that only read
the watch (the agents' own JSON-gateway reader, ``Store.watch_prefix``)
and decode each value, and one writer that writes what a placement writes
today, in three transactions per VM as the agents do at 60 nodes: the
desired entry (create-if-absent), the claim (create-if-absent on
actual/<vm>) and the running state (a put of actual/<vm>); 4 writer
threads, as bench/scale.py's burst. For each N it reports the watchers'
CPU per VM per watcher, etcd's CPU per VM, their sum per VM, and the
placements/s that sum allows on this machine's cores if nothing else ran
(cores / CPU per VM): the ceiling of a design that sends every VM's
messages to every agent, to compare with bench/scale.py's agents and
central baseline. Every watcher must see every event (checked; a run
whose watchers missed events says so).

Prints one table; asserts nothing (speed lives in benchmarks, not tests).

Usage (from the repository root):
    .venv/bin/python bench/watch_floor.py                    # 10,30,60 watchers, 10 VMs per watcher
    .venv/bin/python bench/watch_floor.py --nodes 60 --vms-per-node 10 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import metastack as ms  # noqa: E402
from harness import EtcdServer  # noqa: E402
from scale import proc_cpu_seconds as cpu_seconds  # noqa: E402  (utime + stime of a process)

PREFIX = "/floor"


def watcher(endpoint: str) -> int:
    """One watcher process: watch the prefix, decode each value, count the
    events; print "ready" once watching, and the count when stdin closes."""
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(endpoint), prefix=PREFIX, timeout=5.0))
    seen = [0]

    def on_events(_rev: int, events: list[ms.KeyEvent]) -> None:
        seen[0] += len(events)
        for ev in events:
            if ev.value is not None:
                json.loads(ev.value)

    rev, _ = store.list_prefix(store.keys.all)
    store.watch_prefix(store.keys.all, rev + 1, on_events, lambda exc: None)
    print("ready", flush=True)
    sys.stdin.read()
    print(seen[0], flush=True)
    return 0


def run(etcd: EtcdServer, tag: str, nodes: int, vms: int) -> dict[str, Any]:
    """One case: ``nodes`` watchers, ``vms`` placements written."""
    procs = [subprocess.Popen([sys.executable, __file__, "--watcher", etcd.endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(nodes)]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a watcher did not start")
        store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=PREFIX, timeout=5.0))
        keys = store.keys
        claim = ms.ActualVM("node000", "starting", vcpus=1, ram_mb=1024).encode()
        running = ms.ActualVM("node000", "running", vcpus=1, ram_mb=1024).encode()

        def write(part: range) -> None:
            for i in part:
                vm = f"{tag}-vm{i:05d}"
                store.create(keys.desired(vm), b'{"flavour": "small"}')
                store.create(keys.actual(vm), claim)
                store.put(keys.actual(vm), running)

        watchers0, etcd0, t0 = sum(cpu_seconds(p.pid) for p in procs), cpu_seconds(etcd.proc.pid), time.perf_counter()  # type: ignore[union-attr]
        threads = [threading.Thread(target=write, args=(range(k, vms, 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(2.0)  # the last events reach every watcher
        watchers1, etcd1, t1 = sum(cpu_seconds(p.pid) for p in procs), cpu_seconds(etcd.proc.pid), time.perf_counter()  # type: ignore[union-attr]
        store.close()
    finally:
        counts = []
        for p in procs:
            out, _ = p.communicate("", timeout=30)
            counts.append(int(out.split()[-1]) if out.split() else 0)
    per_watcher = (watchers1 - watchers0) / vms / nodes
    etcd_per_vm = (etcd1 - etcd0) / vms
    total = per_watcher * nodes + etcd_per_vm
    return {"nodes": nodes, "vms": vms, "seconds": round(t1 - t0, 2),
            "watcher_ms_per_vm_per_watcher": round(per_watcher * 1000, 3),
            "etcd_ms_per_vm": round(etcd_per_vm * 1000, 2), "total_ms_per_vm": round(total * 1000, 2),
            "ceiling_pl_per_s": round((os.cpu_count() or 1) / total, 1) if total > 0 else None,
            "events_expected_per_watcher": 3 * vms, "events_seen_min": min(counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="10,30,60", help="comma list of watcher counts (default 10,30,60)")
    ap.add_argument("--vms-per-node", type=int, default=10)
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--watcher", help=argparse.SUPPRESS)  # internal: run one watcher process
    args = ap.parse_args()
    if args.watcher:
        return watcher(args.watcher)
    results = []
    with tempfile.TemporaryDirectory(prefix="ms-floor-") as tmp:
        etcd = EtcdServer(Path(tmp))
        etcd.start()
        try:
            for n in (int(x) for x in args.nodes.split(",")):
                print(f"{n} watchers ...", file=sys.stderr)
                results.append(run(etcd, f"n{n}", n, n * args.vms_per_node))
        finally:
            etcd.stop()
    cols = ["nodes", "VMs", "watcher CPU ms/VM/watcher", "etcd CPU ms/VM", "total ms/VM",
            f"ceiling pl/s on {os.cpu_count()} cores", "events seen (min/expected)"]
    rows = [[str(r["nodes"]), str(r["vms"]), f"{r['watcher_ms_per_vm_per_watcher']:.3f}", f"{r['etcd_ms_per_vm']:.2f}",
             f"{r['total_ms_per_vm']:.2f}", str(r["ceiling_pl_per_s"]),
             f"{r['events_seen_min']}/{r['events_expected_per_watcher']}"] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
