#!/usr/bin/env python3
"""A multi-node MetaStack testbed on one machine, for the chaos suite and the
failover benchmark. A developer tool (root only), not a deployment tool.

    python3 deploy/testbed.py up DIR [--nodes 3] [--subnet 10.213.0] [--name msc] [--agents]
    python3 deploy/testbed.py status DIR
    python3 deploy/testbed.py down DIR
    python3 deploy/testbed.py cut-etcd DIR NODE [--mode drop|reject]    restore-etcd DIR NODE
    python3 deploy/testbed.py isolate DIR NODE                           rejoin DIR NODE
    python3 deploy/testbed.py restart-libvirtd DIR NODE

Run it with a Python that sees Ceph's rados/rbd bindings (the project venv,
made with --system-site-packages). As a module:

    bed = Testbed(Path(DIR), nodes=3).up()     # everything but the agents
    agent = bed.agent("node1").start()         # python metastack.py in node1's netns
    bed.cut_etcd("node1"); bed.restore_etcd("node1")
    bed.down()                                 # stops and removes everything, also after a crash

What `up` builds (every name carries --name, default "msc"):
  * a bridge `msc-br` with SUBNET.1/24 (default 10.213.0.1), the host side;
  * per node i (node1..nodeN): a network namespace `msc-nodeI`, a veth pair
    (`msc-nodeI` on the bridge, `eth0` inside) with address SUBNET.(10+i);
  * a private single-node Ceph (deploy/cephdev.py) bound to SUBNET.1, so a
    client's address tells its node: node-level fencing
    (`ceph osd blocklist range add SUBNET.(10+i)/32`) can be exercised;
  * one etcd on 127.0.0.1 (free ports), data in DIR/etcd, restartable
    (kill -9, restart, SIGSTOP/SIGCONT: Etcd methods). Nodes never reach it
    directly: each node has its own TCP proxy on SUBNET.1:<port> (a process
    of this file, `_proxy`) that the test can cut and restore:
      cut, mode "drop": every byte in flight stalls and new connections are
        accepted and stall too (a partition: requests time out); on restore
        the stalled connections are closed and the clients reconnect;
      cut, mode "reject": every connection is closed, new ones at once;
  * per node its own libvirtd + virtlogd (deploy/libvirtd.py --root --netns):
    in the node's network namespace and in a private mount namespace whose
    /run/libvirt, /var/lib/libvirt, /etc/libvirt, /var/log/libvirt and
    /var/cache/libvirt are DIR/nodes/NODE/libvirt-root/*; so its QEMUs' Ceph
    clients have the node's address. Agents reach it at
    qemu+unix:///system?socket=DIR/nodes/NODE/libvirt-root/run/libvirt-sock.
"A node cut off entirely" is its host-side veth set down (isolate/rejoin).

Agents (Agent objects) run `ip netns exec msc-nodeI PYTHON metastack.py -c
DIR/nodes/NODE/agent.ini` with [node] address = the node's address,
lease_ttl 5 unless told otherwise. Their pids are in DIR/nodes/NODE/agent.pid;
`down` stops them (SIGTERM, then SIGKILL), then SIGTERMs the watchdog named
by STATE_DIR/watchdog-NODE.pid (if it runs and is a `--watchdog` process),
then each libvirtd (which destroys its domains), proxies, etcd, Ceph, and
removes veths, namespaces and the bridge. Every process is stopped by the
pid this file recorded, after checking its command line; nothing is killed
by name. DIR/testbed.json records what was made, and
/run/metastack-testbed-NAME which DIR holds the names. A testbed whose owner
(the process that called up(), e.g. a pytest run killed with -9) is gone is
taken down by the next `up` with the same --name; one made with the command
line has no owner and is only taken down by `down`.
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cephdev  # noqa: E402
import libvirtd  # noqa: E402

STATE = "testbed.json"
REGISTRY_DIR = Path("/run")  # /run/metastack-testbed-NAME: the DIR of the testbed holding NAME's links
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TestbedError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, env=dict(os.environ, PATH=SYS_PATH))
    if check and r.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _cmdline(pid: int) -> list[bytes]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: Optional[int], marker: bytes, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal pid if it lives and its command line contains marker; SIGKILL
    after timeout. Reaps it when it is our child."""
    if not _alive(pid) or not any(marker in a for a in _cmdline(pid)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------


class Etcd:
    """One etcd member on 127.0.0.1, data kept across restarts."""

    def __init__(self, d: Path, client_port: int, peer_port: int) -> None:
        self.dir = d
        self.client_port, self.peer_port = client_port, peer_port
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> Optional[int]:
        return _read_pid(self.dir / "etcd.pid")

    def start(self, timeout: float = 15) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        peer, client = f"http://127.0.0.1:{self.peer_port}", f"http://127.0.0.1:{self.client_port}"
        with open(self.dir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "chaos", "--data-dir", str(self.dir / "data"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"chaos={peer}", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (self.dir / "etcd.pid").write_text(f"{self.proc.pid}\n")
        _wait(self.healthy, timeout, "etcd to answer", 0.1)

    def healthy(self) -> bool:
        r = self.etcdctl("endpoint", "health", check=False, timeout=3)
        return r.returncode == 0

    def signal(self, sig: int) -> None:
        pid = self.pid
        if not _alive(pid) or b"etcd" not in (_cmdline(pid) or [b""])[0]:
            raise TestbedError("etcd is not running")
        os.kill(pid, sig)

    def kill(self) -> None:
        """kill -9 (and reap)."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self) -> None:
        _stop_pid(self.pid, b"--data-dir", 10)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)
        self.proc = None

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(["etcdctl", "--endpoints", self.endpoint, "--dial-timeout=2s", *args],
                              capture_output=True, text=True, env=env, check=check, timeout=timeout)


# ---------------------------------------------------------------------------
# the cuttable TCP proxy (one process per node, controlled by signals)
# ---------------------------------------------------------------------------

PROXY_SIGNALS = {"drop": signal.SIGUSR1, "reject": signal.SIGHUP, "open": signal.SIGUSR2}


class _Proxy:
    """Forwards LISTEN to TARGET. SIGUSR1: cut, drop; SIGHUP: cut, reject;
    SIGUSR2: restore; SIGTERM: exit. The current mode is written to STATEFILE
    ("MODE SEQ") once applied, so the controller can wait for it."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], statefile: Path) -> None:
        self.listen, self.target, self.statefile = listen, target, statefile
        self.mode = "open"
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.conns: dict[int, list[socket.socket]] = {}  # id -> sockets of one client connection
        self.cut: set[int] = set()  # connections that were open during a cut: closed at restore
        self.next_id = 0
        self.wants: list[str] = []
        self.seq = 0

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} proxy {self.listen[1]}: {msg}", flush=True)

    def write_state(self) -> None:
        self.seq += 1
        tmp = self.statefile.with_name(self.statefile.name + ".tmp")
        tmp.write_text(f"{self.mode} {self.seq}\n")
        os.replace(tmp, self.statefile)

    def close_conn(self, cid: int) -> None:
        with self.lock:
            socks = self.conns.pop(cid, [])
            self.cut.discard(cid)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def apply(self, mode: str) -> None:
        if mode == "drop":
            self.gate.clear()
            with self.lock:
                self.cut |= set(self.conns)
        elif mode == "reject":
            self.gate.clear()
            for cid in list(self.conns):
                self.close_conn(cid)
        elif mode == "open":
            for cid in list(self.cut):
                self.close_conn(cid)
            self.gate.set()
        self.mode = mode
        self.log(f"mode {mode} ({len(self.conns)} connection(s) open)")
        self.write_state()

    def pump(self, cid: int, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while not self.gate.wait(0.2):
                    if cid not in self.conns:
                        return
                if cid in self.cut or cid not in self.conns:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self.close_conn(cid)

    def serve(self, client: socket.socket) -> None:
        with self.lock:
            cid = self.next_id
            self.next_id += 1
            self.conns[cid] = [client]
            if not self.gate.is_set():
                self.cut.add(cid)  # accepted during a cut: it stalls until the restore closes it
        if cid in self.cut:
            return
        try:
            up = socket.create_connection(self.target, timeout=2)
            up.settimeout(None)
        except OSError:
            self.close_conn(cid)
            return
        with self.lock:
            if cid not in self.conns:
                up.close()
                return
            self.conns[cid].append(up)
        for a, b in ((client, up), (up, client)):
            threading.Thread(target=self.pump, args=(cid, a, b), daemon=True).start()

    def run(self) -> int:
        for mode, sig in PROXY_SIGNALS.items():
            signal.signal(sig, lambda *_a, m=mode: self.wants.append(m))
        signal.signal(signal.SIGTERM, lambda *_a: self.wants.append("exit"))
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(self.listen)
        ls.listen(128)
        ls.settimeout(0.05)
        self.log(f"forwarding {self.listen} -> {self.target}")
        self.write_state()
        while True:
            while self.wants:
                w = self.wants.pop(0)
                if w == "exit":
                    self.log("exit")
                    return 0
                self.apply(w)
            try:
                c, _ = ls.accept()
            except (socket.timeout, InterruptedError):
                continue
            if self.mode == "reject":
                c.close()
                continue
            c.settimeout(None)
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()


# ---------------------------------------------------------------------------
# nodes and agents
# ---------------------------------------------------------------------------


class Node:
    """One node: its namespace, address, proxy, libvirtd and agent files."""

    def __init__(self, bed: "Testbed", index: int) -> None:
        self.bed = bed
        self.index = index
        self.name = f"node{index}"
        self.address = f"{bed.subnet}.{10 + index}"
        self.netns = f"{bed.name}-{self.name}"
        self.veth = f"{bed.name}-{self.name}"
        self.dir = bed.dir / "nodes" / self.name
        self.libvirt_state = self.dir / "libvirtd"
        self.libvirt_root = self.dir / "libvirt-root"
        self.state_dir = self.dir / "state"
        self.proxy_pidfile = self.dir / "proxy.pid"
        self.proxy_statefile = self.dir / "proxy.state"

    @property
    def uri(self) -> str:
        return libvirtd.uri_for(self.libvirt_root)

    @property
    def proxy_port(self) -> int:
        return int(self.bed.state["proxy_ports"][self.name])

    @property
    def netns_inode(self) -> int:
        return os.stat(f"/run/netns/{self.netns}").st_ino

    def proxy_pid(self) -> Optional[int]:
        pid = _read_pid(self.proxy_pidfile)
        return pid if _alive(pid) and any(b"_proxy" in a for a in _cmdline(pid)) else None


class Agent:
    """`python metastack.py -c DIR/nodes/NODE/agent.ini` in the node's netns."""

    def __init__(self, bed: "Testbed", node: Node, extra: str = "", write: bool = True) -> None:
        self.bed, self.node, self.name = bed, node, node.name
        self.config = node.dir / "agent.ini"
        self.logpath = node.dir / "agent.log"
        self.pidfile = node.dir / "agent.pid"
        self.proc: Optional[subprocess.Popen] = None
        if write:
            self.write_config(extra)

    def write_config(self, extra: str = "") -> None:
        b, n = self.bed, self.node
        ceph = b.ceph
        self.config.write_text(textwrap.dedent(f"""\
            [etcd]
            endpoints = {b.host_address}:{n.proxy_port}
            prefix = {b.prefix}
            timeout = {b.etcd_timeout}
            [node]
            name = {n.name}
            address = {n.address}
            state_dir = {n.state_dir}
            vcpus = {b.vcpus}
            ram_mb = {b.ram_mb}
            [libvirt]
            uri = {n.uri}
            domain_type = qemu
            shutdown_timeout = 2
            [agent]
            lease_ttl = {b.ttl}
            resync_interval = 10
            on_stop = keep
            [logging]
            syslog = none
            [ceph]
            conf = {ceph.conf}
            client = {ceph.client}
            keyring = {ceph.keyring}
            pool = {ceph.pool}
            """) + extra)

    def start(self) -> "Agent":
        if self.alive():
            raise TestbedError(f"agent {self.name} already runs (pid {self.pid})")
        with open(self.logpath, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} testbed: start\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.node.netns, self.bed.python, str(self.bed.script), "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True,
                env=dict(os.environ, PATH=os.environ.get("PATH", SYS_PATH) + ":" + SYS_PATH))
        self.pidfile.write_text(f"{self.proc.pid}\n")
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else _read_pid(self.pidfile)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        pid = _read_pid(self.pidfile)
        return _alive(pid) and any(str(self.config).encode() in a for a in _cmdline(pid))

    def signal(self, sig: int) -> None:
        if not self.alive():
            raise TestbedError(f"agent {self.name} is not running")
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """kill -9 (its QEMUs live on in the node's libvirtd)."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 20) -> Optional[int]:
        if self.proc is not None:
            return self.proc.wait(timeout)
        _wait(lambda: not self.alive(), timeout, f"agent {self.name} to exit")
        return None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, SIGKILL after timeout (a stopped agent is continued first)."""
        _stop_pid(self.pid, str(self.config).encode(), timeout)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)

    def watchdog_pid(self) -> Optional[int]:
        pid = _read_pid(self.node.state_dir / f"watchdog-{self.name}.pid")
        return pid if _alive(pid) and any(b"--watchdog" in a for a in _cmdline(pid)) else None

    def stop_watchdog(self) -> None:
        """SIGTERM the agent's watchdog (it then exits without touching
        domains): the one its pid file names, and any other `--watchdog`
        process started with this agent's own config file (an earlier run's)."""
        pids = {self.watchdog_pid()}
        me = str(self.config).encode()
        for d in os.listdir("/proc"):
            if d.isdigit():
                argv = _cmdline(int(d))
                if b"--watchdog" in argv and me in argv:
                    pids.add(int(d))
        for pid in pids - {None}:
            _stop_pid(pid, b"--watchdog", 10)

    def log(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")
        except OSError:
            return ""


# ---------------------------------------------------------------------------
# the testbed
# ---------------------------------------------------------------------------


class Testbed:
    """N nodes on one machine; see the module docstring."""

    def __init__(self, dir: Path, nodes: int = 3, subnet: str = "10.213.0", name: str = "msc",
                 pool: str = "metastack", prefix: str = "/metastack", ttl: int = 5, etcd_timeout: float = 1.0,
                 vcpus: int = 4, ram_mb: int = 2048, python: Optional[str] = None,
                 script: Optional[Path] = None) -> None:
        self.dir = Path(dir).resolve()
        self.subnet, self.name, self.pool, self.prefix = subnet, name, pool, prefix
        self.ttl, self.etcd_timeout, self.vcpus, self.ram_mb = ttl, etcd_timeout, vcpus, ram_mb
        self.python = python or sys.executable
        self.script = Path(script or ROOT / "metastack.py")
        self.bridge = f"{name}-br"
        self.host_address = f"{subnet}.1"
        self.nodes = [Node(self, i) for i in range(1, nodes + 1)]
        self.state: dict[str, Any] = {}
        self.ceph: Any = None
        self.etcd: Optional[Etcd] = None
        self.agents: dict[str, Agent] = {}
        if (self.dir / STATE).exists():
            self._load()

    # -- bookkeeping
    def _save(self) -> None:
        self.state.update(name=self.name, subnet=self.subnet, nodes=len(self.nodes), pool=self.pool,
                          prefix=self.prefix, ttl=self.ttl)
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / STATE)

    def _load(self) -> None:
        self.state = json.loads((self.dir / STATE).read_text())
        if "etcd_ports" in self.state:
            cp, pp = self.state["etcd_ports"]
            self.etcd = Etcd(self.dir / "etcd", cp, pp)
        info = cephdev._load_info(self.dir / "ceph")
        if info is not None:
            self.ceph = dataclass_replace_pool(info, self.state.get("pool", self.pool))

    @classmethod
    def open(cls, dir: Path) -> "Testbed":
        st = json.loads((Path(dir) / STATE).read_text())
        return cls(Path(dir), nodes=st["nodes"], subnet=st["subnet"], name=st["name"], pool=st["pool"],
                   prefix=st["prefix"], ttl=st["ttl"])

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- up / down
    @property
    def registry(self) -> Path:
        return REGISTRY_DIR / f"metastack-testbed-{self.name}"

    def _reclaim(self) -> None:
        """Take down the testbed that holds our names if its owner is gone."""
        try:
            other = Path(self.registry.read_text().strip())
        except OSError:
            return
        if other == self.dir or not (other / STATE).exists():
            return
        owner = json.loads((other / STATE).read_text()).get("owner", 0)
        if owner and not _alive(owner):
            print(f"testbed: taking down {other}, left behind by pid {owner}", file=sys.stderr)
            for p in Testbed.open(other).down():
                print(f"testbed: {p}", file=sys.stderr)

    def up(self, owner: Optional[int] = None) -> "Testbed":
        """Build everything but the agents. ``owner``: the pid whose death
        makes this testbed a leftover (default: this process; 0: none)."""
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, bridges, bind mounts)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # QEMU (libvirt-qemu) reads consoles and kernels below it
        self._reclaim()
        if _ip("link", "show", self.bridge, check=False).returncode == 0:
            raise TestbedError(f"a link named {self.bridge} already exists: another testbed runs (or was left"
                               f" behind: `testbed.py down DIR` on its DIR), or pick another --name")
        self.state["owner"] = os.getpid() if owner is None else owner
        self._save()
        self.registry.write_text(f"{self.dir}\n")
        try:
            self._network_up()
            self.ceph = cephdev.start(self.dir / "ceph", pool=self.pool, address=self.host_address)
            self.etcd = Etcd(self.dir / "etcd", _free_port("127.0.0.1"), _free_port("127.0.0.1"))
            self.state["etcd_ports"] = [self.etcd.client_port, self.etcd.peer_port]
            self._save()
            self.etcd.start()
            self.state["proxy_ports"] = {}
            for n in self.nodes:
                self._start_proxy(n)
            self._save()
            for n in self.nodes:
                n.state_dir.mkdir(parents=True, exist_ok=True)
                for p in (n.dir, n.state_dir):
                    p.chmod(0o755)
                libvirtd.start(n.libvirt_state, root=n.libvirt_root, netns=n.netns)
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        return self

    def _network_up(self) -> None:
        self.state["links"] = [self.bridge]
        self.state["netns"] = []
        self._save()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n in self.nodes:
            n.dir.mkdir(parents=True, exist_ok=True)
            self.state["netns"].append(n.netns)
            self.state["links"].append(n.veth)
            self._save()
            _ip("netns", "add", n.netns)
            _ip("link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
            _ip("link", "set", n.veth, "master", self.bridge, "up")
            _ip("-n", n.netns, "addr", "add", f"{n.address}/24", "dev", "eth0")
            _ip("-n", n.netns, "link", "set", "eth0", "up")
            _ip("-n", n.netns, "link", "set", "lo", "up")

    def _start_proxy(self, n: Node) -> None:
        port = _free_port(self.host_address)
        self.state["proxy_ports"][n.name] = port
        with open(n.dir / "proxy.log", "ab") as log:
            p = subprocess.Popen([self.python, str(Path(__file__).resolve()), "_proxy",
                                  f"{self.host_address}:{port}", self.etcd.endpoint, str(n.proxy_statefile)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        n.proxy_pidfile.write_text(f"{p.pid}\n")
        self._proxies = getattr(self, "_proxies", {})
        self._proxies[n.name] = p
        _wait(lambda: n.proxy_statefile.exists(), 10, f"proxy of {n.name}")

    def down(self) -> list[str]:
        """Stop and remove everything; returns the problems met (keeps going)."""
        problems: list[str] = []

        def step(what: str, fn, *a, **kw) -> None:
            try:
                fn(*a, **kw)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{what}: {exc}")

        for n in self.nodes:
            ag = self.agents.get(n.name) or Agent(self, n, write=False)
            step(f"stop agent {n.name}", ag.stop, 30)
            step(f"stop watchdog {n.name}", ag.stop_watchdog)
        for n in self.nodes:
            if n.libvirt_state.exists():
                step(f"stop libvirtd {n.name}", libvirtd.stop, n.libvirt_state)
        for n in self.nodes:
            step(f"stop proxy {n.name}", _stop_pid, _read_pid(n.proxy_pidfile), b"_proxy", 5)
            p = getattr(self, "_proxies", {}).get(n.name)
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(1)
        if self.etcd is not None:
            step("stop etcd", self.etcd.stop)
        step("stop ceph", cephdev.stop, self.dir / "ceph")
        # veths first (deleting one end deletes its peer in the namespace),
        # then the namespaces, then the bridge.
        for link in reversed(self.state.get("links", [])):
            r = _ip("link", "del", link, check=False)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"delete link {link}: {r.stderr.strip()}")
        for ns in self.state.get("netns", []):
            if Path(f"/run/netns/{ns}").exists():
                step(f"delete netns {ns}", _ip, "netns", "del", ns)
        with contextlib.suppress(OSError):
            if self.registry.read_text().strip() == str(self.dir):
                self.registry.unlink()
        return problems

    # -- agents
    def agent(self, name: str, extra: str = "") -> Agent:
        """The Agent of node ``name`` (created with its ini on first use)."""
        if name not in self.agents:
            self.agents[name] = Agent(self, self.node(name), extra)
        elif extra:
            self.agents[name].write_config(extra)
        return self.agents[name]

    def ctl_ini(self) -> Path:
        """An ini for metastackctl on the host: etcd directly, Ceph on the bridge."""
        p = self.dir / "ctl.ini"
        c = self.ceph
        p.write_text(f"[etcd]\nendpoints = {self.etcd.endpoint}\nprefix = {self.prefix}\n"
                     f"[ceph]\nconf = {c.conf}\nclient = {c.client}\nkeyring = {c.keyring}\npool = {c.pool}\n")
        return p

    # -- faults
    def _proxy_mode(self, node: str, mode: str, timeout: float = 5) -> None:
        n = self.node(node)
        pid = n.proxy_pid()
        if pid is None:
            raise TestbedError(f"the etcd proxy of {node} is not running")
        before = n.proxy_statefile.read_text().split()[1]
        os.kill(pid, PROXY_SIGNALS[mode])
        _wait(lambda: n.proxy_statefile.read_text().split() != [mode, before]
              and n.proxy_statefile.read_text().split()[0] == mode, timeout, f"proxy of {node} in mode {mode}")

    def cut_etcd(self, node: str, mode: str = "drop") -> None:
        """Cut node's path to etcd (Ceph stays reachable)."""
        if mode not in ("drop", "reject"):
            raise ValueError(mode)
        self._proxy_mode(node, mode)

    def restore_etcd(self, node: str) -> None:
        self._proxy_mode(node, "open")

    def etcd_mode(self, node: str) -> str:
        return self.node(node).proxy_statefile.read_text().split()[0]

    def isolate(self, node: str) -> None:
        """Cut the node off entirely: its veth down (Ceph and etcd unreachable)."""
        _ip("link", "set", self.node(node).veth, "down")

    def rejoin(self, node: str) -> None:
        _ip("link", "set", self.node(node).veth, "up")

    def isolated(self, node: str) -> bool:
        return "UP" not in _ip("-br", "link", "show", self.node(node).veth).stdout.split()[1].split(",")

    def restart_libvirtd(self, node: str) -> int:
        return libvirtd.restart_libvirtd(self.node(node).libvirt_state)

    def heal(self) -> None:
        """Undo every network/etcd fault: links up, proxies open, etcd running."""
        for n in self.nodes:
            if self.isolated(n.name):
                self.rejoin(n.name)
            if n.proxy_statefile.exists() and self.etcd_mode(n.name) != "open":
                self.restore_etcd(n.name)
        if self.etcd is not None:
            pid = self.etcd.pid
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
            else:
                self.etcd.start()


def dataclass_replace_pool(info: Any, pool: str) -> Any:
    import dataclasses
    return dataclasses.replace(info, pool=pool)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up")
    p.add_argument("dir", type=Path)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--subnet", default="10.213.0", help="first three octets of the private /24")
    p.add_argument("--name", default="msc", help="prefix of the bridge, namespace and veth names")
    p.add_argument("--agents", action="store_true", help="also start one agent per node")
    for cmd in ("down", "status"):
        sub.add_parser(cmd).add_argument("dir", type=Path)
    for cmd in ("cut-etcd", "restore-etcd", "isolate", "rejoin", "restart-libvirtd"):
        p = sub.add_parser(cmd)
        p.add_argument("dir", type=Path)
        p.add_argument("node")
        if cmd == "cut-etcd":
            p.add_argument("--mode", choices=["drop", "reject"], default="drop")
    p = sub.add_parser("_proxy")
    p.add_argument("listen")
    p.add_argument("target")
    p.add_argument("statefile", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "_proxy":
        lh, lp = a.listen.rsplit(":", 1)
        th, tp = a.target.rsplit(":", 1)
        return _Proxy((lh, int(lp)), (th, int(tp)), a.statefile).run()
    try:
        if a.cmd == "up":
            bed = Testbed(a.dir, nodes=a.nodes, subnet=a.subnet, name=a.name).up(owner=0)
            if a.agents:
                for n in bed.nodes:
                    bed.agent(n.name).start()
            print(f"testbed up in {bed.dir}: etcd {bed.etcd.endpoint}, Ceph {bed.ceph.conf}, "
                  f"metastackctl -c {bed.ctl_ini()}")
            for n in bed.nodes:
                print(f"  {n.name}: {n.address} netns {n.netns} etcd via {bed.host_address}:{n.proxy_port}"
                      f" libvirt {n.uri}")
            return 0
        bed = Testbed.open(a.dir)
        if a.cmd == "down":
            problems = bed.down()
            for p in problems:
                print(f"testbed: {p}", file=sys.stderr)
            return 1 if problems else 0
        if a.cmd == "status":
            print(json.dumps(bed.state, indent=2, sort_keys=True))
            for n in bed.nodes:
                print(f"{n.name}: agent pid {_read_pid(n.dir / 'agent.pid')}, etcd path "
                      f"{bed.etcd_mode(n.name) if n.proxy_statefile.exists() else '?'}, "
                      f"{'isolated' if bed.isolated(n.name) else 'linked'}")
            return 0
        if a.cmd == "cut-etcd":
            bed.cut_etcd(a.node, a.mode)
        elif a.cmd == "restore-etcd":
            bed.restore_etcd(a.node)
        elif a.cmd == "isolate":
            bed.isolate(a.node)
        elif a.cmd == "rejoin":
            bed.rejoin(a.node)
        elif a.cmd == "restart-libvirtd":
            print(f"libvirtd restarted: pid {bed.restart_libvirtd(a.node)}")
        return 0
    except (TestbedError, cephdev.CephDevError, libvirtd.LibvirtdError) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
