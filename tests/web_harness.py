"""Harness for the web tests: a private etcd, agents on test:/// hosts, the
web server as a real process, users made with metastackctl, and a small
HTTP client that keeps a session cookie. Everything started here is
stopped here, by its handle."""
from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from click.testing import CliRunner

import metastack as ms
from harness import ROOT, Cluster, EtcdServer, free_port, wait_for
from metastackctl import cli

PASSWORDS = {"admin": "admin-pass-1", "viewer": "viewer-pass-1"}


class WebServer:
    """``python metastackweb.py -c FILE`` on a free port; restartable."""

    def __init__(self, workdir: Path, etcd: EtcdServer, prefix: str, extra: str = "",
                 tls: Optional[tuple[Path, Path]] = None) -> None:
        """``tls``: (certificate, key) to serve HTTPS with."""
        self.port = free_port()
        self.ssl_context: Optional[ssl.SSLContext] = None
        if tls is not None:
            extra = f"tls_cert = {tls[0]}\ntls_key = {tls[1]}\n" + extra
            self.ssl_context = ssl.create_default_context(cafile=str(tls[0]))
            self.ssl_context.check_hostname = False
        self.config = workdir / "web.ini"
        self.config.write_text(textwrap.dedent(f"""\
            [etcd]
            endpoints = {etcd.endpoint}
            prefix = {prefix}
            timeout = 1.0
            [web]
            listen = 127.0.0.1:{self.port}
            login_failures = 5
            login_window = 3
            """) + extra)
        self.logpath = workdir / "web.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ssl_context, timeout=timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def start(self) -> "WebServer":
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "metastackweb.py"), "-c", str(self.config)],
                                     stdout=open(self.logpath, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                return Client(self).request("GET", "/api/v1/status")[0] == 401
            except OSError:
                return False
        wait_for(up, 15, what="the web server to answer")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""


class Client:
    """A tiny HTTP client with one session cookie and its CSRF token."""

    def __init__(self, server: WebServer) -> None:
        self.server = server
        self.cookie = ""
        self.csrf = ""

    def request(self, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None,
                csrf: bool = True, raw: Optional[bytes] = None) -> tuple[int, dict[str, str], Any]:
        conn = self.server.connect()
        h = dict(headers or {})
        if self.cookie:
            h["Cookie"] = self.cookie
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            h.setdefault("X-CSRF-Token", self.csrf)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        text = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        for k, v in resp.getheaders():
            if k.lower() == "set-cookie":
                hdrs["set-cookie"] = v
                cookie = v.split(";", 1)[0]
                self.cookie = "" if cookie.endswith("=") or cookie.endswith('=""') else cookie
        conn.close()
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return resp.status, hdrs, payload

    def login(self, user: str, password: str) -> tuple[int, dict[str, str], Any]:
        status, hdrs, body = self.request("POST", "/api/v1/session", {"user": user, "password": password})
        if status == 200:
            self.csrf = body["csrf"]
        return status, hdrs, body


class EventStream:
    """Reads ``/api/v1/events`` on a thread; records (arrival time, event, data)."""

    def __init__(self, client: Client, query: str = "") -> None:
        self.conn = client.server.connect(timeout=30)
        self.conn.request("GET", "/api/v1/events" + query, headers={"Cookie": client.cookie})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.events: list[tuple[float, str, Any]] = []
        self.cond = threading.Condition()
        self.closed = False
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event, data = "message", []
        try:
            for line in self.resp:
                line = line.decode().rstrip("\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    with self.cond:
                        self.events.append((time.monotonic(), event, json.loads("\n".join(data))))
                        self.cond.notify_all()
                    event, data = "message", []
        except (OSError, ValueError, AttributeError, http.client.HTTPException):  # AttributeError: closed meanwhile
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float = 10) -> tuple[float, str, Any]:
        """The first recorded (time, event, data) for which pred(event, data) holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for item in self.events:
                    if pred(item[1], item[2]):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise AssertionError(f"no matching event within {timeout}s; got {self.events[-5:]!r}")
                self.cond.wait(left)

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(2)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        self.conn.close()


class WebEnv:
    """Everything a web test module needs: its own etcd, a prefix, a store,
    a cluster of agents, the web server, and users admin and viewer."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.etcd = EtcdServer(workdir)
        self.etcd.start()
        self.prefix = "/metastack"
        self.store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(self.etcd.endpoint),
                                            prefix=self.prefix, timeout=2.0))
        self.keys = self.store.keys
        self.cluster = Cluster(self.etcd, self.prefix, self.store, workdir)
        for role, password in PASSWORDS.items():
            r = self.ctl("user", "add", role, "--role", role, "--password-stdin", input=password + "\n")
            assert r.exit_code == 0, r.output
        self.web = WebServer(workdir, self.etcd, self.prefix).start()

    def ctl(self, *args: str, input: Optional[str] = None) -> Any:
        return CliRunner().invoke(cli, ["--endpoints", self.etcd.endpoint, "--prefix", self.prefix, *args],
                                  input=input)

    def client(self, role: Optional[str] = "admin") -> Client:
        c = Client(self.web)
        if role is not None:
            status, _, body = c.login(role, PASSWORDS[role])
            assert status == 200, body
        return c

    def keys_under(self) -> dict[str, bytes]:
        """Every key the API may write (desired VMs, flavours, images,
        users; not sessions: logins make them); agents' keys change by themselves."""
        out = {}
        for prefix in (self.keys.dir("desired"), self.keys.dir("flavours"), self.keys.dir("images"),
                       f"{self.prefix}-auth/users/"):
            _, entries = self.store.list_prefix(prefix)
            out.update({k: e.value for k, e in entries.items()})
        _, sharded = self.store.list_prefix(self.keys.shards)  # desired entries in their shards
        out.update({k: e.value for k, e in sharded.items() if (self.keys.split(k) or ("",))[0] == "desired"})
        return out

    def history(self, vm: str, micros: int, node: str, event: str, detail: str = "") -> None:
        """Write one VM life event the way the agent records it."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(micros / 1e6))
        key = f"{self.keys.dir('events')}{vm}/{micros:020d}-{node}"
        self.store.put(key, json.dumps({"at": at, "node": node, "vm": vm, "event": event,
                                        "detail": detail}).encode())

    def close(self) -> None:
        self.web.stop()
        self.cluster.stop_all()
        self.store.close()
        self.etcd.stop()


def web_env_fixture(name: str) -> Any:
    """A module-scoped WebEnv fixture in a directory pytest keeps (its
    screenshots and logs stay there after the run)."""
    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebEnv]:
        env = WebEnv(tmp_path_factory.mktemp(name))
        try:
            yield env
        finally:
            env.close()
    return fixture
