"""An independent checker for the chaos suite: it never imports the agent.

A thread samples, every ``interval`` (0.25 s) seconds:
  * which QEMU processes run for each VM, from /proc (``-name guest=VM.NODE``;
    the node from the process's network namespace, the domain name's
    suffix only as a fallback), each identified by (pid, start time);
  * for each VM disk (RBD images ``vm-<vm>-g<N>`` in the pool, or the
    ``disk`` of the VM's actual key) its watchers, with Ceph's own Python
    bindings (read-only opens: the checker is never a watcher itself), and
    which of them are blocklisted (``osd blocklist ls``: exact client
    addresses and, pacific+, CIDR ranges);
  * etcd with its own client: desired, actual, hosts and fences keys;
  * about once a second the guests' serial consoles (files under each
    node's state dir), for the boot counter the guest prints
    (``METASTACK-GUEST-UP boot=N``): the counter lives on the VM's disk, so
    it going on from where it was proves a moved VM kept its disk.

The timeline (a list of Sample) answers the suite's questions for a time
window: unfenced writers (two clients that can write one disk at once),
time from a fault to a VM running on another node, restarts, lost desired
entries, stale copies. Nothing here decides anything for the agents.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import etcd3  # cslab-etcd3 (module etcd3): see /work/shared/FACTS.md
import rados
import rbd

BOOT_RE = re.compile(rb"METASTACK-GUEST-UP boot=(\d+)")
DISK_RE = re.compile(r"^vm-(.+)-g(\d+)$")


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str
    netns_inode: int
    console_dir: Path


@dataclasses.dataclass(frozen=True)
class Qemu:
    vm: str
    node: str
    pid: int
    start: int  # /proc/PID/stat starttime: (pid, start) never repeats

    @property
    def ident(self) -> tuple[int, int]:
        return (self.pid, self.start)


@dataclasses.dataclass(frozen=True)
class Watcher:
    addr: str  # "IP:0/NONCE"
    ip: str
    fenced: bool


@dataclasses.dataclass
class Sample:
    t: float  # time.monotonic()
    qemus: dict[str, list[Qemu]]
    disks: dict[str, str]  # vm -> image name
    watchers: dict[str, list[Watcher]]  # vm -> watchers of its disk
    blocklist: frozenset[str]
    ranges: tuple[str, ...]  # "IP/BITS"
    etcd_ok: bool
    desired: Optional[frozenset[str]]  # None: etcd did not answer
    actual: Optional[dict[str, dict]]
    fences: Optional[dict[str, dict]]
    hosts: Optional[dict[str, dict]]
    boots: dict[str, int]  # vm -> highest boot counter seen so far on any console


def parse_blocklist(out: bytes) -> tuple[set[str], list[str]]:
    """(client addresses, ranges as "IP/BITS") from ``osd blocklist ls -f json``."""
    text, pos, dec = out.decode(errors="replace").strip(), 0, json.JSONDecoder()
    addrs, ranges = set(), []
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        obj, pos = dec.raw_decode(text, pos)
        for e in obj if isinstance(obj, list) else []:
            if "range" in e:  # "10.213.0.11:0/32"
                ip, _, rest = e["range"].partition(":")
                ranges.append(f"{ip}/{rest.rsplit('/', 1)[1]}")
            elif "addr" in e:
                addrs.add(e["addr"])
    return addrs, ranges


def addr_ip(addr: str) -> str:
    """The IP of a Ceph entity address "v1:IP:PORT/NONCE" / "IP:PORT/NONCE"."""
    a = addr.split(",")[0].strip("[]")
    if a.startswith(("v1:", "v2:", "any:")):
        a = a.split(":", 1)[1]
    return a.rsplit(":", 1)[0]


def in_ranges(ip: str, ranges: Iterable[str]) -> bool:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(a in ipaddress.ip_network(r, strict=False) for r in ranges)


class Timeline:
    """Samples in time order, and the suite's questions about them (pure:
    tests/test_chaoscheck.py feeds it made-up samples)."""

    def __init__(self, nodes: list[NodeInfo], interval: float = 0.25) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.interval = interval
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.qemu_addrs: dict[tuple[int, int], set[str]] = {}  # QEMU identity -> watcher addrs seen from it
        self.qemu_boot0: dict[tuple[int, int], int] = {}  # QEMU identity -> the VM's boot counter when first seen
        self.last: Optional[Sample] = None

    def add(self, s: Sample) -> None:
        """Append a sample, remembering which watcher addresses each QEMU had
        and the VM's boot counter when each QEMU appeared."""
        for vm, qs in s.qemus.items():
            for q in qs:
                self.qemu_boot0.setdefault(q.ident, s.boots.get(vm, 0))
                ip = self.nodes[q.node].address
                self.qemu_addrs.setdefault(q.ident, set()).update(
                    w.addr for w in s.watchers.get(vm, []) if w.ip == ip)
        with self.lock:
            self.samples.append(s)
            self.last = s

    def mark(self, label: str) -> float:
        t = time.monotonic()
        with self.lock:
            self.marks.append((t, label))
        return t

    # -- reading the timeline ----------------------------------------------------
    def window(self, t0: float = 0.0, t1: Optional[float] = None) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if s.t >= t0 and (t1 is None or s.t <= t1)]

    def latest(self) -> Sample:
        with self.lock:
            if self.last is None:
                raise RuntimeError("no sample yet")
            return self.last

    def wait_sample_after(self, t: float, timeout: float = 10.0) -> Sample:
        """The first sample taken entirely after time t."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.last
            if s is not None and s.t > t:
                return s
            time.sleep(0.05)
        raise AssertionError(f"the checker took no sample for {timeout} s; errors: {self.errors[-3:]}")

    def wait_for(self, pred: Callable[[Sample], Any], timeout: float, what: str) -> Sample:
        deadline = time.monotonic() + timeout
        s = self.wait_sample_after(time.monotonic())
        while True:
            if pred(s):
                return s
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.describe(s)}")
            time.sleep(self.interval / 2)
            s = self.latest()

    def node_fenced(self, s: Sample, node: str) -> bool:
        """The node's whole address is blocklisted (a range entry)."""
        return in_ranges(self.nodes[node].address, s.ranges)

    def qemu_fenced(self, s: Sample, q: Qemu) -> bool:
        """The QEMU cannot write: its node's address is range-blocklisted, or
        a client address seen watching the disk from it is blocklisted."""
        return self.node_fenced(s, q.node) or any(a in s.blocklist for a in self.qemu_addrs.get(q.ident, ()))

    # -- the suite's questions ----------------------------------------------------
    def blind_spots(self, t0: float, t1: Optional[float] = None, max_gap: float = 2.0) -> list[str]:
        """Stretches longer than max_gap in [t0, t1 or now] without a sample:
        the other answers mean nothing there."""
        t1 = time.monotonic() if t1 is None else t1
        times = [t0] + [s.t for s in self.window(t0, t1)] + [t1]
        return [f"no sample from t={a:.2f} to t={b:.2f} ({b - a:.1f} s)"
                for a, b in zip(times, times[1:]) if b - a > max_gap]

    def unfenced_writers(self, t0: float = 0.0, t1: Optional[float] = None) -> list[str]:
        """Moments where one disk had two writers nobody had fenced, held for
        two consecutive samples (a taker's lock-break open lasts milliseconds):
        two watchers that are not blocklisted, or two QEMUs of the VM on two
        nodes neither of which is fenced."""
        out, prev = [], None
        for s in self.window(t0, t1):
            if prev is not None:
                for vm, ws in s.watchers.items():
                    now = {w.addr for w in ws if not w.fenced}
                    before = {w.addr for w in prev.watchers.get(vm, []) if not w.fenced}
                    both = now & before
                    if len(both) >= 2:
                        out.append(f"t={s.t:.2f} {vm}: {len(both)} unfenced watchers {sorted(both)}")
                for vm, qs in s.qemus.items():
                    live = {q.ident: q for q in qs if not self.qemu_fenced(s, q)}
                    earlier = {q.ident for q in prev.qemus.get(vm, []) if not self.qemu_fenced(prev, q)}
                    nodes = {q.node for i, q in live.items() if i in earlier}
                    if len(nodes) >= 2:
                        out.append(f"t={s.t:.2f} {vm}: unfenced QEMUs on {sorted(nodes)}")
            prev = s
        return out

    def moved(self, vms: Iterable[str], from_node: str, t_fault: float) -> dict[str, Optional[tuple[float, str]]]:
        """vm -> (seconds from t_fault until its domain ran on another node:
        a QEMU there and the actual key saying running there, new node), or
        None if that has not happened (yet)."""
        res: dict[str, Optional[tuple[float, str]]] = {vm: None for vm in vms}
        last_actual: dict[str, dict] = {}
        for s in self.window(t_fault):
            if s.actual is not None:
                last_actual = s.actual
            for vm in res:
                if res[vm] is not None:
                    continue
                a = last_actual.get(vm) or {}
                for q in s.qemus.get(vm, []):
                    if q.node != from_node and a.get("host") == q.node and a.get("state") == "running":
                        res[vm] = (s.t - t_fault, q.node)
        return res

    def fenced_before_start(self, vms: Iterable[str], from_node: str, t_fault: float) -> list[str]:
        """For each VM, at the first sample showing a QEMU of it outside
        from_node, every QEMU left on from_node must already be fenced."""
        out = []
        for vm in vms:
            for s in self.window(t_fault):
                new = [q for q in s.qemus.get(vm, []) if q.node != from_node]
                if new:
                    old = [q for q in s.qemus.get(vm, []) if q.node == from_node]
                    for q in old:
                        if not self.qemu_fenced(s, q):
                            out.append(f"t={s.t:.2f} {vm}: started on {new[0].node} while its QEMU on "
                                       f"{from_node} (pid {q.pid}) was not fenced")
                    break
        return out

    def restarts(self, vm: str, t0: float, t1: Optional[float] = None) -> tuple[int, int]:
        """(QEMU processes that replaced the first one seen in the window,
        boot counter increase) for vm in [t0, t1]."""
        idents: list[tuple[int, int]] = []
        win = self.window(t0, t1)
        for s in win:
            for q in s.qemus.get(vm, []):
                if q.ident not in idents:
                    idents.append(q.ident)
        boots = [s.boots.get(vm, 0) for s in win]
        return max(0, len(idents) - 1), (boots[-1] - boots[0]) if boots else 0

    def lost_desired(self, expected: Iterable[str], t0: float = 0.0, t1: Optional[float] = None) -> list[str]:
        exp = set(expected)
        out = []
        for s in self.window(t0, t1):
            if s.desired is not None and not exp <= s.desired:
                out.append(f"t={s.t:.2f} desired entries missing: {sorted(exp - s.desired)}")
        return out

    def stale_qemus(self, s: Optional[Sample] = None) -> list[str]:
        """QEMUs running for a VM on a node its actual key does not name."""
        s = s or self.latest()
        out = []
        if s.actual is None:
            return ["etcd did not answer"]
        for vm, qs in s.qemus.items():
            host = (s.actual.get(vm) or {}).get("host")
            for q in qs:
                if q.node != host:
                    out.append(f"{vm}: QEMU pid {q.pid} on {q.node}, actual host {host}")
        return out

    def booted(self, s: Sample, vm: str) -> bool:
        """The guest in vm's (only) QEMU has printed its boot line: the boot
        counter went up after that QEMU appeared."""
        qs = s.qemus.get(vm, [])
        return len(qs) == 1 and s.boots.get(vm, 0) > self.qemu_boot0.get(qs[0].ident, 1 << 30)

    def settled(self, vms: Iterable[str], s: Optional[Sample] = None, booted: bool = True) -> bool:
        """Every VM running on the host its actual key names, as its only
        QEMU, with an unfenced watcher from that host's address, and (with
        booted) its guest booted."""
        s = s or self.latest()
        if s.actual is None:
            return False
        for vm in vms:
            a = s.actual.get(vm) or {}
            qs = s.qemus.get(vm, [])
            if a.get("state") != "running" or len(qs) != 1 or qs[0].node != a.get("host"):
                return False
            ip = self.nodes[qs[0].node].address
            if not any(w.ip == ip and not w.fenced for w in s.watchers.get(vm, [])):
                return False
            if booted and not self.booted(s, vm):
                return False
        return True

    def placement(self, s: Optional[Sample] = None) -> dict[str, str]:
        """vm -> host, from the actual keys."""
        s = s or self.latest()
        return {vm: a.get("host") for vm, a in (s.actual or {}).items()}

    def describe(self, s: Optional[Sample] = None) -> str:
        s = s or self.latest()
        lines = [f"sample t={s.t:.2f} etcd_ok={s.etcd_ok} ranges={list(s.ranges)} blocklisted={len(s.blocklist)}"]
        vms = sorted(set(s.qemus) | set(s.watchers) | set(s.actual or {}) | set(s.desired or ()))
        for vm in vms:
            a = (s.actual or {}).get(vm) or {}
            qs = ", ".join(f"{q.node}:{q.pid}{'(fenced)' if self.qemu_fenced(s, q) else ''}"
                           for q in s.qemus.get(vm, []))
            ws = ", ".join(f"{w.addr}{'(blocklisted)' if w.fenced else ''}" for w in s.watchers.get(vm, []))
            lines.append(f"  {vm}: actual {a.get('state')}@{a.get('host')} qemus [{qs}] watchers [{ws}]"
                         f" boot={s.boots.get(vm, 0)}")
        if s.fences:
            lines.append(f"  fences: {json.dumps(s.fences, sort_keys=True)}")
        return "\n".join(lines)

    def timeline(self, t0: float = 0.0, t1: Optional[float] = None) -> str:
        """The window as text: marks, and every sample where something changed."""
        out, prev_key = [], None
        with self.lock:
            marks = [(t, m) for t, m in self.marks if t >= t0 and (t1 is None or t <= t1)]
        events: list[tuple[float, str]] = [(t, f"MARK {m}") for t, m in marks]
        for s in self.window(t0, t1):
            key = (tuple(sorted((vm, tuple(sorted((q.node, q.pid) for q in qs))) for vm, qs in s.qemus.items())),
                   tuple(sorted((vm, tuple(sorted((w.addr, w.fenced) for w in ws))) for vm, ws in s.watchers.items())),
                   tuple(sorted((vm, a.get("state"), a.get("host")) for vm, a in (s.actual or {}).items())),
                   s.etcd_ok, s.ranges, tuple(sorted(s.boots.items())))
            if key != prev_key:
                events.append((s.t, self.describe(s)))
                prev_key = key
        for t, text in sorted(events, key=lambda e: e[0]):
            out.append(f"[{t - t0:7.2f}] {text}")
        return "\n".join(out)


class Checker(Timeline, threading.Thread):
    """Samples the testbed in its own thread; see the module docstring."""

    def __init__(self, etcd_endpoint: str, prefix: str, ceph_conf: str, ceph_keyring: str, pool: str,
                 nodes: list[NodeInfo], interval: float = 0.25, ceph_client: str = "admin") -> None:
        Timeline.__init__(self, nodes, interval)
        threading.Thread.__init__(self, name="chaos-checker", daemon=True)
        self.prefix = prefix.rstrip("/")
        self.pool = pool
        self.by_inode = {n.netns_inode: n.name for n in nodes}
        host, port = etcd_endpoint.rsplit(":", 1)
        self.etcd = etcd3.MultiEndpointEtcd3Client(
            [etcd3.Endpoint(host, int(port), secure=False, time_retry=0.5)], timeout=0.5, failover=True)
        self.cluster = rados.Rados(conffile=ceph_conf, name=f"client.{ceph_client}",
                                   conf={"keyring": ceph_keyring, "rados_osd_op_timeout": "5",
                                         "rados_mon_op_timeout": "5"})
        self.cluster.connect(timeout=10)
        self.ioctx = self.cluster.open_ioctx(pool)
        self.stopping = threading.Event()
        self.etcd_retry_at = 0.0
        self.boots: dict[str, int] = {}
        self.known_disks: dict[str, str] = {}

    # -- sampling -------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                self.add(self.sample())
            except Exception as exc:  # noqa: BLE001 - keep sampling; report at the end
                self.errors.append(f"{time.monotonic():.2f} {type(exc).__name__}: {exc}")
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        try:
            self.ioctx.close()
            self.cluster.shutdown()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.etcd.close()
        except Exception:  # noqa: BLE001
            pass

    def scan_qemus(self) -> dict[str, list[Qemu]]:
        out: dict[str, list[Qemu]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                if not argv or b"qemu-system" not in argv[0] or b"-name" not in argv:
                    continue
                stat = Path(f"/proc/{d}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] in ("Z", "X"):
                    continue
                ino = os.stat(f"/proc/{d}/ns/net").st_ino
            except OSError:
                continue
            name_arg = argv[argv.index(b"-name") + 1].decode(errors="replace")
            m = re.search(r"(?:^|,)guest=([^,]+)", name_arg)
            domain = m.group(1) if m else name_arg.split(",")[0]
            if ino not in self.by_inode:
                continue  # not one of our nodes' QEMUs (someone else's)
            node = self.by_inode[ino]
            vm = domain.rsplit(".", 1)[0]
            out.setdefault(vm, []).append(Qemu(vm, node, int(d), int(fields[19])))
        return out

    def read_etcd(self) -> tuple[bool, Any, Any, Any, Any]:
        if time.monotonic() < self.etcd_retry_at:
            return False, None, None, None, None
        try:
            kinds: dict[str, dict[str, Any]] = {kind: {} for kind in ("desired", "actual", "fences", "hosts")}
            # desired and actual records live in shards/<xx>/<kind>/<vm> (and, written the old
            # way, in <kind>/<vm>; the shard's wins)
            for p in [f"{self.prefix}/{kind}/" for kind in kinds] + [f"{self.prefix}/shards/"]:
                for value, meta in self.etcd.get_prefix(p):
                    rest = meta.key.decode()[len(p):].split("/")
                    kind, name = (rest[1], rest[2]) if p.endswith("/shards/") and len(rest) == 3 \
                        else (p.rstrip("/").rsplit("/", 1)[1], rest[0])
                    if kind not in kinds:
                        continue
                    try:
                        kinds[kind][name] = json.loads(value)
                    except ValueError:
                        kinds[kind][name] = {"_raw": value.decode(errors="replace")}
        except Exception:  # noqa: BLE001 - etcd down or frozen: try again in a second
            self.etcd_retry_at = time.monotonic() + 1.0
            return False, None, None, None, None
        return True, frozenset(kinds["desired"]), kinds["actual"], kinds["fences"], kinds["hosts"]

    def read_boots(self) -> None:
        for n in self.nodes.values():
            try:
                files = list(n.console_dir.glob("*.log"))
            except OSError:
                continue
            for f in files:
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                nums = [int(x) for x in BOOT_RE.findall(data)]
                if nums:
                    vm = f.name[:-len(".log")]
                    self.boots[vm] = max(self.boots.get(vm, 0), max(nums))

    def sample(self) -> Sample:
        t = time.monotonic()
        qemus = self.scan_qemus()
        etcd_ok, desired, actual, fences, hosts = self.read_etcd()
        ret, out, err = self.cluster.mon_command(json.dumps({"prefix": "osd blocklist ls", "format": "json"}), b"")
        if ret != 0:  # never guess "nothing is fenced": skip this sample
            raise RuntimeError(f"osd blocklist ls failed: {ret} {err}")
        addrs, ranges = parse_blocklist(out)
        for name in rbd.RBD().list(self.ioctx):
            m = DISK_RE.match(name)
            if m:
                cur = self.known_disks.get(m.group(1))
                cm = DISK_RE.match(cur) if cur else None
                if cm is None or int(m.group(2)) >= int(cm.group(2)):
                    self.known_disks[m.group(1)] = name
        for vm, a in (actual or {}).items():
            disk = a.get("disk") if isinstance(a, dict) else None
            if disk and "/" in disk:
                self.known_disks[vm] = disk.split("/", 1)[1]
        watchers: dict[str, list[Watcher]] = {}
        for vm, disk in self.known_disks.items():
            try:
                with rbd.Image(self.ioctx, disk, read_only=True) as img:
                    ws = [str(w["addr"]) for w in img.watchers_list()]
            except rbd.ImageNotFound:
                continue
            watchers[vm] = [Watcher(a, addr_ip(a), a in addrs or in_ranges(addr_ip(a), ranges)) for a in ws]
        self.read_boots()  # a few small files: every sample
        return Sample(t, qemus, dict(self.known_disks), watchers, frozenset(addrs), tuple(ranges), etcd_ok,
                      desired, actual, fences, hosts, dict(self.boots))
