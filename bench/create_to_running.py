#!/usr/bin/env python3
"""Benchmark: `metastackctl create` to `running`, with 3 agents.

Starts a private etcd and three agents (libvirt test:/// hosts, lease TTL 5 s,
the shipped defaults otherwise), then:
  1. sequential: 50 times, run `metastackctl create` (in-process, through
     click) and wait for the VM's actual key to say running, seen through an
     etcd watch; the latency is from just before the CLI call to the event.
  2. burst: create 50 more VMs at once, time until all are running.
Prints a table; asserts nothing (speed targets live here, not in tests).
Usage: .venv/bin/python bench/create_to_running.py [--count 50]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import metastack as ms  # noqa: E402
from harness import Cluster, EtcdServer, RunningWatch  # noqa: E402
from metastackctl import cli  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="metastack-bench-"))
    etcd = EtcdServer(work)
    etcd.start()
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix="/bench", timeout=2.0))
    cluster = Cluster(etcd, "/bench", store, work)
    cluster.ttl, cluster.etcd_timeout = 5, 1.0
    try:
        for n in (1, 2, 3):
            cluster.agent(f"node{n}", vcpus=64, ram_mb=131072)
        cluster.wait_hosts("node1", "node2", "node3")
        base = ["--endpoints", etcd.endpoint, "--prefix", "/bench"]

        def ctl(*argv: str) -> None:
            with contextlib.redirect_stderr(io.StringIO()):  # the CLI's "created ..." lines
                cli.main(base + list(argv), standalone_mode=False)
        ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "256")
        watch = RunningWatch(store)
        lat = []
        for i in range(args.count):
            vm = f"seq{i:03d}"
            t0 = time.perf_counter()
            ctl("create", vm, "--flavour", "small")
            lat.append(watch.wait(vm) - t0)
        t0 = time.perf_counter()
        burst = [f"burst{i:03d}" for i in range(args.count)]
        for vm in burst:
            store.put(store.keys.desired(vm), b'{"flavour": "small"}')
        for vm in burst:
            watch.wait(vm, 60)
        burst_s = time.perf_counter() - t0
        watch.cancel()
        per_host = Counter(h for _, h in cluster.states().values())
        ms_ = [x * 1000 for x in lat]
        rows = [
            ("create -> running, median (ms)", f"{statistics.median(ms_):.1f}"),
            ("create -> running, p90 (ms)", f"{pct(ms_, 90):.1f}"),
            ("create -> running, p99 (ms)", f"{pct(ms_, 99):.1f}"),
            ("create -> running, max (ms)", f"{max(ms_):.1f}"),
            (f"burst of {args.count}: all running (s)", f"{burst_s:.2f}"),
            ("VMs per node after both runs", ", ".join(f"{h}={c}" for h, c in sorted(per_host.items()))),
        ]
        w = max(len(r[0]) for r in rows)
        print(f"{'metric'.ljust(w)}  value   ({args.count} sequential creates, 3 agents, test:/// hosts)")
        for k, v in rows:
            print(f"{k.ljust(w)}  {v}")
    finally:
        cluster.stop_all()
        store.close()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
