"""The chaos suite's cluster: deploy/testbed.py (3 nodes, each with its own
address, libvirtd and cuttable path to etcd) plus agents, guests and the
independent checker (tests/chaoscheck.py). Used by tests/test_chaos.py and
bench/failover.py.

    cc = ChaosCluster.create(guest_dir, vms=["c1", "c2", "c3"])   # up, agents, guests booted
    cc.baseline()          # heal every fault, all agents up, every VM settled
    ...
    cc.close()             # stops and removes everything

Only the testbed's pids and files are touched; the agent is driven through
its config file, etcd (metastackctl) and signals.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "deploy", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import libvirt  # noqa: E402

import testbed as tb  # noqa: E402
from chaoscheck import Checker, NodeInfo  # noqa: E402

libvirt.registerErrorHandler(lambda *_a: None, None)

TTL = 5
MOVE_SLACK = 3.0  # a VM of a failed node must run elsewhere within TTL + this
# etcd extends every lease by an election timeout (1 s by default) when a
# leader takes over, e.g. after a restart: moves timed from an etcd restart
# get this on top.
ETCD_ELECTION = 1.0
# A start that fails (e.g. libvirtd restarting under it) is retried after the
# executor's first back-off (Executor: 2 ** 0 s): moves that meet such a
# failure get this on top.
FIRST_RETRY = 1.0
BOOT_TIMEOUT = 90.0
# What the suite measured: (test, what, value, unit); printed at the end of a
# pytest run (tests/conftest.py pytest_terminal_summary).
MEASURED: list[tuple[str, str, float, str]] = []


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]


class ChaosCluster:
    def __init__(self, bed: tb.Testbed, checker: Checker, vms: list[str], workdir: Path) -> None:
        self.bed = bed
        self.checker = checker
        self.vms = vms
        self.workdir = workdir
        self.ttl = bed.ttl

    # -- life cycle ---------------------------------------------------------------
    @classmethod
    def create(cls, guest: Path, vms: Iterable[str] = ("c1", "c2", "c3"), nodes: int = 3, ttl: int = TTL,
               name: str = "msc", subnet: str = "10.213.0") -> "ChaosCluster":
        workdir = Path(tempfile.mkdtemp(prefix="msc-chaos-"))
        workdir.chmod(0o755)
        bed = tb.Testbed(workdir / "bed", nodes=nodes, ttl=ttl, prefix="/metastack-chaos", name=name,
                         subnet=subnet)
        checker: Optional[Checker] = None
        try:
            bed.up()
            cc0 = cls(bed, None, list(vms), workdir)  # type: ignore[arg-type]
            cc0.ctl("flavour", "create", "tiny", "--vcpus", "1", "--ram-mb", "128")
            cc0.ctl("image", "import", "tiny", str(guest / "disk.raw"), "--kernel", str(guest / "vmlinuz"),
                    "--initrd", str(guest / "initrd.img"), "--cmdline", (guest / "cmdline").read_text().strip())
            for n in bed.nodes:
                bed.agent(n.name).start()
            checker = Checker(bed.etcd.endpoint, bed.prefix, bed.ceph.conf, bed.ceph.keyring, bed.ceph.pool,
                              [NodeInfo(n.name, n.address, n.netns_inode, n.state_dir / "console")
                               for n in bed.nodes])
            checker.start()
            cc = cls(bed, checker, list(vms), workdir)
            checker.wait_for(lambda s: s.hosts is not None and len(s.hosts) == nodes, 30, "every agent registered")
            for vm in cc.vms:
                cc.ctl("create", vm, "--flavour", "tiny", "--image", "tiny")
            checker.wait_for(lambda s: checker.settled(cc.vms, s) and all(s.boots.get(v, 0) >= 1 for v in cc.vms),
                             BOOT_TIMEOUT, "every VM running and booted")
            return cc
        except BaseException:
            if checker is not None:
                checker.stop()
            problems = bed.down()
            if problems:
                print("testbed down:", *problems, sep="\n  ", file=sys.stderr)
            if not os.environ.get("MSC_CHAOS_KEEP"):
                shutil.rmtree(workdir, ignore_errors=True)
            raise

    def close(self) -> list[str]:
        self.checker.stop()
        problems = self.bed.down()
        if os.environ.get("MSC_CHAOS_KEEP"):
            print(f"chaos: kept {self.workdir} (MSC_CHAOS_KEEP)", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    # -- driving ------------------------------------------------------------------------
    def ctl(self, *args: str) -> str:
        r = subprocess.run([sys.executable, str(ROOT / "metastackctl.py"), "-c", str(self.bed.ctl_ini()), *args],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"metastackctl {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r.stdout

    def agent(self, node: str) -> tb.Agent:
        return self.bed.agent(node)

    def vms_on(self, node: str) -> list[str]:
        return sorted(vm for vm, h in self.checker.placement().items() if h == node and vm in self.vms)

    def busiest(self, exclude: Iterable[str] = ()) -> str:
        """The node running the most VMs (ties: lowest name)."""
        counts = {n.name: 0 for n in self.bed.nodes if n.name not in set(exclude)}
        for vm, h in self.checker.placement().items():
            if h in counts and vm in self.vms:
                counts[h] += 1
        return sorted(counts, key=lambda n: (-counts[n], n))[0]

    def boots(self) -> dict[str, int]:
        return dict(self.checker.latest().boots)

    def disks(self) -> dict[str, str]:
        return {vm: (a or {}).get("disk") for vm, a in (self.checker.latest().actual or {}).items()}

    def domains(self, active_only: bool = False) -> dict[str, list[str]]:
        """node -> every domain (running or only defined; with active_only
        the running ones) its libvirtd has."""
        out = {}
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
        for n in self.bed.nodes:
            conn = libvirt.open(n.uri)
            try:
                out[n.name] = sorted(d.name() for d in conn.listAllDomains(flags))
            finally:
                conn.close()
        return out

    def stale_domains(self) -> list[str]:
        """Domains defined on a node that is not the VM's actual host."""
        placement = self.checker.placement()
        out = []
        for node, names in self.domains().items():
            for name in names:
                vm, _, dnode = name.rpartition(".")
                if vm in self.vms and placement.get(vm) != node:
                    out.append(f"{name} on {node} (actual host {placement.get(vm)})")
        return out

    def intrude(self, vm: str, node: str, seconds: float = 2.0) -> None:
        """Open vm's disk read-write (a watcher, a would-be writer; nothing
        is written) from node's network namespace for a while, with Ceph's
        Python bindings: a second writer nobody fenced, for checking the
        checker."""
        disk = self.checker.latest().disks[vm]
        c = self.bed.ceph
        code = ("import rados, rbd, sys, time\n"
                f"c = rados.Rados(conffile={c.conf!r}, name='client.{c.client}', conf={{'keyring': {c.keyring!r}}})\n"
                "c.connect(timeout=10)\n"
                f"io = c.open_ioctx({c.pool!r})\n"
                f"img = rbd.Image(io, {disk!r})\n"
                f"time.sleep({seconds})\n"
                "img.close(); io.close(); c.shutdown()\n")
        subprocess.run(["ip", "netns", "exec", self.bed.node(node).netns, sys.executable, "-c", code],
                       check=True, timeout=seconds + 30)

    def late_write(self, node: str) -> str:
        """A client that opens only now, from node's address (a QEMU whose
        start was slow, finding 6), writes one RADOS object in the VM pool.
        Returns "written" or the error it got; never touches a VM disk."""
        c = self.bed.ceph
        code = ("import rados\n"
                f"c = rados.Rados(conffile={c.conf!r}, name='client.{c.client}', "
                f"conf={{'keyring': {c.keyring!r}, 'rados_osd_op_timeout': '10'}})\n"
                "c.connect(timeout=10)\n"
                f"io = c.open_ioctx({c.pool!r})\n"
                "try:\n"
                f"    io.write_full('metastack-late-writer-{node}', b'x' * 4096)\n"
                "    print('written')\n"
                "except rados.Error as e:\n"
                "    print(f'{type(e).__name__}: {e}')\n")
        r = subprocess.run(["ip", "netns", "exec", self.bed.node(node).netns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=60)
        return (r.stdout.strip() or r.stderr.strip()).splitlines()[-1]

    # -- between tests ---------------------------------------------------------------------
    def baseline(self, timeout: float = 120.0) -> None:
        """Undo every fault (links up, etcd paths open, etcd running and not
        frozen, every agent running) and wait until every VM runs once, on
        its actual host, with no stale domain anywhere."""
        self.bed.heal()
        for n in self.bed.nodes:
            a = self.agent(n.name)
            if a.alive():
                os.kill(a.pid, signal.SIGCONT)
            else:
                a.start()
        try:
            self.checker.wait_for(lambda s: self.checker.settled(self.vms, s) and not self.checker.stale_qemus(s),
                                  timeout, "every VM settled on its host")
            deadline = time.monotonic() + 30
            while self.stale_domains() and time.monotonic() < deadline:
                time.sleep(0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    # -- assertions ------------------------------------------------------------------------
    def logs(self, lines: int = 25) -> str:
        out = []
        for n in self.bed.nodes:
            text = self.agent(n.name).log().splitlines()
            out.append(f"--- {n.name} agent log (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def explain(self, t0: float, what: str) -> str:
        return f"{what}\n--- checker timeline since the fault\n{self.checker.timeline(t0)}\n{self.logs()}"

    def wait_moved(self, vms: list[str], from_node: str, t_fault: float,
                   timeout: Optional[float] = None) -> dict[str, Optional[tuple[float, str]]]:
        """Wait (up to TTL + 30 s) until each VM runs on another node; return
        vm -> (seconds after t_fault, node) or None."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.ttl + 30)
        while True:
            res = self.checker.moved(vms, from_node, t_fault)
            if all(res.values()) or time.monotonic() >= deadline:
                return res
            time.sleep(0.25)

    def assert_moved(self, vms: list[str], from_node: str, t_fault: float, t_ref: Optional[float] = None,
                     extra: float = 0.0) -> dict:
        """Every VM ran on another node within TTL + 3 s (+ extra) of t_ref
        (default the fault), its disk fenced on from_node first."""
        res = self.wait_moved(vms, from_node, t_fault)
        limit = self.ttl + MOVE_SLACK + extra
        t_ref = t_fault if t_ref is None else t_ref
        for vm, r in res.items():
            MEASURED.append((_current_test(), f"{vm} running on {r[1] if r else '-'} after",
                             (r[0] - (t_ref - t_fault)) if r else float("nan"), "s"))
        late = {vm: r for vm, r in res.items() if r is None or r[0] - (t_ref - t_fault) > limit}
        assert not late, self.explain(t_fault, f"VMs of {from_node} not running elsewhere within {limit:.0f} s "
                                      f"(TTL + {MOVE_SLACK + extra:.0f} s): {late} (all: {res})")
        unfenced = self.checker.fenced_before_start(vms, from_node, t_fault)
        assert not unfenced, self.explain(t_fault, f"started before the old copy was fenced: {unfenced}")
        return res

    def assert_boots_continue(self, vms: list[str], before: dict[str, int], disks: dict[str, str]) -> None:
        """Each moved VM boots again from the same disk: its counter goes on."""
        self.checker.wait_for(lambda s: all(s.boots.get(vm, 0) >= before[vm] + 1 for vm in vms), BOOT_TIMEOUT,
                              f"{vms} booted again (boot counters {before} + 1)")
        now = self.disks()
        assert all(now[vm] == disks[vm] for vm in vms), f"disks changed: {disks} -> {now}"

    def assert_no_restarts(self, vms: Iterable[str], t0: float, t_fault: Optional[float] = None) -> None:
        got = {vm: self.checker.restarts(vm, t0) for vm in vms}
        bad = {vm: r for vm, r in got.items() if r != (0, 0)}
        MEASURED.append((_current_test(), "VMs restarted", float(len(bad)), f"of {len(got)}"))
        assert not bad, self.explain(t_fault or t0, f"VMs restarted (new QEMU processes, boot counter increase):"
                                     f" {bad}")

    def assert_safe(self, t0: float) -> None:
        """Never two unfenced writers of a disk; no desired entry lost (and
        the checker never looked away for more than 2 s)."""
        blind = self.checker.blind_spots(t0)
        assert not blind, self.explain(t0, f"the checker missed samples: {blind}; errors: "
                                           f"{self.checker.errors[-5:]}")
        writers = self.checker.unfenced_writers(t0)
        assert not writers, self.explain(t0, "two unfenced writers of one disk:\n" + "\n".join(writers[:20]))
        lost = self.checker.lost_desired(self.vms, t0)
        assert not lost, self.explain(t0, "desired entries lost:\n" + "\n".join(lost[:10]))

    def assert_no_stale(self, t0: float, timeout: float = 30.0) -> None:
        """Once every node is back: no QEMU and no domain of a VM on a node
        that is not its actual host."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.checker.wait_sample_after(time.monotonic())
            stale = self.checker.stale_qemus(s) + self.stale_domains()
            if not stale:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(self.explain(t0, f"stale copies {timeout:.0f} s after the node came back: "
                                                      f"{stale}"))
            time.sleep(0.5)

    def observe(self, seconds: float) -> None:
        time.sleep(seconds)
        self.checker.wait_sample_after(time.monotonic())
