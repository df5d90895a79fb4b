#!/usr/bin/env python3
"""metastack-web: the MetaStack web console and its JSON API.

Usage:  python metastackweb.py -c /etc/metastack/web.ini [--check-config]

Runs on a management node (several may run at once against one etcd). It
keeps one list + watch of the whole MetaStack prefix (the agent's
ClusterView) and fans every change out to the browsers by Server-Sent
Events; nothing polls. The page (``metastackweb_static/``, plain JS, no
build step, nothing loaded from the internet) uses only the JSON API under
``/api/v1/``, documented in README "The web interface".

Reads and the event stream are served from the cluster view; every change
goes through the admin operations that ``metastackctl`` uses (its shared
block), so the API applies the same validation and refusals and returns the
same objects as ``metastackctl ... -o json``. Users and sessions live in
etcd under ``<prefix>-auth/`` (``metastackctl user add``), so a session made
on one management node is valid on every other.

Sections: config, sessions and login limits, feed (list + watch), catalog
(API objects from the view), event hub (SSE fan-out), HTTP app, main.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

import metastack as ms
import metastackctl as ctl

log = logging.getLogger("metastack-web")

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

STATIC_NAME = "metastackweb_static"


def default_static_dir() -> str:
    """The page's assets: next to this file in a checkout, under
    ``<prefix>/share/metastack/web`` when installed with pip."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), STATIC_NAME)
    if os.path.isdir(here):
        return here
    return os.path.join(sys.prefix, "share", "metastack", "web")


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """The ``[web]`` section; see config.example.ini."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    session_ttl: int = 8 * 3600
    login_failures: int = 5
    login_window: float = 300.0
    static_dir: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"


def web_config_from(cp: Any) -> WebConfig:
    """Read and validate ``[web]``; raises ConfigError naming the key at fault."""
    listen = cp.get("web", "listen", fallback="127.0.0.1:8080").strip()
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ms.ConfigError(f"[web] listen: {listen!r} is not host:port")
    cert = cp.get("web", "tls_cert", fallback="").strip()
    key = cp.get("web", "tls_key", fallback="").strip()
    if bool(cert) != bool(key):
        raise ms.ConfigError("[web] tls_cert and tls_key go together")
    for k, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not os.path.isfile(path):
            raise ms.ConfigError(f"[web] {k}: {path} does not exist")

    def pos_int(k: str, default: int) -> int:
        raw = cp.get("web", k, fallback=str(default)).strip()
        if not raw.isdigit() or int(raw) <= 0:
            raise ms.ConfigError(f"[web] {k}: {raw!r} must be a positive integer")
        return int(raw)
    static = cp.get("web", "static_dir", fallback="").strip() or default_static_dir()
    if not os.path.isfile(os.path.join(static, "index.html")):
        raise ms.ConfigError(f"[web] static_dir: {static} has no index.html")
    ttl = pos_int("session_ttl", 8 * 3600)
    if ttl < ms.ETCD_MIN_TTL * 30:
        raise ms.ConfigError(f"[web] session_ttl: {ttl} is too short (at least 60 seconds)")
    return WebConfig(host=host, port=int(port), tls_cert=cert, tls_key=key, session_ttl=ttl,
                     login_failures=pos_int("login_failures", 5),
                     login_window=float(pos_int("login_window", 300)), static_dir=static)


# ---------------------------------------------------------------------------
# Sessions and login limits
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    """Logins and sessions, shared by every management node through etcd.

    Contract: ``login`` checks a password against the user's scrypt hash and,
    on success, stores ``<prefix>-auth/sessions/<sha256(token)>`` = {"user",
    "csrf", "created"} on a lease of ``ttl`` seconds (etcd drops it when it
    expires) and returns the token for the cookie; only the token's hash is
    stored. ``check`` returns the live session of a token, with the role
    read from the user record (a deleted user has no session any more), or
    None; its answer is cached for ``cache_s`` seconds in this process,
    and while etcd is unreachable a cached answer up to ``stale_s`` old is
    used (reads go on from the view; changes fail anyway).
    ``logout`` deletes the session. Blocking (etcd, scrypt): call from a
    worker thread. StoreUnavailable escapes.
    """

    def __init__(self, store: ms.Store, auth: ctl.AuthKeys, ttl: int, cache_s: float = 2.0,
                 stale_s: float = 300.0) -> None:
        self.store = store
        self.auth = auth
        self.ttl = ttl
        self.cache_s = cache_s
        self.stale_s = stale_s
        self._cache: dict[str, tuple[float, Optional[Session]]] = {}
        self._lock = threading.Lock()
        self._dummy = ctl.hash_password(secrets.token_hex(8))  # equal work for unknown users

    @staticmethod
    def _hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def login(self, user: Any, password: Any) -> Optional[tuple[str, Session]]:
        if not isinstance(user, str) or not isinstance(password, str) or len(password) > 1024:
            return None
        record = ctl.get_user(self.store, self.auth, user)
        if not ctl.verify_password(record.password if record else self._dummy, password) or record is None:
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        lease = self.store.grant_lease(self.ttl)
        value = json.dumps({"user": user, "csrf": csrf, "created": ms.utc_now()}).encode()
        self.store.put(self.auth.session(self._hash(token)), value, lease=lease)
        session = Session(user, record.role, csrf)
        with self._lock:
            self._cache[token] = (time.monotonic(), session)
        return token, session

    def check(self, token: Optional[str]) -> Optional[Session]:
        if not token or len(token) > 256:
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(token)
            if hit is not None and now - hit[0] < self.cache_s:
                return hit[1]
        try:
            session = self._read(token)
        except ms.StoreUnavailable:
            if hit is not None and hit[1] is not None and now - hit[0] < self.stale_s:
                return hit[1]
            raise
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[token] = (now, session)
        return session

    def _read(self, token: str) -> Optional[Session]:
        entry = self.store.get(self.auth.session(self._hash(token)))
        if entry is None:
            return None
        try:
            obj = json.loads(entry.value)
            user, csrf = obj["user"], obj["csrf"]
        except (ValueError, KeyError, TypeError):
            return None
        record = ctl.get_user(self.store, self.auth, user) if isinstance(user, str) else None
        if record is None or not isinstance(csrf, str):
            return None
        return Session(user, record.role, csrf)

    def logout(self, token: str) -> None:
        """End the session: revoke its lease (which deletes its key)."""
        key = self.auth.session(self._hash(token))
        entry = self.store.get(key)
        if entry is not None and entry.lease:
            with contextlib.suppress(ms.LeaseNotFound):
                self.store.revoke_lease(entry.lease)
        self.store.delete(key)
        with self._lock:
            self._cache.pop(token, None)


class LoginLimiter:
    """Failed logins per client address in this process: after ``limit``
    failures within ``window`` seconds, further attempts are refused until
    the oldest failure leaves the window. A success clears the count."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._fails: dict[str, collections.deque[float]] = {}

    def _recent(self, client: str, now: float) -> collections.deque[float]:
        q = self._fails.setdefault(client, collections.deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def retry_after(self, client: str) -> float:
        """0 when ``client`` may try now, else seconds to wait."""
        now = time.monotonic()
        q = self._recent(client, now)
        if len(q) < self.limit:
            return 0.0
        return max(1.0, self.window - (now - q[0]))

    def failed(self, client: str) -> None:
        if len(self._fails) > 10000:
            self._fails.clear()
        self._recent(client, time.monotonic()).append(time.monotonic())

    def succeeded(self, client: str) -> None:
        self._fails.pop(client, None)


# ---------------------------------------------------------------------------
# Feed: one list + watch of the whole prefix, kept in a ClusterView
# ---------------------------------------------------------------------------


class Feed(threading.Thread):
    """Keeps ``view`` (the agent's ClusterView) current by one list + watch.

    Contract: lists the prefix, then watches from the listed revision; a
    watch that dies is re-created from the last revision seen, or after a
    re-list when etcd compacted it; while etcd is unreachable it retries
    every ``retry`` seconds. ``on_events(revision, events, before)`` runs on
    the watch thread after the view folded the events in (console tails and
    history keys included: the view keeps none of the former); ``before``
    maps each event's key to its entry in the view just before.
    ``on_status(ok, relisted)`` reports etcd lost (ok False) or reachable,
    ``relisted`` True after a full re-list (readers should re-read all).
    """

    def __init__(self, store: ms.Store, view: ms.ClusterView,
                 on_events: Callable[[int, list[ms.KeyEvent], dict[str, Optional[ms.Entry]]], None],
                 on_status: Callable[[bool, bool], None], retry: float = 1.0) -> None:
        super().__init__(name="feed", daemon=True)
        self.store = store
        self.view = view
        self.on_events = on_events
        self.on_status = on_status
        self.retry = retry
        self.ok = False
        self._dead = threading.Event()
        self._stop = threading.Event()
        self._relist = True
        self._cancel: Optional[Callable[[], None]] = None

    def stop(self) -> None:
        self._stop.set()
        self._dead.set()

    def _events(self, revision: int, events: list[ms.KeyEvent]) -> None:
        before = {ev.key: self.view.entry(ev.key) for ev in events}
        self.view.apply(revision, events)
        try:
            self.on_events(revision, events, before)
        except Exception:  # one bad fan-out must not end the watch
            log.exception("feed: cannot publish events at revision %d", revision)

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, ms.RevisionCompacted):
            self._relist = True
        log.warning("feed: watch ended: %s", exc if isinstance(exc, ms.MetaStackError) else self.store.describe(exc))
        self._dead.set()

    def _set(self, ok: bool, relisted: bool = False) -> None:
        if ok != self.ok or relisted:
            self.ok = ok
            log.info("feed: etcd %s", "reachable, watching" if ok else "lost")
            self.on_status(ok, relisted)

    def run(self) -> None:
        while not self._stop.is_set():
            relisted = False
            try:
                if self._cancel is not None:
                    self._cancel()
                    self._cancel = None
                if self._relist:
                    revision, entries = self.store.list_prefix(self.view.keys.all)
                    self.view.load(revision, entries)
                    self._relist, relisted = False, True
                self._dead.clear()
                self._cancel = self.store.watch_prefix(self.view.keys.all, self.view.revision + 1,
                                                       self._events, self._error)
            except ms.RevisionCompacted:
                self._relist = True
                continue
            except ms.StoreUnavailable as exc:
                (log.warning if self.ok else log.debug)("feed: %s", exc)
                self._set(False)
                self._stop.wait(self.retry)
                continue
            self._set(True, relisted)
            self._dead.wait()
            if not self._stop.is_set():
                self._set(False)
                self._stop.wait(self.retry)
        if self._cancel is not None:
            self._cancel()


# ---------------------------------------------------------------------------
# Catalog: API objects from the view (the shapes of metastackctl -o json)
# ---------------------------------------------------------------------------


class Catalog:
    """Builds the API's objects from the cluster view with metastackctl's
    shared row functions: VMs as ``show -o json``, hosts, flavours and
    images as their ``-o json`` listings. Pure reads of the view."""

    KINDS = ("vm", "host", "flavour", "image")

    def __init__(self, view: ms.ClusterView) -> None:
        self.view = view

    def vms(self) -> list[dict[str, Any]]:
        desired, actual, hosts = (self.view.entries_of(k) for k in ("desired", "actual", "hosts"))
        gave_up = ctl.given_up(hosts)
        snap = self.view.snapshot()  # for why a pending VM waits
        return [ctl.vm_fields(n, desired.get(n), actual.get(n), hosts, gave_up, snap)
                for n in sorted(set(desired) | set(actual))]

    def vm(self, name: str, hosts: Optional[dict[str, ms.Entry]] = None,
           gave_up: Optional[dict[str, dict[str, str]]] = None) -> Optional[dict[str, Any]]:
        keys = self.view.keys
        desired, actual = self.view.record("desired", name), self.view.claim(name)[1]
        if desired is None and actual is None:
            return None
        return ctl.vm_fields(name, desired, actual, hosts if hosts is not None else self.view.entries_of("hosts"),
                             gave_up, self.view.snapshot() if actual is None else None)  # reason of a pending VM

    def hosts(self, only: Optional[str] = None) -> list[dict[str, Any]]:
        parts = [self.view.entries_of(k) for k in ("hosts", "fences", "nodes")]
        if only is not None:
            parts = [{only: p[only]} if only in p else {} for p in parts]
        use = {name: self.view.use_of(name, entry.lease) for name, entry in parts[0].items()}  # the view's index
        return ctl.as_objects(ctl.HOST_COLUMNS, ctl.host_rows(*parts, {}, use))

    def host(self, name: str) -> Optional[dict[str, Any]]:
        rows = self.hosts(only=name)
        return rows[0] if rows else None

    def flavours(self, only: Optional[str] = None) -> list[dict[str, Any]]:
        entries = self.view.entries_of("flavours")
        if only is not None:
            entries = {only: entries[only]} if only in entries else {}
        return ctl.as_objects(ctl.FLAVOUR_COLUMNS, ctl.flavour_rows(entries))

    def images(self, only: Optional[str] = None) -> list[dict[str, Any]]:
        entries = self.view.entries_of("images")
        if only is not None:
            entries = {only: entries[only]} if only in entries else {}
        return ctl.as_objects(ctl.IMAGE_COLUMNS, ctl.image_rows(entries))

    def one(self, kind: str, name: str, hosts: Optional[dict[str, ms.Entry]] = None,
            gave_up: Optional[dict[str, dict[str, str]]] = None) -> Optional[dict[str, Any]]:
        if kind == "vm":
            return self.vm(name, hosts, gave_up)
        if kind == "host":
            return self.host(name)
        rows = self.flavours(name) if kind == "flavour" else self.images(name)
        return rows[0] if rows else None

    @staticmethod
    def _cannot(entry: Optional[ms.Entry]) -> set[tuple[str, str]]:
        if entry is None:
            return set()
        try:
            return set(ms.HostState.parse(entry.value).cannot)
        except ms.SpecError:
            return set()

    def changes(self, revision: int, events: list[ms.KeyEvent],
                before: Optional[dict[str, Optional[ms.Entry]]] = None) -> list[dict[str, Any]]:
        """The stream messages for a batch of watch events (already in the
        view; ``before``: each key's entry before them): one per VM, host,
        flavour or image it touched, with the object as the matching GET
        returns it now (op "delete" when gone); plus "console" and "history"
        messages, scoped to one VM. A host record that appears, vanishes or
        changes lease re-sends the VMs it claims (their trust changes), and
        one whose ``cannot`` changes the VMs named there (``given_up_by``);
        a claim that comes, goes or changes re-sends the hosts it names
        (their use is what their claims reserve); any change of a host,
        node or fence record, or of a host's use, re-sends the unclaimed
        VMs (why they wait depends on every node's capacity and state)."""
        keys = self.view.keys
        before = before or {}
        touched: dict[tuple[str, str], None] = {}
        scoped: list[dict[str, Any]] = []
        history = keys.dir("events")
        lease_changed: set[str] = set()
        for ev in events:
            split = keys.split(ev.key)
            if split is None:
                if ev.key.startswith(history) and ev.value is not None:
                    vm, _, key = ev.key[len(history):].partition("/")
                    item = history_item(key, ev.value)
                    if item is not None and "/" not in key:
                        scoped.append({"kind": "history", "name": vm, "op": "put", "object": item,
                                       "revision": revision})
                continue
            kind, name = split
            if kind in ("desired", "actual"):
                touched[("vm", name)] = None
                if kind == "actual":  # a host's use is what its claims reserve: re-send the holders
                    for entry in (before.get(ev.key), self.view.entry(ev.key)):
                        holder = ms.ActualVM.parse(entry.value).host if entry is not None else ""
                        if holder and self.view.entry(keys.host(holder)) is not None:
                            touched[("host", holder)] = None
            elif kind in ("hosts", "nodes", "fences"):
                touched[("host", name)] = None
                if kind == "hosts":
                    old, new = before.get(ev.key), self.view.entry(ev.key)
                    if old is None or new is None or old.lease != new.lease:
                        lease_changed.add(name)
                    for vm, _ in self._cannot(old) ^ self._cannot(new):
                        touched[("vm", vm)] = None
            elif kind in ("flavours", "images"):
                touched[(kind[:-1], name)] = None
            elif kind == "console":
                text = "" if ev.value is None else ev.value.decode("utf-8", errors="replace")
                scoped.append({"kind": "console", "name": name, "op": "delete" if ev.value is None else "put",
                               "object": {"name": name, "text": text}, "revision": revision})
        if any(kind == "host" for kind, _ in touched):  # capacity, cordon, state: why a VM waits may change
            for vm in sorted(self.view.unclaimed()):
                touched[("vm", vm)] = None
        if lease_changed:  # a host's lease decides whether its claims are trusted
            for vm, entry in self.view.entries_of("actual").items():
                if ms.ActualVM.parse(entry.value).host in lease_changed:
                    touched[("vm", vm)] = None
        hosts: dict[str, ms.Entry] = {}
        gave_up: dict[str, dict[str, str]] = {}
        if any(k == "vm" for k, _ in touched):
            hosts = self.view.entries_of("hosts")
            gave_up = ctl.given_up(hosts)
        out = []
        for kind, name in touched:
            obj = self.one(kind, name, hosts, gave_up)
            out.append({"kind": kind, "name": name, "op": "delete" if obj is None else "put",
                        "object": obj if obj is not None else {"name" if kind != "host" else "node": name},
                        "revision": revision})
        return out + scoped


HISTORY_FIELDS = ("at", "node", "vm", "event", "detail")


def history_item(key: str, raw: bytes) -> Optional[dict[str, Any]]:
    """One VM life event (``<prefix>/events/<vm>/<key>``, written by the
    agent that acted) as the API returns it: its fields as strings, plus
    ``key``; None for a value that is not a JSON object."""
    if len(raw) > 16 * 1024:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    item: dict[str, Any] = {k: str(obj.get(k, "")) for k in HISTORY_FIELDS}
    item["key"] = key
    return item


# ---------------------------------------------------------------------------
# Event hub: fan-out to the browsers' event streams
# ---------------------------------------------------------------------------


class Subscriber:
    """One event-stream client: a bounded queue of encoded SSE frames, and
    the VM whose console and history it also wants (or None)."""

    def __init__(self, vm: Optional[str], size: int) -> None:
        self.vm = vm
        self.queue: asyncio.Queue[Optional[bytes]] = asyncio.Queue(size)


class Hub:
    """Fans messages out to every subscriber (event-loop thread only).

    Contract: each message is encoded once; "console" and "history"
    messages go only to subscribers of that VM. A subscriber whose queue is
    full is dropped (its stream ends; the browser reconnects and re-reads),
    so a slow client never holds up the others or grows memory."""

    def __init__(self, queue_size: int = 2000) -> None:
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self.etcd_ok = False

    def subscribe(self, vm: Optional[str]) -> Subscriber:
        sub = Subscriber(vm, self.queue_size)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    @staticmethod
    def frame(event: str, data: Any) -> bytes:
        return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def _send(self, sub: Subscriber, frame: Optional[bytes]) -> None:
        try:
            sub.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.subscribers.discard(sub)
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)

    def publish(self, messages: list[dict[str, Any]]) -> None:
        for msg in messages:
            scoped = msg["kind"] in ("console", "history")
            frame = self.frame("change", msg)
            for sub in list(self.subscribers):
                if not scoped or sub.vm == msg["name"]:
                    self._send(sub, frame)

    def status(self, ok: bool, relisted: bool) -> None:
        self.etcd_ok = ok
        frame = self.frame("status", {"etcd": "ok" if ok else "lost", "resync": relisted})
        for sub in list(self.subscribers):
            self._send(sub, frame)

    def close(self) -> None:
        for sub in list(self.subscribers):
            self._send(sub, None)
        self.subscribers.clear()


# ---------------------------------------------------------------------------
# HTTP app
# ---------------------------------------------------------------------------

COOKIE = "metastack_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STATUS_OF = {"invalid": 400, "missing": 404, "conflict": 409}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class Server:
    """The web server's state and handlers: config, store, view, feed,
    sessions, hub. ``app()`` builds the aiohttp application; ``start()`` /
    ``stop()`` run the feed around it."""

    def __init__(self, cfg: WebConfig, etcd: ms.EtcdConfig, ceph: Optional[ms.CephConfig] = None) -> None:
        self.cfg = cfg
        self.store = ms.Store(etcd)
        self.keys = self.store.keys
        self.view = ms.ClusterView(self.keys)
        self.catalog = Catalog(self.view)
        self.sessions = Sessions(self.store, ctl.AuthKeys(etcd.prefix), cfg.session_ttl)
        self.limiter = LoginLimiter(cfg.login_failures, cfg.login_window)
        self.hub = Hub()
        self.ceph = ceph
        self._storage: Optional[ms.Storage] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.feed: Optional[Feed] = None

    # -- life cycle ----------------------------------------------------------
    async def _on_startup(self, _app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.feed = Feed(self.store, self.view, self._feed_events, self._feed_status)
        self.feed.start()

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.hub.close()
        if self.feed is not None:
            self.feed.stop()

    async def _on_cleanup(self, _app: web.Application) -> None:
        self.store.close()

    def _feed_events(self, revision: int, events: list[ms.KeyEvent],
                     before: dict[str, Optional[ms.Entry]]) -> None:
        messages = self.catalog.changes(revision, events, before)
        if messages and self.loop is not None:
            self.loop.call_soon_threadsafe(self.hub.publish, messages)

    def _feed_status(self, ok: bool, relisted: bool) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.hub.status, ok, relisted)

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call (etcd, scrypt, Ceph) on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @property
    def storage(self) -> Optional[ms.Storage]:
        if self._storage is None and self.ceph is not None:
            self._storage = ms.Storage(self.ceph)
        return self._storage

    # -- middlewares ---------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Errors as JSON: refusals by kind, etcd down as 503."""
        try:
            return await handler(request)
        except ctl.AdminError as exc:
            return json_error(STATUS_OF.get(exc.kind, 400), str(exc))
        except ms.StoreUnavailable as exc:
            return json_error(503, f"etcd is unreachable: {exc}")
        except ms.StorageError as exc:
            return json_error(502, f"Ceph: {exc}")
        except web.HTTPException as exc:
            if not request.path.startswith("/api/") or exc.status < 400:
                raise
            return json_error(exc.status, exc.reason)

    @web.middleware
    async def auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        """Every API request needs a session (but logging in); every change
        the session's CSRF token in ``X-CSRF-Token``; a viewer changes nothing."""
        if not request.path.startswith("/api/") or (request.path == "/api/v1/session" and request.method == "POST"):
            return await handler(request)
        session = await self.blocking(self.sessions.check, request.cookies.get(COOKIE))
        if session is None:
            return json_error(401, "not logged in")
        if request.method not in SAFE_METHODS:
            sent = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                return json_error(403, "missing or wrong X-CSRF-Token header")
            if not session.admin and not (request.path == "/api/v1/session" and request.method == "DELETE"):
                return json_error(403, f"user {session.user!r} is a viewer: read only")
        request["session"] = session
        return await handler(request)

    async def _headers(self, _request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        h.setdefault("Cache-Control", "no-store")
        if self.cfg.tls:
            h.setdefault("Strict-Transport-Security", "max-age=31536000")

    # -- helpers -------------------------------------------------------------
    @staticmethod
    async def body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The request's JSON object; bad JSON, another type or an unknown
        field is a 400 (nothing written)."""
        if request.content_type != "application/json":
            raise ctl.AdminError("invalid", "send JSON (Content-Type: application/json)")
        try:
            obj = await request.json()
        except ValueError:
            raise ctl.AdminError("invalid", "the body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ctl.AdminError("invalid", "the body must be a JSON object")
        unknown = sorted(set(obj) - set(allowed))
        if unknown:
            raise ctl.AdminError("invalid", f"unknown field(s): {', '.join(map(str, unknown))[:200]}; "
                                            f"allowed: {', '.join(allowed)}")
        return obj

    def synced(self) -> None:
        if not self.view.synced:
            raise ms.StoreUnavailable("the server has not read the cluster state yet")

    def revision_json(self, data: Any, status: int = 200) -> web.Response:
        return web.json_response(data, status=status, headers={"X-MetaStack-Revision": str(self.view.revision)})

    # -- session -------------------------------------------------------------
    async def login(self, request: web.Request) -> web.Response:
        client = request.remote or "?"
        wait = self.limiter.retry_after(client)
        if wait:
            return json_error(429, "too many failed logins; try again later", **{"Retry-After": str(int(wait) + 1)})
        obj = await self.body(request, ("user", "password"))
        result = await self.blocking(self.sessions.login, obj.get("user"), obj.get("password"))
        if result is None:
            self.limiter.failed(client)
            log.info("login failed for %r from %s", str(obj.get("user"))[:64], client)
            return json_error(401, "wrong user or password")
        self.limiter.succeeded(client)
        token, session = result
        log.info("login: %s (%s) from %s", session.user, session.role, client)
        resp = web.json_response({"user": session.user, "role": session.role, "csrf": session.csrf})
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=self.cfg.tls, path="/",
                        max_age=self.cfg.session_ttl)
        return resp

    async def whoami(self, request: web.Request) -> web.Response:
        s: Session = request["session"]
        return web.json_response({"user": s.user, "role": s.role, "csrf": s.csrf})

    async def logout(self, request: web.Request) -> web.Response:
        await self.blocking(self.sessions.logout, request.cookies.get(COOKIE, ""))
        resp = web.json_response({"user": request["session"].user, "logged_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    # -- reads ---------------------------------------------------------------
    async def list_vms(self, _request: web.Request) -> web.Response:
        self.synced()
        return self.revision_json(self.catalog.vms())

    async def get_vm(self, request: web.Request) -> web.Response:
        self.synced()
        name = ctl.check_name(request.match_info["name"], "VM")
        obj = self.catalog.vm(name)
        if obj is None:
            return json_error(404, f"no VM named {name!r}")
        return self.revision_json(obj)

    async def list_hosts(self, _request: web.Request) -> web.Response:
        self.synced()
        return self.revision_json(self.catalog.hosts())

    async def list_flavours(self, _request: web.Request) -> web.Response:
        self.synced()
        return self.revision_json(self.catalog.flavours())

    async def list_images(self, _request: web.Request) -> web.Response:
        self.synced()
        return self.revision_json(self.catalog.images())

    async def console(self, request: web.Request) -> web.Response:
        name = ctl.check_name(request.match_info["name"], "VM")
        entry = await self.blocking(self.store.get, self.keys.console(name))
        if entry is None and self.catalog.vm(name) is None:
            return json_error(404, f"no VM named {name!r}")
        text = entry.value.decode("utf-8", errors="replace") if entry else ""
        return web.json_response({"name": name, "text": text, "published": entry is not None})

    async def history(self, request: web.Request) -> web.Response:
        name = ctl.check_name(request.match_info["name"], "VM")
        prefix = f"{self.keys.dir('events')}{name}/"
        _, entries = await self.blocking(self.store.list_prefix, prefix)
        items = [history_item(k[len(prefix):], e.value) for k, e in sorted(entries.items())]
        if not entries and self.catalog.vm(name) is None:
            return json_error(404, f"no VM named {name!r}")
        return web.json_response([i for i in items if i is not None])

    async def status(self, _request: web.Request) -> web.Response:
        return web.json_response({"etcd": "ok" if self.hub.etcd_ok else "lost", "revision": self.view.revision,
                                  "synced": self.view.synced})

    # -- changes -------------------------------------------------------------
    async def create_vm(self, request: web.Request) -> web.Response:
        obj = await self.body(request, ("name", "flavour", "image", "host", "state"))
        spec = await self.blocking(ctl.create_vm, self.store, obj.get("name"), obj.get("flavour"),
                                   obj.get("host"), obj.get("image"), obj.get("state", "running"))
        entry = ms.Entry(json.dumps(spec.to_json()).encode(), 0)
        log.info("%s created VM %s", request["session"].user, spec.name)
        return web.json_response(ctl.vm_fields(spec.name, entry, None, {}), status=201)

    async def vm_action(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ("start", "stop"):
            return json_error(404, f"no action {action!r}: start or stop")
        changed = await self.blocking(ctl.set_vm_state, self.store, name, "running" if action == "start" else "stopped")
        log.info("%s: %s VM %s", request["session"].user, action, name)
        return web.json_response({"name": name, "desired": "running" if action == "start" else "stopped",
                                  "changed": changed})

    async def destroy_vm(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.blocking(ctl.destroy_vm, self.store, name)
        log.info("%s destroyed VM %s", request["session"].user, name)
        return web.json_response({"name": name, "destroyed": True})

    async def create_flavour(self, request: web.Request) -> web.Response:
        obj = await self.body(request, ("name", "vcpus", "ram_mb"))
        flavour = await self.blocking(ctl.create_flavour, self.store, obj.get("name"), obj.get("vcpus"),
                                      obj.get("ram_mb"))
        return web.json_response({"name": obj["name"], **flavour.to_json()}, status=201)

    async def delete_flavour(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.blocking(ctl.delete_flavour, self.store, name)
        return web.json_response({"name": name, "deleted": True})

    async def delete_image(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def run() -> None:
            storage = self.storage
            children = None if storage is None else (
                lambda r: storage.base_children(r.pool, r.image, r.snapshot))
            entry, rec = ctl.check_image_delete(self.store, name, children)
            if rec is not None and storage is None:
                raise ctl.AdminError("conflict", "this server has no [ceph] section: it cannot remove the "
                                                 "image's data (use metastackctl image delete)")
            ctl.delete_image(self.store, name, entry, rec, storage)
        await self.blocking(run)
        return web.json_response({"name": name, "deleted": True})

    # -- the event stream ----------------------------------------------------
    async def events(self, request: web.Request) -> web.StreamResponse:
        vm = request.query.get("vm")
        if vm is not None:
            ctl.check_name(vm, "VM")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        sub = self.hub.subscribe(vm)
        token = request.cookies.get(COOKIE)
        try:
            await resp.write(b"retry: 1000\n\n" + self.hub.frame(
                "status", {"etcd": "ok" if self.hub.etcd_ok else "lost", "resync": True}))
            while True:
                try:
                    frame = await asyncio.wait_for(sub.queue.get(), 15)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ms.StoreUnavailable):  # etcd down: the stream goes on
                        if await self.blocking(self.sessions.check, token) is None:
                            break  # logged out or expired: the stream ends
                    await resp.write(b": keep-alive\n\n")
                    continue
                if frame is None:
                    break
                await resp.write(frame)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.unsubscribe(sub)
        return resp

    # -- the page --------------------------------------------------------------
    async def index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(self.cfg.static_dir, "index.html"))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors, self.auth], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.index)
        r.add_static("/static/", self.cfg.static_dir)
        r.add_post("/api/v1/session", self.login)
        r.add_get("/api/v1/session", self.whoami)
        r.add_delete("/api/v1/session", self.logout)
        r.add_get("/api/v1/status", self.status)
        r.add_get("/api/v1/vms", self.list_vms)
        r.add_post("/api/v1/vms", self.create_vm)
        r.add_get("/api/v1/vms/{name}", self.get_vm)
        r.add_delete("/api/v1/vms/{name}", self.destroy_vm)
        r.add_post("/api/v1/vms/{name}/{action}", self.vm_action)
        r.add_get("/api/v1/vms/{name}/console", self.console)
        r.add_get("/api/v1/vms/{name}/events", self.history)
        r.add_get("/api/v1/hosts", self.list_hosts)
        r.add_get("/api/v1/flavours", self.list_flavours)
        r.add_post("/api/v1/flavours", self.create_flavour)
        r.add_delete("/api/v1/flavours/{name}", self.delete_flavour)
        r.add_get("/api/v1/images", self.list_images)
        r.add_delete("/api/v1/images/{name}", self.delete_image)
        r.add_get("/api/v1/events", self.events)
        app.on_response_prepare.append(self._headers)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``metastack-web``. Exit codes: 0 clean stop, 2 bad
    configuration, 4 etcd refused the server's credentials or permissions."""
    ap = argparse.ArgumentParser(prog="metastack-web", description="MetaStack web console and JSON API.")
    ap.add_argument("-c", "--config", metavar="FILE",
                    help="ini file with [etcd] and [web] (and optionally [ceph]) sections; every key: "
                         "config.example.ini (installed under share/metastack/)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {ms.version()}")
    ap.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = ap.parse_args(argv)
    try:
        cp = ms.read_ini(args.config)
        etcd, cfg = ms.etcd_config_from(cp), web_config_from(cp)
        ceph = ms.ceph_config_from(cp)
    except ms.ConfigError as exc:
        print(f"metastack-web: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"metastack-web: configuration ok ({cfg.url})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s metastack-web %(levelname)s %(message)s")
    ssl_ctx = None
    if cfg.tls:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    try:
        server = Server(cfg, etcd, ceph)
        # Fail fast on credentials etcd refuses (both key ranges the server uses);
        # an unreachable etcd is waited out by the feed.
        for key in (server.keys.all, ctl.AuthKeys(etcd.prefix).users):
            server.store.get(key)
    except ms.ConfigError as exc:
        print(f"metastack-web: {exc}", file=sys.stderr)
        return 2
    except ms.StoreDenied as exc:
        print(f"metastack-web: cannot start: {exc}", file=sys.stderr)
        return 4
    except ms.StoreUnavailable as exc:
        log.warning("etcd not reachable yet (%s); serving from the view once it is", exc)
    log.info("serving %s (etcd %s, prefix %s)", cfg.url, etcd.endpoint_text, etcd.prefix)
    web.run_app(server.app(), host=cfg.host, port=cfg.port, ssl_context=ssl_ctx, print=None,
                access_log=None, shutdown_timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
