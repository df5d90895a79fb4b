#!/usr/bin/env python3
"""Benchmark: a scheduler-free cluster measured at scale.

For each node count it starts a private etcd (one for the whole run) and N
agents on private libvirt test:/// hosts (lease TTL 5 s, INFO logs to a
file per agent process), creates N x --vms-per-node VMs the way
`metastackctl create` does (a desired entry with a fresh uuid, written as a
create-if-absent transaction), and watches the whole prefix with one etcd
watch of its own. It reports:

  * placements/s (first claim = first PUT of actual/<vm>, from the first
    create to the last claim), create->claimed and create->running p50/p99
    (running: the owner's actual value says "running", i.e. the test-driver
    domain was defined and started);
  * lost claim races per placement (agent log lines "lost the claim race");
  * etcd write transactions per placement: distinct revisions seen by the
    watch, split by the key kinds they touched (actual/ = claim+state,
    hosts/, ~/events/ = history, other), and etcd's own gRPC counters
    (grpc_server_handled_total by method; stream messages for Watch and
    LeaseKeepAlive) before/after, per placement (these include the
    benchmark's own create txn per VM; the revisions are split so that
    desired/ shows it apart);
  * VMs per node at the end (stddev, max/min), reserved vcpus per node as
    a % of the node's vcpus (stddev, max/min: the spread that means
    something with mixed node sizes), and the VMs left pending for
    more than 1 s while a live ready node had room for them (sampled every
    0.5 s from the watch-fed state);
  * per agent (JSON only, "agent_loops"): reconciles and looks for new
    work, their counts and CPU seconds, and what asked for each, from each agent's stop line (its whole life);
  * an idle window after everything runs: revisions written (lease
    renewals are not revisions), LeaseKeepAlive messages per node per
    minute, agent CPU % per agent (utime+stime of each agent process,
    divided by the agents in it) and RSS per process;
  * a central baseline on a fresh prefix of the same etcd, no agents: the
    same arrivals placed by one in-benchmark least-loaded writer (loads in
    memory, each claim one create-if-absent txn on actual/<vm>). A
    reference point only, not a MetaStack feature;
  * the machine's raw etcd rate: sequential create-if-absent txns for 3 s,
    and the same with 8 threads.

Prints one table and, with --json, writes every number. Asserts nothing:
speed targets live in benchmarks, not tests.

Usage (from the repository root):
    .venv/bin/python bench/scale.py                       # 10,30,60 nodes, burst and stream
    .venv/bin/python bench/scale.py --nodes 5 --vms-per-node 10 --mode burst --idle 10
    .venv/bin/python bench/scale.py --nodes 200 --per-process 10 --mixed --json out.json
Options: --nodes LIST, --vms-per-node N, --mode burst|stream|both, --rate
ARRIVALS/S (stream), --mixed (node sizes 16/32/48 vcpus and flavours
small/medium/large), --per-process K (K agents per process, via
bench/agents_host.py), --central/--no-central, --idle SECONDS, --watch auto|json|grpc (the agents' watch transport), --ttl
SECONDS (the agents' lease_ttl, default 5), --cell-size K (cells of about K
nodes: the cluster config's "cells" and each agent's [node] cell, dealt
round robin in order of node size; default: no cells), --deal size|index
(dealt in order of size, or of index: cells of unequal capacity), --json FILE,
--keep (leave the work directory for the logs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import metastack as ms  # noqa: E402
from harness import EtcdServer, node_xml  # noqa: E402
from metastackctl import create_flavour, new_desired  # noqa: E402

TTL = 5
ETCD_TIMEOUT = 1.0  # at the default TTL (5 s); scaled with --ttl (TTL/5). check_timings: TTL/3 + 2*timeout <= TTL - timeout
SETTLE = 2.0  # seconds after the last VM runs that still count as the run (trailing host/state writes)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

FLAVOURS = {"small": (1, 1024), "medium": (2, 4096), "large": (4, 8192)}
EQUAL_NODE = (16, 32768)
MIXED_NODES = [(16, 32768), (32, 65536), (48, 98304)]
MIXED_FLAVOURS = ["small"] * 5 + ["medium"] * 2 + ["large"]  # about 50% of the mixed nodes' vcpus at 10/node


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def etcd_rpcs(etcd: EtcdServer) -> Counter:
    """etcd's gRPC counters by method: unary calls handled, and for the
    streams (Watch, LeaseKeepAlive) the messages received."""
    text = urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=5).read().decode()
    out: Counter = Counter()
    for line in text.splitlines():
        if line.startswith(("grpc_server_handled_total{", "grpc_server_msg_received_total{")):
            labels, _, value = line.rpartition(" ")
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            stream = 'grpc_type="bidi_stream"' in labels
            if line.startswith("grpc_server_handled_total") != stream:  # unary: handled; streams: messages
                out[method] += int(float(value))
    return out


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------
# Agents: processes of K agents each
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class NodeSpec:
    name: str
    vcpus: int
    ram_mb: int


class Fleet:
    """N agents on one prefix, K per process (K=1: `python metastack.py -c
    INI`, as in production; K>1: bench/agents_host.py). Everything started
    is stopped by its Popen handle."""

    def __init__(self, workdir: Path, etcd: EtcdServer, prefix: str, nodes: list[NodeSpec], per_process: int,
                 watch: str = "auto", ttl: int = TTL, resync: float = 0.0, cells: int = 1,
                 deal: str = "size") -> None:
        self.dir = workdir
        self.cells = cells
        self.watch = watch
        self.ttl = ttl
        self.resync = resync
        self.nodes = nodes
        self.per_process = per_process
        self.procs: list[tuple[subprocess.Popen, int, Path]] = []  # (process, agents in it, log)
        dealt = balanced_cells(nodes, cells) if deal == "size" else [i % max(1, cells) for i in range(len(nodes))]
        self.inis = [self._ini(etcd, prefix, n, c) for n, c in zip(nodes, dealt)]

    def _ini(self, etcd: EtcdServer, prefix: str, n: NodeSpec, cell: int = 0) -> Path:
        uri = f"test://{node_xml(self.dir / f'{n.name}.xml', n.vcpus, n.ram_mb)}"
        path = self.dir / f"{n.name}.ini"
        path.write_text(textwrap.dedent(f"""\
            [etcd]
            endpoints = {etcd.endpoint}
            prefix = {prefix}
            timeout = {ETCD_TIMEOUT * self.ttl / TTL:g}
            watch = {self.watch}
            [node]
            name = {n.name}
            state_dir = {self.dir}/state-{n.name}
            vcpus = {n.vcpus}
            ram_mb = {n.ram_mb}
            {f"cell = {cell}" if self.cells > 1 else ""}
            [libvirt]
            uri = {uri}
            domain_type = test
            shutdown_timeout = 2
            [agent]
            lease_ttl = {self.ttl}
            on_stop = keep
            {f"resync_interval = {self.resync:g}" if self.resync else ""}
            [logging]
            syslog = none
            level = info
            """))
        return path

    def start(self) -> None:
        k = self.per_process
        for i in range(0, len(self.inis), k):
            group = self.inis[i:i + k]
            if k == 1:
                argv = [sys.executable, str(ROOT / "metastack.py"), "-c", str(group[0])]
                if os.environ.get("BENCH_PROFILE") == self.nodes[i].name:  # one agent under a profiler (diagnosis)
                    argv[1] = os.environ["BENCH_PROFILER"]
                logpath = self.dir / f"{self.nodes[i].name}.log"
            else:
                argv = [sys.executable, str(HERE / "agents_host.py"), *map(str, group)]
                logpath = self.dir / f"host{i // k:03d}.log"
            with open(logpath, "ab") as logfile:
                proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT)
            self.procs.append((proc, len(group), logpath))

    def dead(self) -> list[str]:
        return [str(p.args[-1]) for p, _, _ in self.procs if p.poll() is not None]

    def cpu(self) -> dict[int, float]:
        return {p.pid: proc_cpu_seconds(p.pid) for p, _, _ in self.procs}

    def rss_mb(self) -> list[float]:
        return [proc_rss_mb(p.pid) for p, _, _ in self.procs]

    def count(self, text: str) -> int:
        """Lines containing ``text`` in every agent log."""
        return sum(path.read_text(errors="replace").count(text) for _, _, path in self.procs)

    STOP_LINE = re.compile(r"stopping after (\d+) reconciles \(([\d.]+) s CPU in them; asked for by (.*?)\) "
                           r"and (\d+) looks for new work \(([\d.]+) s CPU; asked for by (.*?)\); ([\d.]+) s CPU in all")

    def agent_loops(self) -> dict[str, Any]:
        """Per agent, averaged: reconciles and looks (counts, CPU seconds)
        and what asked for the reconciles, from each agent's stop line
        (its whole life: start-up, the run and the idle window). Call
        after stop(); empty when no agent wrote one."""
        rows, causes, look_causes = [], Counter[str](), Counter[str]()
        for _, _, path in self.procs:
            for m in self.STOP_LINE.finditer(path.read_text(errors="replace")):
                rows.append([float(m.group(i)) for i in (1, 2, 4, 5, 7)])
                for text, counter in ((m.group(3), causes), (m.group(6), look_causes)):
                    for part in text.split(", "):
                        what, _, count = part.rpartition(" ")
                        if count.isdigit():
                            counter[what] += int(count)
        if not rows:
            return {}
        n = len(rows)
        out = {k: round(sum(r[i] for r in rows) / n, 3) for i, k in enumerate(
            ("reconciles", "reconcile_cpu_s", "looks", "look_cpu_s", "process_cpu_s"))}
        out["reconciles_asked_by"] = {k: round(v / n, 1) for k, v in sorted(causes.items())}
        out["looks_asked_by"] = {k: round(v / n, 1) for k, v in sorted(look_causes.items())}
        out["agents"] = n
        return out

    def lost_races(self) -> int:
        return self.count("lost the claim race")

    def stop(self) -> None:
        for p, _, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p, _, _ in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------
# The recorder: one watch on the whole prefix
# ---------------------------------------------------------------------------

def kind_of(keys: ms.Keys, key: str) -> str:
    if key.startswith(keys.dir("events")):
        return "history"
    split = keys.split(key)
    first = split[0] if split is not None else ""
    return {"actual": "claim+state", "hosts": "hosts", "desired": "desired"}.get(first, "other")


class Recorder:
    """Watch-fed view of one prefix: for every revision the kinds it
    touched and when it was seen; first claim and first running per VM;
    the current value of every key (for the pending sampler)."""

    def __init__(self, store: ms.Store) -> None:
        self.store = store
        self.keys = store.keys
        self.lock = threading.Lock()
        self.revs: dict[int, tuple[float, set[str]]] = {}
        self.claimed: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.kv: dict[str, bytes] = {}
        self.created: dict[str, float] = {}  # set by the writers, just before each create
        self.all_running = threading.Event()
        self.expect = 0
        self.errors: list[str] = []
        rev, entries = store.list_prefix(self.keys.all)
        self.kv = {k: e.value for k, e in entries.items()}
        self.cancel = store.watch_prefix(self.keys.all, rev + 1, self._on, self._err)

    def _err(self, exc: BaseException) -> None:
        self.errors.append(str(exc))

    def _on(self, _rev: int, events: list[ms.KeyEvent]) -> None:
        now = time.perf_counter()
        with self.lock:
            for ev in events:
                seen = self.revs.setdefault(ev.mod_revision, (now, set()))
                seen[1].add(kind_of(self.keys, ev.key))
                if ev.value is None:
                    self.kv.pop(ev.key, None)
                    continue
                self.kv[ev.key] = ev.value
                split = self.keys.split(ev.key)
                if split is not None and split[0] == "actual":
                    vm = split[1]
                    self.claimed.setdefault(vm, now)
                    if vm not in self.running and json.loads(ev.value).get("state") == "running":
                        self.running[vm] = now
                        if self.expect and len(self.running) >= self.expect:
                            self.all_running.set()

    def writes_between(self, t0: float, t1: float) -> dict[str, int]:
        """Distinct revisions seen in [t0, t1], in total, those not the
        benchmark's own arrivals ("agents"), and per kind touched
        (desired/: the arrivals; history: revisions that wrote history
        alone, not history written in a claim's or a start's transaction)."""
        out: Counter = Counter()
        with self.lock:
            for at, kinds in self.revs.values():
                if t0 <= at <= t1:
                    out["total"] += 1
                    for k in kinds:
                        if k != "history" or kinds == {"history"}:  # history riding in a claim's txn costs nothing
                            out[k] += 1
                    if "desired" not in kinds:
                        out["agents"] += 1
        return {k: out.get(k, 0) for k in ("total", "agents", "desired", "claim+state", "hosts", "history", "other")}

    def values(self, kind: str) -> dict[str, dict]:
        with self.lock:
            return {split[1]: json.loads(v) for k, v in self.kv.items()
                    if (split := self.keys.split(k)) is not None and split[0] == kind}


class PendingSampler(threading.Thread):
    """Every 0.5 s: the VMs created more than 1 s ago, still unclaimed,
    while some live ready node (a host record on a lease, state ready) had
    room for them by the claims it holds."""

    def __init__(self, rec: Recorder, flavour_of: dict[str, str]) -> None:
        super().__init__(name="pending-sampler", daemon=True)
        self.rec, self.flavour_of = rec, flavour_of
        self.stop = threading.Event()
        self.vms: set[str] = set()
        self.samples = 0
        self.worst = 0  # the most such VMs in one sample

    def run(self) -> None:
        while not self.stop.wait(0.5):
            now = time.perf_counter()
            hosts = {n: h for n, h in self.rec.values("hosts").items() if h.get("state", "ready") == "ready"}
            used: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for a in self.rec.values("actual").values():
                used[a.get("host", "")][0] += a.get("vcpus", 0)
                used[a.get("host", "")][1] += a.get("ram_mb", 0)
            free = [(h["vcpus"] - used[n][0], h["ram_mb"] - used[n][1]) for n, h in hosts.items()]
            with self.rec.lock:
                waiting = [vm for vm, t in list(self.rec.created.items())
                           if now - t > 1.0 and vm not in self.rec.claimed]
            hit = [vm for vm in waiting
                   if any(c >= FLAVOURS[self.flavour_of[vm]][0] and r >= FLAVOURS[self.flavour_of[vm]][1]
                          for c, r in free)]
            self.samples += 1
            self.worst = max(self.worst, len(hit))
            self.vms.update(hit)


# ---------------------------------------------------------------------------
# Arrivals: desired entries as `metastackctl create` writes them
# ---------------------------------------------------------------------------

def make_flavours(store: ms.Store) -> None:
    for name, (vcpus, ram_mb) in FLAVOURS.items():
        create_flavour(store, name, vcpus, ram_mb)


def arrive(store: ms.Store, rec: Recorder, vms: list[tuple[str, str]], mode: str, rate: float) -> None:
    """Write the desired entries: burst (4 writer threads, as fast as they
    go) or stream (``rate`` arrivals/s, one writer on a fixed schedule).
    Same entry and transaction as `metastackctl create` (new_desired + a
    create-if-absent); the CLI's check that the flavour exists is done once,
    by creating the flavours, not once per VM."""
    def write(name: str, flavour: str) -> None:
        spec = new_desired(name, flavour)
        with rec.lock:
            rec.created[name] = time.perf_counter()
        for attempt in range(10):  # an overloaded etcd times out: try again, as an admin would
            try:
                rev, _ = store.create(store.keys.desired(name), json.dumps(spec.to_json()).encode())
                break
            except ms.StoreUnavailable:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        if rev is None and attempt == 0:
            raise RuntimeError(f"{name} exists already")  # after a retry: the timed-out attempt landed

    def write_all(part: list[tuple[str, str]]) -> None:
        for name, flavour in part:
            write(name, flavour)

    if mode == "burst":
        threads = [threading.Thread(target=write_all, args=(vms[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return
    t0 = time.perf_counter()
    for i, v in enumerate(vms):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        write(*v)


def workload(n_nodes: int, per_node: int, mixed: bool) -> tuple[list[NodeSpec], list[tuple[str, str]]]:
    nodes = [NodeSpec(f"node{i:03d}", *(MIXED_NODES[i % len(MIXED_NODES)] if mixed else EQUAL_NODE))
             for i in range(n_nodes)]
    count = n_nodes * per_node
    vms = [(f"vm{i:05d}", MIXED_FLAVOURS[i % len(MIXED_FLAVOURS)] if mixed else "small") for i in range(count)]
    return nodes, vms


def latency_ms(rec: Recorder, at: dict[str, float]) -> tuple[float, float]:
    with rec.lock:
        lat = [(at[vm] - t) * 1000 for vm, t in rec.created.items() if vm in at]
    return pct(lat, 50), pct(lat, 99)


def spread(per_node: dict[str, int]) -> dict[str, float]:
    counts = list(per_node.values()) or [0]
    return {"stddev": statistics.pstdev(counts), "max": max(counts), "min": min(counts)}


def balanced_cells(nodes: list[NodeSpec], cells: int) -> list[int]:
    """Each node's cell, dealt round robin in order of size, so that every
    cell gets about the same capacity, as an operator would configure them
    (cells of unequal capacity get equal shares of the VMs, by the hash of
    their names); with equal nodes, plain round robin."""
    out = [0] * len(nodes)
    for pos, i in enumerate(sorted(range(len(nodes)), key=lambda i: (nodes[i].vcpus, i))):
        out[i] = pos % max(1, cells)
    return out


def utilisation(nodes: list[NodeSpec], claims: dict[str, dict]) -> dict[str, float]:
    """Reserved vcpus per node as a % of its vcpus: stddev and max/min
    (the spread that means something when node sizes differ), over every
    claim at the end of the run (all trusted there: no node died)."""
    used: Counter[str] = Counter()
    for claim in claims.values():
        used[claim.get("host", "")] += int(claim.get("vcpus", 0))
    shares = [100.0 * used[n.name] / n.vcpus for n in nodes] or [0.0]
    return {"stddev": statistics.pstdev(shares), "max": max(shares), "min": min(shares)}


def fill(nodes: list[NodeSpec], vms: list[tuple[str, str]]) -> float:
    return sum(FLAVOURS[f][0] for _, f in vms) / sum(n.vcpus for n in nodes)


# ---------------------------------------------------------------------------
# One case with agents; the central baseline; the raw etcd rate
# ---------------------------------------------------------------------------

def wait_all(rec: Recorder, timeout: float, fleet: Optional[Fleet] = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rec.all_running.wait(1.0):
            return True
        if fleet is not None and fleet.dead():
            print(f"  agent process(es) died: {fleet.dead()[:5]}", file=sys.stderr)
            return False
    return False


def run_agents(etcd: EtcdServer, work: Path, tag: str, n_nodes: int, args: argparse.Namespace, mode: str) -> dict:
    nodes, vms = workload(n_nodes, args.vms_per_node, args.mixed)
    prefix = f"/scale-{tag}"
    casedir = work / tag
    casedir.mkdir()
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=prefix, timeout=5.0))
    cells = max(1, round(n_nodes / args.cell_size)) if args.cell_size else 1
    fleet = Fleet(casedir, etcd, prefix, nodes, args.per_process, args.watch, args.ttl, args.resync, cells, args.deal)
    result: dict[str, Any] = {"nodes": n_nodes, "mode": mode, "vms": len(vms), "per_process": args.per_process,
                              "mixed": args.mixed, "fill_vcpus": round(fill(nodes, vms), 3), "cells": cells}
    try:
        make_flavours(store)
        if cells > 1:  # the cluster config an operator writes; each agent's ini names its cell (round robin)
            store.put(store.keys.config, json.dumps({"cells": cells}).encode())
        t_boot = time.perf_counter()
        fleet.start()

        def registered() -> bool:
            return len(store.list_prefix(store.keys.dir("hosts"))[1]) >= n_nodes
        deadline = time.monotonic() + 30 + n_nodes
        while not registered() and time.monotonic() < deadline and not fleet.dead():
            time.sleep(0.5)
        result["start_s"] = round(time.perf_counter() - t_boot, 1)
        if not registered():
            result["error"] = f"only some agents registered (dead: {fleet.dead()[:5]})"
            return result
        time.sleep(1.0)  # let start-up writes drain before the counters are read
        rec = Recorder(store)
        rec.expect = len(vms)
        sampler = PendingSampler(rec, dict(vms))
        rpc0 = etcd_rpcs(etcd)
        busy0 = (sum(fleet.cpu().values()), proc_cpu_seconds(etcd.proc.pid))  # type: ignore[union-attr]
        t0 = time.perf_counter()
        sampler.start()
        arrive(store, rec, vms, mode, args.rate)
        done = wait_all(rec, 60 + len(vms) / 5, fleet)
        t_done = time.perf_counter()
        sampler.stop.set()
        time.sleep(SETTLE)
        t1 = time.perf_counter()
        rpc1 = etcd_rpcs(etcd)
        busy1 = (sum(fleet.cpu().values()), proc_cpu_seconds(etcd.proc.pid))  # type: ignore[union-attr]
        placed = len(rec.claimed)
        writes = rec.writes_between(t0, t1)
        rpcs = {m: rpc1[m] - rpc0[m] for m in sorted(set(rpc1) | set(rpc0)) if rpc1[m] != rpc0[m]}
        per = max(placed, 1)
        last_claim = max(rec.claimed.values(), default=t0)
        first_create = min(rec.created.values(), default=t0)
        per_node = Counter(a["host"] for a in rec.values("actual").values())
        lost = fleet.lost_races()
        result.update({
            "complete": done, "placed": placed, "running": len(rec.running),
            "run_s": round(t_done - t0, 2),
            "placements_per_s": placed / max(last_claim - first_create, 1e-9),
            "arrivals_s": round(max(rec.created.values(), default=t0) - first_create, 3),
            "claimed_ms": dict(zip(("p50", "p99"), latency_ms(rec, rec.claimed))),
            "running_ms": dict(zip(("p50", "p99"), latency_ms(rec, rec.running))),
            "lost_races": lost, "lost_races_per_placement": lost / per,
            # backups that read the VM's claim before claiming and found it taken (a read, no write)
            "backup_rechecks_taken": fleet.count("meanwhile (this view was behind)"),
            "writes": writes, "writes_per_placement": {k: v / per for k, v in writes.items()},
            "rpcs_per_placement": {m: round(v / per, 3) for m, v in rpcs.items()},
            "vms_per_node": spread({n.name: per_node.get(n.name, 0) for n in nodes}),
            "vcpu_use_pct": utilisation(nodes, rec.values("actual")),
            "pending_while_capacity": len(sampler.vms), "pending_while_capacity_worst_sample": sampler.worst,
            "cpu_s": {"agents": round(busy1[0] - busy0[0], 2), "etcd": round(busy1[1] - busy0[1], 2),
                      "window_s": round(t1 - t0, 2)},
        })
        # idle: nothing arrives; what does a settled cluster cost?
        cpu0, i0, rpc0 = fleet.cpu(), time.perf_counter(), etcd_rpcs(etcd)
        time.sleep(args.idle)
        cpu1, i1, rpc1 = fleet.cpu(), time.perf_counter(), etcd_rpcs(etcd)
        window = i1 - i0
        cpu_pct = [100 * (cpu1[p.pid] - cpu0[p.pid]) / window / k for p, k, _ in fleet.procs]
        rss = fleet.rss_mb()
        result["idle"] = {
            "seconds": round(window, 1), "revisions": rec.writes_between(i0, i1)["total"],
            "keepalives_per_node_per_min": (rpc1["LeaseKeepAlive"] - rpc0["LeaseKeepAlive"]) / n_nodes / window * 60,
            "rpcs": {m: rpc1[m] - rpc0[m] for m in sorted(rpc1) if rpc1[m] != rpc0[m]},
            "cpu_pct_per_agent": statistics.mean(cpu_pct), "cpu_pct_per_agent_max": max(cpu_pct),
            "rss_mb_per_process": statistics.mean(rss), "rss_mb_per_process_max": max(rss),
        }
        if rec.errors:
            result["watch_errors"] = rec.errors[:5]
        rec.cancel()
        return result
    finally:
        fleet.stop()
        store.close()
        loops = fleet.agent_loops()
        if loops:
            result["agent_loops"] = loops


def run_central(etcd: EtcdServer, tag: str, n_nodes: int, args: argparse.Namespace, mode: str) -> dict:
    """The reference: one least-loaded placer in this process, no agents."""
    nodes, vms = workload(n_nodes, args.vms_per_node, args.mixed)
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=f"/central-{tag}",
                                   timeout=5.0))
    try:
        make_flavours(store)
        rec = Recorder(store)
        rec.expect = len(vms)
        free = {n.name: [n.vcpus, n.ram_mb] for n in nodes}
        cap = {n.name: (n.vcpus, n.ram_mb) for n in nodes}
        todo: queue.Queue = queue.Queue()
        keys = store.keys
        # The placer learns of arrivals through its own watch on the shards
        # (desired entries), as a central scheduler would; it reads
        # capacities it was given.
        cancel = store.watch_prefix(keys.shards, store.list_prefix(keys.shards)[0] + 1,
                                    lambda _r, evs: [todo.put(e) for e in evs if e.value is not None
                                                     and (keys.split(e.key) or ("",))[0] == "desired"],
                                    lambda e: todo.put(None))
        unplaced: list[str] = []

        def placer() -> None:
            for _ in range(len(vms)):
                ev = todo.get()
                if ev is None:
                    return
                vm = ev.key.rsplit("/", 1)[1]
                spec = ms.DesiredVM.parse(vm, ev.value)
                vcpus, ram = FLAVOURS[spec.flavour]
                fits = [n for n, (c, r) in free.items() if c >= vcpus and r >= ram]
                if not fits:
                    unplaced.append(vm)
                    continue
                node = min(fits, key=lambda n: (1 - free[n][0] / cap[n][0], n))
                claim = ms.ActualVM(host=node, state="starting", vcpus=vcpus, ram_mb=ram, uuid=spec.uuid or "")
                rev, _ = store.create(store.keys.actual(vm), claim.encode())
                if rev is not None:
                    free[node][0] -= vcpus
                    free[node][1] -= ram
        t = threading.Thread(target=placer, name="central-placer", daemon=True)
        t.start()
        t0 = time.perf_counter()
        arrive(store, rec, vms, mode, args.rate)
        t.join(60 + len(vms) / 5)
        time.sleep(0.3)  # the last claims' watch events
        cancel()
        rec.cancel()
        placed = len(rec.claimed)
        last_claim = max(rec.claimed.values(), default=t0)
        first_create = min(rec.created.values(), default=t0)
        per_node = Counter(a["host"] for a in rec.values("actual").values())
        return {"placed": placed, "unplaced": len(unplaced),
                "placements_per_s": placed / max(last_claim - first_create, 1e-9),
                "arrivals_s": round(max(rec.created.values(), default=t0) - first_create, 3),
                "claimed_ms": dict(zip(("p50", "p99"), latency_ms(rec, rec.claimed))),
                "vms_per_node": spread({n.name: per_node.get(n.name, 0) for n in nodes}),
                "vcpu_use_pct": utilisation(nodes, rec.values("actual"))}
    finally:
        store.close()


def raw_txn_rate(etcd: EtcdServer, seconds: float = 3.0) -> dict[str, float]:
    """create-if-absent txns per second: one caller in sequence, then 8 threads."""
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix="/raw", timeout=5.0))
    out = {}
    try:
        for label, threads in (("sequential", 1), ("threads_8", 8)):
            counts = [0] * threads
            stop = time.perf_counter() + seconds

            def loop(i: int) -> None:
                while time.perf_counter() < stop:
                    store.create(f"/raw/{label}/{i}/{counts[i]}", b"{}")
                    counts[i] += 1
            ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out[label] = sum(counts) / (time.perf_counter() - t0)
    finally:
        store.close()
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

COLUMNS = ["nodes", "mode", "agents pl/s", "central pl/s", "ratio", "lost/pl",
           "writes/pl all (claim+state/hosts/history alone)", "create->claimed p50/p99 ms (agents | central)",
           "create->running p50/p99 ms",
           "VMs/node sd", "max/min", "vcpu use % sd (max/min) | central", "pending w/ room", "idle CPU %/agent", "RSS MB/proc"]


def use_cell(u: dict[str, float]) -> str:
    return f"{u['stddev']:.1f} ({u['max']:.0f}%/{u['min']:.0f}%)"


def row(r: dict) -> list[str]:
    if "error" in r:
        return [str(r["nodes"]), r["mode"], "error: " + r["error"]] + [""] * (len(COLUMNS) - 3)
    c = r.get("central")
    w = r["writes_per_placement"]
    return [
        str(r["nodes"]), r["mode"] + ("" if r["complete"] else " (incomplete)"),
        f"{r['placements_per_s']:.1f}",
        f"{c['placements_per_s']:.1f}" if c else "-",
        f"{r['placements_per_s'] / c['placements_per_s']:.2f}" if c else "-",
        f"{r['lost_races_per_placement']:.2f}",
        f"{w.get('agents', 0):.2f} ({w['claim+state']:.2f}/{w['hosts']:.2f}/{w['history']:.2f})",
        f"{r['claimed_ms']['p50']:.0f}/{r['claimed_ms']['p99']:.0f}"
        + (f" | {c['claimed_ms']['p50']:.0f}/{c['claimed_ms']['p99']:.0f}" if c else ""),
        f"{r['running_ms']['p50']:.0f}/{r['running_ms']['p99']:.0f}",
        f"{r['vms_per_node']['stddev']:.2f}",
        f"{r['vms_per_node']['max']}/{r['vms_per_node']['min']}",
        use_cell(r["vcpu_use_pct"]) + (f" | {use_cell(c['vcpu_use_pct'])}" if c else ""),
        str(r["pending_while_capacity"]),
        f"{r['idle']['cpu_pct_per_agent']:.2f}",
        f"{r['idle']['rss_mb_per_process']:.0f}",
    ]


def print_table(results: list[dict]) -> None:
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="10,30,60", help="comma list of node counts (default %(default)s)")
    ap.add_argument("--vms-per-node", type=int, default=10)
    ap.add_argument("--mode", choices=("burst", "stream", "both"), default="both")
    ap.add_argument("--rate", type=float, default=20.0, help="stream arrivals per second (default %(default)s)")
    ap.add_argument("--mixed", action="store_true", help="mixed node sizes and flavours")
    ap.add_argument("--per-process", type=int, default=1, metavar="K", help="agents per process (default 1)")
    ap.add_argument("--central", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the central least-loaded baseline (default on)")
    ap.add_argument("--idle", type=float, default=20.0, help="idle window in seconds (default %(default)s)")
    ap.add_argument("--watch", choices=("auto", "json", "grpc"), default="auto",
                    help="the agents' [etcd] watch transport (default %(default)s: json here)")
    ap.add_argument("--ttl", type=int, default=TTL,
                    help="the agents' lease_ttl in seconds (default %(default)s; more for many agents per core)")
    ap.add_argument("--resync", type=float, default=0.0, metavar="SECONDS",
                    help="the agents' resync_interval (default: the agent's own default)")
    ap.add_argument("--cell-size", type=int, default=0, metavar="K",
                    help="about K nodes per cell: the cluster config gets cells = round(nodes / K) and each agent's ini "
                         "a cell, dealt round robin in order of node size (default 0: no cells)")
    ap.add_argument("--deal", choices=("size", "index"), default="size",
                    help="how nodes are dealt into cells: round robin in order of size (default) or of index (with "
                         "--mixed: cells of unequal capacity, which overflow between cells evens out)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    args = ap.parse_args()
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    modes = ["burst", "stream"] if args.mode == "both" else [args.mode]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill by pid still stops our agents and etcd
    work = Path(tempfile.mkdtemp(prefix="metastack-scale-"))
    etcd = EtcdServer(work)
    etcd.start()
    results: list[dict] = []
    try:
        raw = raw_txn_rate(etcd)
        print(f"raw etcd create-if-absent txns/s: sequential {raw['sequential']:.0f}, "
              f"8 threads {raw['threads_8']:.0f}", file=sys.stderr)
        for n in counts:
            for mode in modes:
                tag = f"{n}-{mode}"
                print(f"{n} nodes, {mode}: {n * args.vms_per_node} VMs ...", file=sys.stderr)
                r = run_agents(etcd, work, tag, n, args, mode)
                if args.central and "error" not in r:
                    r["central"] = run_central(etcd, tag, n, args, mode)
                results.append(r)
        kind = "mixed nodes/flavours" if args.mixed else f"equal nodes {EQUAL_NODE[0]} vcpus/{EQUAL_NODE[1]} MiB, small VMs"
        print(f"\n{args.vms_per_node} VMs/node, {kind}, cells of about {args.cell_size or 'all'} nodes, "
              f"{args.per_process} agent(s)/process, watch {args.watch}, lease TTL {args.ttl}s, resync {args.resync or 'default'}, stream rate "
              f"{args.rate:g}/s, idle {args.idle:g}s; raw etcd txn/s: {raw['sequential']:.0f} seq, "
              f"{raw['threads_8']:.0f} with 8 threads")
        print_table(results)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "raw_txn_per_s": raw, "results": results},
                                                  indent=2, default=str))
    finally:
        etcd.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
