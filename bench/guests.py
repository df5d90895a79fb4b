#!/usr/bin/env python3
"""Benchmark: real QEMU guests booting from RBD clones, with 3 agents.

Starts its own etcd, a private single-node Ceph (deploy/cephdev.py),
libvirtd (deploy/libvirtd.py; an already running qemu:///system is used as
is and left alone), builds or reuses the tiny guest in .cache/guest, imports
it as image "tiny" (direct kernel boot) and starts three agents as the
real_cluster test fixture does (qemu:///system, domain type qemu, Ceph
disks; each agent 4 vcpus, 2048 MiB), then measures:
  1. one guest, 3 times: `metastackctl create` (in-process, through click)
     until `metastackctl console NAME` (polled every 0.2 s) shows
     `METASTACK-GUEST-UP boot=1`, and until the actual key says running
     (etcd watch); the VM is destroyed between runs.
  2. five guests created back to back: time from each one's create to its
     console line, and the wall time until all five show it.
  3. a VM disk as an RBD clone of the image's protected snapshot
     (Storage.ensure_disk, median of 5) versus a full copy of the same 32 MiB
     raw image into RBD with `qemu-img convert` (median of 3).
  4. the RSS of each QEMU process of step 2 (VmRSS, pid from
     /run/libvirt/qemu/<vm>.<node>.pid) and of each agent process.
Prints a table; asserts nothing. Everything started here is stopped here.
Usage: .venv/bin/python bench/guests.py
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "deploy"))
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

import cephdev  # noqa: E402
import libvirtd as lvd  # noqa: E402
import metastack as ms  # noqa: E402
from harness import Cluster, EtcdServer, RunningWatch, wait_for  # noqa: E402
from metastackctl import cli  # noqa: E402

PREFIX = "/bench"
NODES = ("gbench1", "gbench2", "gbench3")  # not node1..3: the demo may share this libvirtd
FLAVOUR_MB = 128
UP = re.compile(r"METASTACK-GUEST-UP boot=1\b")
POLL = 0.2
BOOT_TIMEOUT = 90.0


class Bench:
    def __init__(self, cluster: Cluster, ceph: cephdev.CephInfo) -> None:
        self.c = cluster
        self.ceph = ceph
        self.ini = cluster.dir / "ctl.ini"
        self.ini.write_text(f"[etcd]\nendpoints = {cluster.etcd.endpoint}\nprefix = {cluster.prefix}\n"
                            + cluster.ceph_section)
        self.runner = CliRunner()
        self.hosts: dict[str, str] = {}  # vm -> node, once claimed

    def ctl(self, *args: str, check: bool = True):
        r = self.runner.invoke(cli, ["-c", str(self.ini), *args])
        if check and r.exit_code != 0:
            raise RuntimeError(f"metastackctl {' '.join(args)}: exit {r.exit_code}: {r.output}")
        return r

    def console_up(self, vm: str) -> bool:
        r = self.ctl("console", vm, check=False)
        return r.exit_code == 0 and UP.search(r.output) is not None

    def file_up(self, vm: str) -> bool:
        """The same line in the serial console file on the host (no publish lag)."""
        host = self.hosts.get(vm) or self.c.states().get(vm, ("", ""))[1]
        if not host:
            return False
        self.hosts[vm] = host
        try:
            return UP.search((self.c.dir / f"state-{host}" / "console" / f"{vm}.log").read_text(errors="replace")) is not None
        except OSError:
            return False

    def wait_up(self, started: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """Poll every VM's console (metastackctl console) every POLL s until each
        shows the UP line; returns (perf_counter when seen via the CLI, when
        seen in the console file)."""
        seen: dict[str, float] = {}
        in_file: dict[str, float] = {}
        deadline = time.perf_counter() + BOOT_TIMEOUT
        while len(seen) < len(started):
            t_round = time.perf_counter()
            if t_round > deadline:
                raise TimeoutError(f"no console line within {BOOT_TIMEOUT:.0f}s: {sorted(set(started) - set(seen))}")
            self.check_alive()
            for vm in started:
                if vm not in in_file and self.file_up(vm):
                    in_file[vm] = time.perf_counter()
                if vm not in seen and self.console_up(vm):
                    seen[vm] = time.perf_counter()
                    in_file.setdefault(vm, seen[vm])
            time.sleep(max(0.0, t_round + POLL - time.perf_counter()))
        return seen, in_file

    def check_alive(self) -> None:
        """Fail fast if libvirtd went away (it may be shared: nothing stops
        someone else from stopping it) or an agent died (with its log tail)."""
        if not lvd.LIBVIRT_SOCK.exists():
            raise RuntimeError(f"libvirtd went away: {lvd.LIBVIRT_SOCK} is gone")
        for a in self.c.agents:
            if not a.alive():
                tail = "".join(a.log().splitlines(keepends=True)[-8:])
                raise RuntimeError(f"agent {a.name} exited (code {a.proc.returncode if a.proc else None}); "
                                   f"last lines of its log:\n{tail}")

    def destroy(self, *vms: str) -> None:
        for vm in vms:
            self.ctl("destroy", vm, "--yes")
        def gone() -> bool:
            self.check_alive()
            return not (set(vms) & set(self.c.states()))
        wait_for(gone, 60, 0.1, what=f"claims of {vms} gone")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="metastack-guests-"))
    work.chmod(0o755)  # QEMU runs as libvirt-qemu: kernels and consoles live below
    etcd: Optional[EtcdServer] = None
    store: Optional[ms.Store] = None
    cluster: Optional[Cluster] = None
    storage: Optional[ms.Storage] = None
    ceph_dir = work / "ceph"
    ceph: Optional[cephdev.CephInfo] = None
    lvd_pid = 0
    rows: list[tuple[str, str]] = []
    t_all = time.perf_counter()
    try:
        guest = ROOT / ".cache" / "guest"
        subprocess.run(["bash", str(ROOT / "deploy" / "build-guest.sh"), str(guest)], check=True,
                       stdout=subprocess.DEVNULL)
        etcd = EtcdServer(work)
        etcd.start()
        ceph = cephdev.start(ceph_dir, pool="metastack")
        lvd_pid = lvd.start(work / "libvirtd")
        store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=PREFIX, timeout=2.0))
        cluster = Cluster(etcd, PREFIX, store, work)
        cluster.libvirt_uri, cluster.domain_type = "qemu:///system", "qemu"
        cluster.ttl, cluster.etcd_timeout = 4, 0.5
        cluster.ceph_section = (f"[ceph]\nconf = {ceph.conf}\nclient = {ceph.client}\n"
                                f"keyring = {ceph.keyring}\npool = {ceph.pool}\n")
        b = Bench(cluster, ceph)
        b.ctl("flavour", "create", "tiny", "--vcpus", "1", "--ram-mb", str(FLAVOUR_MB))
        b.ctl("image", "import", "tiny", str(guest / "disk.raw"), "--kernel", str(guest / "vmlinuz"),
              "--initrd", str(guest / "initrd.img"), "--cmdline", (guest / "cmdline").read_text().strip())
        for n in NODES:
            cluster.agent(n, vcpus=4, ram_mb=2048)
        cluster.wait_hosts(*NODES)
        setup_s = time.perf_counter() - t_all
        watch = RunningWatch(store)

        # 1. one guest at a time
        one_console, one_file, one_running = [], [], []
        one = [f"one{i}" for i in range(1, 4)]
        for vm in one:
            t0 = time.perf_counter()
            b.ctl("create", vm, "--flavour", "tiny", "--image", "tiny")
            seen, in_file = b.wait_up({vm: t0})
            one_console.append(seen[vm] - t0)
            one_file.append(in_file[vm] - t0)
            one_running.append(watch.at[vm] - t0)
            b.destroy(vm)

        # 2. five at once
        five = [f"five{i}" for i in range(1, 6)]
        started: dict[str, float] = {}
        for vm in five:
            started[vm] = time.perf_counter()
            b.ctl("create", vm, "--flavour", "tiny", "--image", "tiny")
        seen, in_file = b.wait_up(started)
        five_console = {vm: seen[vm] - started[vm] for vm in five}
        five_file = {vm: in_file[vm] - started[vm] for vm in five}
        five_wall = max(seen.values()) - started[five[0]]
        five_running = {vm: watch.at[vm] - started[vm] for vm in five if vm in watch.at}
        watch.cancel()

        # 4. memory, while the five run
        states = cluster.states()
        qemu_rss = {}
        for vm in five:
            dom = ms.domain_name(vm, states[vm][1])
            pid = int(Path(f"/run/libvirt/qemu/{dom}.pid").read_text().strip())
            qemu_rss[vm] = rss_kib(pid) / 1024
        agent_rss = {a.name: rss_kib(a.proc.pid) / 1024 for a in cluster.agents if a.proc is not None}
        placement = ", ".join(f"{vm}@{states[vm][1]}" for vm in five)
        b.destroy(*five)

        # 3. clone vs full copy (on a quiet cluster: the guests are gone)
        entry = store.get(store.keys.image("tiny"))
        assert entry is not None
        image = ms.Image.parse("tiny", entry.value)
        storage = ms.Storage(ms.CephConfig(conf=ceph.conf, client=ceph.client, keyring=ceph.keyring,
                                           pool=ceph.pool))
        storage.pool_exists(ceph.pool)  # connect once: not part of the timings
        clone_s = []
        for i in range(5):
            name = f"bench-clone-{i}"
            t0 = time.perf_counter()
            created = storage.ensure_disk(ceph.pool, name, image)
            clone_s.append(time.perf_counter() - t0)
            assert created, name
            storage.remove_disk(ceph.pool, name)
        rbd_auth = ["-c", ceph.conf, "--keyring", ceph.keyring, "--id", ceph.client]
        copy_s = []
        copy_used = ""
        for i in range(3):
            name = f"bench-copy-{i}"
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest / "disk.raw"),
                            f"rbd:{ceph.pool}/{name}:conf={ceph.conf}:id={ceph.client}:keyring={ceph.keyring}"],
                           check=True, capture_output=True)
            copy_s.append(time.perf_counter() - t0)
            if i == 0:  # how much of the 32 MiB qemu-img actually wrote (it skips zeroes)
                du = subprocess.run(["rbd", *rbd_auth, "du", "--format", "json", f"{ceph.pool}/{name}"],
                                    capture_output=True, text=True)
                if du.returncode == 0:
                    img = json.loads(du.stdout)["images"][0]
                    copy_used = f"{img['used_size'] / 2**20:.1f} of {img['provisioned_size'] / 2**20:.0f} MiB"
            subprocess.run(["rbd", *rbd_auth, "rm", "--no-progress", f"{ceph.pool}/{name}"], check=True,
                           capture_output=True)

        ms_ = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        rows = [
            ("setup: etcd+ceph+libvirtd+import+3 agents (s)", f"{setup_s:.1f}"),
            ("1. create -> console line, median (s)", f"{med(one_console):.2f}"),
            ("1. create -> console line, max (s)", f"{max(one_console):.2f}   [{ms_(one_console)}]"),
            ("1. create -> line in host console file, median (s)", f"{med(one_file):.2f}   [{ms_(one_file)}]"),
            ("1. create -> running (actual key), median (s)", f"{med(one_running):.2f}"),
            ("1. create -> running (actual key), max (s)", f"{max(one_running):.2f}   [{ms_(one_running)}]"),
            ("1. placement", ", ".join(f"{vm}@{b.hosts.get(vm, '?')}" for vm in one)),
            ("2. 5 at once: create -> console line, per VM (s)", ms_([five_console[v] for v in five])),
            ("2. 5 at once: create -> console line, median (s)", f"{med(list(five_console.values())):.2f}"),
            ("2. 5 at once: create -> console line, max (s)", f"{max(five_console.values()):.2f}"),
            ("2. 5 at once: line in host console file, median (s)", f"{med(list(five_file.values())):.2f}"),
            ("2. 5 at once: create -> running, median (s)",
             f"{med(list(five_running.values())):.2f}" if five_running else "n/a"),
            ("2. 5 at once: first create -> all 5 lines, wall (s)", f"{five_wall:.2f}"),
            ("2. placement", placement),
            ("3. RBD clone of snapshot, median of 5 (ms)", f"{med(clone_s) * 1000:.1f}   [max {max(clone_s) * 1000:.1f}]"),
            ("3. full copy, qemu-img convert, median of 3 (ms)", f"{med(copy_s) * 1000:.1f}   [max {max(copy_s) * 1000:.1f}]"),
            ("3. full copy / clone", f"{med(copy_s) / med(clone_s):.0f}x"),
            ("3. full copy: RBD space used", copy_used or "n/a"),
            ("4. QEMU RSS per guest, median (MiB)", f"{med(list(qemu_rss.values())):.1f}"),
            ("4. QEMU RSS per guest, max (MiB)", f"{max(qemu_rss.values()):.1f}"),
            ("4. guest RAM (flavour tiny) (MiB)", f"{FLAVOUR_MB}"),
            ("4. agent RSS (MiB)", ", ".join(f"{n}={v:.1f}" for n, v in agent_rss.items())),
        ]
    finally:
        t_clean = time.perf_counter()
        if cluster is not None:
            try:
                cluster.stop_all()  # drains: VMs shut down and undefined
            except AssertionError as exc:  # one agent hung: it was killed; stop the others too
                print(f"warning: {exc}", file=sys.stderr)
                for a in cluster.agents:
                    try:
                        a.stop()
                    except AssertionError as exc2:
                        print(f"warning: {exc2}", file=sys.stderr)
        if storage is not None:
            storage.close()
        secret = None
        if ceph is not None:
            secret = str(uuid.uuid5(uuid.NAMESPACE_URL, f"metastack:{ceph.fsid}:client.{ceph.client}"))
            cephdev.stop(ceph_dir)
        if secret is not None:  # the agents' libvirt secret for this (now gone) Ceph cluster
            subprocess.run(["virsh", "-c", "qemu:///system", "secret-undefine", secret], capture_output=True)
        if lvd_pid:
            lvd.stop(work / "libvirtd")
        if store is not None:
            store.close()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
        clean_s = time.perf_counter() - t_clean
    if rows:
        rows.append(("cleanup (s)", f"{clean_s:.1f}"))
        rows.append(("whole run (s)", f"{time.perf_counter() - t_all:.1f}"))
        w = max(len(r[0]) for r in rows)
        print(f"{'metric'.ljust(w)}  value   (tiny guest, direct kernel boot, RBD disk, 3 agents, qemu TCG)")
        for k, v in rows:
            print(f"{k.ljust(w)}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
