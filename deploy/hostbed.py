#!/usr/bin/env python3
"""Several Debian 12 hosts on one machine, each a systemd-nspawn container
with systemd as PID 1, its own network and SSH: a testbed for the playbook
(deploy/ansible/). A developer tool (root only), not a deployment tool.

    python3 deploy/hostbed.py up DIR [--hosts 3] [--subnet 10.214.0] [--name mstb]
    python3 deploy/hostbed.py status DIR
    python3 deploy/hostbed.py down DIR
    python3 deploy/hostbed.py power-off DIR HOST

What `up` builds:
  * a base root file system, made once and cached (default
    .cache/hostbed-base, ``--cache``): ``debootstrap --variant=minbase
    bookworm`` plus, installed from outside (chroot), every Debian package
    the playbook installs, so the hosts need no mirror (they have no route
    out) and the playbook's apt tasks find everything present;
  * a bridge NAME-br with SUBNET.1/24 (the controller's side: Ansible, the
    dev Ceph's clients);
  * per host hostI (I = 1..N): an overlay mount (the cached base below,
    DIR/hosts/hostI/upper above) booted by ``systemd-nspawn -b
    --register=no --keep-unit --network-bridge=NAME-br``, with SUBNET.(10+I)
    on its host0 (systemd-networkd), the testbed's SSH key for root, a
    fresh machine id, /etc/hosts naming every host;
  * DIR/id_ed25519 (the SSH key), DIR/inventory-hosts.yml (the hosts with
    their addresses and SSH settings, to merge into a playbook inventory),
    DIR/wheels (the pip packages of constraints.txt, mounted read-only at
    /opt/wheels in every host: install with --no-index --find-links).

`power-off HOST` pulls one host's plug: SIGKILL to its container's init
(every process in it dies at once, nothing shuts down cleanly).

`down` stops every container by the pid it recorded (SIGTERM to all at
once: systemd in each container shuts down cleanly; SIGKILL to those still
running after 60 s), unmounts the
overlays, deletes the bridge and DIR/hosts. Addresses exist only on the
bridge it made; nothing is sent anywhere else.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
BASE_INCLUDE = "systemd,systemd-sysv,dbus,iproute2,python3,openssh-server,ca-certificates"
# What the playbook's roles install (apt), and what Ansible's modules need on a host.
PACKAGES = [
    "python3-apt", "python3-venv", "python3-rados", "python3-rbd", "python3-libvirt",
    "etcd-server", "etcd-client", "openssl", "rsyslog", "rsyslog-relp",
    "libvirt-daemon-system", "qemu-system-x86", "qemu-block-extra", "qemu-utils",
    "ceph-common", "ceph-mon", "ceph-osd", "ceph-mgr",
]
# pip packages the hosts install (with their dependencies), from constraints.txt.
WHEELS = ["cslab-etcd3", "grpcio", "protobuf", "six", "click", "aiohttp"]


class HostbedError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise HostbedError(f"{' '.join(argv)}: {r.stderr.strip()[-2000:]}")
    return r


def base_rootfs(cache: Path) -> Path:
    """The cached base root file system (built when missing or when the
    package list changed)."""
    stamp_text = hashlib.sha256(" ".join([SUITE, BASE_INCLUDE] + PACKAGES).encode()).hexdigest()
    root, stamp = cache / "rootfs", cache / "stamp"
    if stamp.exists() and stamp.read_text() == stamp_text and (root / "usr/bin/python3").exists():
        return root
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise HostbedError(f"{tool} is missing: apt-get install debootstrap systemd-container")
    if root.exists():
        shutil.rmtree(root)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sh("debootstrap", "--variant=minbase", f"--include={BASE_INCLUDE}", SUITE, str(root))
    policy = root / "usr/sbin/policy-rc.d"  # no daemon starts inside the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    sh("chroot", str(root), "apt-get", "update", "-q", env=env)
    sh("chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES, env=env)
    sh("chroot", str(root), "apt-get", "clean", env=env)
    policy.unlink()
    for unit in ("systemd-networkd.service", "ssh.service"):
        sh("chroot", str(root), "systemctl", "enable", unit, env=env)
    # Packaged daemons the playbook configures first: not started at boot until it enables them.
    for unit in ("etcd.service", "libvirtd.service", "rsyslog.service"):
        sh("chroot", str(root), "systemctl", "disable", unit, check=False, env=env)
    (root / "etc/machine-id").write_text("")
    stamp.write_text(stamp_text)
    print(f"hostbed: base root file system built in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return root


def wheels(out: Path) -> Path:
    """The pip packages the hosts install, downloaded once (ordinary pip)."""
    stamp = out / ".stamp"
    want = hashlib.sha256(((ROOT / "constraints.txt").read_text() + " ".join(WHEELS)).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", str(out), "-c", str(ROOT / "constraints.txt"), *WHEELS)
    stamp.write_text(want)
    return out


class Hostbed:
    """N nspawn hosts on a private bridge; see the module docstring."""

    def __init__(self, dir: Path, hosts: int = 3, subnet: str = "10.214.0", name: str = "mstb",
                 cache: Optional[Path] = None) -> None:
        self.dir = dir.resolve()
        self.n = hosts
        self.subnet = subnet
        self.name = name
        self.cache = (cache or ROOT / ".cache" / "hostbed-base").resolve()
        self.bridge = f"{name}-br"

    # -- layout --------------------------------------------------------------
    def hosts(self) -> list[str]:
        return [f"host{i}" for i in range(1, self.n + 1)]

    def address(self, host: str) -> str:
        return f"{self.subnet}.{10 + int(host[4:])}"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    def hdir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    # -- up ------------------------------------------------------------------
    def up(self, timeout: float = 120.0) -> "Hostbed":
        if os.geteuid() != 0:
            raise HostbedError("hostbed needs root")
        self.dir.mkdir(parents=True, exist_ok=True)
        base = base_rootfs(self.cache)
        whl = wheels(self.cache.parent / "hostbed-wheels")
        if not self.key.exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "metastack-hostbed", "-f", str(self.key))
        if sh("ip", "link", "show", self.bridge, check=False).returncode != 0:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        state = {"bridge": self.bridge, "subnet": self.subnet, "hosts": {}}
        for host in self.hosts():
            state["hosts"][host] = self._start(host, base, whl)
            (self.dir / "hostbed.json").write_text(json.dumps(state, indent=2))
        for host in self.hosts():
            self._wait_ssh(host, timeout)
        self._write_inventory()
        return self

    def _start(self, host: str, base: Path, whl: Path) -> dict:
        d = self.hdir(host)
        upper, work, merged = d / "upper", d / "work", d / "root"
        for p in (upper, work, merged):
            p.mkdir(parents=True, exist_ok=True)
        pidfile = d / "nspawn.pid"
        if _alive(_read_pid(pidfile), b"systemd-nspawn"):
            return {"address": self.address(host), "pid": _read_pid(pidfile)}
        if not os.path.ismount(merged):
            sh("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={base},upperdir={upper},workdir={work}", str(merged))
        etc = merged / "etc"
        (etc / "hostname").write_text(f"{host}\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{self.address(h)} {h}\n" for h in self.hosts()))
        if not (etc / "machine-id").read_text().strip():
            (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        net = etc / "systemd/network"
        net.mkdir(parents=True, exist_ok=True)
        (net / "10-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.address(host)}/24\nLinkLocalAddressing=no\n")
        ssh = merged / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh / "authorized_keys").chmod(0o600)
        periodic = merged / "var/lib/apt/periodic"  # the apt cache counts as fresh: hosts have no mirror
        periodic.mkdir(parents=True, exist_ok=True)
        (periodic / "update-success-stamp").touch()
        log = open(d / "console.log", "ab")
        proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(merged), "-b", "--register=no", "--keep-unit", f"--machine={host}",
             f"--network-bridge={self.bridge}", "--bind=/dev/net/tun", f"--bind-ro={whl}:/opt/wheels"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pidfile.write_text(f"{proc.pid}\n")
        return {"address": self.address(host), "pid": proc.pid}

    def _wait_ssh(self, host: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(_read_pid(self.hdir(host) / "nspawn.pid"), b"systemd-nspawn"):
                raise HostbedError(f"{host}'s container exited; see {self.hdir(host) / 'console.log'}")
            if self.ssh(host, "true", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.5)
        raise HostbedError(f"{host} did not answer SSH within {timeout:.0f}s")

    def ssh(self, host: str, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return sh("ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                  "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3",
                  f"root@{self.address(host)}", command, check=check, timeout=timeout)

    def _write_inventory(self) -> None:
        lines = ["all:", "  vars:", "    ansible_user: root",
                 f"    ansible_ssh_private_key_file: {self.key}",
                 "    ansible_ssh_common_args: '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
                 "  hosts:"]
        lines += [f"    {h}: {{ansible_host: {self.address(h)}}}" for h in self.hosts()]
        (self.dir / "inventory-hosts.yml").write_text("\n".join(lines) + "\n")

    # -- down ----------------------------------------------------------------
    def down(self, grace: float = 60.0) -> None:
        """Shut every host down (SIGTERM to nspawn: a clean shutdown), pull
        the plug of those still up after ``grace`` seconds, then remove the
        bridge, the overlays and the host folders."""
        hosts_dir = self.dir / "hosts"
        dirs = sorted(hosts_dir.glob("host*")) if hosts_dir.exists() else []
        pids = [pid for pid in (_read_pid(d / "nspawn.pid") for d in dirs)
                if pid is not None and _alive(pid, b"systemd-nspawn")]
        for pid in pids:  # all hosts shut down at once, within one deadline
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(pid, b"systemd-nspawn") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid, b"systemd-nspawn"):
                _power_off(pid)
        while any(_alive(pid, b"systemd-nspawn") for pid in pids) and time.monotonic() < deadline + 10:
            time.sleep(0.2)
        for d in dirs:
            if os.path.ismount(d / "root"):
                sh("umount", str(d / "root"), check=False)
        if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
            sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(hosts_dir, ignore_errors=True)
        with_json = self.dir / "hostbed.json"
        if with_json.exists():
            with_json.unlink()

    def power_off(self, host: str) -> None:
        """Pull the plug of HOST: SIGKILL to its container's init (the
        kernel then kills every process in the container, QEMU included;
        its veth goes with its network namespace). No shutdown runs."""
        pid = _read_pid(self.hdir(host) / "nspawn.pid")
        if pid is None or not _alive(pid, b"systemd-nspawn"):
            raise HostbedError(f"{host} is not running")
        _power_off(pid)

    def status(self) -> dict:
        out = {}
        for host in self.hosts():
            pid = _read_pid(self.hdir(host) / "nspawn.pid")
            out[host] = {"address": self.address(host), "pid": pid,
                         "running": _alive(pid, b"systemd-nspawn")}
        return out


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _power_off(nspawn_pid: int) -> None:
    """SIGKILL to the init of the container run by ``nspawn_pid``: the
    descendant whose pid in its own namespace is 1. Killing a PID
    namespace's init kills the whole namespace; nspawn then exits."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop(0)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if pid != nspawn_pid and nspid and nspid[-1] == "1":
                os.kill(pid, signal.SIGKILL)
                return
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    with contextlib.suppress(ProcessLookupError):  # no container init found: nspawn itself
        os.kill(nspawn_pid, signal.SIGKILL)


def _alive(pid: Optional[int], marker: bytes) -> bool:
    """True when ``pid`` runs and its command line contains ``marker``."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except OSError:
        return False
    return marker in cmd


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hostbed.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "power-off"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("host", nargs="?", help="power-off: the host (e.g. host2)")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--subnet", default="10.214.0")
    ap.add_argument("--name", default="mstb")
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args(argv)
    bed = Hostbed(args.dir, args.hosts, args.subnet, args.name, args.cache)
    try:
        if args.command == "up":
            bed.up()
            print(json.dumps(bed.status(), indent=2))
        elif args.command == "down":
            bed.down()
        elif args.command == "power-off":
            if not args.host:
                ap.error("power-off needs a HOST")
            bed.power_off(args.host)
        else:
            print(json.dumps(bed.status(), indent=2))
    except HostbedError as exc:
        print(f"hostbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
