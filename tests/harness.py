"""Test and benchmark harness: a private etcd, agents as real processes on
libvirt test:/// hosts, and helpers to read the etcd contract.

Everything started here is stopped here, by its Popen handle.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metastack as ms  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class EtcdServer:
    """A private single-member etcd on free loopback ports, restartable."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(workdir / "etcd.log", "ab")
        self.user: Optional[str] = None  # "name:password" for etcdctl once auth is enabled

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 15, what="etcd to answer")

    def healthy(self) -> bool:
        r = self.etcdctl("endpoint", "health", check=False, timeout=3)
        return r.returncode == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
        env = dict(os.environ, ETCDCTL_API="3")
        if self.user is not None:  # once etcd's auth is on (a test turned it on)
            env["ETCDCTL_USER"] = self.user
        return subprocess.run(["etcdctl", "--endpoints", self.endpoint, "--dial-timeout=2s", *args],
                              capture_output=True, text=True, env=env, check=check, timeout=timeout)


def node_xml(path: Path, vcpus: int, ram_mb: int) -> Path:
    """A libvirt test-driver host description: private hypervisor per open."""
    path.write_text(textwrap.dedent(f"""\
        <node>
          <cpu><mhz>2000</mhz><model>x86_64</model><active>{vcpus}</active><total>{vcpus}</total>
               <nodes>1</nodes><sockets>1</sockets><cores>{vcpus}</cores><threads>1</threads></cpu>
          <memory>{ram_mb * 1024}</memory>
        </node>
        """))
    return path


class AgentProc:
    """One ``python metastack.py -c FILE`` process on a test:/// hypervisor."""

    def __init__(self, cluster: "Cluster", name: str, vcpus: int, ram_mb: int, extra: str = "") -> None:
        self.cluster = cluster
        self.name = name
        d = cluster.dir
        if cluster.libvirt_uri is None:
            uri, domain_type = f"test://{node_xml(d / f'{name}.xml', vcpus, ram_mb)}", "test"
        else:
            uri, domain_type = cluster.libvirt_uri, cluster.domain_type
        self.config = d / f"{name}.ini"
        self.config.write_text(textwrap.dedent(f"""\
            [etcd]
            endpoints = {cluster.etcd.endpoint}
            prefix = {cluster.prefix}
            timeout = {cluster.etcd_timeout}
            [node]
            name = {name}
            state_dir = {d}/state-{name}
            vcpus = {vcpus}
            ram_mb = {ram_mb}
            [libvirt]
            uri = {uri}
            domain_type = {domain_type}
            shutdown_timeout = 2
            [agent]
            lease_ttl = {cluster.ttl}
            resync_interval = 10
            on_stop = {cluster.on_stop}
            [logging]
            syslog = none
            """) + cluster.ceph_section + extra)
        self.logpath = d / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "AgentProc":
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "metastack.py"), "-c", str(self.config)],
                                     stdout=self.logfile, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def log(self) -> str:
        return self.logpath.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def watchdog_pid(self) -> Optional[int]:
        """The pid of this node's watchdog process, if its pid file exists."""
        try:
            return int((self.cluster.dir / f"state-{self.name}" / f"watchdog-{self.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop_watchdog(self) -> None:
        """SIGTERM the watchdog by its pid file (it exits touching nothing)."""
        pid = self.watchdog_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                     open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                     10, what=f"watchdog {pid} to exit")

    def stop(self) -> None:
        self._stop_agent()
        self.stop_watchdog()

    def _stop_agent(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)  # thread stacks into the log, for the post-mortem
                time.sleep(0.5)
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent {self.name} did not stop within 15s of SIGTERM; see {self.logpath}")


class Cluster:
    """Agents sharing one etcd prefix, plus helpers to read the contract keys."""

    def __init__(self, etcd: EtcdServer, prefix: str, store: ms.Store, workdir: Path) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.store = store
        self.keys = store.keys
        self.dir = workdir
        self.ttl = 4  # with timeout 0.5: about 1 s of slack in the keep-alive timing on a loaded 2-core box
        self.etcd_timeout = 0.5
        self.agents: list[AgentProc] = []
        self.libvirt_uri: Optional[str] = None  # None: a private test:/// host per agent
        self.domain_type = "test"
        self.ceph_section = ""  # "[ceph]\nconf = ...": agents get Ceph storage
        self.on_stop = "drain"  # tests that check keep set it; teardown then leaves nothing running

    def agent(self, name: str, vcpus: int = 8, ram_mb: int = 16384, extra: str = "", start: bool = True) -> AgentProc:
        a = AgentProc(self, name, vcpus, ram_mb, extra)
        self.agents.append(a)
        return a.start() if start else a

    def wait_hosts(self, *names: str, timeout: float = 20) -> None:
        wait_for(lambda: set(names) <= set(self.hosts()), timeout, what=f"hosts {names} registered")

    def flavour(self, name: str, vcpus: int, ram_mb: int) -> None:
        self.store.put(self.keys.flavour(name), json.dumps({"vcpus": vcpus, "ram_mb": ram_mb}).encode())

    def desire(self, vm: str, flavour: str = "small", **fields: Any) -> None:
        self.store.put(self.keys.desired(vm), json.dumps(dict(flavour=flavour, **fields)).encode())

    def undesire(self, vm: str) -> None:
        self.store.delete(self.keys.desired(vm))

    def _kind(self, kind: str) -> dict[str, dict]:
        _, entries = self.store.list_kind(kind)
        return {name: json.loads(e.value) for name, e in entries.items()}

    def actual(self) -> dict[str, dict]:
        return self._kind("actual")

    def hosts(self) -> dict[str, dict]:
        """node -> its host record, with the use its trusted claims reserve
        (vcpus_used, ram_mb_used, vms), as metastackctl hosts shows it."""
        _, hosts = self.store.list_prefix(self.keys.dir("hosts"))
        _, actual = self.store.list_kind("actual")
        hosts = {k.rsplit("/", 1)[1]: e for k, e in hosts.items()}
        use = ms.claims_use(hosts, actual)
        return {name: {**json.loads(e.value), **dict(zip(("vcpus_used", "ram_mb_used", "vms"),
                                                         use.get(name, (0, 0, 0))))}
                for name, e in hosts.items()}

    def states(self) -> dict[str, tuple[str, str]]:
        """vm -> (state, host)."""
        return {vm: (a["state"], a["host"]) for vm, a in self.actual().items()}

    def wait_running(self, vms: list[str], timeout: float = 30) -> dict[str, tuple[str, str]]:
        def ok() -> Any:
            s = self.states()
            return s if all(s.get(v, ("", ""))[0] == "running" for v in vms) else None
        return wait_for(ok, timeout, what=f"{len(vms)} VMs running")

    def stop_all(self) -> None:
        for a in self.agents:
            a.stop()


class RunningWatch:
    """Records when each VM's actual key first says running (watch thread)."""

    def __init__(self, store: ms.Store) -> None:
        self.at: dict[str, float] = {}
        self.cond = threading.Condition()
        self.keys = store.keys
        rev, _ = store.list_prefix(store.keys.shards)
        self.cancel = store.watch_prefix(store.keys.shards, rev + 1, self._on, lambda e: None)

    def _on(self, _rev: int, events: list[ms.KeyEvent]) -> None:
        now = time.perf_counter()
        with self.cond:
            for ev in events:
                if (self.keys.split(ev.key) or ("",))[0] != "actual":
                    continue  # the shards hold desired entries too
                if ev.value is not None and json.loads(ev.value).get("state") == "running":
                    self.at.setdefault(ev.key.rsplit("/", 1)[1], now)
            self.cond.notify_all()

    def wait(self, vm: str, timeout: float = 30) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: vm in self.at, timeout):
                raise TimeoutError(vm)
            return self.at[vm]


class EtcdMembers:
    """Three etcd processes on loopback forming one cluster (a member can be
    SIGSTOPped: a host powered off, whose connections get no reset)."""

    def __init__(self, workdir: Path) -> None:
        self.names = ("m1", "m2", "m3")
        self.client = {n: free_port() for n in self.names}
        self.peer = {n: free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen] = {}
        self.workdir = workdir

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.client[name]}"

    def start(self) -> None:
        cluster = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for n in self.names:
            client, peer = f"http://127.0.0.1:{self.client[n]}", f"http://127.0.0.1:{self.peer[n]}"
            with open(self.workdir / f"{n}.log", "ab") as log:
                self.procs[n] = subprocess.Popen(
                    ["etcd", "--name", n, "--data-dir", str(self.workdir / n),
                     "--listen-client-urls", client, "--advertise-client-urls", client,
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", cluster, "--initial-cluster-state", "new", "--log-level", "warn"],
                    stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 30, interval=0.2, what="3 etcd members healthy")

    def leader(self) -> str:
        """The member that leads now (etcdctl endpoint status)."""
        eps = ",".join(self.endpoint(n) for n in self.names)
        r = subprocess.run(["etcdctl", "--endpoints", eps, "--dial-timeout=2s", "-w", "json", "endpoint", "status"],
                           capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=15,
                           check=True)
        status = json.loads(r.stdout)
        by_id = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in status}
        leader = by_id[status[0]["Status"]["leader"]]
        return next(n for n in self.names if leader.endswith(f":{self.client[n]}"))

    def healthy(self) -> bool:
        eps = ",".join(self.endpoint(n) for n in self.names)
        r = subprocess.run(["etcdctl", "--endpoints", eps, "--dial-timeout=2s", "endpoint", "health"],
                           capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=15)
        return r.returncode == 0

    def stop(self) -> None:
        """SIGKILL (a throw-away cluster: a clean stop would wait for leader
        transfers between members that are all stopping)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait()
