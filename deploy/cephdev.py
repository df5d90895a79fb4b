#!/usr/bin/python3
"""A private single-node Ceph cluster (mon + mgr + 1 memstore OSD on 127.0.0.1)
for MetaStack's tests and demo.

    python3 deploy/cephdev.py start DIR [--pool NAME] [--timeout S] [--wait-health] [--address IP]
    python3 deploy/cephdev.py status DIR
    python3 deploy/cephdev.py stop DIR

or, imported (from /usr/bin/python3 or a venv made with --system-site-packages):

    info = cephdev.start(Path(d), pool="metastack")   # -> CephInfo
    cephdev.admin_key(info); cephdev.clear_blocklist(info)
    cephdev.stop(Path(d))

``--address IP`` (``start(..., address=IP)``) binds the daemons to another
local address instead of 127.0.0.1, e.g. the bridge address of a multi-node
testbed (deploy/testbed.py) so clients in network namespaces reach the
cluster and each client shows up with its own address (node-level
``ceph osd blocklist range`` fencing needs that). The address must already
be configured on this machine. Default: 127.0.0.1, as before.

Everything lives in DIR: ceph.conf, the client.admin keyring, mon/mgr/osd
data, logs (DIR/log), admin sockets (DIR/run), pid files (DIR/<daemon>.pid),
cephdev.json (the CephInfo of the running cluster). Nothing is written to
/etc/ceph, /var/lib/ceph, /var/log/ceph or /var/run/ceph; every command gets
``-c DIR/ceph.conf``.

``start`` is idempotent: if DIR's pid files name live daemons that this
script started, it returns their info (creating the requested pool if it is
new). Otherwise it stops whatever is left of an earlier cluster in DIR (by
its pid files only) and creates a NEW cluster (new fsid, new keys, empty
pool): memstore keeps data in RAM, so nothing survives ``stop`` anyway.
``start`` returns once a Python rados client can connect and create and
remove an RBD image in the pool (0.55-0.85 s here); HEALTH_OK with the mgr
active and every PG active+clean (also of the pool the mgr makes for
itself) about 4 s after the start began (``wait_health``, or ``start
--wait-health``). Idle RSS: mon 43 MiB, mgr 161 MiB, OSD 45 MiB. ``stop``
takes 0.06-0.3 s.

Settings that make it quick (see _conf_text): paxos propose interval 0.01 s,
mgr tick/stats/digest periods 1 s, the OSD registered before it starts, and
a mgr module path (DIR/mgr-modules) holding only the always-on modules plus
iostat: the mgr imports every module it finds at start, and loading all 29
that Debian ships took 4-6 s and 300 MiB (vs about 1 s and 161 MiB).

Daemons run as the caller (root here), detached from the caller's session
(a /bin/sh trampoline forks them and exits, so they are nobody's child and
no caller has to reap them); the pid of each is written to DIR/<daemon>.pid
before anything else happens. ``stop`` signals only those pids, and only
after checking /proc/<pid>/cmdline names the Ceph daemon and DIR's conf:
SIGTERM (OSD and mgr first, then the mon), up to 10 s, then SIGKILL.

Only the standard library is imported at module level; ``start``,
``clear_blocklist`` and ``wait_health`` import Debian's python3-rados and
python3-rbd when called.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

SETUP_HINT = "run `bash deploy/setup.sh` (it installs ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd)"
BINARIES = ("ceph-mon", "ceph-osd", "ceph-mgr", "monmaptool", "ceph")
MON, MGR, OSD = "mon.a", "mgr.x", "osd.0"
DAEMONS = (MON, MGR, OSD)
BINARY_OF = {MON: "ceph-mon", MGR: "ceph-mgr", OSD: "ceph-osd"}
CLIENT = "admin"
STATE_FILE = "cephdev.json"
CONF_FILE = "ceph.conf"
KEYRING_FILE = "ceph.client.admin.keyring"
# Everything start() creates in DIR: removed (only these) before a new cluster.
MANAGED = (CONF_FILE, KEYRING_FILE, STATE_FILE, "mon.keyring", "monmap", MON, MGR, OSD, "log", "run", "crash",
           "mgr-modules",
           *(f"{d}.pid" for d in DAEMONS))
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
POOL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
PROBE_PREFIX = "cephdev-probe-"


_T0 = [time.monotonic()]


def _log(msg: str) -> None:
    """Progress on stderr when CEPHDEV_VERBOSE=1 (seconds since start() began)."""
    if os.environ.get("CEPHDEV_VERBOSE"):
        print(f"cephdev: {time.monotonic() - _T0[0]:7.3f} {msg}", file=sys.stderr, flush=True)


class CephDevError(RuntimeError):
    """The dev cluster could not be started, checked or stopped."""


@dataclasses.dataclass
class CephInfo:
    dir: str
    conf: str        # DIR/ceph.conf
    keyring: str     # DIR/ceph.client.admin.keyring
    client: str      # "admin" (cephx name client.admin)
    pool: str        # the RBD pool start() made sure of
    fsid: str
    mon_host: str    # "[v2:127.0.0.1:P2,v1:127.0.0.1:P1]", also in ceph.conf
    pids: dict[str, int]  # daemon name ("mon.a", "mgr.x", "osd.0") -> pid

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CephInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _check_dir(d: Path) -> Path:
    d = Path(d).resolve()
    # ceph.conf has no quoting: these would change the meaning of a value
    # ("," separates keyring paths, "$" starts a metavariable, "#;" comments).
    if re.search(r"[\s,$#;\[\]\\\"']", str(d)):
        raise CephDevError(f"{d}: the cluster directory must not contain whitespace or any of , $ # ; [ ] \\ \" '")
    return d


def _check_pool(pool: str) -> str:
    if not POOL_RE.match(pool):
        raise CephDevError(f"{pool!r} is not a valid pool name")
    return pool


def _check_installed() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise CephDevError(f"Ceph is not installed ({', '.join(missing)} not found): {SETUP_HINT}")


def _import_bindings() -> tuple[Any, Any]:
    try:
        import rados  # Debian's python3-rados (built for /usr/bin/python3)
        import rbd
    except ImportError as exc:
        raise CephDevError(
            f"cannot import the rados/rbd Python bindings ({exc}); they come from Debian's python3-rados and "
            f"python3-rbd and only work with /usr/bin/python3 or a venv made with --system-site-packages: "
            f"{SETUP_HINT}") from None
    return rados, rbd


def _free_port(taken: set[int], address: str = "127.0.0.1") -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _cephx_key() -> str:
    """A new cephx secret as Ceph writes it: base64 of CryptoKey's encoding
    (u16 type 1 = AES, u32 sec, u32 nsec of creation, u16 length, 16 bytes)."""
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + os.urandom(16)
    return base64.b64encode(raw).decode("ascii")


def _keyring_text(entries: list[tuple[str, str, dict[str, str]]]) -> str:
    out = []
    for name, key, caps in entries:
        out.append(f"[{name}]\n\tkey = {key}\n")
        for svc, cap in sorted(caps.items()):
            out.append(f'\tcaps {svc} = "{cap}"\n')
    return "".join(out)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, mode)  # umask must not make the admin keyring unreadable
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise start/stop on one DIR (e.g. parallel test workers)."""
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".cephdev.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# processes: started by us, found by pid file, stopped by pid only
# ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The caller's environment without what would point Ceph elsewhere."""
    return {k: v for k, v in os.environ.items() if k not in ("CEPH_ARGS", "CEPH_CONF", "CEPH_KEYRING")}


def _read_pid(d: Path, daemon: str) -> Optional[int]:
    try:
        text = (d / f"{daemon}.pid").read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _proc(pid: int) -> Optional[list[bytes]]:
    """argv of a live (not zombie) process, [] while it is exiting (the kernel
    drops its memory, hence its cmdline, before it becomes a zombie), None if
    there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else: the cmdline check decides
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].startswith(("Z", "X")):
            return None  # exited, waiting for its parent (init) to reap it
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except (OSError, ValueError):
        return None


def _is_daemon(d: Path, daemon: str, argv: list[bytes]) -> bool:
    return (bool(argv) and os.path.basename(argv[0].decode(errors="replace")) == BINARY_OF[daemon]
            and str(d / CONF_FILE).encode() in argv and daemon.split(".", 1)[1].encode() in argv)


def _ours(d: Path, daemon: str, pid: int) -> bool:
    """pid is alive (os.kill(pid, 0)), not a zombie, and really is this DIR's
    daemon (its command line names the binary and DIR/ceph.conf): a pid that
    the kernel reused for something else is never ours."""
    argv = _proc(pid)
    return argv is not None and _is_daemon(d, daemon, argv)


def _still_there(d: Path, daemon: str, pid: int) -> bool:
    """After we signalled our daemon: still running or still exiting."""
    argv = _proc(pid)
    return argv is not None and (not argv or _is_daemon(d, daemon, argv))


def _live_pids(d: Path) -> dict[str, int]:
    out = {}
    for daemon in DAEMONS:
        pid = _read_pid(d, daemon)
        if pid is not None and _ours(d, daemon, pid):
            out[daemon] = pid
    return out


def _spawn(d: Path, daemon: str, args: list[str]) -> int:
    """Start a daemon in the foreground (-f) but detached: a /bin/sh in a new
    session forks it (stdio to DIR/log/<daemon>.out) and prints its pid, then
    exits, so the daemon is reparented to init. The pid file is written
    before we return."""
    out = d / "log" / f"{daemon}.out"
    script = 'out=$1; shift; "$@" </dev/null >>"$out" 2>&1 & echo $!'
    proc = subprocess.run(["/bin/sh", "-c", script, "sh", str(out), *args], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, check=False,
                          env=_env())
    try:
        pid = int(proc.stdout.decode().strip())
    except ValueError:
        raise CephDevError(f"cannot start {daemon}: {proc.stderr.decode(errors='replace').strip()}") from None
    _write(d / f"{daemon}.pid", f"{pid}\n")
    return pid


def _wait_gone(d: Path, waiting: dict[str, int], deadline: float) -> dict[str, int]:
    while True:
        waiting = {n: p for n, p in waiting.items() if _still_there(d, n, p)}
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(0.02)


def _terminate(d: Path, group: dict[str, int]) -> None:
    """SIGTERM, wait up to STOP_GRACE s, SIGKILL what is left, wait again."""
    for daemon, pid in group.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = _wait_gone(d, group, time.monotonic() + STOP_GRACE)
    for daemon, pid in left.items():
        if _ours(d, daemon, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    left = _wait_gone(d, left, time.monotonic() + 5)
    if left:
        raise CephDevError(f"could not stop {', '.join(f'{n} (pid {p})' for n, p in left.items())}")


def _stop_locked(d: Path) -> None:
    live = _live_pids(d)
    # The OSD (and mgr) before the mon: an OSD whose mon is gone hangs on exit.
    _terminate(d, {n: p for n, p in live.items() if n != MON})
    _terminate(d, {n: p for n, p in live.items() if n == MON})
    for daemon in DAEMONS:
        with contextlib.suppress(FileNotFoundError):
            (d / f"{daemon}.pid").unlink()


# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------


MGR_MODULE_DIR = Path("/usr/share/ceph/mgr")
# The mgr imports every module in its module path at start (about 3-6 s and
# 100+ MB here) although it runs only the always-on ones and the enabled ones:
# give it a path holding just those (symlinks), not the 29 Debian ships.
MGR_MODULES = ("balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler", "progress", "rbd_support",
               "status", "telemetry", "volumes", "iostat")


def _link_mgr_modules(dest: Path) -> None:
    for entry in MGR_MODULE_DIR.iterdir():
        if (entry.is_file() and entry.suffix == ".py") or entry.name in MGR_MODULES:
            (dest / entry.name).symlink_to(entry)


def _conf_text(d: Path, fsid: str, mon_host: str, address: str = "127.0.0.1") -> str:
    asok = f"{d}/run/$name.asok"
    if len(f"{d}/run/mgr.x.asok") > 100:  # AF_UNIX path limit (108 bytes)
        asok = ""  # admin sockets disabled rather than failing to bind
    daemon_common = f"""\
admin socket = {asok}
log file = {d}/log/$name.log
pid file = {d}/$name.pid
keyring = {d}/$name/keyring
"""
    mgr_addr = "" if address == "127.0.0.1" else f"public addr = {address}\n"
    return f"""\
# Written by deploy/cephdev.py: a private single-node test cluster. Use -c {d}/{CONF_FILE}.
[global]
fsid = {fsid}
mon host = {mon_host}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/{KEYRING_FILE}
run dir = {d}/run
crash dir = {d}/crash
# one OSD: no replicas, the OSD is the failure domain
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 5
mon data avail crit = 1
# quick: paxos commits and mgr reports every fraction of a second / second
paxos propose interval = 0.01
paxos min wait = 0.01
mgr tick period = 1
mgr stats period = 1
mon mgr digest period = 1
# read by the mon only when it creates the cluster, and only from [global]
mgr initial modules = iostat
osd objectstore = memstore
memstore device bytes = {1 << 30}

[mon]
{daemon_common}mon data = {d}/$name
mon cluster log file = default={d}/log/ceph.$channel.log cluster={d}/log/ceph.log

[mgr]
{daemon_common}mgr data = {d}/$name
mgr module path = {d}/mgr-modules
{mgr_addr}
[osd]
{daemon_common}osd data = {d}/$name
public addr = {address}
cluster addr = {address}
osd op num shards = 2
osd op num threads per shard = 1
"""


def _run(args: list[str], what: str, timeout: float = 30) -> None:
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
                              env=_env())
    except subprocess.TimeoutExpired:
        raise CephDevError(f"{what} timed out after {timeout:.0f} s: {' '.join(args)}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise CephDevError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{err[-2000:]}")


class _Client:
    """One rados connection as client.admin for start()'s own checks."""

    def __init__(self, info: CephInfo, connect_timeout: float, op_timeout: float) -> None:
        self.rados, self.rbd = _import_bindings()
        t = str(max(1, int(op_timeout)))
        # objecter_tick_interval: an op sent before the OSD was up waits for the
        # next tick (default 5 s) to fetch the osdmap that says it is
        conf = {"keyring": info.keyring, "client_mount_timeout": str(max(1, int(connect_timeout))),
                "rados_mon_op_timeout": t, "rados_osd_op_timeout": t, "objecter_tick_interval": "0.05"}
        self.cluster = self.rados.Rados(conffile=info.conf, name=f"client.{info.client}", conf=conf)
        try:
            self.cluster.connect()
        except Exception:
            self.cluster.shutdown()
            raise

    def mon(self, what: str, **cmd: Any) -> Any:
        ret, out, err = self.cluster.mon_command(json.dumps({**cmd, "format": "json"}), b"")
        if ret != 0:
            raise CephDevError(f"{what}: ceph {cmd['prefix']} failed: {os.strerror(-ret) if ret < 0 else ret} {err}")
        text = out.decode(errors="replace").strip()
        if not text:
            return None
        try:
            # raw_decode: pacific's `osd blocklist ls` appends a second JSON
            # list (the range blocklist) to the first
            return json.JSONDecoder().raw_decode(text)[0]
        except ValueError as exc:
            raise CephDevError(f"{what}: ceph {cmd['prefix']} returned no JSON ({exc}): {text[:200]}") from None

    def close(self) -> None:
        self.cluster.shutdown()


def _connect(info: CephInfo, deadline: float) -> _Client:
    """Connect as client.admin, retrying while the mon comes up."""
    rados, _ = _import_bindings()
    last: Exception = CephDevError("no attempt")
    while time.monotonic() < deadline:
        try:
            left = deadline - time.monotonic()
            return _Client(info, min(3.0, max(1.0, left)), max(1.0, left))
        except rados.Error as exc:
            last = exc
            time.sleep(0.05)
    raise CephDevError(f"cannot connect to the mon at {info.mon_host}: {last}")


def _ensure_pool(client: _Client, pool: str, deadline: float) -> None:
    """Create the RBD pool (size 1 from the defaults), `rbd pool init` it, then
    wait until an RBD image can be created and removed in it."""
    if not client.cluster.pool_exists(pool):
        client.mon(f"create pool {pool}", prefix="osd pool create", pool=pool, pg_num=8, pgp_num=8,
                   pool_type="replicated")
    for var in ("size", "min_size"):
        got = client.mon("check pool", prefix="osd pool get", pool=pool, var=var)
        if got.get(var) != 1:
            client.mon(f"set {var}", prefix="osd pool set", pool=pool, var=var, val="1",
                       yes_i_really_mean_it=True)
    ioctx = client.cluster.open_ioctx(pool)
    try:
        rbd = client.rbd.RBD()
        # application enable rbd + pool validation (writes rbd_info and makes a
        # self-managed snapshot): blocks until the OSD serves the pool
        rbd.pool_init(ioctx, False)
        _log(f"pool {pool}: rbd pool init done")
        name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
        rbd.create(ioctx, name, 4 << 20)
        rbd.remove(ioctx, name)
        _log(f"pool {pool}: RBD image create/remove works")
    finally:
        ioctx.close()


def _wait_osd_up(client: _Client, d: Path, info: CephInfo, deadline: float) -> None:
    """Poll the mon until the OSD is up, failing at once if a daemon died
    (else a dead OSD would show only as an RBD timeout at the deadline)."""
    while True:
        for daemon, pid in info.pids.items():
            if not _ours(d, daemon, pid):
                raise CephDevError(f"{daemon} (pid {pid}) exited during start")
        if client.mon("osd stat", prefix="osd stat").get("num_up_osds") == 1:
            return
        if time.monotonic() >= deadline:
            raise CephDevError("osd.0 did not come up in time")
        time.sleep(0.02)


def _info_path(d: Path) -> Path:
    return d / STATE_FILE


def _load_info(d: Path) -> Optional[CephInfo]:
    try:
        return CephInfo.from_dict(json.loads(_info_path(d).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _running_info(d: Path) -> Optional[CephInfo]:
    """The info of a complete cluster running in d, else None."""
    info = _load_info(d)
    if info is None:
        return None
    live = _live_pids(d)
    if set(live) != set(DAEMONS) or live != info.pids:
        return None
    return info


def _fail(d: Path, msg: str) -> CephDevError:
    logs = []
    for daemon in DAEMONS:
        for suffix in (".out", ".log"):
            tail = _tail(d / "log" / f"{daemon}{suffix}", 8)
            if tail.strip():
                logs.append(f"--- {d}/log/{daemon}{suffix} (tail)\n{tail}")
    return CephDevError(msg + ("\n" + "\n".join(logs) if logs else ""))


def _create(d: Path, pool: str, deadline: float, address: str = "127.0.0.1") -> CephInfo:
    for name in MANAGED:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for sub in ("log", "run", "crash", "mgr-modules", MON, MGR, OSD):
        (d / sub).mkdir(mode=0o755)
    _link_mgr_modules(d / "mgr-modules")

    fsid = str(uuid.uuid4())
    osd_uuid = str(uuid.uuid4())
    ports: set[int] = set()
    v2, v1 = _free_port(ports, address), _free_port(ports, address)
    mon_host = f"[v2:{address}:{v2},v1:{address}:{v1}]"
    conf = d / CONF_FILE
    info = CephInfo(dir=str(d), conf=str(conf), keyring=str(d / KEYRING_FILE), client=CLIENT, pool=pool,
                    fsid=fsid, mon_host=mon_host, pids={})
    _write(conf, _conf_text(d, fsid, mon_host, address))

    # Every key is made here and handed to the mon at mkfs, so the mon starts
    # with the mgr's and the OSD's auth entries already in place.
    keys = {name: _cephx_key() for name in ("mon.", "client.admin", MGR, OSD)}
    admin_caps = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}
    mgr_caps = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
    osd_caps = {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}
    _write(d / "mon.keyring", _keyring_text([("mon.", keys["mon."], {"mon": "allow *"}),
                                             ("client.admin", keys["client.admin"], admin_caps),
                                             (MGR, keys[MGR], mgr_caps), (OSD, keys[OSD], osd_caps)]), 0o600)
    # The admin keyring is readable by everyone: a throw-away loopback cluster,
    # and tests running as another user must be able to use it.
    _write(d / KEYRING_FILE, _keyring_text([("client.admin", keys["client.admin"], admin_caps)]), 0o644)
    _write(d / MGR / "keyring", _keyring_text([(MGR, keys[MGR], {})]), 0o600)
    _write(d / OSD / "keyring", _keyring_text([(OSD, keys[OSD], {})]), 0o600)

    c = ["-c", str(conf)]
    _log("files written")
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_host, str(d / "monmap")], "monmaptool")
    # mon and OSD mkfs are independent: run them side by side
    mkfs = {
        "ceph-mon --mkfs": subprocess.Popen(
            ["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring", str(d / "mon.keyring")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()),
        "ceph-osd --mkfs": subprocess.Popen(
            ["ceph-osd", *c, "--mkfs", "-i", "0", "--osd-uuid", osd_uuid, "--no-mon-config"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()),
    }
    outputs, failed = {}, []
    try:
        for what, proc in mkfs.items():
            try:
                outputs[what] = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                raise CephDevError(f"{what} timed out") from None
            if proc.returncode != 0:
                failed.append(f"{what} failed (exit {proc.returncode}):\n"
                              f"{outputs[what].decode(errors='replace')[-2000:]}")
    finally:
        for proc in mkfs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        raise CephDevError("\n".join(failed))
    (d / "mon.keyring").unlink()  # the mon has its own copy in its data dir now
    _log("mon and osd mkfs done")

    # -f: foreground (so the pid we hold is the daemon's); the daemon runs as
    # the caller (root here): without --setuser Ceph does not change user.
    info.pids[MON] = _spawn(d, MON, ["ceph-mon", *c, "-f", "-i", "a"])
    info.pids[MGR] = _spawn(d, MGR, ["ceph-mgr", *c, "-f", "-i", "x"])
    _log("mon and mgr started")
    client = _connect(info, deadline)
    _log("connected to the mon")
    try:
        client.mon("register osd.0", prefix="osd new", uuid=osd_uuid, id=0)
        info.pids[OSD] = _spawn(d, OSD, ["ceph-osd", *c, "-f", "-i", "0"])
        _log("osd.0 registered and started")
        _wait_osd_up(client, d, info, deadline)
        _log("osd.0 is up")
        _ensure_pool(client, pool, deadline)
    finally:
        client.close()
    _write(_info_path(d), info.to_json() + "\n")
    return info


def start(dir: Path, pool: str = "metastack", timeout: float = 60.0, address: str = "127.0.0.1") -> CephInfo:
    """Start (or find running) the cluster in ``dir``; return once a rados
    client can create and remove an RBD image in ``pool``. ``address``: the
    local IPv4 address the daemons bind (a running cluster keeps its own)."""
    d = _check_dir(Path(dir))
    if not re.match(r"^\d{1,3}(\.\d{1,3}){3}$", address):
        raise CephDevError(f"{address!r} is not an IPv4 address")
    _check_pool(pool)
    _check_installed()
    _import_bindings()
    _T0[0] = time.monotonic()
    deadline = _T0[0] + timeout
    with _locked(d):
        info = _running_info(d)
        if info is not None:
            if pool != info.pool:
                rados, rbd = _import_bindings()
                client = _connect(info, deadline)
                try:
                    _ensure_pool(client, pool, deadline)
                except (rados.Error, rbd.Error) as exc:
                    raise CephDevError(f"cannot create pool {pool} in {d}: {type(exc).__name__}: {exc}") from None
                finally:
                    client.close()
                info = dataclasses.replace(info, pool=pool)  # cephdev.json keeps the first pool
            return info
        _stop_locked(d)  # whatever is left of an earlier cluster in d
        try:
            return _create(d, pool, deadline, address)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                _stop_locked(d)
            if isinstance(exc, CephDevError):
                raise _fail(d, f"cannot start the Ceph dev cluster in {d}: {exc}") from None
            rados, rbd = _import_bindings()
            if isinstance(exc, (rados.Error, rbd.Error)):
                raise _fail(d, f"cannot start the Ceph dev cluster in {d}: {type(exc).__name__}: {exc}") from None
            raise


def stop(dir: Path) -> None:
    """Stop the daemons whose pid files are in ``dir`` (OSD and mgr, then the
    mon). Data and logs stay until the next start. Nothing running: no-op."""
    d = Path(dir).resolve()
    if not d.is_dir():
        return
    with _locked(d):
        _stop_locked(d)


def status(dir: Path) -> dict[str, Any]:
    """The CephInfo fields of the cluster running in ``dir`` plus "running"
    (False, with no info fields, if it is not complete and running) and
    "daemons" (name -> live pid or None)."""
    d = Path(dir).resolve()
    live = _live_pids(d) if d.is_dir() else {}
    info = _running_info(d) if d.is_dir() else None
    out: dict[str, Any] = dataclasses.asdict(info) if info else {"dir": str(d)}
    out.update(running=info is not None, daemons={n: live.get(n) for n in DAEMONS})
    return out


def admin_key(info: CephInfo) -> str:
    """The base64 cephx key of client.<info.client> from the keyring file
    (what a libvirt ceph secret needs: setValue(base64.b64decode(key)))."""
    section = None
    with open(info.keyring, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            m = re.match(r"^\[(.+)\]$", line)
            if m:
                section = m.group(1).strip()
                continue
            m = re.match(r"^key\s*=\s*(\S+)$", line)
            if m and section == f"client.{info.client}":
                return m.group(1)
    raise CephDevError(f"{info.keyring} holds no key for client.{info.client}")


def _blocklist_ls(client: _Client) -> list[str]:
    """Every blocklist entry: client addresses, then ranges as "cidr:IP:0/BITS"
    (pacific prints the range list as a second JSON list after the first)."""
    ret, out, err = client.cluster.mon_command(json.dumps({"prefix": "osd blocklist ls", "format": "json"}), b"")
    if ret != 0:
        raise CephDevError(f"list blocklist: {err}")
    return [f"cidr:{e['range']}" if "range" in e else e["addr"] for e in parse_blocklist(out)]


def parse_blocklist(out: bytes) -> list[dict[str, Any]]:
    """The entries of `osd blocklist ls -f json` output: one or two JSON lists
    (the second, pacific+, holds range entries {"range": "IP:0/BITS", ...})."""
    text, entries, pos = out.decode(errors="replace").strip(), [], 0
    dec = json.JSONDecoder()
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        obj, pos = dec.raw_decode(text, pos)
        entries.extend(obj if isinstance(obj, list) else [])
    return entries


def clear_blocklist(info: CephInfo) -> int:
    """Remove every OSD blocklist entry (lock breaks leave them for an hour).
    Returns how many there were."""
    client = _connect(info, time.monotonic() + 15)
    try:
        n = len(_blocklist_ls(client))
        if n:
            try:
                client.mon("clear blocklist", prefix="osd blocklist", blocklistop="clear")
            except CephDevError:
                for addr in _blocklist_ls(client):
                    if addr.startswith("cidr:"):
                        client.mon(f"unblocklist {addr}", prefix="osd blocklist", range="range", blocklistop="rm",
                                   addr=addr[len("cidr:"):])
                    else:
                        client.mon(f"unblocklist {addr}", prefix="osd blocklist", blocklistop="rm", addr=addr)
        return n
    finally:
        client.close()


MGR_POOLS = ("device_health_metrics", ".mgr")  # made by the mgr once active (pacific, quincy+)


def _healthy(st: dict[str, Any], pools: list[str]) -> bool:
    """HEALTH_OK, mgr active, OSD up, the mgr's own pool made, and the mgr
    reports every pool's PGs, all active+clean."""
    pgmap = st.get("pgmap", {})
    clean = sum(s["count"] for s in pgmap.get("pgs_by_state", []) if s["state_name"] == "active+clean")
    return (st.get("health", {}).get("status") == "HEALTH_OK" and st.get("mgrmap", {}).get("available") is True
            and st.get("osdmap", {}).get("num_up_osds") == 1 and any(p in pools for p in MGR_POOLS)
            and pgmap.get("num_pools") == len(pools) and clean == pgmap.get("num_pgs", -1) > 0)


def cluster_status(info: CephInfo) -> dict[str, Any]:
    """``ceph status`` as JSON (health, osdmap, pgmap, mgrmap...)."""
    client = _connect(info, time.monotonic() + 15)
    try:
        return client.mon("status", prefix="status")
    finally:
        client.close()


def wait_health(info: CephInfo, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until ``ceph status`` says HEALTH_OK with the mgr active, the OSD up
    and every PG active+clean, including those of the pool the mgr creates
    just after it becomes active (before the mgr is up the mon says HEALTH_OK
    without knowing about PGs). Returns the last status, with "healthy"."""
    deadline = time.monotonic() + timeout
    client = _connect(info, deadline)
    try:
        while True:
            st = client.mon("status", prefix="status")
            st["healthy"] = _healthy(st, client.mon("list pools", prefix="osd pool ls") or [])
            if st["healthy"] or time.monotonic() >= deadline:
                return st
            time.sleep(0.1)
    finally:
        client.close()


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="cephdev.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start (or find running) the cluster in DIR; print its info as JSON")
    p.add_argument("dir", type=Path)
    p.add_argument("--pool", default="metastack")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--wait-health", action="store_true", help="also wait (up to --timeout) for HEALTH_OK")
    p.add_argument("--address", default="127.0.0.1", help="local IPv4 address the daemons bind (default 127.0.0.1)")
    p = sub.add_parser("stop", help="stop the cluster in DIR (by its pid files only)")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("status", help="print the cluster's info as JSON; exit 3 if it is not running")
    p.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            t0 = time.monotonic()
            info = start(args.dir, args.pool, args.timeout, args.address)
            print(info.to_json())
            print(f"cephdev: ready in {time.monotonic() - t0:.2f} s (conf {info.conf})", file=sys.stderr)
            if args.wait_health:
                st = wait_health(info, max(1.0, args.timeout - (time.monotonic() - t0)))
                if not st["healthy"]:
                    print(json.dumps(st, indent=2), file=sys.stderr)
                    print(f"cephdev: not healthy after {time.monotonic() - t0:.2f} s", file=sys.stderr)
                    return 1
                print(f"cephdev: HEALTH_OK, mgr active, all PGs active+clean after {time.monotonic() - t0:.2f} s",
                      file=sys.stderr)
        elif args.cmd == "stop":
            t0 = time.monotonic()
            stop(args.dir)
            print(f"cephdev: stopped in {time.monotonic() - t0:.2f} s", file=sys.stderr)
        else:
            st = status(args.dir)
            print(json.dumps(st, indent=2, sort_keys=True))
            return 0 if st["running"] else 3
    except CephDevError as exc:
        print(f"cephdev: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
