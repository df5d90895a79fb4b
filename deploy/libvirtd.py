#!/usr/bin/env python3
"""Start and stop the system libvirtd (qemu:///system) where nothing else does.

For tests and the demo on a machine without systemd. Standard library only.

    python3 deploy/libvirtd.py start STATEDIR    start (idempotent), wait until qemu:///system answers
    python3 deploy/libvirtd.py stop STATEDIR     stop what `start` started (no-op if nothing)
    python3 deploy/libvirtd.py status STATEDIR   exit 0 if qemu:///system answers, 3 if not
    python3 deploy/libvirtd.py restart-libvirtd STATEDIR
                                                 restart libvirtd only; QEMUs keep running

As a module: start(statedir) -> supervisor pid (0 if a libvirtd that this
script did not start already answers: use it as is), stop(statedir),
restart_libvirtd(statedir), running(uri="qemu:///system") -> bool.

Isolated instances (several libvirtds on one machine, for the multi-node
testbed in deploy/testbed.py):

    python3 deploy/libvirtd.py start STATEDIR --root NODEDIR [--netns NAME]

runs the supervisor (and so virtlogd, libvirtd and every QEMU) in its own
mount namespace (`unshare --mount --propagation slave`), inside network
namespace NAME when given (`nsenter --net=/run/netns/NAME`). Before starting
anything the supervisor bind-mounts NODEDIR/{run,lib,etc,log,cache} over
/run/libvirt, /var/lib/libvirt, /etc/libvirt, /var/log/libvirt and
/var/cache/libvirt, visible to that namespace only: each instance has its own
sockets, pid files, domain definitions, secrets, logs and capability cache,
and its QEMUs' network traffic (Ceph) leaves from the namespace's address.
Clients outside reach it with uri_for(NODEDIR) =
`qemu+unix:///system?socket=NODEDIR/run/libvirt-sock`. The capability cache
is seeded from the machine's /var/cache/libvirt (no 4-8 s QEMU probe per
instance). `stop` and `status` find NODEDIR again in STATEDIR/root. The
foreign-libvirtd check (qemu:///system) does not apply to such instances.

`start` launches a small supervisor (this file, hidden mode `_supervise`) in
its own session, logging to STATEDIR/supervisor.log. The supervisor
 - makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER) and reaps
   every child at once: libvirtd double-forks QEMU, so QEMU processes are
   re-parented to the supervisor, and `virsh destroy` returns as soon as QEMU
   is reaped (about 0.25 s) instead of waiting for a slow PID 1 (about 2 s);
 - does the one-time prerequisites (state/log directories, the libvirt-qemu
   system user and group that libvirt 9.0 needs to initialise its QEMU driver,
   that user in group kvm as Debian's libvirt-daemon-system does);
 - runs virtlogd, then libvirtd -f STATEDIR/libvirtd.conf, both in the
   foreground with pid files in STATEDIR;
 - on SIGTERM destroys the running domains (through virsh), stops libvirtd,
   kills any QEMU left among its children, stops virtlogd, and exits. If
   libvirtd or virtlogd exits by itself, it does the same.

Nothing in /etc/libvirt is edited. Without libvirt-daemon-system there is no
/etc/libvirt/qemu.conf, so the compiled-in defaults apply: QEMU runs as
libvirt-qemu:libvirt-qemu and libvirt chowns a guest's files (kernel, disks,
serial log) to that user while it runs, restoring them afterwards; the files
and their directories must be reachable by that user. Defined (persistent) domains live in
/etc/libvirt/qemu and survive a restart: undefine what you define.
"""

import argparse
import ctypes
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

URI = "qemu:///system"
RUN_DIR = Path("/run/libvirt")
LIBVIRT_SOCK = RUN_DIR / "libvirt-sock"
VIRTLOGD_SOCK = RUN_DIR / "virtlogd-sock"
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
QEMU_DRIVER = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
QEMU_USER = QEMU_GROUP = "libvirt-qemu"  # Debian's build-time default (no qemu.conf)
DIRS = ("/run/libvirt", "/var/log/libvirt/qemu", "/var/lib/libvirt/qemu",
        "/var/lib/libvirt/images", "/var/cache/libvirt/qemu", "/etc/libvirt/qemu")
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

START_TIMEOUT = 20.0   # start(): until qemu:///system answers
CHILD_STOP = 10.0      # supervisor: SIGTERM -> SIGKILL for libvirtd, qemu, virtlogd
DESTROY_BUDGET = 15.0  # supervisor: total time for destroying domains at shutdown
STOP_TIMEOUT = 60.0    # stop(): SIGTERM -> SIGKILL for the supervisor

SUP_PID, LIBVIRTD_PID, VIRTLOGD_PID = "supervisor.pid", "libvirtd.pid", "virtlogd.pid"
LOG, CONF, LOCK = "supervisor.log", "libvirtd.conf", ".lock"
ROOT_FILE = "root"  # STATEDIR/root: NODEDIR of an isolated instance
# An isolated instance's private directories: NODEDIR/<sub> is bind-mounted over <path>.
NODE_DIRS = (("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"), ("etc", "/etc/libvirt"),
             ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"))

# Root needs no change from libvirtd's built-in defaults (there is no
# /etc/libvirt/libvirtd.conf without libvirt-daemon-system): the default
# unix-socket auth is polkit, which libvirtd skips for uid 0 clients, so
# D-Bus/polkit are never asked. Non-root clients cannot connect (no D-Bus
# here for polkit); they would need auth_unix_rw = "none" and a wider
# unix_sock_rw_perms (test machines only: that opens the socket to everyone).
# libvirtd's attempts to reach D-Bus (firewalld detection in the network
# driver, systemd-machined on domain stop) fail, are logged, and are harmless.
CONF_TEXT = """\
# Written by deploy/libvirtd.py; rewritten on every start.
# Local unix sockets only (TCP/TLS listeners are off by default); root only.
unix_sock_dir = "/run/libvirt"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
"""

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


class LibvirtdError(RuntimeError):
    pass


# ---------------------------------------------------------------- helpers

def _sd(statedir) -> Path:
    return Path(statedir).expanduser().resolve()


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


def _read_pid(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def _cmdline(pid: int):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def _alive(pid) -> bool:
    """True if pid exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _ours(pid, statedir: Path, marker: bytes) -> bool:
    """pid lives and its command line names marker and our statedir (no pid reuse)."""
    if not _alive(pid):
        return False
    args = _cmdline(pid) or []
    sd = str(statedir).encode()
    return any(marker in a for a in args) and any(sd in a for a in args)


def _supervisor_pid(statedir: Path):
    pid = _read_pid(statedir / SUP_PID)
    return pid if _ours(pid, statedir, b"_supervise") else None


def _sock_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _log_tail(statedir: Path, n: int = 25) -> str:
    try:
        lines = (statedir / LOG).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _check_installed() -> None:
    need = [LIBVIRTD, VIRTLOGD, QEMU_DRIVER]
    missing = [p for p in need if not os.path.exists(p)]
    for prog in ("virsh", "qemu-system-x86_64"):
        if not shutil.which(prog, path=SYS_PATH):
            missing.append(prog)
    if missing:
        raise LibvirtdError(
            "libvirt/QEMU are not installed (missing: " + ", ".join(missing)
            + "); run `bash deploy/setup.sh` first")
    if os.geteuid() != 0:
        raise LibvirtdError("the system libvirtd must be started as root")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid is gone or a zombie; reaps it if it is our child."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _kill_ours(path: Path, statedir: Path, marker: bytes, timeout: float = CHILD_STOP) -> None:
    """SIGTERM (then SIGKILL) the process named by a pid file if it is ours."""
    pid = _read_pid(path)
    if _ours(pid, statedir, marker):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _kill_orphaned_qemu(run_dir: Path = RUN_DIR) -> None:
    """After a supervisor had to be killed: QEMU processes of the system
    libvirtd (our libvirtd: start() never runs one next to a foreign one),
    listed in /run/libvirt/qemu/*.pid (NODEDIR/run/qemu/*.pid for an isolated
    instance), would otherwise run on unsupervised."""
    pids = []
    for f in (run_dir / "qemu").glob("*.pid"):
        pid = _read_pid(f)
        args = _cmdline(pid) if _alive(pid) else None
        if args and b"qemu-system" in args[0]:
            pids.append(pid)
    for pid in pids:
        print(f"libvirtd: killing orphaned qemu pid {pid}", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid, 5)


class _Lock:
    def __init__(self, statedir: Path):
        self.path = statedir / LOCK

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def uri_for(root=None) -> str:
    """The URI of the instance whose private root is ``root`` (None: the
    machine's qemu:///system)."""
    if root is None:
        return URI
    return f"qemu+unix:///system?socket={_sd(root) / 'run' / 'libvirt-sock'}"


def _root_of(statedir: Path):
    try:
        text = (statedir / ROOT_FILE).read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def _seed_capabilities(root: Path) -> None:
    """Copy the machine's QEMU capability cache into a new instance's cache
    (libvirt re-validates it: binary and libvirtd ctimes, kernel, microcode)."""
    src = Path("/var/cache/libvirt/qemu/capabilities")
    dst = root / "cache" / "qemu" / "capabilities"
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not any(dst.iterdir()):
        for f in src.glob("*.xml"):
            shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------- public API

def running(uri: str = URI) -> bool:
    """True if a libvirt daemon answers on uri (`virsh -c uri version`)."""
    virsh = shutil.which("virsh", path=SYS_PATH)
    if "?socket=" in uri and not _sock_answers(Path(uri.split("?socket=", 1)[1])):
        return False
    if not virsh:
        return uri == URI and _sock_answers(LIBVIRT_SOCK)
    # Fast "no" without a socket file. (Not a test connect: libvirtd logs an
    # error for every client that connects and hangs up without a word.)
    if uri == URI and not (LIBVIRT_SOCK.exists() or (RUN_DIR / "virtqemud-sock").exists()):
        return False
    env = dict(os.environ, LC_ALL="C")
    env.pop("LIBVIRT_DEFAULT_URI", None)
    try:
        r = subprocess.run([virsh, "-c", uri, "version"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10, env=env)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def start(statedir: Path, timeout: float = START_TIMEOUT, root=None, netns=None) -> int:
    """Start libvirtd under a supervisor; return the supervisor pid.

    Returns at once with the pid if our supervisor already runs, and returns
    0 (starting nothing) if a libvirtd not started by us answers on
    qemu:///system. With ``root`` (and optionally ``netns``): an isolated
    instance (see the module docstring), reached at uri_for(root).
    """
    statedir = _sd(statedir)
    statedir.mkdir(parents=True, exist_ok=True)
    if root is None and netns is not None:
        raise LibvirtdError("--netns needs --root (a libvirtd in a network namespace needs its own directories)")
    if netns is not None and not Path(f"/run/netns/{netns}").exists():
        raise LibvirtdError(f"network namespace {netns} does not exist (/run/netns/{netns})")
    with _Lock(statedir):
        pid = _supervisor_pid(statedir)
        if pid:
            return pid
        # A supervisor killed with SIGKILL may leave its daemons behind
        # (normally they get SIGTERM through PDEATHSIG): stop them by pid file.
        _kill_ours(statedir / LIBVIRTD_PID, statedir, b"libvirtd")
        _kill_ours(statedir / VIRTLOGD_PID, statedir, b"virtlogd")
        (statedir / SUP_PID).unlink(missing_ok=True)
        uri = uri_for(root)
        if root is None:
            (statedir / ROOT_FILE).unlink(missing_ok=True)
            if running(URI):
                print(f"libvirtd: a libvirtd not started by this script already answers on {URI};"
                      " using it as is", file=sys.stderr)
                return 0
        else:
            root = _sd(root)
            for sub, _ in NODE_DIRS:
                (root / sub).mkdir(parents=True, exist_ok=True)
            _seed_capabilities(root)
            (statedir / ROOT_FILE).write_text(f"{root}\n")
        _check_installed()

        t0 = time.monotonic()
        (statedir / CONF).write_text(CONF_TEXT)
        with open(statedir / LOG, "ab") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
            log.flush()
            # The intermediate process forks the real supervisor and exits,
            # so the caller is never left holding a zombie.
            argv = [sys.executable or "/usr/bin/python3", os.path.abspath(__file__), "_supervise", str(statedir)]
            if root is not None:
                argv = ["unshare", "--mount", "--propagation", "slave", "--", *argv, "--root", str(root)]
                if netns is not None:
                    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
            env = dict(os.environ, LIBVIRTD_PY_CALLER_MNTNS=os.readlink("/proc/self/ns/mnt"))
            proc = subprocess.Popen(
                argv, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, cwd="/")
        rc = proc.wait()
        if rc != 0:
            raise LibvirtdError(f"libvirtd supervisor failed to start (exit {rc});"
                                f" {statedir / LOG}:\n{_log_tail(statedir)}")
        deadline = t0 + timeout
        pid = None
        while True:
            pid = pid or _read_pid(statedir / SUP_PID)
            if pid and running(uri):
                return pid
            if pid and not _alive(pid):
                raise LibvirtdError(f"libvirtd supervisor exited during start-up;"
                                    f" {statedir / LOG}:\n{_log_tail(statedir)}")
            if time.monotonic() >= deadline:
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    _wait_gone(pid, STOP_TIMEOUT)
                raise LibvirtdError(f"{uri} did not answer within {timeout:.0f} s;"
                                    f" {statedir / LOG}:\n{_log_tail(statedir)}")
            time.sleep(0.1)


def stop(statedir: Path, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the supervisor started by start(statedir) (and with it libvirtd,
    virtlogd and any QEMU they run). No-op if nothing runs."""
    statedir = _sd(statedir)
    if not statedir.is_dir():
        return
    with _Lock(statedir):
        pid = _supervisor_pid(statedir)
        # A pid file without its supervisor: it died without cleaning up.
        unclean = pid is None and (statedir / SUP_PID).exists()
        if pid:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                print(f"libvirtd: supervisor {pid} did not stop in {timeout:.0f} s, killing it",
                      file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
                unclean = True
        (statedir / SUP_PID).unlink(missing_ok=True)
        # Normally gone already; these only act on leftovers of a killed
        # supervisor (its daemons get SIGTERM through PDEATHSIG anyway).
        _kill_ours(statedir / LIBVIRTD_PID, statedir, b"libvirtd")
        _kill_ours(statedir / VIRTLOGD_PID, statedir, b"virtlogd")
        root = _root_of(statedir)
        if unclean and not running(uri_for(root)):
            _kill_orphaned_qemu(RUN_DIR if root is None else root / "run")


def restart_libvirtd(statedir: Path, timeout: float = START_TIMEOUT) -> int:
    """Restart libvirtd (only) of the supervisor started with statedir, as
    `systemctl restart libvirtd` would: virtlogd and every QEMU keep running
    and the new libvirtd re-attaches to them. Returns the new libvirtd pid
    once the instance answers again."""
    statedir = _sd(statedir)
    pid = _supervisor_pid(statedir)
    if not pid:
        raise LibvirtdError(f"no supervisor started with {statedir} runs")
    old = _read_pid(statedir / LIBVIRTD_PID)
    uri = uri_for(_root_of(statedir))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while True:
        new = _read_pid(statedir / LIBVIRTD_PID)
        if new and new != old and _alive(new) and running(uri):
            return new
        if not _alive(pid):
            raise LibvirtdError(f"the supervisor exited while restarting libvirtd; {statedir / LOG}:\n"
                                f"{_log_tail(statedir)}")
        if time.monotonic() >= deadline:
            raise LibvirtdError(f"libvirtd did not come back within {timeout:.0f} s")
        time.sleep(0.05)


def status(statedir: Path) -> int:
    statedir = _sd(statedir)
    pid = _supervisor_pid(statedir) if statedir.is_dir() else None
    uri = uri_for(_root_of(statedir)) if statedir.is_dir() else URI
    answers = running(uri)
    if pid:
        lv = _read_pid(statedir / LIBVIRTD_PID)
        lg = _read_pid(statedir / VIRTLOGD_PID)
        print(f"supervisor pid {pid}, libvirtd pid {lv}, virtlogd pid {lg};"
              f" {uri} {'answers' if answers else 'does NOT answer'}")
        return 0 if answers else 1
    if answers:
        print(f"{uri} answers, but not from a libvirtd started with {statedir}")
        return 0
    print("not running")
    return 3


# ---------------------------------------------------------------- supervisor

class _Supervisor:
    SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}

    def __init__(self, statedir: Path, root=None):
        self.sd = statedir
        self.root = root
        self.restart = False  # SIGUSR1: restart libvirtd only
        self.me = os.getpid()
        self.virtlogd = None
        self.libvirtd = None
        self.exited = {}      # pid -> wait status (the two daemons, our virsh runs)
        self.quiet = set()    # our own virsh helpers: not logged when reaped
        self.stopping = False

    def log(self, msg: str) -> None:
        t = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        print(f"{t} supervisor[{self.me}]: {msg}", flush=True)

    # -- children
    def spawn(self, argv) -> int:
        pid = os.fork()
        if pid == 0:  # child
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                          signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(s, signal.SIG_DFL)
                _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                env = {k: v for k, v in os.environ.items()
                       if not k.startswith(("LIBVIRT_", "VIRSH_", "VIRTUAL_ENV", "PYTHON"))}
                env.update(PATH=SYS_PATH, LC_ALL="C")
                os.execve(argv[0], argv, env)
            except BaseException as e:  # noqa: BLE001
                os.write(2, f"exec {argv[0]} failed: {e}\n".encode())
            os._exit(127)
        self.log(f"started {' '.join(argv)} as pid {pid}")
        return pid

    def reap(self) -> None:
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in (self.libvirtd, self.virtlogd):
                self.exited[pid] = st
                name = "libvirtd" if pid == self.libvirtd else "virtlogd"
                self.log(f"{name} (pid {pid}) exited: {self.describe(st)}")
            elif pid in self.quiet:
                self.quiet.discard(pid)
                self.exited[pid] = st
            else:  # QEMU and libvirt's helpers, re-parented to us
                self.log(f"reaped pid {pid} ({self.describe(st)})")

    @staticmethod
    def describe(st: int) -> str:
        if os.WIFSIGNALED(st):
            return f"signal {os.WTERMSIG(st)}"
        return f"status {os.waitstatus_to_exitcode(st)}"

    def gone(self, pid) -> bool:
        return pid is None or pid in self.exited

    def wait_signals(self, timeout: float) -> None:
        """Sleep up to timeout, handling SIGCHLD/SIGTERM meanwhile."""
        info = signal.sigtimedwait(self.SIGNALS, max(timeout, 0.001))
        sig = info.si_signo if info else None
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            self.log(f"got signal {signal.Signals(sig).name}, shutting down")
            self.stopping = True
        if sig == signal.SIGUSR1:
            self.restart = True
        self.reap()

    def wait_until(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.wait_signals(min(left, 0.05))
        return True

    def children(self):
        """pids whose parent is this supervisor (qemu processes end up here)."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == self.me and fields[0] not in ("Z", "X"):
                    out.append(int(d))
        return out

    def terminate(self, pids, what: str) -> None:
        pids = [p for p in pids if p and not self.gone(p) and _alive(p)]
        if not pids:
            return
        self.log(f"stopping {what}: {pids}")
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not self.wait_until(lambda: not any(_alive(p) for p in pids), CHILD_STOP):
            for p in pids:
                if _alive(p):
                    self.log(f"pid {p} ignored SIGTERM for {CHILD_STOP:.0f} s, SIGKILL")
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.wait_until(lambda: not any(_alive(p) for p in pids), 5)
        self.reap()

    # -- setup
    def isolate(self) -> None:
        """Bind-mount the instance's private directories over libvirt's
        paths, refusing to do so in the machine's own mount namespace."""
        if os.readlink("/proc/self/ns/mnt") == os.environ.get("LIBVIRTD_PY_CALLER_MNTNS", "unknown"):
            raise LibvirtdError("--root: not in a private mount namespace; refusing to mount over the"
                                " machine's libvirt directories")
        for sub, target in NODE_DIRS:
            src = self.root / sub
            src.mkdir(parents=True, exist_ok=True)
            os.makedirs(target, exist_ok=True)
            subprocess.run(["mount", "--bind", str(src), target], check=True,
                           env=dict(os.environ, PATH=SYS_PATH))
        self.log(f"private libvirt directories from {self.root}; network namespace "
                 f"{os.readlink('/proc/self/ns/net')}")

    def prerequisites(self) -> None:
        for d in DIRS:
            os.makedirs(d, exist_ok=True)
        try:
            grp.getgrnam(QEMU_GROUP)
        except KeyError:
            self.log(f"creating system group {QEMU_GROUP}")
            subprocess.run(["groupadd", "--system", QEMU_GROUP], check=True,
                           env=dict(os.environ, PATH=SYS_PATH))
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            self.log(f"creating system user {QEMU_USER}")
            subprocess.run(["useradd", "--system", "--gid", QEMU_GROUP, "--no-create-home",
                            "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
                            "--comment", "Libvirt Qemu", QEMU_USER], check=True,
                           env=dict(os.environ, PATH=SYS_PATH))
        # As Debian's libvirt-daemon-system does: the QEMU user is in group
        # kvm. Besides letting KVM guests run, it keeps libvirt's QEMU
        # capability cache valid: if /dev/kvm is not usable by this user
        # while QEMU's probe reports KVM, libvirt throws the cache away and
        # re-probes every QEMU binary (about 4 s each) at every start and on
        # every later capability lookup.
        try:
            kvm = grp.getgrnam("kvm")
        except KeyError:
            kvm = None
        if kvm and QEMU_USER not in kvm.gr_mem and pwd.getpwnam(QEMU_USER).pw_gid != kvm.gr_gid:
            self.log(f"adding {QEMU_USER} to group kvm")
            subprocess.run(["usermod", "-a", "-G", "kvm", QEMU_USER], check=True,
                           env=dict(os.environ, PATH=SYS_PATH))

    def destroy_domains(self) -> None:
        """Destroy running domains so libvirt records them as shut off and
        restores file ownership; persistent definitions stay."""
        if self.gone(self.libvirtd) or not LIBVIRT_SOCK.exists():
            return
        deadline = time.monotonic() + DESTROY_BUDGET
        env = dict(os.environ, PATH=SYS_PATH, LC_ALL="C")
        env.pop("LIBVIRT_DEFAULT_URI", None)

        def virsh(*args):
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(args, 0)
            # Popen + polling (not run()): qemu processes must be reaped
            # while virsh destroy waits for them to vanish.
            with tempfile.TemporaryFile() as out:
                p = subprocess.Popen(["virsh", "-q", "-c", URI, *args],
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env)
                self.quiet.add(p.pid)
                if not self.wait_until(lambda: p.pid in self.exited,
                                       deadline - time.monotonic()):
                    p.kill()
                    self.wait_until(lambda: p.pid in self.exited, 2)
                    raise subprocess.TimeoutExpired(args, 0)
                p.returncode = os.waitstatus_to_exitcode(self.exited.pop(p.pid))
                out.seek(0)
                return p.returncode, out.read().decode(errors="replace")

        try:
            st, out = virsh("list", "--name")
            names = [n.strip() for n in out.splitlines() if n.strip()] if st == 0 else []
            for n in names:
                st, out = virsh("destroy", n)
                self.log(f"destroyed domain {n}" if st == 0 else f"destroy {n}: {out.strip()}")
        except subprocess.TimeoutExpired:
            self.log("destroying domains took too long; going on")

    # -- main
    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _write_pid(self.sd / SUP_PID, self.me)
        rc = 0
        try:
            if self.root is not None:
                self.isolate()
            self.prerequisites()
            if _sock_answers(VIRTLOGD_SOCK):
                self.log(f"a virtlogd already listens on {VIRTLOGD_SOCK}; not starting ours")
            else:
                self.virtlogd = self.spawn([VIRTLOGD, "-p", str(self.sd / VIRTLOGD_PID)])
                if not self.wait_until(lambda: self.stopping or self.gone(self.virtlogd)
                                       or _sock_answers(VIRTLOGD_SOCK), 10):
                    raise LibvirtdError(f"virtlogd did not listen on {VIRTLOGD_SOCK} in 10 s")
                if self.gone(self.virtlogd):
                    raise LibvirtdError("virtlogd exited during start-up")
            if not self.stopping:
                self.libvirtd = self.spawn([LIBVIRTD, "-f", str(self.sd / CONF),
                                            "-p", str(self.sd / LIBVIRTD_PID)])
            while not self.stopping:
                self.wait_signals(1.0)
                if self.restart and not self.stopping:
                    self.restart = False
                    self.terminate([self.libvirtd], "libvirtd (restart; QEMUs keep running)")
                    if not self.stopping:
                        self.libvirtd = self.spawn([LIBVIRTD, "-f", str(self.sd / CONF),
                                                    "-p", str(self.sd / LIBVIRTD_PID)])
                if self.gone(self.libvirtd) or (self.virtlogd and self.gone(self.virtlogd)):
                    self.log("a daemon exited by itself; shutting down")
                    rc = 1
                    break
        except Exception as e:  # noqa: BLE001
            self.log(f"error: {e}")
            rc = 1
        finally:
            self.shutdown()
        return rc

    def shutdown(self) -> None:
        self.destroy_domains()
        self.terminate([self.libvirtd], "libvirtd")
        self.terminate([p for p in self.children() if p != self.virtlogd],
                       "leftover child processes (qemu)")
        self.terminate([self.virtlogd], "virtlogd")
        self.reap()
        if _read_pid(self.sd / SUP_PID) == self.me:
            (self.sd / SUP_PID).unlink(missing_ok=True)
        self.log("stopped")


def _supervise(statedir: Path, root=None) -> int:
    # Daemonise: the parent (started by start()) exits at once; the child is
    # re-parented away from the caller, which then has no zombie to reap.
    if os.fork() != 0:
        os._exit(0)
    return _Supervisor(statedir, root).run()


# ---------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status", "restart-libvirtd", "_supervise"])
    ap.add_argument("statedir", type=Path)
    ap.add_argument("--root", type=Path, help="isolated instance: private libvirt directories below ROOT")
    ap.add_argument("--netns", help="isolated instance: run inside this network namespace (needs --root)")
    a = ap.parse_args(argv)
    try:
        if a.command == "_supervise":
            return _supervise(_sd(a.statedir), _sd(a.root) if a.root else None)
        if a.command == "start":
            t0 = time.monotonic()
            pid = start(a.statedir, root=a.root, netns=a.netns)
            if pid:
                print(f"libvirtd: {uri_for(a.root)} answers (supervisor pid {pid},"
                      f" {time.monotonic() - t0:.2f} s)")
            return 0
        if a.command == "restart-libvirtd":
            print(f"libvirtd: restarted, new pid {restart_libvirtd(a.statedir)}")
            return 0
        if a.command == "stop":
            stop(a.statedir)
            return 0
        return status(a.statedir)
    except LibvirtdError as e:
        print(f"libvirtd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
