#!/usr/bin/env python3
"""MetaStack agent: one per compute node, no central scheduler.

Usage:  python metastack.py -c /etc/metastack/metastack.ini [--check-config]

The agent watches etcd's desired-VM prefix and, on its own, claims the VMs
it is able to run (free vcpus and RAM, matching host pin). Every agent
computes the same placement of the unclaimed VMs from what it reads
(Placement): the node chosen for a VM claims it at once, the others step
in one after another only if it stays unclaimed (ClaimTurns). A claim is
one etcd transaction that creates ``<prefix>/actual/<vm>`` only if it does
not exist, attached to this agent's lease, so exactly one node wins. The
winner defines and starts the libvirt domain and publishes the VM's actual
state and its own host state under that single lease. Deleting the desired
entry makes the owner destroy the VM. When an agent dies its lease expires,
its claims vanish, and the surviving agents fence it and claim and start
its VMs from the same disk.

Safety rules the code keeps:
  * a VM another node ran is started only after its former writers are
    fenced at the storage layer (node record, Ceph blocklist, lock break);
  * an agent whose lease is in doubt (etcd unreachable) keeps its VMs
    running and claims and starts nothing; one whose main loop stalls
    stops renewing its lease, and its watchdog process powers its guests
    off before the lease can lapse;
  * on SIGTERM the agent keeps its guests for the next agent to adopt
    (``on_stop = keep``) or drains them (``on_stop = drain``);
  * it only ever touches libvirt domains tagged with the MetaStack metadata
    namespace and its own node name.

Sections, in dependency order: errors, config, logging, data model and key
schema, store (every etcd call), cluster view (watch-fed cache), hypervisor
(every libvirt call), planner (pure), agent (executor and main loop), main.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import concurrent.futures
import configparser
import contextlib
import dataclasses
import datetime as _dt
import faulthandler
import functools
import hashlib
import heapq
import json
import logging
import logging.handlers
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping, Optional, Sequence, Union

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class MetaStackError(Exception):
    """Base of every error MetaStack raises on purpose."""


class ConfigError(MetaStackError):
    """The configuration file is missing, unreadable or holds a bad value."""


class SpecError(MetaStackError):
    """A desired-VM or flavour entry in etcd is malformed."""


class StoreUnavailable(MetaStackError):
    """etcd could not be reached or did not answer in time."""


class StoreDenied(StoreUnavailable):
    """etcd refused this client: a wrong user or password, a certificate
    it does not accept, or a key outside what the client's role may touch.
    A subclass of StoreUnavailable, so a running agent treats it like an
    outage (keeps its guests, claims nothing); at start-up it is fatal."""


class LeaseNotFound(MetaStackError):
    """etcd answered that the lease a write or keep-alive named is gone
    (expired or revoked): the node's claims have vanished with it."""


class RevisionCompacted(MetaStackError):
    """A watch asked for history etcd has already compacted away."""


class HypervisorError(MetaStackError):
    """libvirt refused or failed an operation."""


class StorageError(MetaStackError):
    """Ceph (rados/rbd) refused or failed an operation."""


class StorageBusy(StorageError):
    """An RBD image is still open by some client; retry later."""


class StorageFenced(StorageError):
    """Ceph refused this node's own client: it is blocklisted (fenced)."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DOMAIN_TYPES = ("kvm", "qemu", "test", "auto")
ETCD_MIN_TTL = 2  # etcd silently raises smaller lease TTLs to about this
RETRY_PAUSE = 0.2  # seconds between a failed lease keep-alive and the next attempt
WATCHDOG_ALLOWANCE = 0.6  # the watchdog's poll (0.1 s) and its power-off (about 0.25 s), with room


def valid_name(name: str) -> bool:
    """True when ``name`` is a valid VM, node, flavour or image name."""
    return isinstance(name, str) and bool(NAME_RE.match(name))


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``"http://h1:2379, h2:2379"`` into ((host, port), ...).

    Raises ConfigError on an empty list or a malformed entry.
    """
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        hostport = re.sub(r"^https?://", "", item).rstrip("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"[etcd] endpoints: {item!r} is not host:port")
        out.append((host, int(port)))
    if not out:
        raise ConfigError("[etcd] endpoints: at least one endpoint is required")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is, how long one request may take, and how this client
    proves who it is: TLS (``tls``; ``ca_cert`` to verify the servers,
    default the system's roots; ``cert``/``key``, a client certificate whose
    common name etcd takes as the user name) and/or etcd's own ``user`` and
    ``password``. Paths are checked to exist by ``etcd_config_from``."""

    endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 2379),)
    prefix: str = "/metastack"
    timeout: float = 1.0
    tls: bool = False
    ca_cert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    watch: str = "auto"  # auto | json | grpc: how watches travel (Store.watch_transport)

    @property
    def watch_transport(self) -> str:
        """"json" (etcd's JSON gateway, JsonWatch: the cheaper one) or
        "grpc": ``watch``, where auto means json unless a client
        certificate is set: etcd's gateway refuses a client that shows one
        (it would not see its common name; it authenticates by token only)."""
        if self.watch != "auto":
            return self.watch
        return "grpc" if self.cert is not None else "json"

    @property
    def endpoint_text(self) -> str:
        """The endpoints as one line, with the scheme (for messages)."""
        scheme = "https" if self.tls else "http"
        return ",".join(f"{scheme}://{h}:{p}" for h, p in self.endpoints)


@dataclasses.dataclass(frozen=True)
class CephConfig:
    """How to reach the Ceph cluster that holds images and VM disks."""

    conf: str
    client: str = "admin"
    keyring: Optional[str] = None
    pool: str = "metastack"


def ceph_config_from(cp: configparser.ConfigParser) -> Optional[CephConfig]:
    """Read the [ceph] section; None when it is absent or has no conf."""
    conf = cp.get("ceph", "conf", fallback="").strip()
    if not conf:
        return None
    client = cp.get("ceph", "client", fallback="admin").strip() or "admin"
    client = client[len("client."):] if client.startswith("client.") else client
    pool = cp.get("ceph", "pool", fallback="metastack").strip() or "metastack"
    if not re.match(r"^[A-Za-z0-9_.-]+$", pool):
        raise ConfigError(f"[ceph] pool: {pool!r} is not a valid pool name")
    if not re.match(r"^[A-Za-z0-9_.-]+$", client):
        raise ConfigError(f"[ceph] client: {client!r} is not a valid cephx name")
    keyring = cp.get("ceph", "keyring", fallback="").strip() or None
    for key, path in (("conf", conf), ("keyring", keyring)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"[ceph] {key}: {path} does not exist")
    return CephConfig(conf=conf, client=client, keyring=keyring, pool=pool)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Everything the agent reads from its ini file, validated."""

    etcd: EtcdConfig
    node_name: str
    vcpus: Optional[int]
    ram_mb: Optional[int]
    libvirt_uri: str
    domain_type: str
    shutdown_timeout: float
    lease_ttl: int
    resync_interval: float
    claim_step: float
    syslog: str
    log_level: str
    ceph: Optional[CephConfig] = None
    state_dir: str = "/var/lib/metastack"
    address: str = ""  # IP of this node's Ceph clients (agent and QEMUs): node-level fencing
    on_stop: str = "keep"  # SIGTERM: keep guests running for the next agent, or drain them
    failover_grace: float = 0.0  # seconds owners get to re-claim after a correlated loss (0: 2 x TTL)
    config_path: str = ""  # the ini this came from (the watchdog process reads it too)
    cpu_allocation_ratio: Optional[float] = None  # [node] override of /metastack/config's
    ram_allocation_ratio: Optional[float] = None
    cell: Optional[int] = None  # [node] cell: this node's cell when the cluster has cells (None: by hash)

    @property
    def renew_interval(self) -> float:
        """Lease keep-alive period: a third of the TTL (kubelet, Patroni)."""
        return self.lease_ttl / 3.0

    @property
    def stall_limit(self) -> float:
        """The lease is renewed only while the main loop proved progress
        this recently; the loop beats at least twice as often."""
        return self.lease_ttl / 3.0

    @property
    def watchdog_delay(self) -> float:
        """Seconds after the main loop's last beat at which the watchdog
        stops this node's domains, at the latest: at least ``stall_limit``
        plus half a second, so that the keeper has stopped renewing by then
        and the lease is bound to lapse. While the keeper's renewals succeed
        the agent feeds an earlier deadline when the lease's own end asks
        for it (``Agent.watchdog_deadline``): the last renewal may come up
        to a renew interval *before* the last beat (a SIGSTOP stops the
        keeper too), so the beat alone does not bound the lease's end."""
        return max(self.stall_limit + 0.5, self.lease_ttl - self.fence_margin - 0.5)

    @property
    def grace(self) -> float:
        """How long other nodes leave VMs alone after a correlated loss of
        leases (an etcd outage), so their owners can re-claim them."""
        return self.failover_grace or 2.0 * self.lease_ttl

    @property
    def fence_margin(self) -> float:
        """How long before the lease's worst-case expiry the agent fences."""
        return self.etcd.timeout


def _get_float(cp: configparser.ConfigParser, sec: str, key: str, default: float,
               minimum: float) -> float:
    raw = cp.get(sec, key, fallback=None)
    if raw is None or raw.strip() == "":
        return default
    try:
        val = float(raw)
    except ValueError:
        raise ConfigError(f"[{sec}] {key}: {raw!r} is not a number") from None
    if val < minimum:
        raise ConfigError(f"[{sec}] {key}: {val} is below the minimum {minimum}")
    return val


def _get_opt_int(cp: configparser.ConfigParser, sec: str, key: str) -> Optional[int]:
    raw = cp.get(sec, key, fallback="").strip()
    if raw in ("", "auto"):
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(f"[{sec}] {key}: {raw!r} must be a positive integer or auto")
    return int(raw)


def _get_cell(cp: configparser.ConfigParser) -> Optional[int]:
    raw = cp.get("node", "cell", fallback="").strip()
    if raw == "":
        return None
    if not raw.isdigit():
        raise ConfigError(f"[node] cell: {raw!r} must be a whole number from 0, or empty")
    return int(raw)


def _get_opt_ratio(cp: configparser.ConfigParser, sec: str, key: str) -> Optional[float]:
    """An allocation ratio (0 < r <= 100), or None when not set."""
    raw = cp.get(sec, key, fallback="").strip()
    if not raw:
        return None
    try:
        val = float(raw)
    except ValueError:
        raise ConfigError(f"[{sec}] {key}: {raw!r} is not a number") from None
    if not 0 < val <= 100:
        raise ConfigError(f"[{sec}] {key}: {val} must be above 0 and at most 100")
    return val


def etcd_config_from(cp: configparser.ConfigParser) -> EtcdConfig:
    """Read and validate the [etcd] section (shared by agent, CLI and web).

    TLS is on when the endpoints say ``https://`` or ``ca_cert`` is set;
    mixing http:// and https:// endpoints, a client certificate without
    TLS, ``cert`` without ``key`` (or the reverse), ``user`` without
    ``password`` (or the reverse) and files that do not exist are refused.
    """
    prefix = cp.get("etcd", "prefix", fallback="/metastack").strip() or "/metastack"
    if not prefix.startswith("/") or prefix.rstrip("/") == "" or " " in prefix:
        raise ConfigError(f"[etcd] prefix: {prefix!r} must be an absolute key path like /metastack")
    raw = cp.get("etcd", "endpoints", fallback="127.0.0.1:2379")
    schemes = {m.lower() for m in re.findall(r"(?:^|,)\s*(https?)://", raw, flags=re.IGNORECASE)}
    if len(schemes) > 1:
        raise ConfigError("[etcd] endpoints: mixes http:// and https://; use one scheme for every endpoint")
    opt = {k: (cp.get("etcd", k, fallback="").strip() or None) for k in ("ca_cert", "cert", "key", "user")}
    password = cp.get("etcd", "password", fallback="") or None  # taken as written (spaces included)
    tls = schemes == {"https"} or opt["ca_cert"] is not None
    if schemes == {"http"} and tls:
        raise ConfigError("[etcd] ca_cert: set, but the endpoints say http://; use https:// endpoints")
    if (opt["cert"] is None) != (opt["key"] is None):
        raise ConfigError("[etcd] cert and key: give both (a client certificate and its private key) or neither")
    if opt["cert"] is not None and not tls:
        raise ConfigError("[etcd] cert: a client certificate needs TLS (https:// endpoints or ca_cert)")
    if (opt["user"] is None) != (password is None):
        raise ConfigError("[etcd] user and password: give both or neither")
    for k in ("ca_cert", "cert", "key"):
        if opt[k] is not None and not os.path.isfile(opt[k]):
            raise ConfigError(f"[etcd] {k}: {opt[k]} does not exist")
    watch = cp.get("etcd", "watch", fallback="auto").strip().lower() or "auto"
    if watch not in ("auto", "json", "grpc"):
        raise ConfigError(f"[etcd] watch: {watch!r} is not one of auto, json, grpc")
    if watch == "json" and opt["cert"] is not None:
        raise ConfigError("[etcd] watch = json: etcd's JSON gateway refuses clients that show a certificate "
                          "(it would not see its common name); use watch = grpc or auto")
    return EtcdConfig(
        endpoints=parse_endpoints(raw),
        prefix=prefix.rstrip("/"),
        timeout=_get_float(cp, "etcd", "timeout", 1.0, 0.1),
        tls=tls, ca_cert=opt["ca_cert"], cert=opt["cert"], key=opt["key"], user=opt["user"], password=password,
        watch=watch,
    )


def read_ini(path: Optional[str]) -> configparser.ConfigParser:
    """Read an ini file; a missing or unreadable file is a ConfigError."""
    cp = configparser.ConfigParser()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                cp.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except configparser.Error as exc:
            raise ConfigError(f"config file {path} is not valid ini: {exc}") from None
    return cp


def load_config(path: Optional[str]) -> AgentConfig:
    """Load and validate the agent's configuration.

    Every key and its default is documented in config.example.ini. Raises
    ConfigError with a message naming the section and key at fault.
    """
    cp = read_ini(path)
    etcd = etcd_config_from(cp)
    node = cp.get("node", "name", fallback="").strip() or socket.gethostname().split(".")[0].lower()
    if not valid_name(node):
        raise ConfigError(f"[node] name: {node!r} must match {NAME_RE.pattern}")
    domain_type = cp.get("libvirt", "domain_type", fallback="kvm").strip()
    if domain_type not in DOMAIN_TYPES:
        raise ConfigError(f"[libvirt] domain_type: {domain_type!r} is not one of {', '.join(DOMAIN_TYPES)}")
    state_dir = cp.get("node", "state_dir", fallback="/var/lib/metastack").strip() or "/var/lib/metastack"
    if not state_dir.startswith("/"):
        raise ConfigError(f"[node] state_dir: {state_dir!r} must be an absolute path")
    ttl_raw = cp.get("agent", "lease_ttl", fallback="5").strip()
    if not ttl_raw.isdigit():
        raise ConfigError(f"[agent] lease_ttl: {ttl_raw!r} must be a whole number of seconds")
    address = cp.get("node", "address", fallback="").strip()
    if address:
        import ipaddress
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"[node] address: {address!r} is not an IP address") from None
    on_stop = cp.get("agent", "on_stop", fallback="keep").strip() or "keep"
    if on_stop not in ("keep", "drain"):
        raise ConfigError(f"[agent] on_stop: {on_stop!r} is not keep or drain")
    level = cp.get("logging", "level", fallback="INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"[logging] level: {level!r} is not DEBUG, INFO, WARNING or ERROR")
    cfg = AgentConfig(
        etcd=etcd,
        node_name=node,
        vcpus=_get_opt_int(cp, "node", "vcpus"),
        ram_mb=_get_opt_int(cp, "node", "ram_mb"),
        libvirt_uri=cp.get("libvirt", "uri", fallback="qemu:///system").strip(),
        domain_type=domain_type,
        shutdown_timeout=_get_float(cp, "libvirt", "shutdown_timeout", 10.0, 0.0),
        lease_ttl=int(ttl_raw),
        resync_interval=_get_float(cp, "agent", "resync_interval", 30.0, 1.0),
        claim_step=_get_float(cp, "agent", "claim_step", 2.0, 0.0),
        syslog=cp.get("logging", "syslog", fallback="auto").strip(),
        log_level=level,
        ceph=ceph_config_from(cp),
        state_dir=state_dir,
        address=address,
        on_stop=on_stop,
        failover_grace=_get_float(cp, "agent", "failover_grace", 0.0, 0.0),
        config_path=os.path.abspath(path) if path else "",
        cpu_allocation_ratio=_get_opt_ratio(cp, "node", "cpu_allocation_ratio"),
        ram_allocation_ratio=_get_opt_ratio(cp, "node", "ram_allocation_ratio"),
        cell=_get_cell(cp),
    )
    check_timings(cfg)
    return cfg


def check_timings(cfg: AgentConfig) -> None:
    """Refuse lease timings that cannot keep the lease safely alive.

    The keeper renews every TTL/3 and the agent fences (stops its VMs) one
    etcd timeout before the lease could expire; a renewal must therefore get
    at least two attempts, each bounded by the etcd timeout and separated by
    the retry pause, before the fence deadline:
    ``ttl/3 + 2*timeout + RETRY_PAUSE <= ttl - timeout``.
    """
    ttl, timeout = cfg.lease_ttl, cfg.etcd.timeout
    if ttl < ETCD_MIN_TTL:
        raise ConfigError(f"[agent] lease_ttl: {ttl}s is below etcd's minimum lease TTL ({ETCD_MIN_TTL}s)")
    if cfg.renew_interval + 2 * timeout + RETRY_PAUSE > ttl - cfg.fence_margin:
        raise ConfigError(
            f"[agent] lease_ttl = {ttl}s is too short for [etcd] timeout = {timeout}s: "
            f"renewing every {cfg.renew_interval:.2f}s with two attempts of {timeout}s must finish "
            f"{cfg.fence_margin}s before expiry (need lease_ttl >= {1.5 * (3 * timeout + RETRY_PAUSE):.1f}s "
            f"or a smaller timeout)")


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def syslog_handler(spec: str) -> Optional[logging.Handler]:
    """Build the syslog handler named by ``[logging] syslog``.

    ``auto``: /dev/log when present; ``none``: no syslog; an absolute path:
    that unix socket; ``udp://host:port`` or ``tcp://host:port``: a remote
    (central) syslog receiver. Raises ConfigError on a malformed value.
    """
    if spec in ("", "none"):
        return None
    if spec == "auto":
        spec = "/dev/log" if os.path.exists("/dev/log") else "none"
        if spec == "none":
            return None
    m = re.match(r"^(udp|tcp)://([^:/]+):(\d+)$", spec)
    if m:
        socktype = socket.SOCK_DGRAM if m.group(1) == "udp" else socket.SOCK_STREAM
        address: Union[str, tuple[str, int]] = (m.group(2), int(m.group(3)))
    elif spec.startswith("/"):
        socktype, address = socket.SOCK_DGRAM, spec
    else:
        raise ConfigError(f"[logging] syslog: {spec!r} is not auto, none, a socket path or udp://host:port")
    try:
        handler = logging.handlers.SysLogHandler(address=address, socktype=socktype)
    except OSError as exc:
        raise ConfigError(f"[logging] syslog: cannot open {spec}: {exc.strerror}") from None
    return handler


def setup_logging(node: str, level: str, syslog: str) -> None:
    """Log to stderr and, when configured, to syslog (one line per event)."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"%(asctime)s {node} %(levelname)s %(message)s"))
    root.addHandler(console)
    handler = syslog_handler(syslog)
    if handler is not None:
        handler.setFormatter(logging.Formatter(f"metastack[{os.getpid()}]: node={node} %(levelname)s %(message)s"))
        root.addHandler(handler)


__version__ = "0.1.0"  # keep equal to setup.py's version

log = logging.getLogger("metastack")

# ---------------------------------------------------------------------------
# Data model and key schema (public: operators use it with plain etcdctl)
# ---------------------------------------------------------------------------

VM_STATES = ("running", "stopped")
LAYOUT = 2  # the key layout: 2 = desired entries and claims in shards (host records say which their agent reads)


class Keys:
    """The key layout under one prefix. See README "The contract in etcd".

    What agents write and never read, VM history and console tails, lives
    under the side folder ``<prefix>/~/`` (``~/events/<vm>/...``,
    ``~/console/<vm>``). "~" sorts after every kind, so the keys an agent
    needs are one key range, ``[all, watched_end)``: an agent lists and
    watches only that range and receives no history or console write of
    any node (a placement writes two history events)."""

    KINDS = ("desired", "actual", "hosts", "flavours", "images", "console", "fences", "nodes", "moves", "pins",
             "overflow")
    SHARDED = ("desired", "actual")  # kinds kept per VM in shards: shards/<xx>/<kind>/<vm>
    SIDE_KINDS = ("console", "events")  # under <prefix>/~/
    # A VM's desired entry and its claim (actual record) live in one of
    # SHARDS shards by a hash of its name: ``shards/<xx>/desired/<vm>`` and
    # ``shards/<xx>/actual/<vm>``, xx = two hex digits of shard(vm). A node
    # in a cell (ClusterConfig.cells > 1) lists and watches only its cell's
    # shards and the rest of the prefix below ``shards/`` (every other kind
    # sorts before "shards"): a VM's writes reach the agents of one cell,
    # not every agent. ``desired/<vm>`` and ``actual/<vm>`` (the layout of
    # before, and what an operator may write with etcdctl) are still read:
    # every agent watches them, and an entry there counts like one in its
    # shard (the shard's wins when both exist).
    SHARDS = 64

    def events(self, vm: str) -> str:
        """The folder of ``vm``'s history: ``~/events/<vm>/<usec>-<node>``."""
        return f"{self._side}events/{vm}/"

    def event(self, vm: str, usec: int, node: str) -> str:
        return f"{self._side}events/{vm}/{usec:020d}-{node}"

    def __init__(self, prefix: str = "/metastack") -> None:
        self.prefix = prefix.rstrip("/")
        self._all = f"{self.prefix}/"
        self._side = f"{self.prefix}/~/"
        self._kinds = frozenset(self.KINDS)

    @property
    def watched_end(self) -> str:
        """The end (exclusive) of the key range ``[all, watched_end)`` that
        holds everything but the side folder: what an agent lists and watches."""
        return f"{self.prefix}/~"

    def desired(self, vm: str) -> str:
        """``vm``'s desired entry: ``<prefix>/shards/<xx>/desired/<vm>``."""
        return f"{self._all}shards/{self.shard(vm):02x}/desired/{vm}"

    def legacy_desired(self, vm: str) -> str:
        """``<prefix>/desired/<vm>``: where desired entries lived before
        shards, still read (an operator may write one there with etcdctl)."""
        return f"{self._all}desired/{vm}"

    def pin_hint(self, node: str, vm: str) -> str:
        """``pins/<node>/<vm>``: VM ``vm`` of another cell is pinned to
        ``node`` (written by the VM's cell, read by ``node``; see CellMap)."""
        return f"{self._all}pins/{node}/{vm}"

    @classmethod
    def shard(cls, vm: str) -> int:
        """The shard of ``vm``'s claim: crc32 of its name modulo SHARDS (documented: tools may compute it)."""
        return zlib.crc32(vm.encode()) % cls.SHARDS

    def actual(self, vm: str) -> str:
        """``vm``'s claim and state: ``<prefix>/shards/<xx>/actual/<vm>``."""
        return f"{self._all}shards/{self.shard(vm):02x}/actual/{vm}"

    def legacy_actual(self, vm: str) -> str:
        """Where claims lived before shards (``<prefix>/actual/<vm>``): still
        read, never written but to delete; a claim there blocks a new one."""
        return f"{self._all}actual/{vm}"

    @property
    def shards(self) -> str:
        """The folder of every shard: ``<prefix>/shards/``; everything an
        agent needs besides its shards is ``[all, shards)``."""
        return f"{self._all}shards/"

    def shard_range(self, lo: int, hi: int) -> tuple[str, str]:
        """The key range [start, end) of shards lo..hi-1 (0 <= lo < hi <= SHARDS)."""
        return f"{self._all}shards/{lo:02x}/", f"{self._all}shards/{hi:02x}/"

    def host(self, node: str) -> str:
        return f"{self.prefix}/hosts/{node}"

    def flavour(self, name: str) -> str:
        return f"{self.prefix}/flavours/{name}"

    def image(self, name: str) -> str:
        return f"{self.prefix}/images/{name}"

    def console(self, vm: str) -> str:
        return f"{self._side}console/{vm}"

    def fence(self, node: str) -> str:
        return f"{self.prefix}/fences/{node}"

    def node(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def move(self, vm: str) -> str:
        return f"{self.prefix}/moves/{vm}"

    def overflow(self, vm: str) -> str:
        """``overflow/<vm>``: VM ``vm``, which no node of the cell serving
        its shard can take, is offered to another cell (see Spill)."""
        return f"{self.prefix}/overflow/{vm}"

    def group_guard(self, group: str, node: str) -> str:
        """``groups/<group>/<node>``: the one VM of a strict anti-affinity
        group on ``node``, created in the claim's transaction, on its lease."""
        return f"{self.prefix}/groups/{group}/{node}"

    def dir(self, kind: str) -> str:
        return f"{self._side if kind in self.SIDE_KINDS else self._all}{kind}/"

    @property
    def config(self) -> str:
        return f"{self.prefix}/config"

    @property
    def all(self) -> str:
        return f"{self.prefix}/"

    def split(self, key: str) -> Optional[tuple[str, str]]:
        """``/metastack/desired/web1`` -> ("desired", "web1"),
        ``/metastack/~/console/web1`` -> ("console", "web1"),
        ``/metastack/shards/<xx>/actual/web1`` -> ("actual", "web1") when xx
        is web1's shard, and so does the old ``/metastack/actual/web1``
        (likewise for desired), ``/metastack/pins/n1/web1`` -> ("pins",
        "n1/web1"); None if foreign."""
        if not key.startswith(self._all):
            return None
        kind, sep, name = key[len(self._all):].partition("/")
        if kind == "shards":  # shards/<xx>/<kind>/<vm>, in the shard of its name
            shard, _, rest = name.partition("/")
            kind, sep, name = rest.partition("/")
            if (kind not in self.SHARDED or not sep or not name or "/" in name or len(shard) != 2
                    or shard != f"{self.shard(name):02x}"):
                return None
            return kind, name
        if kind == "pins":  # pins/<node>/<vm>
            node, sep, vm = name.partition("/")
            if not sep or not node or not vm or "/" in vm:
                return None
            return kind, name
        if kind == "~":
            kind, sep, name = name.partition("/")
            if kind not in self.SIDE_KINDS:
                return None
        elif kind in self.SIDE_KINDS:
            return None
        if not sep or kind not in self._kinds or not name or "/" in name:
            return None
        return kind, name


def utc_now() -> str:
    """ISO-8601 UTC timestamp with second precision, e.g. 2026-11-23T19:00:00Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_VALUE_BYTES = 256 * 1024  # a record value larger than this is refused unparsed
MAX_JSON_DEPTH = 64  # arrays/objects nested deeper than this are refused
MAX_INT = 2 ** 53 - 1  # integers beyond what every JSON reader keeps exactly are refused


def _show(val: Any, limit: int = 60) -> str:
    """``repr(val)`` cut to ``limit`` characters: for error messages that
    quote a value from etcd (it may be huge)."""
    if isinstance(val, (list, dict)):
        return f"a JSON {'array' if isinstance(val, list) else 'object'}"
    text = repr(val)
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: never recurses)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        val, depth = stack.pop()
        children = val.values() if isinstance(val, dict) else val if isinstance(val, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((c, depth + 1) for c in children)
    return deepest


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Decode a record value from etcd into a dict.

    Contract: whatever ``raw`` holds (not bytes, not UTF-8, not JSON, huge,
    nested without end, NaN, an integer of a million digits), this returns a
    dict or raises SpecError with a short reason; nothing else escapes.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise SpecError(f"{what} is not a byte string")
    if len(raw) > MAX_VALUE_BYTES:
        raise SpecError(f"{what} is {len(raw)} bytes, more than {MAX_VALUE_BYTES}")
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise SpecError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except MemoryError:
        raise SpecError(f"{what} is too large to parse") from None
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise SpecError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{what} must be a JSON object, got {type(obj).__name__}")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth(obj) > MAX_JSON_DEPTH:
        raise SpecError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return obj


def _positive_int(obj: Mapping[str, Any], key: str, what: str) -> int:
    val = obj.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or not 0 < val <= MAX_INT:
        raise SpecError(f"{what}: {key!r} must be a positive integer, got {_show(val)}")
    return val


@dataclasses.dataclass(frozen=True)
class Flavour:
    """``/metastack/flavours/<name>``: {"vcpus": int, "ram_mb": int}."""

    vcpus: int
    ram_mb: int

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "Flavour":
        """Parse a flavour value; raises SpecError with the reason."""
        obj = _json_object(raw, f"flavour {name!r}")
        return cls(_positive_int(obj, "vcpus", f"flavour {name!r}"),
                   _positive_int(obj, "ram_mb", f"flavour {name!r}"))

    def to_json(self) -> dict[str, int]:
        return {"vcpus": self.vcpus, "ram_mb": self.ram_mb}


@dataclasses.dataclass(frozen=True)
class DesiredVM:
    """``/metastack/desired/<vm>``: what the admin wants.

    JSON: {"flavour": str, "state": "running"|"stopped" (default running),
    "host": str (optional pin), "image": str (optional), "uuid": str
    (the VM's identity, written once at create)}. Unknown keys are kept in
    ``extra`` and written back untouched by the CLI.

    Identity: with a ``uuid`` the VM is that uuid, whatever happens to the
    key (a restore, a tool that deletes and puts it again). An entry
    written by hand without one is identified by its key's create_revision
    (``generation``): deleting and re-creating such a key makes a new VM.
    """

    name: str
    flavour: str
    state: str = "running"
    host: Optional[str] = None
    image: Optional[str] = None
    extra: tuple[tuple[str, Any], ...] = ()
    generation: int = 0  # the desired key's etcd create_revision: new on every re-create
    uuid: Optional[str] = None
    group: Optional[str] = None  # anti-affinity group: spread over nodes (preferred)
    strict: bool = False  # ... required: never two of the group on one node

    KNOWN = ("flavour", "state", "host", "image", "uuid", "group", "strict")

    @property
    def identity(self) -> str:
        """What makes this VM itself: its uuid, or ``g<create_revision>``."""
        return self.uuid or f"g{self.generation}"

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "DesiredVM":
        """Parse a desired value; raises SpecError with a reason an operator can act on."""
        if not valid_name(name):
            raise SpecError(f"VM name {_show(name)} does not match {NAME_RE.pattern}")
        return cls.from_dict(name, _json_object(raw, f"desired entry of {name!r}"))

    @classmethod
    def from_dict(cls, name: str, obj: Mapping[str, Any]) -> "DesiredVM":
        """Validate a decoded desired entry; raises SpecError (only) with the reason."""
        flavour = obj.get("flavour")
        if not isinstance(flavour, str) or not valid_name(flavour):
            raise SpecError(f"'flavour' must be a flavour name, got {_show(flavour)}")
        state = obj.get("state", "running")
        if not isinstance(state, str) or state not in VM_STATES:
            raise SpecError(f"'state' must be 'running' or 'stopped', got {_show(state)}")
        host = obj.get("host")
        if host is not None and (not isinstance(host, str) or not valid_name(host)):
            raise SpecError(f"'host' must be a node name, got {_show(host)}")
        image = obj.get("image")
        if image is not None and (not isinstance(image, str) or not valid_name(image)):
            raise SpecError(f"'image' must be an image name, got {_show(image)}")
        vm_uuid = obj.get("uuid")
        if vm_uuid is not None and not valid_uuid(vm_uuid):
            raise SpecError(f"'uuid' must be a UUID like {uuid.UUID(int=0)}, got {_show(vm_uuid)}")
        group = obj.get("group")
        if group is not None and (not isinstance(group, str) or not valid_name(group)):
            raise SpecError(f"'group' must be a group name, got {_show(group)}")
        strict = obj.get("strict", False)
        if not isinstance(strict, bool):
            raise SpecError(f"'strict' must be true or false, got {_show(strict)}")
        if strict and group is None:
            raise SpecError("'strict' needs a 'group'")
        extra = tuple(sorted((k, v) for k, v in obj.items() if k not in cls.KNOWN))
        return cls(name, flavour, state, host, image, extra, uuid=vm_uuid, group=group, strict=strict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update({"flavour": self.flavour, "state": self.state})
        if self.host is not None:
            out["host"] = self.host
        if self.image is not None:
            out["image"] = self.image
        if self.uuid is not None:
            out["uuid"] = self.uuid
        if self.group is not None:
            out["group"] = self.group
        if self.strict:
            out["strict"] = True
        return out


def valid_uuid(text: Any) -> bool:
    """True for a canonical lower-case UUID string."""
    if not isinstance(text, str):
        return False
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class ActualVM:
    """``/metastack/actual/<vm>``: the claim and the VM's observed state.

    JSON: {"host", "state", "reason", "updated", "vcpus", "ram_mb", "disk",
    "generation", "uuid"}. The key exists only while its owner's lease
    lives, and is trusted only while attached to the lease that the named
    host's record hangs on (``lease``, from etcd, not from the value).
    ``vcpus``/``ram_mb`` record what the owner reserved (0 for an error
    claim); ``disk`` names the VM's RBD disk once it has one; ``uuid`` (or,
    for entries without one, ``generation``: the create_revision) is the
    identity of the desired entry the claim was made for.
    """

    host: str
    state: str
    reason: str = ""
    vcpus: int = 0
    ram_mb: int = 0
    updated: str = ""
    disk: str = ""  # "pool/image" of the VM's RBD disk, once it has one
    generation: int = 0  # create_revision of the desired entry this claim serves
    uuid: str = ""  # uuid of the desired entry this claim serves
    lease: int = 0  # the etcd lease the key is attached to (not part of the value)

    STATES = ("starting", "running", "stopping", "stopped", "error")

    def serves(self, vm: "DesiredVM") -> bool:
        """Whether this claim was made for ``vm`` (the same identity). Only
        comparable identities count: uuid with uuid, generation with
        generation; a claim that cannot be compared is taken as serving."""
        if self.uuid and vm.uuid:
            return self.uuid == vm.uuid
        if not self.uuid and not vm.uuid and self.generation and vm.generation:
            return self.generation == vm.generation
        return True

    @classmethod
    def parse(cls, raw: bytes) -> "ActualVM":
        """Parse an actual value; never raises. A value another tool mangled
        becomes an 'error' record owned by whoever the 'host' field names
        when it is a string (else by nobody); a field of the wrong type
        reads as its default (0, "", or "error" for the state)."""
        try:
            obj = _json_object(raw, "actual entry")
        except SpecError as exc:
            return cls(host="", state="error", reason=str(exc))
        def _int(k: str) -> int:
            v = obj.get(k, 0)
            return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT else 0
        def _str(k: str, default: str = "") -> str:
            v = obj.get(k, default)
            return v if isinstance(v, str) else default
        return cls(host=_str("host"), state=_str("state", "error"),
                   reason=_str("reason"), vcpus=_int("vcpus"),
                   ram_mb=_int("ram_mb"), updated=_str("updated"), disk=_str("disk"),
                   generation=_int("generation"), uuid=_str("uuid"))

    def same_content(self, other: Optional["ActualVM"]) -> bool:
        """Equal but for the timestamp: whether a write would change anything."""
        return other is not None and (dataclasses.replace(self, updated="", lease=0)
                                      == dataclasses.replace(other, updated="", lease=0))

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"host": self.host, "state": self.state, "reason": self.reason,
                               "updated": self.updated or utc_now(), "vcpus": self.vcpus, "ram_mb": self.ram_mb}
        if self.disk:
            obj["disk"] = self.disk
        if self.generation:
            obj["generation"] = self.generation
        if self.uuid:
            obj["uuid"] = self.uuid
        return json.dumps(obj, sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class Image:
    """``/metastack/images/<name>``: a base image in RBD.

    JSON: {"pool": str, "image": str, "snapshot": str, "size": int (bytes),
    "kernel": str, "initrd": str (RADOS object names in the same pool, for
    direct kernel boot; optional), "cmdline": str (optional)}. VM disks are
    copy-on-write clones of ``pool/image@snapshot``.
    """

    pool: str
    image: str
    snapshot: str
    size: int
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None

    # Ceph pool, RBD image/snapshot and RADOS object names as MetaStack
    # writes them. They become path components of the boot-file cache, so:
    # no '/', no leading '.' or '-', no '..', no '@' (the cache joins image
    # and snapshot with it), no control characters, bounded length.
    OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    CMDLINE_RE = re.compile(r"^[\x20-\x7e]{0,2048}$")  # printable ASCII, one line

    @classmethod
    def valid_object_name(cls, text: Any) -> bool:
        """True when ``text`` is a safe pool, image, snapshot or object name."""
        return isinstance(text, str) and bool(cls.OBJECT_NAME_RE.match(text)) and ".." not in text

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "Image":
        """Parse an image record; raises SpecError (only) with the reason.
        Every name in it is checked against OBJECT_NAME_RE and the cmdline
        against CMDLINE_RE, so nothing from etcd reaches a path unchecked."""
        what = f"image {_show(name)}"
        obj = _json_object(raw, what)
        for key in ("pool", "image", "snapshot"):
            if not cls.valid_object_name(obj.get(key)):
                raise SpecError(f"{what}: {key!r} must be a Ceph name matching {cls.OBJECT_NAME_RE.pattern} "
                                f"without '..', got {_show(obj.get(key))}")
        size = _positive_int(obj, "size", what)
        opt = {k: obj.get(k) for k in ("kernel", "initrd", "cmdline")}
        for k in ("kernel", "initrd"):
            if opt[k] is not None and not cls.valid_object_name(opt[k]):
                raise SpecError(f"{what}: {k!r} must be a RADOS object name matching "
                                f"{cls.OBJECT_NAME_RE.pattern} without '..', got {_show(opt[k])}")
        cmdline = opt["cmdline"]
        if cmdline is not None and (not isinstance(cmdline, str) or not cls.CMDLINE_RE.match(cmdline)):
            raise SpecError(f"{what}: 'cmdline' must be one line of printable ASCII, at most 2048 characters, "
                            f"got {_show(cmdline)}")
        if (opt["kernel"] is None) != (opt["initrd"] is None):
            raise SpecError(f"{what}: 'kernel' and 'initrd' go together")
        return cls(obj["pool"], obj["image"], obj["snapshot"], size, **opt)

    def boot_cache_paths(self, cache_dir: str) -> tuple[str, str]:
        """Where the local copies of the kernel and initrd live below
        ``cache_dir``: ``<cache_dir>/<pool>/<image>@<snapshot>/<object>``.
        A new import never meets a stale copy (the path names the base image
        and snapshot). Raises SpecError for a record that did not come from
        ``parse`` and would leave ``cache_dir``."""
        names = (self.pool, self.image, self.snapshot, self.kernel, self.initrd)
        if not all(self.valid_object_name(n) for n in names):
            raise SpecError(f"image {self.pool}/{self.image}@{self.snapshot}: unsafe names for a cache path")
        d = os.path.join(cache_dir, self.pool, f"{self.image}@{self.snapshot}")
        return os.path.join(d, str(self.kernel)), os.path.join(d, str(self.initrd))

    @property
    def direct_boot(self) -> bool:
        return self.kernel is not None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def disk_name(vm: str, identity: str) -> str:
    """The RBD image holding ``vm``'s disk: ``vm-<name>-<uuid hex>``, or
    ``vm-<name>-g<create_revision>`` for an entry without a uuid (and every
    disk made before uuids existed). The VM's identity is part of it, so a
    VM destroyed and created again never inherits an old disk, while
    stop/start, moves and a re-written key keep the same one."""
    return f"vm-{vm}-{identity.replace('-', '')}" if valid_uuid(identity) else f"vm-{vm}-{identity}"


def parse_disk_name(name: str) -> Optional[tuple[str, str]]:
    """(vm, identity) of a name made by disk_name, else None."""
    m = re.match(r"^vm-(.+)-(g\d+|[0-9a-f]{32})$", name)
    if not m:
        return None
    ident = m.group(2)
    return m.group(1), (ident if ident.startswith("g") else str(uuid.UUID(hex=ident)))


def orphan_disks(pool: str, disks: Iterable[str], snap: "Snapshot") -> list[str]:
    """Disks in ``pool`` that no VM can still want: no desired entry of that
    name *and generation*, and no claim that names the disk. Pure; callers
    re-check each candidate against etcd before removing it."""
    claimed = {a.disk for a in list(snap.actual.values()) + list(snap.untrusted.values()) if a.disk}
    out = []
    for disk in disks:
        parsed = parse_disk_name(disk)
        if parsed is None or f"{pool}/{disk}" in claimed:
            continue
        vm, ident = parsed
        if snap.interest is not None and not snap.interest.keeps(vm):
            continue  # another cell's VM: not in this view, that cell's agents judge it
        spec = snap.desired.get(vm)
        if isinstance(spec, DesiredVM) and spec.identity == ident:
            continue
        if isinstance(spec, SpecError):  # cannot tell which generation it wants: keep
            continue
        out.append(disk)
    return out


@dataclasses.dataclass(frozen=True)
class HostState:
    """``/metastack/hosts/<node>``: what a node offers, under its lease.

    JSON: {"vcpus", "ram_mb", "state"
    ("ready"; "fenced"; "recovering": it lost its lease and re-claims only
    its own running VMs for a grace period; "degraded": its libvirt does
    not answer; only a ready node gets new work), "address" (its Ceph clients' IP, "" if not set), "cannot" ({vm: reason}
    for VMs this node gave up on after repeated failures), "cell" (its
    cell, CellMap; absent: 0), "foreign" ({"vcpus", "ram_mb", "vms"} its
    claims of VMs outside its cell's shards reserve, which the other nodes
    of its cell do not watch; absent: none)}. ``lease`` is
    the etcd lease the key hangs on (from etcd, not from the value): a
    record without one is not a live node.

    The record holds no use: what a node uses is what its trusted claims
    reserve (``claims_use``), so a placement writes no host record and no
    agent receives one per VM. ``vcpus_used``, ``ram_mb_used`` and ``vms``
    are filled in by readers from the claims (``with_use``; the view does
    it for a snapshot); the same fields in a value written by an older
    agent are ignored.
    """

    vcpus: int
    ram_mb: int
    vcpus_used: int = 0
    ram_mb_used: int = 0
    vms: int = 0
    state: str = "ready"
    address: str = ""
    cannot: tuple[tuple[str, str], ...] = ()
    lease: int = 0
    cell: int = 0
    foreign: tuple[int, int, int] = (0, 0, 0)  # (vcpus, ram_mb, vms) of claims outside its cell's shards
    layout: int = LAYOUT  # the key layout its agent reads: 1 (absent) for agents of before the shards

    @classmethod
    def parse(cls, raw: bytes) -> "HostState":
        """Parse a host value; raises SpecError (only) when it is unusable."""
        obj = _json_object(raw, "host entry")
        ints = {}
        for key in ("vcpus", "ram_mb"):
            if key not in obj:
                raise SpecError(f"host entry: {key!r} is missing")
            val = obj.get(key, 0)
            if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= MAX_INT:
                raise SpecError(f"host entry: {key!r} must be a non-negative integer, got {_show(val)}")
            ints[key] = val
        cannot = obj.get("cannot") or {}
        if not isinstance(cannot, dict):
            raise SpecError("host entry: 'cannot' must be an object")
        for key in ("state", "address"):
            if not isinstance(obj.get(key, ""), str):
                raise SpecError(f"host entry: {key!r} must be a string, got {_show(obj.get(key))}")
        cell = obj.get("cell", 0)
        if isinstance(cell, bool) or not isinstance(cell, int) or not 0 <= cell < Keys.SHARDS:
            raise SpecError(f"host entry: 'cell' must be a whole number from 0 to {Keys.SHARDS - 1}, got {_show(cell)}")
        foreign = obj.get("foreign")
        foreign = {} if foreign is None else foreign
        if not isinstance(foreign, dict):
            raise SpecError("host entry: 'foreign' must be an object")
        held = []
        for key in ("vcpus", "ram_mb", "vms"):
            val = foreign.get(key, 0)
            if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= MAX_INT:
                raise SpecError(f"host entry: 'foreign' {key!r} must be a non-negative integer, got {_show(val)}")
            held.append(val)
        layout = obj.get("layout", 1)
        layout = layout if isinstance(layout, int) and not isinstance(layout, bool) and 1 <= layout <= MAX_INT else 1
        return cls(**ints, state=obj.get("state", "ready"), address=obj.get("address", "") or "",
                   cannot=tuple(sorted((str(k), str(v)) for k, v in cannot.items())), cell=cell,
                   foreign=(held[0], held[1], held[2]), layout=layout)

    def encode(self) -> bytes:
        """The record's value: the offer (no use, no lease)."""
        obj: dict[str, Any] = {"vcpus": self.vcpus, "ram_mb": self.ram_mb, "state": self.state,
                               "address": self.address, "cannot": dict(self.cannot)}
        if self.cell:
            obj["cell"] = self.cell
        if any(self.foreign):
            obj["foreign"] = dict(zip(("vcpus", "ram_mb", "vms"), self.foreign))
        obj["layout"] = self.layout
        return json.dumps(obj, sort_keys=True).encode()

    def with_use(self, vcpus: int, ram_mb: int, vms: int) -> "HostState":
        """A copy whose use is (vcpus, ram_mb, vms), as the claims give it."""
        return dataclasses.replace(self, vcpus_used=vcpus, ram_mb_used=ram_mb, vms=vms)

    _USE = re.compile(rb'"(?:vcpus_used|ram_mb_used|vms)": *\d+')

    @classmethod
    def same_offer(cls, a: bytes, b: bytes) -> bool:
        """Two values of one host record that differ at most in use
        (vcpus_used, ram_mb_used, vms); False if either is unusable. Fast
        when only the numbers of use differ in the text (how agents write)."""
        if cls._USE.sub(b"", a) == cls._USE.sub(b"", b):
            return True
        try:
            return cls.parse(a).offer() == cls.parse(b).offer()
        except SpecError:
            return False

    def offer(self) -> tuple[Any, ...]:
        """What the node offers, without what it uses: capacity, state,
        address, what it gave up on, and the lease it is live on."""
        return (self.vcpus, self.ram_mb, self.state, self.address, self.cannot, self.cell, self.foreign, self.layout,
                self.lease)

    def same_content(self, other: Optional["HostState"]) -> bool:
        """Whether ``other`` has the same value (offer) in etcd: a write would change nothing."""
        return other is not None and self.offer()[:-1] == other.offer()[:-1]


@dataclasses.dataclass(frozen=True)
class FenceRecord:
    """``/metastack/fences/<node>``: a node whose Ceph clients were cut off.

    JSON: {"node", "by", "at", "mode": "range" (every client from
    ``address`` is blocklisted) | "clients" (only the disk clients seen),
    "address", "clients": [...], "state": "fenced" | "clean"}. Written by
    the node that fenced, before it boots anything; no lease, so it
    survives restarts. The fenced node kills its stale domains, then
    marks the record clean; whoever may remove blocklist entries lifts a
    clean fence (or an operator: ``metastackctl host unfence``).
    """

    node: str
    by: str
    at: str
    mode: str
    address: str = ""
    clients: tuple[str, ...] = ()
    state: str = "fenced"

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "FenceRecord":
        obj = _json_object(raw, f"fence record of {name!r}")
        mode = obj.get("mode")
        if mode not in ("range", "clients"):
            raise SpecError(f"fence record of {name!r}: 'mode' must be range or clients, got {mode!r}")
        clients = obj.get("clients") or []
        if not isinstance(clients, list):
            raise SpecError(f"fence record of {name!r}: 'clients' must be a list")
        return cls(node=name, by=str(obj.get("by", "")), at=str(obj.get("at", "")), mode=mode,
                   address=str(obj.get("address", "") or ""), clients=tuple(str(c) for c in clients),
                   state="clean" if obj.get("state") == "clean" else "fenced")

    def encode(self) -> bytes:
        obj = dataclasses.asdict(self)
        obj["clients"] = list(self.clients)
        return json.dumps(obj, sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """``/metastack/nodes/<node>``: a node as known to the cluster, whether
    or not it lives now; no lease. JSON: {"address", "first_seen"} written
    by the node's agent (created on first start), plus the operator's
    cordon/drain/evacuate state {"cordon": bool, "drain": bool, "evacuate":
    bool, "reason", "by", "since"} (``metastackctl host
    cordon|drain|evacuate|uncordon``; evacuate: see Agent._tend_evacuations)
    and ``lost_at``
    (when a live node first saw the node's host record vanish; cleared when
    it registers again). Every writer changes only its own fields, by
    compare-and-swap, and keeps unknown keys (``extra``). Takers read the
    address of a dead node here to fence it; a cordoned or draining node
    claims nothing new."""

    address: str = ""
    first_seen: str = ""
    cordon: bool = False
    drain: bool = False
    evacuate: bool = False
    reason: str = ""
    by: str = ""
    since: str = ""
    lost_at: str = ""
    extra: tuple[tuple[str, Any], ...] = ()

    TEXT = ("address", "first_seen", "reason", "by", "since", "lost_at")
    FLAGS = ("cordon", "drain", "evacuate")

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "NodeRecord":
        obj = _json_object(raw, f"node record of {name!r}")
        texts = {k: str(obj.get(k, "") or "") for k in cls.TEXT}
        flags = {k: obj.get(k) is True for k in cls.FLAGS}
        extra = tuple(sorted((k, v) for k, v in obj.items() if k not in cls.TEXT + cls.FLAGS))
        return cls(**texts, **flags, extra=extra)

    @property
    def unschedulable(self) -> bool:
        """Cordoned, draining or evacuated: claims nothing new."""
        return self.cordon or self.drain or self.evacuate

    def encode(self) -> bytes:
        obj: dict[str, Any] = dict(self.extra)
        obj.update({"address": self.address, "first_seen": self.first_seen})
        for k in self.FLAGS:
            if getattr(self, k):
                obj[k] = True
        for k in ("reason", "by", "since", "lost_at"):
            if getattr(self, k):
                obj[k] = getattr(self, k)
        return json.dumps(obj, sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class MoveRequest:
    """``/metastack/moves/<vm>``: move the VM off node ``from_node``
    (``metastackctl move NAME``). JSON: {"from": node, "mode": "cold", "by",
    "at"}; no lease. The owner named in ``from`` hands the VM over (stop
    cleanly, release) once another live node has room, and claims it no
    more while the request exists; the next owner deletes the request.
    ``mode`` leaves room for a live migration later: today only "cold"
    exists, and an agent ignores a mode it does not know."""

    from_node: str
    mode: str = "cold"
    by: str = ""
    at: str = ""

    MODES = ("cold",)

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "MoveRequest":
        obj = _json_object(raw, f"move request of {name!r}")
        src = obj.get("from")
        if not isinstance(src, str) or not valid_name(src):
            raise SpecError(f"move request of {name!r}: 'from' must be a node name, got {_show(src)}")
        return cls(src, str(obj.get("mode", "cold")), str(obj.get("by", "")), str(obj.get("at", "")))

    def encode(self) -> bytes:
        return json.dumps({"from": self.from_node, "mode": self.mode, "by": self.by, "at": self.at},
                          sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class Spill:
    """``/metastack/overflow/<vm>``: with cells, a VM that no node of the
    cell serving its shard can take (too small everywhere, or its strict
    group is on every one) is offered to another cell. JSON: {"cell": the
    cell offered it now, or null once every live cell was offered it and
    none had room; "tried": the cells that had no room, in order;
    "vcpus", "ram_mb": what the VM needs (so a cell judges its room before
    it watches the VM); "holder": the node whose claim of the VM the
    serving cell saw vanish last, "" if none (the claimant fences it if it
    is not live: Executor._former_writers); "by": the node that wrote it;
    "at": when}. No
    lease. Written by the first node of a cell (first_in_cell): the serving
    cell's writes it and deletes it once the VM is claimed, gone or
    pinned; the offered cell's passes it on to the next cell when its own
    nodes lack room. The nodes of the offered cell watch the VM (an extra
    of their Interest) and place it as one of their own; the claim is the
    usual one, in the VM's shard. A hint, never needed for correctness:
    the claim's compare-and-swap decides who runs the VM."""

    cell: Optional[int]
    tried: tuple[int, ...] = ()
    vcpus: int = 0
    ram_mb: int = 0
    by: str = ""
    at: str = ""
    holder: str = ""

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "Spill":
        """Raises SpecError with the reason."""
        what = f"overflow record of {name!r}"
        obj = _json_object(raw, what)
        cell = obj.get("cell")
        if cell is not None and (isinstance(cell, bool) or not isinstance(cell, int) or not 0 <= cell < Keys.SHARDS):
            raise SpecError(f"{what}: 'cell' must be null or a cell number, got {_show(cell)}")
        tried = obj.get("tried", [])
        if (not isinstance(tried, list) or len(tried) > Keys.SHARDS
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < Keys.SHARDS for c in tried)):
            raise SpecError(f"{what}: 'tried' must be a list of cell numbers")
        holder = obj.get("holder", "")
        if not isinstance(holder, str) or (holder and not valid_name(holder)):
            raise SpecError(f"{what}: 'holder' must be a node name or empty, got {_show(holder)}")
        return cls(cell, tuple(tried), _positive_int(obj, "vcpus", what), _positive_int(obj, "ram_mb", what),
                   str(obj.get("by", "")), str(obj.get("at", "")), holder)

    def encode(self) -> bytes:
        return json.dumps({"cell": self.cell, "tried": list(self.tried), "vcpus": self.vcpus, "ram_mb": self.ram_mb,
                           "by": self.by, "at": self.at, "holder": self.holder}, sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """``/metastack/config``: cluster-wide settings (JSON object), all
    optional. ``cpu_allocation_ratio``/``ram_allocation_ratio`` (numbers,
    0 < r <= 100, default 1.0): a node offers its vcpus and RAM times the
    ratio (overcommit above 1); ``[node]`` in a node's ini overrides them.
    ``placement``: "spread" (default: the least loaded node that can take a
    VM claims it) or "pack" (the fullest that can); see Placement.
    ``cells`` (integer, 1 to Keys.SHARDS, default 1): how many cells the
    nodes form; see CellMap. Unknown keys are ignored."""

    cpu_allocation_ratio: float = 1.0
    ram_allocation_ratio: float = 1.0
    placement: str = "spread"
    cells: int = 1

    PLACEMENTS = ("spread", "pack")

    @classmethod
    def parse(cls, raw: bytes) -> "ClusterConfig":
        """Raises SpecError naming the bad key."""
        obj = _json_object(raw, "cluster config")
        out = {}
        for key in ("cpu_allocation_ratio", "ram_allocation_ratio"):
            val = obj.get(key, 1.0)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val <= 100:
                raise SpecError(f"cluster config: {key!r} must be a number above 0 and at most 100, got {_show(val)}")
            out[key] = float(val)
        placement = obj.get("placement", "spread")
        if placement not in cls.PLACEMENTS:
            raise SpecError(f"cluster config: 'placement' must be spread or pack, got {_show(placement)}")
        cells = obj.get("cells", 1)
        if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= Keys.SHARDS:
            raise SpecError(f"cluster config: 'cells' must be a whole number from 1 to {Keys.SHARDS}, got {_show(cells)}")
        return cls(out["cpu_allocation_ratio"], out["ram_allocation_ratio"], placement, cells)


@dataclasses.dataclass(frozen=True)
class CellMap:
    """Which cell serves each shard of claims (Keys.SHARDS), computed the
    same way by every agent from what all of them read: the cluster
    config's ``cells`` and the live host records (each names its node's
    cell). Pure.

    Shard s belongs to cell ``s * cells // SHARDS`` (contiguous ranges of
    near-equal size). A cell with no live node (no host record on a lease)
    is adopted by the next cell that has one, so no VM waits for a cell
    that is gone; when it comes back it serves its shards again. A node
    counts for its cell only while it takes work (``takes_work``: on a
    lease, not fenced, not cordoned, draining or evacuated): a cell whose
    nodes all take no work is adopted too, so its VMs can be drained or
    placed elsewhere; its nodes then watch the adopting cell's shards
    (``watched_by``). The nodes
    of the serving cell are the only ones that place and claim a shard's
    VMs (but for VMs pinned to a node of another cell, which that node
    claims), so each agent watches the claims of its cell's shards only.
    With one cell (the default) every node serves every shard."""

    cells: int
    live: frozenset[int]  # cells with at least one node that takes work

    @classmethod
    def of(cls, cells: int, hosts: Mapping[str, "HostState"],
           nodes: Mapping[str, "NodeRecord"]) -> "CellMap":
        """From the config's cell count, the host records and the node
        records (cordon, drain)."""
        return cls(cells, frozenset(h.cell % cells for n, h in hosts.items() if takes_work(h, nodes.get(n))))

    def home(self, shard: int) -> int:
        return shard * self.cells // Keys.SHARDS

    def serving(self, shard: int) -> Optional[int]:
        """The cell that serves ``shard`` now; None when no cell has a live node."""
        home = self.home(shard)
        for step in range(self.cells):
            cell = (home + step) % self.cells
            if cell in self.live:
                return cell
        return None

    def watched_by(self, cell: int) -> frozenset[int]:
        """The shards the nodes of ``cell`` keep in their views (and count
        the use of): those their cell serves; when their cell has no node
        that takes work, those of the cell that adopted its shards (they
        hand their VMs to that cell, so must see its nodes' use, and they
        keep the memory of their own shards); when no cell has one, their
        own cell's shards."""
        if cell in self.live:
            return self.shards_of(cell)
        home = [s for s in range(Keys.SHARDS) if self.home(s) == cell]
        adopter = self.serving(home[0]) if home else None
        return frozenset(home) if adopter is None else self.shards_of(adopter)

    def shards_of(self, cell: int) -> frozenset[int]:
        """The shards ``cell`` serves now (its own and those it adopted)."""
        return frozenset(s for s in range(Keys.SHARDS) if self.serving(s) == cell)


def takes_work(host: "HostState", rec: Optional["NodeRecord"]) -> bool:
    """Whether a node makes its cell live (CellMap): its host record is on
    a lease and does not say fenced, and its node record says neither
    cordon, drain nor evacuate. "degraded" (libvirt failing a moment) and
    "recovering" (a lease lost a moment ago) still count: a cell is not
    handed to another, with the re-lists that costs, for a passing fault."""
    return bool(host.lease) and host.state != "fenced" and not (rec is not None and rec.unschedulable)


def node_cell(node: str, cells: int, configured: Optional[int]) -> int:
    """A node's cell: ``[node] cell`` of its ini (modulo ``cells``), else a
    fixed hash of its name; 0 with one cell."""
    if cells <= 1:
        return 0
    if configured is not None:
        return configured % cells
    return int(_node_rank(node), 16) % cells


@dataclasses.dataclass(frozen=True)
class Interest:
    """What of the shards one agent keeps: every VM of the shards its cell
    serves (``cell_shards``; their claims decide placement in the cell)
    and the VMs named in ``extra``, whatever their shard (pinned to this
    node, claimed by it, defined on its hypervisor, or offered to its cell
    by another: CellOverflow). The agent watches the shards of both; its view drops the
    desired entries and claims of every other VM (ClusterView._kept)."""

    cell: int
    cell_shards: frozenset[int]
    extra: frozenset[str]

    def keeps(self, vm: str) -> bool:
        return Keys.shard(vm) in self.cell_shards or vm in self.extra

    def in_cell(self, vm: str) -> bool:
        """Whether ``vm``'s claim counts for placement in this cell."""
        return Keys.shard(vm) in self.cell_shards

    def ranges(self, keys: Keys) -> list[tuple[str, str]]:
        """The key ranges of the watched shards, contiguous ones merged."""
        shards = sorted(self.cell_shards | {Keys.shard(vm) for vm in self.extra})
        out: list[tuple[str, str]] = []
        for s in shards:
            if out and out[-1][1] == keys.shard_range(s, s + 1)[0]:
                out[-1] = (out[-1][0], keys.shard_range(s, s + 1)[1])
            else:
                out.append(keys.shard_range(s, s + 1))
        return out


def effective_capacity(vcpus: int, ram_mb: int, cpu_ratio: float, ram_ratio: float) -> tuple[int, int]:
    """What a node offers: its vcpus and RAM times the allocation ratios (floor)."""
    return int(vcpus * cpu_ratio), int(ram_mb * ram_ratio)


def group_members(snap: "Snapshot") -> dict[str, dict[str, list[str]]]:
    """group -> node -> VMs of that anti-affinity group claimed there (trusted claims)."""
    out: dict[str, dict[str, list[str]]] = {}
    grouped = [(vm, spec.group, claim.host) for vm, claim in snap.actual.items()
               if isinstance(spec := snap.desired.get(vm), DesiredVM) and spec.group is not None]
    for vm, group, host in sorted(grouped):
        out.setdefault(group, {}).setdefault(host, []).append(vm)
    return out


def free_capacity(host: HostState) -> tuple[int, int]:
    """(vcpus, ram_mb) a live node reports free in its host record."""
    return max(0, host.vcpus - host.vcpus_used), max(0, host.ram_mb - host.ram_mb_used)


def pending_reason(name: str, snap: "Snapshot") -> str:
    """Why VM ``name`` waits: the reason no live node takes it, computed by
    a reader from what the nodes already publish (host records: capacity,
    use, state, ``cannot``; node records: cordon/drain, lost_at). "" when
    the VM is claimed or has no desired entry. Pure; ``snap`` as
    ClusterView.snapshot() gives it (live hosts only, trusted claims).

    Nobody writes anything for a VM it does not take: this is an
    explanation, in the Sparrow/Nomad style ("0/3 nodes: ..."), not a
    record of a decision, and a node may claim the VM a moment later."""
    spec = snap.desired.get(name)
    if spec is None or name in snap.actual:
        return ""
    live = dict(sorted(snap.hosts.items()))
    if not live:
        known = sorted(snap.nodes)
        return "no live node" + (f" (known but lost: {', '.join(known[:10])})" if known else "")
    resolved = resolve(spec, snap)
    if isinstance(resolved, str):
        return f"{resolved} (a live node records it as an error claim)"
    vm, flav = resolved
    lead = ""  # with cells: where the VM was offered (Spill)
    if vm.host is not None:
        rec = snap.nodes.get(vm.host)
        if vm.host not in live:
            if rec is None:
                return f"pinned to {vm.host}, which is not a known node"
            lost = f", lost since {rec.lost_at}" if rec.lost_at else ""
            return f"pinned to {vm.host}, which is not live{lost}"
        live = {vm.host: live[vm.host]}
    elif snap.cells is not None:  # only the nodes of the cell that serves its shard place it
        cell = snap.cells.serving(Keys.shard(name))
        spill = snap.overflow.get(name)
        if spill is not None and cell is not None:
            if spill.cell is not None and spill.cell != cell and spill.cell in snap.cells.live:
                lead = f"cell {cell} has no room for it, offered to cell {spill.cell}: "  # (Spill) its nodes place it
                cell = spill.cell
            elif spill.cell is None:
                lead = (f"no cell had room (offered to cell(s) {', '.join(map(str, spill.tried[1:])) or 'none'}"
                        f" since {spill.at}); ")
        if cell is not None:  # else no node takes work in any cell: every live node says why
            live = {n: h for n, h in live.items() if h.cell % snap.cells.cells == cell}
        if not live:
            return f"{lead}no live node in cell {cell} (its shard's)"
    members = group_members(snap).get(vm.group or "", {}) if vm.group is not None else {}
    why: dict[str, list[str]] = {}
    small: list[str] = []
    best_cpu: tuple[int, str] = (-1, "")
    best_ram: tuple[int, str] = (-1, "")
    fits: list[str] = []
    for node, host in live.items():
        rec = snap.nodes.get(node)
        cannot = dict(host.cannot)
        if host.state == "fenced":
            why.setdefault("fenced", []).append(node)
        elif host.state != "ready":  # "recovering": it lost its lease and takes back only its own VMs for now
            why.setdefault(host.state, []).append(node)
        elif rec is not None and rec.evacuate:
            why.setdefault("evacuated", []).append(node + (f" ({rec.reason})" if rec.reason else ""))
        elif rec is not None and rec.drain:
            why.setdefault("draining", []).append(node + (f" ({rec.reason})" if rec.reason else ""))
        elif rec is not None and rec.cordon:
            why.setdefault("cordoned", []).append(node + (f" ({rec.reason})" if rec.reason else ""))
        elif name in cannot:
            why.setdefault("gave it up", []).append(f"{node} ({cannot[name]})")
        elif vm.strict and members.get(node):
            why.setdefault(f"strict group {vm.group} already there", []).append(
                f"{node} ({', '.join(members[node])})")
        else:
            cpu, ram = free_capacity(host)
            best_cpu = max(best_cpu, (cpu, node), key=lambda p: p[0])
            best_ram = max(best_ram, (ram, node), key=lambda p: p[0])
            if cpu >= flav.vcpus and ram >= flav.ram_mb:
                fits.append(node)
            else:
                small.append(node)
    if fits:
        return (f"{lead}not claimed yet: {', '.join(fits[:5])}{' ...' if len(fits) > 5 else ''} "
                f"{'has' if len(fits) == 1 else 'have'} room (a claim is due, or waits out a failover grace)")
    parts = [f"{what}: {', '.join(nodes)}" for what, nodes in why.items()]
    if small:
        parts.append(f"too small: {', '.join(small)} (needs {flav.vcpus} vcpus and {flav.ram_mb} MiB RAM; "
                     f"largest free: {best_cpu[0]} vcpus on {best_cpu[1]}, {best_ram[0]} MiB on {best_ram[1]})")
    pin = f" (pinned to {vm.host})" if vm.host is not None else ""
    return f"{lead}0/{len(live)} live node(s) can take it{pin}: " + "; ".join(parts)


# ---------------------------------------------------------------------------
# Store: every etcd call lives here
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One key as etcd holds it."""

    value: bytes
    mod_revision: int
    lease: int = 0
    create_revision: int = 0


@dataclasses.dataclass(frozen=True)
class KeyEvent:
    """One watch event: ``value`` is None for a delete."""

    key: str
    value: Optional[bytes]
    mod_revision: int
    lease: int = 0
    create_revision: int = 0


class Store:
    """The only class that speaks etcd's protocol (python-etcd3 API).

    Contract, for every method: a lost compare-and-swap returns False (or
    None where a revision is returned); failing to reach etcd raises
    StoreUnavailable; etcd refusing this client (authentication, a
    certificate, a permission) raises StoreDenied; no etcd3 or grpc
    exception escapes. Values are bytes (JSON encoding is the callers'
    business, keys come from ``self.keys``).

    Security comes from the EtcdConfig: TLS channels (server verified by
    ``ca_cert``, client certificate ``cert``/``key``) and etcd's own
    user/password. With a password, the store authenticates on its first
    call (never in the constructor, which does no I/O), sends the token
    as gRPC metadata, and authenticates again once when etcd says the
    token is invalid (etcd forgets its simple tokens on restart).
    """

    # etcd's refusals (etcd 3.4 api/v3rpc/rpctypes): wrong user or password,
    # no credentials on a cluster with auth, a role that does not cover the key.
    DENIED = ("authentication failed", "user name is empty", "permission denied", "user name not found",
              "invalid auth management", "auth: revision in header is old")

    # etcd's require-leader metadata (rpctypes.MetadataRequireLeaderKey): a
    # member that has had no leader for a few election timeouts ends the watch
    # (it would otherwise stay open and silent while the others go on).
    REQUIRE_LEADER = (("hasleader", "true"),)

    def __init__(self, cfg: EtcdConfig) -> None:
        import etcd3  # imported here: importing metastack has no side effects
        import grpc
        self._etcd3 = etcd3
        self._grpc = grpc
        self._errors: tuple[type[BaseException], ...] = (etcd3.exceptions.Etcd3Exception, grpc.RpcError)
        self.keys = Keys(cfg.prefix)
        self.timeout = cfg.timeout
        self.cfg = cfg
        creds = None
        if cfg.tls:
            try:  # no ca_cert: the system's roots verify the servers
                creds = grpc.ssl_channel_credentials(self._read(cfg.ca_cert), self._read(cfg.key), self._read(cfg.cert))
            except OSError as exc:
                raise ConfigError(f"[etcd] cannot read {exc.filename}: {exc.strerror}") from None
        # No HTTP/2 keep-alive pings: tried, and with them a CI run failed the
        # e2e etcd-freeze test (leases expired across the freeze) and a chaos
        # cut test's time limit; the pings' part in that is likely, not
        # proven. A gRPC watch left on a member that lost touch is repaired
        # by the periodic re-list.
        endpoints = [etcd3.Endpoint(h, p, secure=cfg.tls, creds=creds, time_retry=0.5) for h, p in cfg.endpoints]
        self._client = etcd3.MultiEndpointEtcd3Client(endpoints, timeout=cfg.timeout, failover=True)
        self._tx = self._client.transactions
        self._auth_lock = threading.Lock()
        self._token_gen = 0  # bumped on every successful authentication
        self._json_watches: set[JsonWatch] = set()  # open JSON-gateway watches (closed with the store)

    @staticmethod
    def _read(path: Optional[str]) -> Optional[bytes]:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    def _authenticate(self, stale_gen: Optional[int] = None) -> None:
        """Get a token for user/password (once; again when the token of
        generation ``stale_gen`` was refused). Raises StoreDenied/StoreUnavailable."""
        if self.cfg.user is None:
            return
        with self._auth_lock:
            if self._token_gen and self._token_gen != stale_gen:
                return  # another thread already did it
            from etcd3 import etcdrpc
            req = etcdrpc.AuthenticateRequest(name=self.cfg.user, password=self.cfg.password or "")
            try:
                resp = self._client.authstub.Authenticate(req, self.timeout)
            except self._grpc.RpcError as exc:
                self._fail_endpoint(exc)
                with contextlib.suppress(Exception):
                    if exc.code() in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.DEADLINE_EXCEEDED):
                        self._next_endpoint(self._etcd3.exceptions.ConnectionFailedError())
                raise self._error("authentication", exc) from None
            except self._etcd3.exceptions.Etcd3Exception as exc:
                raise self._error("authentication", exc) from None
            self._client.metadata = (("token", resp.token),)
            self._client.call_credentials = None  # the token travels as metadata: works with and without TLS
            watcher = self._client._stubs.get("watcher")
            if watcher is not None:
                watcher._metadata = self._watch_metadata()  # its next stream uses the new token
            self._token_gen += 1

    def _watch_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata of a watch stream: the token, if any, and require-leader."""
        return tuple(self._client.metadata or ()) + self.REQUIRE_LEADER

    def _fail_endpoint(self, exc: BaseException) -> None:
        """Let the client fail over to another endpoint after a transport error."""
        with contextlib.suppress(Exception):
            if exc.code() in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.DEADLINE_EXCEEDED):
                self._client.endpoint_in_use.fail()
                self._client._clear_old_stubs()

    def _next_endpoint(self, exc: BaseException) -> bool:
        """After a transport failure, move to the next endpoint; True when it
        moved. python-etcd3 marks the endpoint failed for only ``time_retry``
        (0.5 s) and keeps it as the current one, so calls further apart than
        that would go back to a dead member for ever (measured on a 3-member
        cluster with one member down)."""
        if len(self._client.endpoints) < 2:
            return False
        if not isinstance(exc, (self._etcd3.exceptions.ConnectionFailedError,
                                self._etcd3.exceptions.ConnectionTimeoutError)):
            return False
        with contextlib.suppress(Exception):
            labels = list(self._client.endpoints)
            failed = self._client._current_endpoint_label
            i = labels.index(failed)
            self._client._current_endpoint_label = labels[(i + 1) % len(labels)]
            self._abandon_json_watches(failed, f"{failed} did not answer another call ({self.describe(exc)})")
            return True
        return False

    def _abandon_json_watches(self, member: str, why: str) -> None:
        """End (``on_error``) the JSON watches reading from ``member``
        ("host:port"), as python-etcd3 ends its gRPC watch when the client
        moves off a member: a member that stopped answering calls (hung,
        its host powered off: no reset comes, and its kernel may even
        answer TCP keep-alive) must not keep a silent watch."""
        with self._auth_lock:
            doomed = [w for w in self._json_watches if w.member == member]
        for w in doomed:
            w.abandon(why)

    def _error(self, what: str, exc: BaseException) -> StoreUnavailable:
        """Translate an etcd3/grpc error into StoreDenied or StoreUnavailable."""
        text = self.describe(exc)
        low = text.lower()
        if any(d in low for d in self.DENIED) or low.startswith(("permission_denied", "unauthenticated")):
            who = f"user {self.cfg.user!r}" if self.cfg.user else (
                f"certificate {self.cfg.cert}" if self.cfg.cert else "no credentials")
            return StoreDenied(f"etcd refused {what} ({who}): {text}")
        # A refused client certificate shows only when reading (TLS 1.3): "Unwrap failed (TSI_DATA_CORRUPTED)".
        if any(w in low for w in ("handshake", "ssl", "certificate", "unwrap failed", "tsi_")):
            return StoreDenied(f"etcd {what} failed: TLS handshake with {self.cfg.endpoint_text} failed "
                               f"(check [etcd] ca_cert, cert, key): {text}")
        return StoreUnavailable(f"etcd {what} failed: {text}")

    # Seconds during which a read (get, list) that failed for a reason the
    # next member, or the same one a moment later, may not have (a member
    # that does not answer, a leader election) is tried again. 0: never,
    # the caller retries (the agent's loop does, within its lease's
    # margins, so its calls stay bounded by the timeout); metastackctl
    # sets it, so that one command gives one answer.
    read_retry_for = 0.0
    TRANSIENT = ("leader changed", "no leader", "context deadline exceeded", "request timed out")

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, compacted: Any = (), **kwargs: Any) -> Any:
        """Run one client call; errors translated as the class says, except
        the ``compacted`` exception type, which is let through. With
        ``read_retry_for``, a read (``get``, ``list``) that fails on the
        transport goes on to the next endpoint, and one that meets an
        election is tried again, for that long: a member that died without
        a reset (a host powered off) costs one timeout, not the read. A
        write is never tried again (it may have been applied)."""
        gen = self._token_gen
        if self.cfg.user is not None and not gen:
            self._authenticate()
            gen = self._token_gen
        retry_until = time.monotonic() + self.read_retry_for if what in ("get", "list") else 0.0
        reauthenticate = self.cfg.user is not None
        while True:
            try:
                return fn(*args, **kwargs)
            except compacted:
                raise
            except self._errors as exc:
                text = self.describe(exc)
                if "lease not found" in text:
                    raise LeaseNotFound(f"etcd {what} failed: the lease has expired") from None
                if reauthenticate and "invalid auth token" in text:
                    reauthenticate = False
                    self._authenticate(stale_gen=gen)  # etcd forgot our token (it restarted): once more with a new one
                    continue
                moved = self._next_endpoint(exc)
                if time.monotonic() < retry_until and (moved or any(t in text for t in self.TRANSIENT)):
                    if not moved:
                        time.sleep(0.2)  # an election takes about a second
                    continue
                raise self._error(what, exc) from None

    @staticmethod
    def describe(exc: BaseException) -> str:
        """One line for an etcd3/grpc error (grpc's own text spans lines).
        python-etcd3 replaces some grpc errors by its own, message-less
        ones: then the grpc error it replaced says what happened."""
        code, details = getattr(exc, "code", None), getattr(exc, "details", None)
        if callable(code) and callable(details):
            return f"{code().name}: {' '.join(str(details() or '').split())}"
        inner = exc.__context__
        if inner is not None and callable(getattr(inner, "code", None)) and callable(getattr(inner, "details", None)):
            return f"{str(exc) or type(exc).__name__} ({Store.describe(inner)})"
        return str(exc) or type(exc).__name__

    def close(self) -> None:
        """Cancel the open watches and close the connections."""
        with self._auth_lock:
            watches, self._json_watches = list(self._json_watches), set()
        for w in watches:
            w.cancel()
        try:
            self._client.close()
        except self._errors:
            pass

    # -- reads -------------------------------------------------------------
    def list_prefix(self, prefix: str, until: Optional[str] = None) -> tuple[int, dict[str, Entry]]:
        """All keys under ``prefix`` (with ``until``: the keys from
        ``prefix`` up to, not including, ``until``) and the store revision
        they were read at."""
        if until is None:
            resp = self._call("list", self._client.get_prefix_response, prefix)
        else:
            resp = self._call("list", self._client.get_range_response, prefix, until)
        return resp.header.revision, {kv.key.decode(): Entry(kv.value, kv.mod_revision, kv.lease, kv.create_revision)
                                      for kv in resp.kvs}

    def get(self, key: str) -> Optional[Entry]:
        value, meta = self._call("get", self._client.get, key)
        return None if meta is None else Entry(value, meta.mod_revision, meta.lease_id, meta.create_revision)

    def list_kind(self, kind: str) -> tuple[int, dict[str, Entry]]:
        """name -> entry of every record of one kind under this store's
        prefix (names as Keys.split gives them), and the revision of the
        read. Claims ("actual") come from every shard and from the old
        ``actual/`` folder; a name in both keeps its shard's entry."""
        keys = self.keys
        if kind not in keys.SHARDED:
            revision, entries = self.list_prefix(keys.dir(kind))
            return revision, {split[1]: e for k, e in entries.items() if (split := keys.split(k)) is not None}
        revision, sharded = self.list_prefix(keys.shards)
        _, legacy = self.list_prefix(keys.dir(kind))
        out: dict[str, Entry] = {}
        for key, entry in [*legacy.items(), *sharded.items()]:
            split = keys.split(key)
            if split is not None and split[0] == kind:
                out[split[1]] = entry
        return revision, out

    def find(self, kind: str, vm: str) -> tuple[str, Optional[Entry]]:
        """(key, entry) of ``vm``'s record of a sharded kind (desired,
        actual): in its shard, else in the old folder; (its shard's key,
        None) when there is none."""
        key = self.keys.actual(vm) if kind == "actual" else self.keys.desired(vm)
        entry = self.get(key)
        if entry is None:
            old = self.keys.legacy_actual(vm) if kind == "actual" else self.keys.legacy_desired(vm)
            entry = self.get(old)
            if entry is not None:
                return old, entry
        return key, entry

    def get_claim(self, vm: str) -> Optional[Entry]:
        """``vm``'s claim: from its shard, else from the old ``actual/`` folder."""
        return self.find("actual", vm)[1]

    def get_desired(self, vm: str) -> Optional[Entry]:
        """``vm``'s desired entry: from its shard, else from the old ``desired/`` folder."""
        return self.find("desired", vm)[1]

    # -- writes ------------------------------------------------------------
    def _txn(self, what: str, compare: list, success: list, failure: Optional[list] = None) -> tuple[bool, list]:
        return self._call(what, self._client.transaction, compare=compare, success=success, failure=failure or [])

    def create(self, key: str, value: bytes, lease: int = 0,
               also: Sequence[tuple[str, bytes]] = (),
               plus: Sequence[tuple[str, bytes, int]] = (),
               absent: Sequence[str] = (),
               supersede: Optional[tuple[str, int]] = None) -> tuple[Optional[int], Optional[Entry]]:
        """Create ``key`` only if absent. Returns (revision, None) on success,
        or (None, the existing entry) when another writer holds the key.
        ``also``: more (key, value) pairs created in the same transaction,
        on the same lease, only if every one of them is absent too (guard
        keys); (None, None) when only one of those exists. ``plus``: (key,
        value, lease) written in the same transaction when it succeeds (one
        revision for both: history that rides along). ``absent``: keys that
        must not exist either (compared, not written); (None, None) when
        only one of those exists. ``supersede``: (key, mod_revision) of a
        key deleted in the same transaction, which must be unchanged since
        that revision; (None, None) when it changed or went."""
        compare = ([self._tx.create(key) == 0] + [self._tx.create(k) == 0 for k, _ in also]
                   + [self._tx.create(k) == 0 for k in absent])
        puts = ([self._tx.put(key, value, lease=lease or None)]
                + [self._tx.put(k, v, lease=lease or None) for k, v in also]
                + [self._tx.put(k, v, lease=ls or None) for k, v, ls in plus])
        if supersede is not None:
            compare.append(self._tx.mod(supersede[0]) == supersede[1])
            puts.append(self._tx.delete(supersede[0]))
        ok, resp = self._txn("create", compare, puts, [self._tx.get(key)])
        if ok:
            return resp[0].response_put.header.revision, None
        existing = resp[0][0] if resp and resp[0] else None
        return None, (None if existing is None else Entry(existing[0], existing[1].mod_revision, existing[1].lease_id))

    def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0,
                plus: Sequence[tuple[str, bytes, int]] = ()) -> Optional[int]:
        """Write ``key`` only if it is unchanged since ``mod_revision``;
        returns the new revision, or None when it changed or vanished.
        ``plus`` as for ``create``."""
        ok, resp = self._txn("replace", [self._tx.mod(key) == mod_revision],
                             [self._tx.put(key, value, lease=lease or None)]
                             + [self._tx.put(k, v, lease=ls or None) for k, v, ls in plus])
        return resp[0].response_put.header.revision if ok else None

    def replace_many(self, writes: Sequence[tuple[str, bytes, int, int]],
                     plus: Sequence[tuple[str, bytes, int]] = ()) -> Optional[int]:
        """Write each (key, value, mod_revision, lease) only if every key is
        unchanged since its ``mod_revision``, all in one transaction (one
        revision); ``plus`` as for ``create``. The revision, or None when
        any key changed."""
        ok, resp = self._txn("replace", [self._tx.mod(k) == rev for k, _, rev, _ in writes],
                             [self._tx.put(k, v, lease=ls or None) for k, v, _, ls in writes]
                             + [self._tx.put(k, v, lease=ls or None) for k, v, ls in plus])
        return resp[0].response_put.header.revision if ok else None

    def delete_all_if(self, items: Sequence[tuple[str, int]]) -> Optional[int]:
        """Delete every (key, mod_revision) in one transaction, only if none
        changed since; the revision, or None when one changed or went."""
        ok, resp = self._txn("delete", [self._tx.mod(k) == rev for k, rev in items],
                             [self._tx.delete(k) for k, _ in items])
        return resp[0].response_delete_range.header.revision if ok else None

    def delete_if(self, key: str, mod_revision: int) -> Optional[int]:
        """Delete ``key`` only if unchanged since ``mod_revision``; returns
        the delete's revision or None when the key changed or vanished."""
        ok, resp = self._txn("delete", [self._tx.mod(key) == mod_revision], [self._tx.delete(key)])
        return resp[0].response_delete_range.header.revision if ok else None

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional write (admin data, or a key only its owner writes);
        returns the revision."""
        return self._call("put", self._client.put, key, value, lease=lease or None).header.revision

    def delete(self, key: str) -> bool:
        """Unconditional delete; True when the key existed."""
        return bool(self._call("delete", self._client.delete, key))

    # -- leases ------------------------------------------------------------
    def grant_lease(self, ttl: int) -> int:
        return self._call("lease grant", self._client.lease, ttl).id

    def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns its remaining TTL (0: it has expired)."""
        resp = self._call("lease keep-alive", lambda: list(self._client.refresh_lease(lease_id)))
        return max(0, resp[0].TTL) if resp else 0

    def lease_ttl(self, lease_id: int) -> tuple[int, int]:
        """(remaining, granted) TTL of a lease in seconds; remaining <= 0
        when it no longer exists."""
        info = self._call("lease info", self._client.get_lease_info, lease_id)
        return int(info.TTL), int(info.grantedTTL)

    def revoke_lease(self, lease_id: int) -> None:
        self._call("lease revoke", self._client.revoke_lease, lease_id)

    # -- watch -------------------------------------------------------------
    def watch_prefix(self, prefix: str, start_revision: int,
                     on_events: Callable[[int, list[KeyEvent]], None],
                     on_error: Callable[[BaseException], None],
                     until: Optional[str] = None) -> Callable[[], None]:
        """Watch ``prefix`` (with ``until``: the keys from ``prefix`` up to,
        not including, ``until``) from ``start_revision``; returns a cancel
        function.

        ``on_events(header_revision, events)`` and ``on_error(exc)`` run on
        the client's watch thread. After ``on_error`` the watch is dead: the
        caller re-creates it. A start revision that etcd has compacted raises
        RevisionCompacted here, or reaches ``on_error`` as RevisionCompacted:
        the caller must then re-list. The events travel as
        ``watch_transport`` says.
        """
        if self.watch_transport == "json":
            return self._watch_json(prefix, start_revision, on_events, on_error, until)
        return self._watch_grpc(prefix, start_revision, on_events, on_error, until)

    @property
    def watch_transport(self) -> str:
        """How this store's watches travel (EtcdConfig.watch_transport)."""
        return self.cfg.watch_transport

    def _endpoint_order(self) -> list[tuple[str, int]]:
        """The configured endpoints, the one the client uses now first."""
        eps = list(self.cfg.endpoints)
        current = str(getattr(self._client, "_current_endpoint_label", ""))
        for i, (host, port) in enumerate(eps):
            if current.endswith(f"{host}:{port}"):
                return eps[i:] + eps[:i]
        return eps

    def _watch_json(self, prefix: str, start_revision: int,
                    on_events: Callable[[int, list[KeyEvent]], None],
                    on_error: Callable[[BaseException], None],
                    until: Optional[str] = None) -> Callable[[], None]:
        key = prefix.encode()
        end = bytearray(key)
        while end and end[-1] == 0xFF:
            end.pop()
        end[-1] += 1  # the prefix's range end, as etcd's prefix watch has it
        if until is not None:
            end = bytearray(until.encode())
        for attempt in (1, 2):
            gen = self._token_gen
            token = None
            if self.cfg.user is not None:
                if not gen:
                    self._authenticate()
                token = str(dict(self._client.metadata or ()).get("token", "")) or None
            watch = JsonWatch(self.cfg, self._endpoint_order(), token, key, bytes(end), start_revision,
                              on_events, on_error)
            try:
                watch.start()
            except StoreDenied:
                if self.cfg.user is None or attempt == 2:
                    raise
                self._authenticate(stale_gen=self._token_gen)  # etcd forgot the token (a restart): once more
                continue
            with self._auth_lock:
                self._json_watches.add(watch)

            def cancel(w: JsonWatch = watch) -> None:
                w.cancel()
                with self._auth_lock:
                    self._json_watches.discard(w)
            return cancel
        raise AssertionError("unreachable")

    def _watch_grpc(self, prefix: str, start_revision: int,
                    on_events: Callable[[int, list[KeyEvent]], None],
                    on_error: Callable[[BaseException], None],
                    until: Optional[str] = None) -> Callable[[], None]:
        PutEvent = self._etcd3.events.PutEvent
        Compacted = self._etcd3.exceptions.RevisionCompactedError

        def callback(resp: Any) -> None:
            if isinstance(resp, Compacted):
                on_error(RevisionCompacted(f"revision {start_revision} is compacted "
                                           f"(oldest kept: {resp.compacted_revision})"))
                return
            if isinstance(resp, BaseException) or resp is None:
                on_error(resp if resp is not None else StoreUnavailable("watch closed"))
                return
            events = [KeyEvent(ev.key.decode(), ev.value if isinstance(ev, PutEvent) else None,
                               ev.mod_revision, ev.lease, ev.create_revision) for ev in resp.events]
            on_events(resp.header.revision, events)

        def add(*args: Any, **kwargs: Any) -> Any:
            watcher = self._client.watcher  # made anew after a failover, with the client's metadata only
            watcher._metadata = self._watch_metadata()  # read when its next stream opens
            if until is not None:
                return self._client.add_watch_callback(*args, range_end=until, **kwargs)
            return self._client.add_watch_prefix_callback(*args, **kwargs)

        try:
            watch_id = self._call("watch", add, prefix, callback, start_revision=start_revision, compacted=Compacted)
        except Compacted as exc:  # before the general case: it is an Etcd3Exception too
            raise RevisionCompacted(f"revision {start_revision} is compacted "
                                    f"(oldest kept: {exc.compacted_revision})") from None

        def cancel() -> None:
            try:
                self._client.cancel_watch(watch_id)
            except self._errors:
                pass
        return cancel


class JsonWatch:
    """One etcd watch read from etcd's JSON gateway: ``POST /v3/watch`` on a
    member's client port (etcd 3.4+), answered by a stream of JSON lines
    that one thread of its own reads.

    Why not the gRPC watch (``watch = grpc``): python-etcd3 and grpcio
    spend 165-190 us of CPU on every watch response, and deliver each on its
    own; this reader spends about 50 us (measured on this machine: 4
    watchers x 2,000 puts, see the scale issue's note), and responses that
    wait in the socket while the process is busy reach ``on_events`` in one
    call: a busy agent coalesces what arrived while it worked. etcd's
    gateway authenticates by token (the ``Authorization`` header) and
    refuses a client that shows a certificate (it would not see its common
    name), so such a client watches over gRPC (``EtcdConfig.watch_transport``).

    Contract: ``start()`` returns once etcd confirmed the watch; it raises
    StoreUnavailable (no member answered in ``timeout``), StoreDenied
    (refused: TLS, token, role) or RevisionCompacted. Then the reader
    thread calls ``on_events(header_revision, events)`` with events in
    revision order, and ``on_error(exc)`` once when the watch ends for any
    reason but ``cancel()``; after that the watch is dead. TCP keep-alive
    (probes after 5 s idle, 3 x 2 s) ends a watch whose member's host
    vanished without a reset; ``abandon()`` one whose member stopped
    answering the store's other calls (the store does it when it moves to
    another member)."""

    DENIED = Store.DENIED + ("invalid auth token",)

    def __init__(self, cfg: EtcdConfig, endpoints: Sequence[tuple[str, int]], token: Optional[str],
                 key: bytes, range_end: bytes, start_revision: int,
                 on_events: Callable[[int, list[KeyEvent]], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self.cfg = cfg
        self.endpoints = list(endpoints)
        self.token = token
        self.body = json.dumps({"create_request": {
            "key": base64.b64encode(key).decode(), "range_end": base64.b64encode(range_end).decode(),
            "start_revision": start_revision}}).encode()
        self.start_revision = start_revision
        self.on_events = on_events
        self.on_error = on_error
        self._sock: Optional[socket.socket] = None
        self._raw = b""  # received, not yet de-chunked
        self._chunked = False
        self._lines = b""  # de-chunked, not yet a whole line
        self._cancelled = threading.Event()
        self._abandoned = ""  # why abandon() ended the watch
        self.member = ""  # "host:port" of the member it reads from, once started

    # -- connection ------------------------------------------------------------
    def _context(self) -> Any:
        import ssl
        ctx = ssl.create_default_context(cafile=self.cfg.ca_cert)
        if self.cfg.cert is not None:
            ctx.load_cert_chain(self.cfg.cert, self.cfg.key)
        return ctx

    def _open(self, host: str, port: int) -> None:
        sock = socket.create_connection((host, port), timeout=self.cfg.timeout)
        try:
            if self.cfg.tls:
                sock = self._context().wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            head = ["POST /v3/watch HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                    f"Content-Length: {len(self.body)}"]
            if self.token is not None:
                head.append(f"Authorization: {self.token}")
            # etcd's require-leader: a member that loses its leader (cut off
            # from the others) ends the watch instead of going silent.
            head.append("Grpc-Metadata-Hasleader: true")
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + self.body)
            self._sock = sock
            status, headers = self._response_head()
        except BaseException:
            sock.close()
            self._sock = None
            raise
        if status != 200:
            raise self._refusal(status, self._lines + self._raw)
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()

    def _response_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._raw:
            self._recv()
        head, self._raw = self._raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise OSError(f"not an HTTP answer: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _refusal(self, status: int, body: bytes) -> StoreUnavailable:
        text = body.decode("utf-8", "replace").strip()[:300] or f"HTTP {status}"
        return self._error(f"HTTP {status}: {text}")

    def _error(self, text: str) -> StoreUnavailable:
        if any(d in text.lower() for d in self.DENIED):
            return StoreDenied(f"etcd refused the watch: {text}")
        return StoreUnavailable(f"etcd watch failed: {text}")

    def _recv(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(262144)
        if not data:
            raise ConnectionError("etcd closed the watch stream")
        self._raw += data

    # -- the stream --------------------------------------------------------------
    def _dechunk(self) -> None:
        """Move whole chunks' payload from ``_raw`` to ``_lines``."""
        if not self._chunked:
            self._lines += self._raw
            self._raw = b""
            return
        raw, pos = self._raw, 0
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
            end = eol + 2 + size
            if len(raw) < end + 2:
                break
            if size == 0:
                raise ConnectionError("etcd ended the watch stream")
            self._lines += raw[eol + 2:end]
            pos = end + 2
        self._raw = raw[pos:]

    def _messages(self) -> list[dict]:
        """Every whole JSON line received so far (waits for at least one)."""
        while True:
            self._dechunk()
            if b"\n" in self._lines:
                *whole, self._lines = self._lines.split(b"\n")
                return [json.loads(line) for line in whole if line.strip()]
            self._recv()

    def _result(self, msg: dict) -> dict:
        """The WatchResponse of one line; raises for an error or a cancel."""
        if "error" in msg:
            err = msg["error"] or {}
            raise self._error(str(err.get("message") or err))
        res = msg.get("result") or {}
        if res.get("canceled"):
            compacted = int(res.get("compact_revision") or 0)
            if compacted:
                raise RevisionCompacted(f"revision {self.start_revision} is compacted (oldest kept: {compacted})")
            raise self._error(res.get("cancel_reason") or "etcd cancelled the watch")
        return res

    @staticmethod
    def _events(res: dict) -> list[KeyEvent]:
        out = []
        b64 = base64.b64decode
        for ev in res.get("events") or ():
            kv = ev.get("kv") or {}
            deleted = ev.get("type") == "DELETE"
            out.append(KeyEvent(b64(kv.get("key", "")).decode(), None if deleted else b64(kv.get("value", "")),
                                int(kv.get("mod_revision") or 0), int(kv.get("lease") or 0),
                                int(kv.get("create_revision") or 0)))
        return out

    def start(self) -> None:
        """Connect to the first member that answers and wait for etcd to
        confirm the watch (see the class contract)."""
        import ssl
        failures, tls_refused = [], False
        for host, port in self.endpoints:
            try:
                self._open(host, port)
                self.member = f"{host}:{port}"
                break
            except StoreUnavailable:
                raise
            except (OSError, ValueError) as exc:
                tls_refused = tls_refused or isinstance(exc, ssl.SSLError)
                failures.append(f"{host}:{port}: {exc}")
        else:
            if tls_refused:  # like the gRPC path: a TLS refusal does not heal by waiting
                raise StoreDenied(f"etcd watch failed: TLS handshake with {self.cfg.endpoint_text} failed "
                                  f"(check [etcd] ca_cert, cert, key): {'; '.join(failures)}")
            raise StoreUnavailable(f"etcd watch failed: no member answered ({'; '.join(failures)})")
        try:
            pending: list[dict] = []
            while not pending:
                pending = self._messages()
            created = self._result(pending[0])
            if not created.get("created"):
                raise StoreUnavailable(f"etcd watch failed: unexpected first answer {pending[0]!r:.200}")
            assert self._sock is not None
            self._sock.settimeout(None)  # from now on the reader blocks; cancel() shuts the socket down
        except (OSError, ValueError) as exc:
            self.close()
            raise StoreUnavailable(f"etcd watch failed: {exc}") from None
        except MetaStackError:
            self.close()
            raise
        threading.Thread(target=self._run, args=(pending[1:],), name="etcd-watch", daemon=True).start()

    def _run(self, pending: list[dict]) -> None:
        try:
            while True:
                revision, events = 0, []
                for msg in pending:
                    res = self._result(msg)
                    revision = max(revision, int((res.get("header") or {}).get("revision") or 0))
                    events.extend(self._events(res))
                if events or revision:
                    self.on_events(revision, events)
                pending = self._messages()
        except MetaStackError as exc:
            if not self._cancelled.is_set():
                self.on_error(exc)
        except (OSError, ValueError) as exc:
            if not self._cancelled.is_set():
                self.on_error(StoreUnavailable(f"etcd watch ended: {self._abandoned or exc}"))
        except Exception as exc:  # noqa: BLE001 - a failing handler must not end the watch unnoticed
            log.exception("watch handler failed")
            if not self._cancelled.is_set():
                self.on_error(StoreUnavailable(f"etcd watch handler failed: {exc}"))
        finally:
            self.close()

    def cancel(self) -> None:
        """End the watch; ``on_error`` is not called."""
        self._cancelled.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def abandon(self, why: str) -> None:
        """End the watch as a failure: ``on_error`` gets StoreUnavailable
        saying ``why``."""
        self._abandoned = why
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


# ---------------------------------------------------------------------------
# Cluster view: a watch-fed cache of the whole prefix
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """Parsed cluster state at one moment (the planner's input)."""

    desired: dict[str, Union[DesiredVM, SpecError]]
    actual: dict[str, ActualVM]
    flavours: dict[str, Union[Flavour, SpecError]]
    hosts: dict[str, HostState]
    images: dict[str, Union[Image, SpecError]] = dataclasses.field(default_factory=dict)
    untrusted: dict[str, ActualVM] = dataclasses.field(default_factory=dict)  # claims on no live host lease
    fences: dict[str, FenceRecord] = dataclasses.field(default_factory=dict)
    nodes: dict[str, NodeRecord] = dataclasses.field(default_factory=dict)
    moves: dict[str, MoveRequest] = dataclasses.field(default_factory=dict)
    overflow: dict[str, Spill] = dataclasses.field(default_factory=dict)  # VMs offered to another cell
    interest: Optional["Interest"] = None  # the agent's cell, when its view holds only what its cell needs
    cells: Optional["CellMap"] = None  # with cells (config "cells" > 1): who serves each shard now


def in_cell(snap: Snapshot, node: str) -> bool:
    """Whether ``node`` belongs to the cell the snapshot's view serves (always, with no cells)."""
    host = snap.hosts.get(node)
    return snap.interest is None or (host is not None and host.cell == snap.interest.cell)


def placeable(snap: Snapshot, node: str, host: HostState) -> bool:
    """Whether live ``node`` (its host record ``host``) takes new VMs of the
    snapshot's cell: ready, neither cordoned, draining nor evacuated, and of
    the cell (always, with no cells)."""
    rec = snap.nodes.get(node)
    return host.state == "ready" and not (rec is not None and rec.unschedulable) and in_cell(snap, node)


def places(snap: Snapshot, node: str, vm: str) -> bool:
    """Whether ``node`` is of the cell that places VM ``vm`` now (always,
    with no cells): the cell that serves the VM's shard by ``snap.cells``
    (its own cell's, or the adopting one's when no node of that cell takes
    work), else, without a cell map, the snapshot's own cell. For a VM
    outside the shards the snapshot's view watches (pinned to this node,
    held by it, offered to its cell: CellOverflow), the cell that serves
    the watched shards: only its nodes' use is known here (another cell's
    nodes look empty: their claims are not in this view)."""
    if snap.interest is None:
        return True
    host = snap.hosts.get(node)
    if host is None:
        return False
    if snap.cells is not None:
        shard = Keys.shard(vm)
        if not snap.interest.in_cell(vm) and snap.interest.cell_shards:
            shard = min(snap.interest.cell_shards)  # the watched shards have one serving cell (CellMap.watched_by)
        return host.cell % snap.cells.cells == snap.cells.serving(shard)
    return host.cell == snap.interest.cell


def first_in_cell(snap: Snapshot) -> Optional[str]:
    """The live node first by name among those of the snapshot's cell:
    who does the chores nobody owns (purging bogus claims, finished moves,
    pin hints). None when the cell serves no shard (its nodes take no work:
    the adopting cell's first node does them); when no cell takes work,
    each cell's first node does its own cell's."""
    if (snap.interest is not None and snap.cells is not None and snap.cells.live
            and snap.interest.cell not in snap.cells.live):
        return None
    return min((n for n in snap.hosts if in_cell(snap, n)), default=None)


def split_trusted(snap: Snapshot) -> None:
    """Keep in ``snap.hosts`` only host records attached to a lease, and in
    ``snap.actual`` only claims attached to the very lease the named host's
    record hangs on; the other claims (written by hand, or left by a stale
    tool) move to ``snap.untrusted``. Pure."""
    snap.hosts = {n: h for n, h in snap.hosts.items() if h.lease}
    for vm, claim in list(snap.actual.items()):
        host = snap.hosts.get(claim.host)
        if not claim.lease or host is None or host.lease != claim.lease:
            snap.untrusted[vm] = snap.actual.pop(vm)


def claims_use(hosts: Mapping[str, Entry], actual: Mapping[str, Entry]) -> dict[str, tuple[int, int, int]]:
    """node -> (vcpus, ram_mb, vms) its trusted claims reserve, from raw
    entries as ``list_prefix`` gives them (name -> Entry): the claims
    attached to the very lease the node's host record hangs on. What a
    reader (metastackctl hosts, the web page) shows as a node's use."""
    leases = {name: e.lease for name, e in hosts.items() if e.lease}
    out: dict[str, tuple[int, int, int]] = {}
    for entry in actual.values():
        claim = ActualVM.parse(entry.value)
        if entry.lease and leases.get(claim.host) == entry.lease:
            cpu, ram, vms = out.get(claim.host, (0, 0, 0))
            out[claim.host] = (cpu + claim.vcpus, ram + claim.ram_mb, vms + 1)
    return out


def _stamped(record: Any, **fields: Any) -> Any:
    """Set fields that come from etcd rather than the value (a lease, a
    create revision) on a record just parsed, that nobody else holds yet:
    dataclasses.replace without its cost (it runs on every watch event)."""
    for name, value in fields.items():
        object.__setattr__(record, name, value)
    return record


@dataclasses.dataclass(frozen=True)
class Change:
    """One key as a watch event changed it: ``old`` None when created, ``new`` None when deleted."""

    key: str
    old: Optional[Entry]
    new: Optional[Entry]


@dataclasses.dataclass(frozen=True)
class Vanished:
    """A claim that disappeared: who held it and at which revision."""

    host: str
    revision: int
    at: float  # monotonic time it was seen gone
    lease: int = 0  # the lease the claim hung on


class ClusterView:
    """In-memory copy of every key under the prefix, kept by list + watch.

    Contract: ``load`` replaces the content with a full listing at some
    revision; ``apply`` folds in watch events in order and returns whether
    anything kept changed; ``note`` records the result of our own writes.
    Stale information never overwrites newer: an event or note older than
    what is held for its key, or not newer than the last full listing, is
    dropped. Console tails (kinds in IGNORED_KINDS) are not kept: they
    change every few seconds and the reconcile never reads them. Each key
    is parsed at most once per mod_revision (``_parse``, cached); snapshots
    share the parsed objects. Thread-safe.
    """

    IGNORED_KINDS = ("console",)
    LIGHT_KINDS = ("flavours", "hosts", "images", "fences", "nodes", "moves")  # what light() parses besides VMs

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._events = keys.dir("events")
        self._legacy_side = tuple(f"{keys.all}{kind}/" for kind in keys.SIDE_KINDS)
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._seen: dict[str, int] = {}  # key -> last revision seen (incl. deletes)
        self._parsed: dict[str, tuple[int, Optional[tuple[str, str]], Any]] = {}  # key -> (mod_revision, split, value)
        self.parses = 0  # keys parsed so far (each once per mod_revision)
        self._list_revision = 0
        self.revision = 0
        self.synced = False
        # Memory of departures, for telling one node's death from a
        # correlated loss of leases: vm -> its last claim's holder, and
        # node -> (revision, monotonic time) its host record vanished.
        self.vanished: dict[str, Vanished] = {}
        self.lapsed: dict[str, tuple[int, float]] = {}
        self.lapsed_cells: dict[str, int] = {}  # node -> the cell its last host record named
        self._lapse_folded: dict[str, str] = {}  # host key -> node: a lapse folded in before its watch event
        # The incremental index (see _index): kind -> name -> key; vm -> (host,
        # lease, vcpus, ram_mb) of its claim; (host, lease) -> [vcpus, ram_mb,
        # vms] reserved; desired VMs without any claim.
        self._kinds: dict[str, dict[str, str]] = {}
        self._claims: dict[str, tuple[str, int, int, int]] = {}
        self._by_creation: list[tuple[int, str]] = []  # (desired create revision, vm) of claimed VMs, sorted
        self._creation_of: dict[str, int] = {}  # vm -> its place in _by_creation
        self._use: dict[tuple[str, int], list[int]] = {}
        self._unclaimed: set[str] = set()
        self._light_gens: dict[str, int] = {}  # kind in LIGHT_KINDS -> bumped by every change of one
        self._raw_hosts: dict[str, bytes] = {}  # host key -> the value whose offer light() holds
        self._light_cache: dict[str, tuple[int, dict[str, Any]]] = {}  # kind -> (gen, name -> parsed)
        self._hosts_used: dict[str, tuple[HostState, HostState]] = {}  # name -> (record, with use): _fill_use
        # What snapshot() returns copies of, kept per change: kind -> name ->
        # parsed value, brought up to date for the keys in _dirty (changed
        # since the last snapshot) when the next snapshot is taken.
        self._fields: dict[str, dict[str, Any]] = {}
        self._dirty: dict[str, None] = {}  # an ordered set: snapshots list keys in the order they came
        # With cells: what of the shards this view keeps (None: everything),
        # and the VMs it dropped whose desired entry pins them to ``node``
        # (the agent widens its interest to them: a re-list).
        self.interest: Optional[Interest] = None
        self.node = ""
        self.missed: set[str] = set()

    def _gone(self, key: str, old: Entry, revision: int) -> None:
        split = self.keys.split(key)
        if split is None:
            return
        kind, name = split
        if kind == "actual":
            self.vanished[name] = Vanished(ActualVM.parse(old.value).host, revision, time.monotonic(), old.lease)
        elif kind == "hosts":
            self.lapsed[name] = (revision, time.monotonic())
            with contextlib.suppress(SpecError):
                self.lapsed_cells[name] = HostState.parse(old.value).cell

    def lapsed_in_cells(self, cells: Collection[int], count: int) -> list[str]:
        """The lapsed nodes (still remembered) whose last host record named
        one of ``cells`` (modulo the cell ``count``)."""
        with self._lock:
            return [n for n in self.lapsed if n in self.lapsed_cells and self.lapsed_cells[n] % count in cells]

    def unconfirmed_departures(self) -> dict[str, Vanished]:
        """The desired, unclaimed VMs whose claim vanished while the
        holder's host record still hangs on the very lease the claim did
        and is older than the claim's vanishing: either the holder deleted
        its claim (a release, a hand-over) or the lease expired and the host
        record's deletion has not come yet (with cells it comes on another
        watch than the claim's)."""
        with self._lock:
            out = {}
            few = self._unclaimed if len(self._unclaimed) < len(self.vanished) else self.vanished
            for vm in few:
                gone = self.vanished.get(vm)
                if gone is None or vm not in self._unclaimed or not gone.lease:
                    continue
                host = self._entries.get(self.keys.host(gone.host))
                if host is not None and host.lease == gone.lease and host.mod_revision < gone.revision:
                    out[vm] = gone
            return out

    def departures(self, since: float) -> tuple[dict[str, "Vanished"], dict[str, tuple[int, float]]]:
        """Copies of (vanished claims, lapsed hosts) no older than ``since``
        (monotonic); older memories are dropped."""
        with self._lock:
            self.vanished = {vm: v for vm, v in self.vanished.items() if v.at >= since}
            self.lapsed = {n: p for n, p in self.lapsed.items() if p[1] >= since}
            self.lapsed_cells = {n: c for n, c in self.lapsed_cells.items() if n in self.lapsed}
            return dict(self.vanished), dict(self.lapsed)

    def _kept(self, key: str) -> bool:
        if key.startswith(self._events):  # VM history: written often, never read by the reconcile
            return False
        if key.startswith(self._legacy_side):  # history and consoles where agents before ~/ wrote them
            return False
        split = self.keys.split(key)
        if split is None:
            return True
        if split[0] in self.keys.SHARDED and self.interest is not None:
            return self.interest.keeps(split[1])
        return split[0] not in self.IGNORED_KINDS

    def _peek(self, key: str, value: bytes) -> None:
        """A desired entry this view drops (another cell's VM): note it
        when it pins the VM to this node. Parses only values that name the
        node. Call with the lock held."""
        if not self.node or self.node.encode() not in value:
            return
        split = self.keys.split(key)
        if split is None or split[0] != "desired":
            return
        with contextlib.suppress(SpecError):
            if DesiredVM.parse(split[1], value).host == self.node:
                self.missed.add(split[1])

    def _in_cell(self, vm: str) -> bool:
        return self.interest is None or self.interest.in_cell(vm)

    def _claim_of(self, vm: str) -> Optional[tuple[str, Entry]]:
        """(key, entry) of ``vm``'s claim: in its shard, else in the old
        actual/ folder. Call with the lock held."""
        return self._record_of("actual", vm)

    def _record_of(self, kind: str, vm: str) -> Optional[tuple[str, Entry]]:
        """(key, entry) of ``vm``'s record of a sharded kind: in its shard,
        else in the old folder. Call with the lock held."""
        keys = self.keys
        for key in ((keys.actual(vm), keys.legacy_actual(vm)) if kind == "actual"
                    else (keys.desired(vm), keys.legacy_desired(vm))):
            entry = self._entries.get(key)
            if entry is not None:
                return key, entry
        return None

    def load(self, revision: int, entries: Mapping[str, Entry], interest: Any = "keep") -> None:
        """Replace the content with a full listing at ``revision``; with
        ``interest`` (an Interest, or None: everything), keep that from now
        on (the VMs missed so far are forgotten: the listing has them)."""
        with self._lock:
            if interest != "keep":
                self.interest, self.missed = interest, set()
            for key, old in self._entries.items():
                if key not in entries:  # went while we did not watch: remember who held it
                    self._gone(key, old, revision)
            self._entries = {k: e for k, e in entries.items() if self._kept(k)}
            self._seen = {k: e.mod_revision for k, e in self._entries.items()}
            self._lapse_folded.clear()
            self._parsed = {k: p for k, p in self._parsed.items()
                            if k in self._entries and p[0] == self._entries[k].mod_revision}
            self._list_revision = revision
            self.revision = revision
            self.synced = True
            self._kinds, self._claims, self._use, self._unclaimed = {}, {}, {}, set()
            self._by_creation, self._creation_of = [], {}
            self._light_cache, self._raw_hosts, self._hosts_used = {}, {}, {}
            self._fields, self._dirty = {}, dict.fromkeys(self._entries)  # in the listing's order
            for key, entry in self._entries.items():
                self._index(key, entry)

    # -- incremental index: what a look at new work needs, kept per change --------
    def _index(self, key: str, entry: Optional[Entry]) -> None:
        """Keep the per-kind key index, the use each (host, lease) holds
        and the unclaimed desired VMs in step with one key (None: deleted).
        Call with the lock held."""
        split = self.keys.split(key)
        if split is None:
            return
        kind, name = split
        if kind in self.LIGHT_KINDS and not (kind == "hosts" and self._same_offer(key, entry)):
            self._light_gens[kind] = self._light_gens.get(kind, 0) + 1
        if kind in self.keys.SHARDED:  # a VM's record: from its shard, else from the old folder
            found = self._record_of(kind, name)
            key, entry = found if found is not None else (key, None)
        if entry is None:
            self._kinds.get(kind, {}).pop(name, None)
        else:
            self._kinds.setdefault(kind, {})[name] = key
        if kind == "actual":
            counted = self._in_cell(name)  # claims outside the cell's shards: in the holder's host record
            old = self._claims.pop(name, None)
            if old is not None and counted:
                use = self._use[old[:2]]
                use[0], use[1], use[2] = use[0] - old[2], use[1] - old[3], use[2] - 1
            if entry is not None:
                _, claim = self._cached(key, entry)
                new = (claim.host, entry.lease, claim.vcpus, claim.ram_mb)
                self._claims[name] = new
                if counted:
                    use = self._use.setdefault(new[:2], [0, 0, 0])
                    use[0], use[1], use[2] = use[0] + new[2], use[1] + new[3], use[2] + 1
                self._unclaimed.discard(name)
            elif name in self._kinds.get("desired", {}):
                self._unclaimed.add(name)
            self._order_claim(name)
        elif kind == "desired":
            if entry is None:
                self._unclaimed.discard(name)
            elif name not in self._claims:
                self._unclaimed.add(name)
            self._order_claim(name)

    def _order_claim(self, vm: str) -> None:
        """Keep ``vm``'s place in the claimed VMs' creation order (present
        while it is both desired and claimed). Call with the lock held."""
        key = self._kinds.get("desired", {}).get(vm)
        created = (self._entries[key].create_revision
                   if key is not None and vm in self._claims and self._in_cell(vm) else None)
        was = self._creation_of.get(vm)
        if was == created:
            return
        if was is not None:
            i = bisect.bisect_left(self._by_creation, (was, vm))
            del self._by_creation[i]
            del self._creation_of[vm]
        if created is not None:
            bisect.insort(self._by_creation, (created, vm))
            self._creation_of[vm] = created

    def _same_offer(self, key: str, entry: Optional[Entry]) -> bool:
        """Whether a host record's new value (``entry``) offers what the
        one last parsed for ``key`` offered (only its use changed): light()
        ignores the use a host record states. Call with the lock held."""
        hit = self._parsed.get(key)
        if entry is None or hit is None or not isinstance(hit[2], HostState):
            return False
        if hit[2].lease == entry.lease and key in self._raw_hosts \
                and HostState.same_offer(self._raw_hosts[key], entry.value):
            self._raw_hosts[key] = entry.value
            return True
        self._raw_hosts[key] = entry.value
        _, new = self._cached(key, entry)
        return isinstance(new, HostState) and hit[2].offer() == new.offer()

    def recent_claims(self, pending: Iterable[str],
                      hosts: Mapping[str, HostState]) -> list[tuple[int, str, str, int, int]]:
        """The trusted claims (on their host's lease, per ``hosts``) of VMs
        created after the oldest of ``pending``, as (create revision, vm,
        node, vcpus, ram_mb), for Placement, in creation order. O(pending +
        those claims), without parsing."""
        with self._lock:
            desired = self._kinds.get("desired", {})
            oldest = min(((self._entries[desired[n]].create_revision, n) for n in pending if n in desired),
                         default=None)
            if oldest is None:
                return []
            out = []
            for created, vm in self._by_creation[bisect.bisect_right(self._by_creation, oldest):]:
                host, lease, cpu, ram = self._claims[vm]
                h = hosts.get(host)
                if h is not None and h.lease == lease:
                    out.append((created, vm, host, cpu, ram))
            return out

    def use_of(self, host: str, lease: int) -> tuple[int, int, int]:
        """(vcpus, ram_mb, vms) reserved by the claims naming ``host`` on
        ``lease`` (that node's trusted claims). O(1)."""
        with self._lock:
            use = self._use.get((host, lease))
            return (use[0], use[1], use[2]) if use else (0, 0, 0)

    def holder(self, vm: str) -> Optional[str]:
        """The node named by ``vm``'s claim (trusted or not), None if unclaimed. O(1)."""
        with self._lock:
            claim = self._claims.get(vm)
            return claim[0] if claim is not None else None

    def has_unclaimed(self) -> bool:
        """Whether some desired VM has no claim. O(1)."""
        return bool(self._unclaimed)

    def unclaimed(self) -> set[str]:
        """Desired VMs that have no claim at all (a copy). O(unclaimed)."""
        with self._lock:
            return set(self._unclaimed)

    def light(self) -> tuple[Snapshot, dict[str, tuple[int, int]]]:
        """What Placement needs to look at new work, without the cost of a
        full snapshot: a Snapshot whose ``desired`` holds only the
        unclaimed VMs and whose ``actual`` is empty (hosts, nodes, fences,
        moves, flavours and images as usual, live hosts only), and the
        vcpus and RAM the trusted claims of each live host reserve.
        O(unclaimed + hosts + flavours + images)."""
        snap = Snapshot({}, {}, {}, {})
        with self._lock:
            for kind in self.LIGHT_KINDS:
                gen = self._light_gens.get(kind, 0)
                hit = self._light_cache.get(kind)
                if hit is None or hit[0] != gen:
                    field: dict[str, Any] = {}
                    for name, key in self._kinds.get(kind, {}).items():
                        _, value = self._cached(key, self._entries[key])
                        if value is not None and (kind != "hosts" or value.lease):
                            field[name] = value
                    hit = self._light_cache[kind] = (gen, field)
                setattr(snap, kind, dict(hit[1]))
            for name in self._unclaimed:
                key = self._kinds["desired"][name]
                _, value = self._cached(key, self._entries[key])
                if value is not None:
                    snap.desired[name] = value
            use = {}
            for n, h in snap.hosts.items():
                u = self._use.get((n, h.lease))
                use[n] = (u[0], u[1]) if u else (0, 0)
                if self.interest is not None:  # what its claims outside its cell's shards reserve
                    use[n] = (use[n][0] + h.foreign[0], use[n][1] + h.foreign[1])
        snap.interest = self.interest
        return snap, use

    def _note(self, key: str, value: Optional[bytes], revision: int, lease: int, created: int = 0) -> bool:
        # A revision already seen is no change: the watch's echo of this
        # agent's own write, which note() folded in when the write succeeded.
        if revision <= self._list_revision or revision <= self._seen.get(key, 0):
            return False
        if not self._kept(key):
            if value is not None and self.interest is not None:
                self._peek(key, value)
            return False
        self._seen[key] = revision
        self._dirty[key] = None
        if value is None:
            old = self._entries.pop(key, None)
            if old is not None:
                self._gone(key, old, revision)
            elif key in self._lapse_folded:  # the watch brings a lapse folded in before (Agent._confirm_departures)
                name = self._lapse_folded.pop(key)
                if name in self.lapsed:
                    self.lapsed[name] = (revision, self.lapsed[name][1])
            self._parsed.pop(key, None)
            self._index(key, None)
        else:
            self._lapse_folded.pop(key, None)
            old = self._entries.get(key)
            created = created or (old.create_revision if old is not None else revision)
            self._entries[key] = Entry(value, revision, lease, created)
            self._index(key, self._entries[key])
        return True

    def apply(self, header_revision: int, events: Iterable[KeyEvent]) -> bool:
        """Fold in watch events; True when a kept key changed (the caller
        wakes its reconcile only then)."""
        return bool(self.changes(header_revision, events))

    def changes(self, header_revision: int, events: Iterable[KeyEvent]) -> list[Change]:
        """Fold in watch events like ``apply``; returns what changed, one
        Change per kept key event that was newer than what was held."""
        out = []
        with self._lock:
            for ev in events:
                old = self._entries.get(ev.key)
                if self._note(ev.key, ev.value, ev.mod_revision, ev.lease, ev.create_revision):
                    out.append(Change(ev.key, old, self._entries.get(ev.key)))
            self.revision = max(self.revision, header_revision)
        return out

    def fold_lapse(self, node: str, revision: int) -> None:
        """Fold in the deletion of ``node``'s host record at ``revision``,
        known before the watch brings it (a lease found expired, at the
        revision of the last of its claims seen to vanish); when the watch
        brings it, at its own revision, the lapse is dated by that one."""
        key = self.keys.host(node)
        with self._lock:
            if self._note(key, None, revision, 0):
                self._lapse_folded[key] = node

    def note(self, key: str, value: Optional[bytes], revision: int, lease: int = 0) -> None:
        """Fold in what this client wrote (``revision`` from the write's
        answer), so that its readers see it at once; the watch's echo of
        the same write then changes nothing (no Change, no wake-up)."""
        with self._lock:
            self._note(key, value, revision, lease)

    def entry(self, key: str) -> Optional[Entry]:
        with self._lock:
            return self._entries.get(key)

    def parsed_claim(self, vm: str) -> tuple[str, Optional[Entry], Optional["ActualVM"]]:
        """``claim(vm)`` and its parsed value (parsed once per revision, shared: do not change it)."""
        with self._lock:
            found = self._claim_of(vm)
            if found is None:
                return self.keys.actual(vm), None, None
            value = self._cached(found[0], found[1])[1]
        return found[0], found[1], value if isinstance(value, ActualVM) else ActualVM.parse(found[1].value)

    def record(self, kind: str, vm: str) -> Optional[Entry]:
        """``vm``'s record of a sharded kind (desired, actual) as held: its shard's, else the old folder's."""
        with self._lock:
            found = self._record_of(kind, vm)
        return found[1] if found is not None else None

    def claim(self, vm: str) -> tuple[str, Optional[Entry]]:
        """(key, entry) of ``vm``'s claim as held: in its shard, else in the
        old actual/ folder; (its shard's key, None) when there is none."""
        with self._lock:
            found = self._claim_of(vm)
        return found if found is not None else (self.keys.actual(vm), None)

    def names_of(self, kind: str) -> list[str]:
        """The names of every kept record of one kind, parsed or not. O(records of the kind)."""
        with self._lock:
            return list(self._kinds.get(kind, {}))

    def entries_under(self, prefix: str) -> dict[str, Entry]:
        """key -> entry of every kept key below ``prefix``."""
        with self._lock:
            return {k: e for k, e in self._entries.items() if k.startswith(prefix)}

    def entries_of(self, kind: str) -> dict[str, Entry]:
        """name -> raw entry of every kept key of one kind (desired,
        actual, hosts, ...), as ``list_prefix`` would give them; for
        readers that format records the way metastackctl does."""
        with self._lock:
            if kind in self.keys.SHARDED:
                names = self._claims if kind == "actual" else self._kinds.get("desired", {})
                return {vm: found[1] for vm in names if (found := self._record_of(kind, vm)) is not None}
            prefix = self.keys.dir(kind)
            return {key[len(prefix):]: e for key, e in self._entries.items()
                    if key.startswith(prefix) and "/" not in key[len(prefix):]}

    def _parse(self, kind: str, name: str, entry: Entry) -> Any:
        """The one place each kind of record is parsed. Returns what the
        snapshot holds for the key in its field named ``kind`` (a SpecError
        for a malformed desired, flavour or image record), or None to leave
        the key out (a malformed host record, a kind the snapshot does not
        hold). To add a kind: a Snapshot field of that name, a branch here."""
        try:
            if kind == "desired":
                return _stamped(DesiredVM.parse(name, entry.value), generation=entry.create_revision)
            if kind == "actual":
                return _stamped(ActualVM.parse(entry.value), lease=entry.lease)
            if kind == "flavours":
                return Flavour.parse(name, entry.value)
            if kind == "hosts":
                return _stamped(HostState.parse(entry.value), lease=entry.lease)
            if kind == "fences":
                return FenceRecord.parse(name, entry.value)
            if kind == "nodes":
                return NodeRecord.parse(name, entry.value)
            if kind == "moves":
                return MoveRequest.parse(name, entry.value)
            if kind == "overflow":
                return Spill.parse(name, entry.value)
            if kind == "images":
                return Image.parse(name, entry.value)
            return None
        except SpecError as exc:
            return None if kind in ("hosts", "fences", "nodes", "moves", "overflow") else exc
        except Exception as exc:  # a parser bug must stay this key's problem, not stop every tick
            log.exception("%s %r: cannot parse its value", kind, name)
            why = f"cannot parse the {kind} record ({type(exc).__name__})"
            if kind == "actual":
                return ActualVM(host="", state="error", reason=why)
            return None if kind in ("hosts", "fences", "nodes", "moves", "overflow") else SpecError(why)

    def _cached(self, key: str, entry: Entry) -> tuple[Optional[tuple[str, str]], Any]:
        """(kind and name, parsed value) of one key; parses only when the key
        changed since it was last parsed. Call with the lock held."""
        hit = self._parsed.get(key)
        if hit is not None and hit[0] == entry.mod_revision:
            return hit[1], hit[2]
        split = self.keys.split(key)
        value = None if split is None else self._parse(split[0], split[1], entry)
        self._parsed[key] = (entry.mod_revision, split, value)
        self.parses += 1
        return split, value

    def snapshot(self) -> Snapshot:
        """The parsed cluster state now. Cheap after the first call: only
        keys changed since the last snapshot are looked at (and parsed, if
        no reader parsed them yet); the rest is copies of dicts kept from
        snapshot to snapshot (O(changes) in Python, plus the copies)."""
        snap = Snapshot({}, {}, {}, {})
        with self._lock:
            parses = self.parses
            for key in self._dirty:
                split = self.keys.split(key)
                if split is None:
                    continue
                if split[0] in self.keys.SHARDED:  # the record that counts: its shard's, else the old folder's
                    found = self._record_of(split[0], split[1])
                    key, entry = found if found is not None else (key, None)
                else:
                    entry = self._entries.get(key)
                value = None if entry is None else self._cached(key, entry)[1]
                field = self._fields.setdefault(split[0], {})
                if value is None:
                    field.pop(split[1], None)
                else:
                    field[split[1]] = value
            self._dirty = {}
            for kind, field in self._fields.items():
                setattr(snap, kind, dict(field))
            keys, parses = len(self._entries), self.parses - parses
            use = {held: (u[0], u[1], u[2]) for held, u in self._use.items()}
        log.debug("view snapshot at revision %d: %d key(s), %d parsed", self.revision, keys, parses)
        snap.interest = self.interest
        split_trusted(snap)
        self._fill_use(snap, use)
        conf = self.entry(self.keys.config)
        if conf is not None:
            with contextlib.suppress(SpecError):
                cells = ClusterConfig.parse(conf.value).cells
                snap.cells = CellMap.of(cells, snap.hosts, snap.nodes) if cells > 1 else None
        return snap

    def _fill_use(self, snap: Snapshot, use: Mapping[tuple[str, int], tuple[int, int, int]]) -> None:
        """Give each live host of ``snap`` the use (vcpus_used, ram_mb_used,
        vms) of its trusted claims, from the index's ``use`` ((host, lease)
        -> use, taken with the snapshot). A host whose record and use did
        not change since the last snapshot is the same object as then."""
        for name, host in snap.hosts.items():
            held = use.get((name, host.lease), (0, 0, 0))
            if self.interest is not None and any(host.foreign):  # plus its claims outside its cell's shards
                held = tuple(a + b for a, b in zip(held, host.foreign))  # type: ignore[assignment]
            if held == (host.vcpus_used, host.ram_mb_used, host.vms):
                continue
            was = self._hosts_used.get(name)
            if was is not None and was[0] is host and (was[1].vcpus_used, was[1].ram_mb_used, was[1].vms) == held:
                snap.hosts[name] = was[1]
                continue
            snap.hosts[name] = host.with_use(*held)
            self._hosts_used[name] = (host, snap.hosts[name])

    def foreign_use(self, node: str, lease: int) -> tuple[int, int, int]:
        """(vcpus, ram_mb, vms) of ``node``'s claims on ``lease`` of VMs
        outside the cell's shards (what its host record states as
        "foreign"). O(claims held)."""
        with self._lock:
            held = [c for vm, c in self._claims.items()
                    if c[0] == node and c[1] == lease and not self._in_cell(vm)]
        return sum(c[2] for c in held), sum(c[3] for c in held), len(held)

    def usage(self, node: str, lease: int) -> tuple[int, int, int]:
        """(vcpus, ram_mb, vms) reserved by the claims ``node`` holds on
        ``lease`` (its trusted claims), without building a snapshot."""
        return self.use_of(node, lease)


# ---------------------------------------------------------------------------
# Storage: every rados/rbd call lives here
# ---------------------------------------------------------------------------


def read_keyring_key(path: str, client: str) -> str:
    """The base64 cephx key of ``client.<client>`` in a keyring file."""
    cp = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as fh:
            cp.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise StorageError(f"cannot read keyring {path}: {exc}") from None
    key = cp.get(f"client.{client}", "key", fallback="").strip()
    if not key:
        raise StorageError(f"keyring {path} holds no key for client.{client}")
    return key


def parse_mon_hosts(mon_host: str) -> list[tuple[str, int]]:
    """Monitor addresses from a ``mon_host`` value, v1 (legacy) ones first
    when both are given: ``[v2:127.0.0.1:3300/0,v1:127.0.0.1:6789/0]``."""
    v1, v2, plain = [], [], []
    for item in re.split(r"[,\s]+", mon_host.replace("[", " ").replace("]", " ")):
        m = re.match(r"^(?:(v[12]):)?([^:/]+):(\d+)(?:/\d+)?$", item.strip())
        if not m:
            if item.strip() and re.match(r"^[\w.-]+$", item.strip()):
                plain.append((item.strip(), 6789))
            continue
        (v1 if m.group(1) == "v1" else v2 if m.group(1) == "v2" else plain).append((m.group(2), int(m.group(3))))
    return v1 or plain or v2


def watcher_ip(addr: str) -> str:
    """The IP of a Ceph client address like ``10.0.0.5:0/3047`` or
    ``v2:[::1]:0/12``; "" when it cannot be read."""
    m = re.match(r"^(?:v[12]:)?\[?([0-9A-Fa-f.:]+?)\]?:\d+/\d+$", addr.strip())
    return m.group(1) if m else ""


class Storage:
    """The only class that calls rados/rbd (Ceph's own Python bindings).

    Contract: every rados/rbd handle is owned by a context manager; every
    library error is raised as StorageError (StorageBusy when an image is
    still open by a client); operations are idempotent: creating what exists
    or removing what is gone is success. One cluster connection per Storage,
    re-opened after a failure.
    """

    OP_TIMEOUT = 15.0  # default seconds for any mon/osd operation: never hang the caller

    def __init__(self, cfg: CephConfig, op_timeout: Optional[float] = None) -> None:
        """``op_timeout`` bounds every monitor and OSD operation (and the
        connect): the agent passes less than its watchdog delay, so a sick
        Ceph makes an operation fail, not the main loop stall."""
        self.op_timeout = op_timeout or self.OP_TIMEOUT
        try:
            import rados  # Debian's python3-rados: imported here, not at module import
            import rbd
        except ImportError as exc:
            raise StorageError(f"Ceph's Python bindings are missing ({exc}): install python3-rados and "
                               f"python3-rbd and use a venv made with --system-site-packages") from None
        self._rados, self._rbd = rados, rbd
        self.cfg = cfg
        self._cluster: Any = None
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------
    def _connect(self) -> Any:
        with self._lock:
            if self._cluster is None:
                secs = str(max(1, int(self.op_timeout)))  # Ceph takes whole seconds here
                conf = {"rados_osd_op_timeout": secs, "rados_mon_op_timeout": secs}
                if self.cfg.keyring:
                    conf["keyring"] = self.cfg.keyring
                try:
                    cluster = self._rados.Rados(conffile=self.cfg.conf, name=f"client.{self.cfg.client}", conf=conf)
                    cluster.connect(timeout=self.op_timeout)
                except self._rados.Error as exc:
                    raise StorageError(f"cannot connect to Ceph ({self.cfg.conf}, client.{self.cfg.client}): {exc}") from None
                self._cluster = cluster
            return self._cluster

    def close(self) -> None:
        with self._lock:
            if self._cluster is not None:
                try:
                    self._cluster.shutdown()
                except self._rados.Error:
                    pass
                self._cluster = None

    @contextlib.contextmanager
    def _pool(self, pool: str) -> Iterator[Any]:
        cluster = self._connect()
        try:
            ioctx = cluster.open_ioctx(pool)
        except self._rados.ObjectNotFound:
            raise StorageError(f"Ceph pool {pool!r} does not exist") from None
        except self._rados.Error as exc:
            self.close()
            raise StorageError(f"cannot open Ceph pool {pool!r}: {exc}") from None
        try:
            yield ioctx
        except (self._rados.Error, self._rbd.Error) as exc:
            if isinstance(exc, self._rbd.ImageBusy):
                raise StorageBusy(f"RBD image in pool {pool!r} is in use: {exc}") from None
            if isinstance(exc, (self._rados.ConnectionShutdown, self._rados.TimedOut)):
                self.close()
            if isinstance(exc, self._rados.ConnectionShutdown) or getattr(exc, "errno", None) == 108:
                raise StorageFenced(f"Ceph refused this node's client in pool {pool!r} "
                                    f"(blocklisted: fenced): {exc}") from None
            raise StorageError(f"Ceph operation in pool {pool!r} failed: {exc}") from None
        finally:
            ioctx.close()

    @contextlib.contextmanager
    def _image(self, ioctx: Any, name: str, snapshot: Optional[str] = None,
               read_only: bool = False) -> Iterator[Any]:
        img = self._rbd.Image(ioctx, name, snapshot=snapshot, read_only=read_only)
        try:
            yield img
        finally:
            img.close()

    def pool_exists(self, pool: str) -> bool:
        try:
            return bool(self._connect().pool_exists(pool))
        except self._rados.Error as exc:
            raise StorageError(f"cannot check Ceph pool {pool!r}: {exc}") from None

    def mon_hosts(self) -> list[tuple[str, int]]:
        """Monitor addresses as QEMU's librbd should be given them."""
        try:
            return parse_mon_hosts(self._connect().conf_get("mon_host") or "")
        except self._rados.Error as exc:
            raise StorageError(f"cannot read mon_host: {exc}") from None

    def fsid(self) -> str:
        try:
            return str(self._connect().get_fsid())
        except self._rados.Error as exc:
            raise StorageError(f"cannot read the cluster fsid: {exc}") from None

    def key(self) -> str:
        """This client's base64 cephx key (for the libvirt secret)."""
        if self.cfg.keyring:
            return read_keyring_key(self.cfg.keyring, self.cfg.client)
        try:
            ret, out, err = self._connect().mon_command(
                json.dumps({"prefix": "auth get-key", "entity": f"client.{self.cfg.client}", "format": "json"}), b"")
        except self._rados.Error as exc:
            raise StorageError(f"cannot read the cephx key: {exc}") from None
        if ret != 0:
            raise StorageError(f"cannot read the cephx key: {err}")
        return json.loads(out)["key"]

    # -- VM disks --------------------------------------------------------------
    def ensure_disk(self, pool: str, disk: str, base: "Image") -> bool:
        """Clone ``disk`` from the base image's protected snapshot unless it
        exists (copy-on-write, no data copied). True if it was created."""
        with self._pool(base.pool) as parent, self._pool(pool) as ioctx:
            if disk in self._rbd.RBD().list(ioctx):
                return False
            features = self._rbd.RBD_FEATURE_LAYERING | self._rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            try:
                self._rbd.RBD().clone(parent, base.image, base.snapshot, ioctx, disk, features=features)
            except self._rbd.ImageExists:
                return False
            except self._rbd.ImageNotFound:
                raise StorageError(f"base image {base.pool}/{base.image}@{base.snapshot} does not exist") from None
            return True

    def disk_exists(self, pool: str, disk: str) -> bool:
        with self._pool(pool) as ioctx:
            return disk in self._rbd.RBD().list(ioctx)

    def vm_disks(self, pool: str) -> list[str]:
        """Names of the VM disks (``vm-*``) in ``pool``."""
        with self._pool(pool) as ioctx:
            return [n for n in self._rbd.RBD().list(ioctx) if n.startswith("vm-")]

    def in_use(self, pool: str, disk: str) -> bool:
        """True while some client (a QEMU) has the image open. Opened
        read-only, so this check does not count itself as a watcher."""
        with self._pool(pool) as ioctx:
            try:
                with self._image(ioctx, disk, read_only=True) as img:
                    return bool(list(img.watchers_list()))
            except self._rbd.ImageNotFound:
                return False

    def fence_disk(self, pool: str, disk: str) -> list[str]:
        """Cut off every client that has ``disk`` open, before a new QEMU
        boots it: each watcher of the image (a QEMU left on a dead or cut-off
        node, whether or not it holds the lock right now) is blocklisted, so
        its writes fail from then on, and every exclusive lock is broken
        (which blocklists its owner too). Callers run this only when no
        domain of theirs has the disk open. Returns the clients fenced."""
        fenced: list[str] = []
        with self._pool(pool) as ioctx:
            try:
                with self._image(ioctx, disk, read_only=True) as img:  # read-only: not a watcher itself
                    watchers = [str(w["addr"]) for w in img.watchers_list()]
                for addr in watchers:
                    self._blocklist(addr)
                    fenced.append(addr)
                with self._image(ioctx, disk) as img:
                    owners = list(img.lock_get_owners())
                    for owner in owners:
                        img.lock_break(owner["mode"], owner["owner"])
                        fenced.append(str(owner["owner"]))
            except self._rbd.ImageNotFound:
                return []
        return fenced

    def _blocklist(self, addr: str) -> None:
        self._mon("osd blocklist", f"blocklist {addr}", blocklistop="add", addr=addr)

    def _mon(self, prefix: str, what: str, **args: Any) -> str:
        """One monitor command; StorageError (with the monitor's words) on
        failure, PermissionError-like refusals included."""
        try:
            ret, out, err = self._connect().mon_command(json.dumps({"prefix": prefix, **args}), b"")
        except self._rados.Error as exc:
            raise StorageError(f"cannot {what}: {exc}") from None
        if ret != 0:
            raise StorageError(f"cannot {what}: {err or os.strerror(-ret)}")
        return out.decode(errors="replace") if isinstance(out, bytes) else str(out)

    def watchers(self, pool: str, disk: str) -> list[str]:
        """Addresses of the clients that have ``disk`` open right now."""
        with self._pool(pool) as ioctx:
            try:
                with self._image(ioctx, disk, read_only=True) as img:
                    return [str(w["addr"]) for w in img.watchers_list()]
            except self._rbd.ImageNotFound:
                return []

    def blocklist_range(self, ip: str, expire: float) -> None:
        """Blocklist every client from ``ip`` (node-level fence) for
        ``expire`` seconds; adding an entry that exists is success."""
        cidr = f"{ip}/{128 if ':' in ip else 32}"
        self._mon("osd blocklist", f"blocklist {cidr}", range="range", blocklistop="add", addr=cidr,
                  expire=float(expire))

    def unblocklist_range(self, ip: str) -> None:
        """Lift a node-level fence; needs more than ``profile rbd``."""
        cidr = f"{ip}/{128 if ':' in ip else 32}"
        self._mon("osd blocklist", f"lift the blocklist of {cidr}", range="range", blocklistop="rm", addr=cidr)

    def remove_disk(self, pool: str, disk: str) -> None:
        """Remove a VM disk; gone already is success; StorageBusy while a
        client (a QEMU) still has it open."""
        with self._pool(pool) as ioctx:
            try:
                self._rbd.RBD().remove(ioctx, disk)
            except self._rbd.ImageNotFound:
                pass

    def fetch_object(self, pool: str, obj: str, dest: str) -> None:
        """Copy a RADOS object to a local file, atomically (kernel, initrd)."""
        tmp = f"{dest}.part{os.getpid()}"
        try:
            with self._pool(pool) as ioctx:
                try:
                    size, _ = ioctx.stat(obj)
                except self._rados.ObjectNotFound:
                    raise StorageError(f"RADOS object {pool}/{obj} does not exist") from None
                with open(tmp, "wb") as fh:
                    offset, chunk = 0, 4 << 20
                    while offset < size:
                        data = ioctx.read(obj, min(chunk, size - offset), offset)
                        if not data:
                            break
                        fh.write(data)
                        offset += len(data)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # -- base images (used by metastackctl image ...) --------------------------
    def import_base(self, pool: str, image: str, snapshot: str, src: BinaryIO, size: int,
                    progress: Optional[Callable[[int], None]] = None) -> None:
        """Create ``pool/image`` of ``size`` bytes from ``src``, snapshot it as
        ``snapshot`` and protect the snapshot (clones need that). On any
        failure nothing is left behind."""
        with self._pool(pool) as ioctx:
            try:
                self._rbd.RBD().create(ioctx, image, size, old_format=False,
                                       features=self._rbd.RBD_FEATURE_LAYERING)
            except self._rbd.ImageExists:
                raise StorageError(f"RBD image {pool}/{image} already exists") from None
            try:
                with self._image(ioctx, image) as img:
                    offset, chunk = 0, 4 << 20
                    while True:
                        data = src.read(chunk)
                        if not data:
                            break
                        if data.count(0) != len(data):  # keep the image sparse
                            img.write(data, offset)
                        offset += len(data)
                        if progress:
                            progress(offset)
                    img.flush()
                    img.create_snap(snapshot)
                    img.protect_snap(snapshot)
            except BaseException:
                self._remove_base(ioctx, image, snapshot)
                raise

    def put_object(self, pool: str, obj: str, path: str) -> None:
        """Store a local file as one RADOS object (kernel or initrd)."""
        with self._pool(pool) as ioctx, open(path, "rb") as fh:
            ioctx.write_full(obj, fh.read())

    def remove_object(self, pool: str, obj: str) -> None:
        with self._pool(pool) as ioctx:
            try:
                ioctx.remove_object(obj)
            except self._rados.ObjectNotFound:
                pass

    def base_children(self, pool: str, image: str, snapshot: str) -> list[str]:
        """Clones of a base image's snapshot (VM disks that depend on it)."""
        with self._pool(pool) as ioctx:
            try:
                with self._image(ioctx, image, snapshot=snapshot, read_only=True) as img:
                    return [f"{p}/{c}" for p, c in img.list_children()]
            except self._rbd.ImageNotFound:
                return []

    def remove_base(self, pool: str, image: str, snapshot: str) -> None:
        """Unprotect and remove the snapshot, then the image; idempotent."""
        with self._pool(pool) as ioctx:
            self._remove_base(ioctx, image, snapshot)

    def _remove_base(self, ioctx: Any, image: str, snapshot: str) -> None:
        try:
            with self._image(ioctx, image) as img:
                for snap in list(img.list_snaps()):
                    if snap["name"] == snapshot:
                        if img.is_protected_snap(snapshot):
                            img.unprotect_snap(snapshot)
                        img.remove_snap(snapshot)
            self._rbd.RBD().remove(ioctx, image)
        except self._rbd.ImageNotFound:
            pass


# ---------------------------------------------------------------------------
# Hypervisor: every libvirt call lives here
# ---------------------------------------------------------------------------

XMLNS = "https://metastack.dev/xmlns/domain/1"


@dataclasses.dataclass(frozen=True)
class RBDDisk:
    """A VM disk in RBD, reached by QEMU's librbd with a cephx secret."""

    pool: str
    name: str
    hosts: tuple[tuple[str, int], ...]
    user: str
    secret_uuid: str


@dataclasses.dataclass(frozen=True)
class DirectBoot:
    """Direct kernel boot: local paths of the kernel and initrd, and the command line."""

    kernel: str
    initrd: str
    cmdline: str


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """Everything the domain document says about one VM on one node."""

    vm: str
    node: str
    domain_type: str
    vcpus: int
    ram_mb: int
    flavour: str
    image: Optional[str] = None
    disk: Optional[RBDDisk] = None
    boot: Optional[DirectBoot] = None
    console: Optional[str] = None  # file that receives the serial console


def domain_name(vm: str, node: str) -> str:
    """libvirt name of ``vm``'s domain on ``node``. The node is part of it so
    agents sharing one libvirtd (the demo) never collide, even mid-move."""
    return f"{vm}.{node}"


def build_domain_xml(spec: DomainSpec, uuid: Optional[str] = None) -> str:
    """The libvirt domain document (ElementTree, never text templates). It
    carries a <metastack:instance> metadata element naming the owning node
    and the VM: the agent only ever touches domains so tagged. The cephx key
    never appears here, only the uuid of the libvirt secret holding it."""
    ET.register_namespace("metastack", XMLNS)
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = domain_name(spec.vm, spec.node)
    if uuid is not None:  # re-defining an existing domain keeps its identity
        ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.ram_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{XMLNS}}}instance")
    ET.SubElement(meta, f"{{{XMLNS}}}node").text = spec.node
    ET.SubElement(meta, f"{{{XMLNS}}}vm").text = spec.vm
    ET.SubElement(meta, f"{{{XMLNS}}}flavour").text = spec.flavour
    if spec.image:
        ET.SubElement(meta, f"{{{XMLNS}}}image").text = spec.image
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    if spec.boot is not None:
        ET.SubElement(os_el, "kernel").text = spec.boot.kernel
        ET.SubElement(os_el, "initrd").text = spec.boot.initrd
        ET.SubElement(os_el, "cmdline").text = spec.boot.cmdline
    elif spec.disk is not None:
        ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if spec.disk is not None:
        d = spec.disk
        disk = ET.SubElement(devices, "disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none")
        auth = ET.SubElement(disk, "auth", username=d.user)
        ET.SubElement(auth, "secret", type="ceph", uuid=d.secret_uuid)
        source = ET.SubElement(disk, "source", protocol="rbd", name=f"{d.pool}/{d.name}")
        for host, port in d.hosts:
            ET.SubElement(source, "host", name=host, port=str(port))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if spec.console is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=spec.console)
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="file")
        ET.SubElement(console, "source", path=spec.console)
        ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def owner_of(metadata_xml: str) -> Optional[tuple[str, str]]:
    """(node, vm) named in a <metastack:instance> metadata element, if any."""
    try:
        root = ET.fromstring(metadata_xml)
    except ET.ParseError:
        return None

    def text(tag: str) -> Optional[str]:
        el = root.find(tag)
        if el is None:
            el = root.find(f"{{{XMLNS}}}{tag}")
        return el.text if el is not None else None
    node, vm = text("node"), text("vm")
    return (node, vm) if node and vm else None


_EVENT_LOOP_LOCK = threading.Lock()
_EVENT_LOOP_STARTED = False


def start_libvirt_event_loop(libvirt: Any) -> None:
    """Register libvirt's default event loop and run it in a daemon thread,
    once per process; must happen before a connection is opened."""
    global _EVENT_LOOP_STARTED
    with _EVENT_LOOP_LOCK:
        if _EVENT_LOOP_STARTED:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _EVENT_LOOP_STARTED = True


# A 512-byte boot sector that writes "KVMOK" to the first serial port and
# halts: real guest code, the smallest thing that proves KVM can run a guest.
#   xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,msg
#   next: lodsb; test al,al; jz done; out dx,al; jmp next;  done: cli; hlt
_PROBE_CODE = bytes.fromhex("31c08ed8fc" "baf803" "be157c" "ac" "84c0" "7403" "ee" "ebf8" "fa" "f4") + b"KVMOK\n\0"
PROBE_SECTOR = _PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa"


def find_probe_kernel() -> Optional[str]:
    """The newest Linux kernel image in /boot, if any (for the KVM probe)."""
    import glob
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    return kernels[-1] if kernels else None


def probe_kvm(kernel: Optional[str] = None, emulator: str = "qemu-system-x86_64",
              timeout: float = 10.0) -> tuple[bool, str]:
    """Does KVM really run guests here? Capabilities that advertise kvm are
    not trusted: a guest is booted under ``-accel kvm`` and its serial output
    checked. With a Linux ``kernel`` (default: the newest in /boot) the guest
    must reach the kernel's first log line, which needs 64-bit long mode with
    paging (seen here: a KVM that runs real-mode code but hangs the kernel's
    decompressor); without one, PROBE_SECTOR only proves real-mode code runs.
    Returns (works, why)."""
    import shutil
    import subprocess
    import tempfile
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm is missing"
    exe = shutil.which(emulator)
    if exe is None:
        return False, f"{emulator} is not installed"
    kernel = kernel or find_probe_kernel()
    with tempfile.TemporaryDirectory(prefix="metastack-kvm-probe-") as tmp:
        out = os.path.join(tmp, "serial.txt")
        args = [exe, "-accel", "kvm", "-machine", "pc", "-m", "96", "-display", "none",
                "-nodefaults", "-no-reboot", "-serial", f"file:{out}"]
        if kernel is not None:
            args += ["-kernel", kernel, "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
            expect, what = b"Linux version", f"kernel {kernel}"
        else:
            img = os.path.join(tmp, "boot.img")
            with open(img, "wb") as fh:
                fh.write(PROBE_SECTOR.ljust(1474560, b"\0"))
            args += ["-drive", f"file={img},format=raw,if=floppy"]
            expect, what = b"KVMOK", "a boot sector (no kernel in /boot: real mode only)"
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if os.path.exists(out):
                    with open(out, "rb") as fh:
                        if expect in fh.read():
                            return True, f"{what} ran under KVM"
                time.sleep(0.05)
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read().decode(errors="replace").strip()
                if err:
                    return False, f"{what} failed under KVM: {err.splitlines()[-1]}"
            return False, f"{what} did not get going under KVM within {timeout:.0f}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class Hypervisor:
    """The only class that calls libvirt; one connection per agent.

    Contract: it lists and acts only on domains whose MetaStack metadata
    names ``node``, and keys them by VM name; every libvirt failure is raised
    as HypervisorError; a domain already gone counts as destroyed
    (idempotent). ``on_event(vm, what)`` is called from libvirt's event
    thread for lifecycle events of our domains (started, stopped, crashed..),
    except the "defined", "started" and "resumed" that this object's own
    define and start of the domain cause, within OWN_EVENTS_S of the call
    (the agent that started it knows; they would only wake another
    reconcile).
    """

    OWN_EVENTS_S = 10.0  # how long after our own define/start its events are taken as ours

    KEEPALIVE = (1, 2)  # seconds between pings, unanswered pings before the connection is dropped
    EVENTS = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed",
              5: "stopped", 6: "shut down", 7: "pm-suspended", 8: "crashed"}
    STOP_DETAILS = {0: "guest shutdown", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                    5: "failed", 6: "restored from snapshot"}
    # virDomainState SHUTOFF's reasons (virDomainShutoffReason), worded as STOP_DETAILS
    SHUTOFF_REASONS = {1: "guest shutdown", 2: "destroyed", 3: "crashed", 4: "migrated", 5: "saved",
                       6: "failed", 7: "restored from snapshot", 8: "gone while libvirtd was down"}

    def __init__(self, uri: str, node: str, domain_type: str,
                 on_event: Optional[Callable[[str, str], None]] = None) -> None:
        import libvirt  # imported here: importing metastack has no side effects
        self._lv = libvirt
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
        self.node = node
        self.domain_type = domain_type
        self.last_event: dict[str, str] = {}
        self._on_event = on_event
        self._uri = uri
        if on_event is not None:
            start_libvirt_event_loop(libvirt)
        self._owner_cache: dict[bytes, Optional[tuple[str, str]]] = {}
        # vm -> (events our own define/start of it causes, still to come; until when)
        self._own_events: dict[str, tuple[set[str], float]] = {}
        self._own_lock = threading.Lock()
        self._conn = self._open()

    def _expect_own(self, vm: str, events: Iterable[str]) -> None:
        """Our next define/start of ``vm`` causes ``events`` (any thread)."""
        with self._own_lock:
            self._own_events[vm] = (set(events), time.monotonic() + self.OWN_EVENTS_S)

    def _is_own(self, vm: str, what: str) -> bool:
        """Whether lifecycle event ``what`` of ``vm`` is one our own define
        or start caused (each expected event is taken once)."""
        with self._own_lock:
            hit = self._own_events.get(vm)
            if hit is None:
                return False
            if hit[1] < time.monotonic():
                del self._own_events[vm]
                return False
            if what not in hit[0]:
                return False
            hit[0].discard(what)
            if not hit[0]:
                del self._own_events[vm]
            return True

    def _open(self) -> Any:
        try:
            conn = self._lv.open(self._uri)
            if self._on_event is not None:
                conn.domainEventRegisterAny(None, self._lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
                # Bound every call: a libvirtd that stops answering closes the
                # connection after about KEEPALIVE[0] * (KEEPALIVE[1] + 1) s, and
                # the call fails instead of hanging (needs the event loop).
                with contextlib.suppress(self._lv.libvirtError):
                    conn.setKeepAlive(*self.KEEPALIVE)
            return conn
        except self._lv.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {self._uri}: {exc}") from None

    def _reconnect_if_dead(self) -> None:
        """Re-open the connection when libvirtd went away (restart, upgrade);
        raises HypervisorError while it cannot be reached."""
        try:
            if self._conn.isAlive():
                return
        except self._lv.libvirtError:
            pass
        with contextlib.suppress(self._lv.libvirtError):
            self._conn.close()
        self._owner_cache.clear()
        self._conn = self._open()
        log.info("re-connected to libvirt at %s", self._uri)

    def close(self) -> None:
        try:
            self._conn.close()
        except self._lv.libvirtError:
            pass

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            owner = self._owner(dom)
        except self._lv.libvirtError:
            return
        if owner is None or owner[0] != self.node:
            return
        what = self.EVENTS.get(event, f"event {event}")
        if event == 5:
            what = f"stopped ({self.STOP_DETAILS.get(detail, detail)})"
        if event == 2:  # up again: forget how it last went down
            self.last_event.pop(owner[1], None)
        elif event in (5, 8):  # how the domain went down (final)
            self.last_event[owner[1]] = what
        elif event == 6:  # "shut down" may come before or after "stopped": keep the more exact one
            self.last_event.setdefault(owner[1], what)
        if self._on_event is not None and not self._is_own(owner[1], what):
            self._on_event(owner[1], what)

    def capacity(self) -> tuple[int, int]:
        """(vcpus, ram_mb) of the host as libvirt reports it."""
        try:
            info = self._conn.getInfo()
        except self._lv.libvirtError as exc:
            raise HypervisorError(f"cannot read host info: {exc}") from None
        return int(info[2]), int(info[1])

    def _owner(self, dom: Any) -> Optional[tuple[str, str]]:
        uuid = dom.UUID()
        if uuid not in self._owner_cache:
            try:
                xml = dom.metadata(self._lv.VIR_DOMAIN_METADATA_ELEMENT, XMLNS)
                self._owner_cache[uuid] = owner_of(xml)
            except self._lv.libvirtError:
                self._owner_cache[uuid] = None
        return self._owner_cache[uuid]

    def domains(self) -> dict[str, str]:
        """Our domains, by VM name: "running" (active) or "stopped"."""
        self._reconnect_if_dead()
        try:
            out = {}
            for d in self._conn.listAllDomains():
                owner = self._owner(d)
                if owner is not None and owner[0] == self.node:
                    out[owner[1]] = "running" if d.isActive() else "stopped"
            return out
        except self._lv.libvirtError as exc:
            if exc.get_error_code() == self._lv.VIR_ERR_NO_DOMAIN:
                return self.domains()  # one vanished while we listed: list again
            raise HypervisorError(f"cannot list domains: {exc}") from None

    def how_stopped(self, vm: str) -> str:
        """How ``vm``'s stopped domain went down, as libvirt records it with
        the domain's state ("stopped (destroyed)", "crashed", ...). This is
        read at call time, so it never races the event thread (a QEMU killed
        by the host sends "shut down" first and "stopped" a moment later);
        the last lifecycle event is the fall-back when libvirt gives no
        reason, and "it stopped" when neither says anything."""
        try:
            dom = self._lookup(vm)
            state, reason = dom.state() if dom is not None else (0, 0)
        except (HypervisorError, self._lv.libvirtError):
            state, reason = 0, 0
        if state == self._lv.VIR_DOMAIN_SHUTOFF and reason in self.SHUTOFF_REASONS:
            return f"stopped ({self.SHUTOFF_REASONS[reason]})"
        if state == self._lv.VIR_DOMAIN_CRASHED:
            return "crashed"
        return self.last_event.get(vm, "it stopped")

    def _lookup(self, vm: str) -> Optional[Any]:
        name = domain_name(vm, self.node)
        try:
            dom = self._conn.lookupByName(name)
        except self._lv.libvirtError as exc:
            if exc.get_error_code() == self._lv.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up domain {name}: {exc}") from None
        owner = self._owner(dom)
        if owner is None or owner[0] != self.node:
            raise HypervisorError(f"domain {name} exists but is not MetaStack's on {self.node}: left alone")
        return dom

    def ensure_running(self, spec: DomainSpec) -> bool:
        """(Re)define the domain from ``spec`` unless it runs, and start it.
        True if it was started now."""
        return self._define(spec, start=True)

    def ensure_defined(self, spec: DomainSpec) -> None:
        """(Re)define the domain from ``spec`` unless it runs; do not start it."""
        self._define(spec, start=False)

    def _define(self, spec: DomainSpec, start: bool) -> bool:
        dom = self._lookup(spec.vm)
        try:
            if dom is not None and dom.isActive():
                return False
            self._expect_own(spec.vm, ("defined", "started", "resumed") if start else ("defined",))
            dom = self._conn.defineXML(build_domain_xml(spec, dom.UUIDString() if dom is not None else None))
            self._owner_cache.pop(dom.UUID(), None)
            if start:
                dom.create()
                return True
            return False
        except self._lv.libvirtError as exc:
            with self._own_lock:
                self._own_events.pop(spec.vm, None)  # what it would have caused will not come
            raise HypervisorError(f"cannot {'start' if start else 'define'} {spec.vm}: {exc}") from None

    def request_shutdown(self, vm: str) -> bool:
        """Ask the guest to power off (ACPI); True if it is already off."""
        dom = self._lookup(vm)
        try:
            if dom is None or not dom.isActive():
                return True
            dom.shutdown()
            return not dom.isActive()
        except self._lv.libvirtError as exc:
            if exc.get_error_code() in (self._lv.VIR_ERR_NO_DOMAIN, self._lv.VIR_ERR_OPERATION_INVALID):
                return True
            raise HypervisorError(f"cannot shut down {vm}: {exc}") from None

    def power_off(self, vm: str) -> None:
        """Hard power-off (virsh destroy); the definition stays."""
        dom = self._lookup(vm)
        try:
            if dom is not None and dom.isActive():
                dom.destroy()
        except self._lv.libvirtError as exc:
            if exc.get_error_code() not in (self._lv.VIR_ERR_NO_DOMAIN, self._lv.VIR_ERR_OPERATION_INVALID):
                raise HypervisorError(f"cannot power off {vm}: {exc}") from None

    def remove(self, vm: str) -> None:
        """Power off and undefine; a missing domain is success."""
        self.power_off(vm)
        dom = self._lookup(vm)
        try:
            if dom is not None:
                self._owner_cache.pop(dom.UUID(), None)
                dom.undefine()
        except self._lv.libvirtError as exc:
            if exc.get_error_code() != self._lv.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"cannot undefine {vm}: {exc}") from None
        self.last_event.pop(vm, None)

    def ensure_ceph_secret(self, uuid: str, usage: str, key: Callable[[], str]) -> bool:
        """Make sure the libvirt secret ``uuid`` exists and holds the cephx
        key (``key()`` is called only to set it). The secret is private
        (libvirt never shows its value) and ephemeral (it lives in libvirtd's
        memory only, so nothing is left on disk; it is re-created when
        missing). False when this hypervisor has no secret driver (test)."""
        sec = ET.Element("secret", ephemeral="yes", private="yes")
        ET.SubElement(sec, "uuid").text = uuid
        usage_el = ET.SubElement(sec, "usage", type="ceph")
        ET.SubElement(usage_el, "name").text = usage
        try:
            try:
                self._conn.secretLookupByUUIDString(uuid)
                return True
            except self._lv.libvirtError as exc:
                if exc.get_error_code() == self._lv.VIR_ERR_NO_SUPPORT:
                    return False
            secret = self._conn.secretDefineXML(ET.tostring(sec, encoding="unicode"))
            secret.setValue(base64.b64decode(key()))
            return True
        except self._lv.libvirtError as exc:
            if exc.get_error_code() == self._lv.VIR_ERR_NO_SUPPORT:
                return False
            raise HypervisorError(f"cannot set the ceph secret: {exc}") from None


# ---------------------------------------------------------------------------
# Planner: pure function from (desired, actual, domains) to actions
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Action:
    """One step for the executor. ``kind`` is one of:

    claim        create the actual key (it is free and fits here), then run
    claim_error  create the actual key in state error (malformed desired)
    purge        delete a claim that is on no live lease (compare-and-swap)
    run          ensure the domain is defined and running
    park         ensure the domain is defined and not running (desired stopped)
    report       publish ``state``/``reason`` for a VM we own (domain untouched)
    remove       desired entry gone: remove the domain, delete the claim
    release      stop and undefine the domain here, then delete our claim
    kill         a domain of ours that someone else owns or nobody wants
    """

    kind: str
    vm: str
    reason: str = ""
    state: str = ""
    vcpus: int = 0
    ram_mb: int = 0


@dataclasses.dataclass(frozen=True)
class Capacity:
    vcpus: int
    ram_mb: int


def _order_key(node: str, vm: str) -> str:
    """Per-node pseudo-random order, so racing agents start on different VMs."""
    return hashlib.blake2b(f"{node}/{vm}".encode(), digest_size=8).hexdigest()


def usage(node: str, actual: Mapping[str, ActualVM]) -> tuple[int, int, int]:
    """(vcpus, ram_mb, vms) reserved by the claims ``node`` holds."""
    mine = [a for a in actual.values() if a.host == node]
    return sum(a.vcpus for a in mine), sum(a.ram_mb for a in mine), len(mine)


def resolve(spec: Union[DesiredVM, SpecError], snap: Snapshot) -> Union[tuple[DesiredVM, Flavour], str]:
    """The desired VM and its flavour, or why it cannot run anywhere."""
    if isinstance(spec, SpecError):
        return str(spec)
    flav = snap.flavours.get(spec.flavour)
    if flav is None:
        return f"unknown flavour {spec.flavour!r}"
    if isinstance(flav, SpecError):
        return f"flavour {spec.flavour!r} is malformed: {flav}"
    if spec.image is not None:
        image = snap.images.get(spec.image)
        if image is None:
            return f"unknown image {spec.image!r}"
        if isinstance(image, SpecError):
            return f"image {spec.image!r} is malformed: {image}"
    return spec, flav


def room_elsewhere(node: str, name: str, flav: Flavour, snap: Snapshot) -> list[str]:
    """Live nodes other than ``node`` that could take VM ``name`` now, by
    what they publish: ready, not cordoned or draining, not given up on it,
    enough free vcpus and RAM; with cells, only nodes of the cell that
    places the VM now (``places``). Pure."""
    out = []
    for other, host in sorted(snap.hosts.items()):
        rec = snap.nodes.get(other)
        if other == node or host.state != "ready" or (rec is not None and rec.unschedulable):
            continue
        if not places(snap, other, name):  # with cells: no other cell takes the VM
            continue
        if name in dict(host.cannot):
            continue
        cpu, ram = free_capacity(host)
        if cpu >= flav.vcpus and ram >= flav.ram_mb:
            out.append(other)
    return out


@functools.lru_cache(maxsize=4096)
def _node_rank(node: str) -> str:
    """A fixed pseudo-random order of the nodes, the same on every agent:
    it breaks ties between equally loaded nodes."""
    return hashlib.blake2b(node.encode(), digest_size=8).hexdigest()


@dataclasses.dataclass
class _Bin:
    """One live node as Placement sees it: what it offers and what is reserved."""

    name: str
    cap_cpu: int
    cap_ram: int
    cannot: frozenset[str]
    cpu: int = 0  # reserved now, by every claim (and the simulation's own choices): decides room
    ram: int = 0
    version: int = 0
    rank_cpu: int = 0  # reserved as replayed in creation order: decides who is least loaded
    rank_ram: int = 0

    def load(self) -> float:
        return max(self.rank_cpu / max(self.cap_cpu, 1), self.rank_ram / max(self.cap_ram, 1))

    def fits(self, flav: Flavour) -> bool:
        return self.cap_cpu - self.cpu >= flav.vcpus and self.cap_ram - self.ram >= flav.ram_mb


@dataclasses.dataclass(frozen=True)
class SimEnd:
    """Where one run of Placement's simulation ended: each node's (cpu,
    ram, rank_cpu, rank_ram) after the last VM it placed, the sizes no
    node had room for, and (create revision, name) of that last VM (None:
    it placed none)."""

    bins: Mapping[str, tuple[int, int, int, int]]
    full: frozenset[tuple[int, int]]
    last: Optional[tuple[int, str]]


class Placement:
    """Deterministic replicated placement: which node should claim each
    unclaimed VM, computed the same way by every agent from the view it
    already has, so that about one node tries each VM without a scheduler.

    Contract (pure: no I/O, no clock). ``assign()`` runs a central
    scheduler over the unclaimed VMs in creation order (the desired key's
    create revision, then name): ``spread`` gives each VM to the least
    loaded node that can take it, ``pack`` to the fullest one that can
    (load: the larger of the reserved vcpu and RAM fractions; ties broken
    by a fixed hash order of node names). It starts from the capacity that
    live, ready, schedulable nodes publish in their host records and the
    vcpus and RAM their trusted claims reserve, and honours pins, what a
    node gave up on (``cannot``), a move's source node and anti-affinity
    groups (strict: never next to a member; otherwise fewest members
    first). It returns vm -> node for every VM that some node can take in
    that simulation (the others wait, and ``pending_reason`` says why). A
    malformed entry goes to the first ready node in the VM's own hash
    order (it is claimed as an error so its reason shows).

    Agents that read the same revision get the same answer; agents a few
    revisions apart mostly do too, because each node claims the VMs it was
    given in the simulation's order. ``backups(vm, chosen)`` lists the
    other nodes that can take ``vm`` now, in rendezvous-hash order of
    (node, vm): they step in one after another when the chosen node leaves
    the VM unclaimed (dead but still leased, busy, or disagreeing).
    """

    POLICIES = ("spread", "pack")

    def __init__(self, snap: "Snapshot", policy: str = "spread",
                 use: Optional[Mapping[str, tuple[int, int]]] = None,
                 recent: Optional[Sequence[tuple[int, str, str, int, int]]] = None) -> None:
        """``use``: node -> (vcpus, ram_mb) its trusted claims reserve, and
        ``recent``: the claims of VMs created after the oldest unclaimed one,
        as (create revision, vm, node, vcpus, ram_mb), when ``snap.actual``
        does not hold the claims (ClusterView.light)."""
        self.snap = snap
        self.policy = policy if policy in self.POLICIES else "spread"
        self.bins: dict[str, _Bin] = {}
        self._created: dict[str, tuple[int, str]] = {}
        cell = snap.interest
        for name, host in snap.hosts.items():
            if placeable(snap, name, host):
                self.bins[name] = _Bin(name, host.vcpus, host.ram_mb, frozenset(n for n, _ in host.cannot))
        if use is not None:
            for name, b in self.bins.items():
                b.cpu, b.ram = use.get(name, (0, 0))
        elif cell is not None:  # with cells: a node's claims outside the cell's shards, as it publishes them
            for name, b in self.bins.items():
                b.cpu, b.ram = snap.hosts[name].foreign[:2]
        for vm, claim in snap.actual.items():
            b = self.bins.get(claim.host)
            if b is not None and (cell is None or cell.in_cell(vm)):
                b.cpu += claim.vcpus
                b.ram += claim.ram_mb
        if recent is None:
            oldest = min((self.created(n) for n in self.pending()), default=None)
            recent = [] if oldest is None else sorted(
                (spec.generation, vm, c.host, c.vcpus, c.ram_mb) for vm, c in snap.actual.items()
                if isinstance(spec := snap.desired.get(vm), DesiredVM) and (spec.generation, vm) > oldest
                and (cell is None or cell.in_cell(vm)))
        self.recent = sorted(recent)
        for b in self.bins.values():
            b.rank_cpu, b.rank_ram = b.cpu, b.ram
        for _, _, host, cpu, ram in self.recent:  # replayed in creation order by assign()
            b = self.bins.get(host)
            if b is not None:
                b.rank_cpu -= cpu
                b.rank_ram -= ram
        self._order = {name: _node_rank(name) for name in self.bins}
        self._members: Optional[dict[str, dict[str, int]]] = None

    def members(self) -> dict[str, dict[str, int]]:
        """group -> node -> how many of its VMs are claimed there (computed once)."""
        if self._members is None:
            self._members = {g: {n: len(v) for n, v in by.items()} for g, by in group_members(self.snap).items()}
        return self._members

    def _key(self, b: _Bin) -> tuple[float, str]:
        load = b.load()
        return (load if self.policy == "spread" else -load, self._order[b.name])

    def _allowed(self, b: _Bin, name: str, vm: DesiredVM, flav: Flavour,
                 members: Mapping[str, int]) -> bool:
        move = self.snap.moves.get(name)
        return (b.fits(flav) and name not in b.cannot and (move is None or move.from_node != b.name)
                and (vm.host is None or vm.host == b.name) and not (vm.strict and members.get(b.name, 0)))

    def created(self, name: str) -> tuple[int, str]:
        """(create revision, name) of desired VM ``name``: the creation order."""
        hit = self._created.get(name)
        if hit is None:
            spec = self.snap.desired[name]
            hit = self._created[name] = (spec.generation if isinstance(spec, DesiredVM) else 0, name)
        return hit

    def pending(self, skip: Collection[str] = ()) -> list[str]:
        """Unclaimed desired VMs not in ``skip``, in creation order."""
        snap = self.snap
        return sorted((n for n in snap.desired if n not in snap.actual and n not in skip), key=self.created)

    def assign(self, skip: Collection[str] = ()) -> dict[str, str]:
        """vm -> the node that should claim it (see the class contract)."""
        return self.assign_ended(skip)[0]

    def assign_ended(self, skip: Collection[str] = (), start: Optional["SimEnd"] = None,
                     names: Optional[Sequence[str]] = None) -> tuple[dict[str, str], "SimEnd"]:
        """``assign(skip)`` and where the simulation ended (SimEnd).

        With ``start`` (the SimEnd of an earlier run) and ``names``: go on
        from there with ``names`` only, which must be pending VMs created
        after ``start.last``, in creation order, and replay only the recent
        claims created after ``start.last``. Exactly what a fresh
        ``assign(skip)`` answers for ``names`` when, since that run, the only
        changes are VMs of it claimed where it put them and the arrival of
        ``names`` (AssignmentMemo checks that): every node's reservation
        and ranking at ``start.last`` are then the same in both runs.
        O(names x log nodes) instead of O(pending x log nodes)."""
        bins = self.bins
        saved = {n: (b.cpu, b.ram, b.rank_cpu, b.rank_ram) for n, b in bins.items()}  # run in place, then undo
        try:
            if start is not None:
                for n, state in start.bins.items():
                    b = bins[n]
                    b.cpu, b.ram, b.rank_cpu, b.rank_ram = state
            return self._simulate(skip, start, names)
        finally:
            for n, (cpu, ram, rcpu, rram) in saved.items():
                b = bins[n]
                b.cpu, b.ram, b.rank_cpu, b.rank_ram = cpu, ram, rcpu, rram

    def _simulate(self, skip: Collection[str], start: Optional["SimEnd"] = None,
                  names: Optional[Sequence[str]] = None) -> tuple[dict[str, str], "SimEnd"]:
        snap, bins = self.snap, self.bins
        members = {g: dict(by) for g, by in self.members().items()}
        heap = [(self._key(b), b.version, n) for n, b in bins.items()]
        heapq.heapify(heap)
        # sizes no node had room for (loads only grow in a pass, and a run from start continues one)
        full: set[tuple[int, int]] = set(start.full) if start is not None else set()
        out: dict[str, str] = {}
        after = start.last if start is not None else None
        replay = iter(self.recent if after is None else [r for r in self.recent if (r[0], r[1]) > after])
        upcoming = next(replay, None)
        names = self.pending(skip) if names is None else names
        for name in names:
            # Claims of VMs created before this one count for ranking now, not
            # before: the answer does not depend on the order claims were made in.
            while upcoming is not None and (upcoming[0], upcoming[1]) < self.created(name):
                b = bins.get(upcoming[2])
                if b is not None:
                    b.rank_cpu += upcoming[3]
                    b.rank_ram += upcoming[4]
                    b.version += 1
                    heapq.heappush(heap, (self._key(b), b.version, b.name))
                upcoming = next(replay, None)
            resolved = resolve(snap.desired[name], snap)
            if isinstance(resolved, str):
                ready = [n for n in snap.hosts if snap.hosts[n].state == "ready" and in_cell(snap, n)]
                if ready:
                    out[name] = min(ready, key=lambda n: _order_key(n, name))
                continue
            vm, flav = resolved
            size = (flav.vcpus, flav.ram_mb)
            ours = members.get(vm.group, {}) if vm.group is not None else {}
            chosen: Optional[_Bin] = None
            if vm.host is not None or vm.group is not None:
                fit = [b for b in bins.values() if self._allowed(b, name, vm, flav, ours)]
                if fit:
                    chosen = min(fit, key=lambda b: (ours.get(b.name, 0), self._key(b)))
            elif size not in full:
                aside: list[tuple[tuple[float, str], int, str]] = []
                special = False  # a node was passed over for this VM alone (cannot, move)
                while heap:
                    item = heapq.heappop(heap)
                    b = bins[item[2]]
                    if item[1] != b.version:
                        continue  # stale entry: the node's load changed since
                    aside.append(item)
                    if self._allowed(b, name, vm, flav, ours):
                        chosen = b
                        break
                    special = special or (b.fits(flav))
                for item in aside:
                    if chosen is None or item[2] != chosen.name:
                        heapq.heappush(heap, item)
                if chosen is None and not special:
                    full.add(size)
            if chosen is None:
                continue
            chosen.cpu += flav.vcpus
            chosen.ram += flav.ram_mb
            chosen.rank_cpu += flav.vcpus
            chosen.rank_ram += flav.ram_mb
            chosen.version += 1
            heapq.heappush(heap, (self._key(chosen), chosen.version, chosen.name))
            if vm.group is not None:
                members.setdefault(vm.group, {})[chosen.name] = ours.get(chosen.name, 0) + 1
            out[name] = chosen.name
        end = SimEnd({n: (b.cpu, b.ram, b.rank_cpu, b.rank_ram) for n, b in bins.items()}, frozenset(full),
                     self.created(names[-1]) if names else after)
        return out, end

    def next_takers(self, given: Mapping[str, tuple[int, int]], count: int) -> frozenset[str]:
        """A forecast: the ``count`` nodes first in line for the next VM of
        each flavour to arrive (unpinned, in no group), once each node also
        holds what the last assignment gave it (``given``: node -> vcpus,
        RAM). Spread: the least loaded nodes that fit it; pack: the fullest.
        Used only to decide who looks at new work at once; never decides a
        claim. O(nodes log nodes + flavours x nodes)."""
        line = []
        for n, b in self.bins.items():
            add_cpu, add_ram = given.get(n, (0, 0))
            cpu, ram = b.cpu + add_cpu, b.ram + add_ram
            load = max(cpu / max(b.cap_cpu, 1), ram / max(b.cap_ram, 1))
            line.append((load if self.policy == "spread" else -load, self._order[n], n, b.cap_cpu - cpu,
                         b.cap_ram - ram))
        line.sort()
        out: set[str] = set()
        for flav in self.snap.flavours.values():
            if not isinstance(flav, Flavour):
                continue
            found = 0
            for _, _, n, free_cpu, free_ram in line:
                if free_cpu >= flav.vcpus and free_ram >= flav.ram_mb:
                    out.add(n)
                    found += 1
                    if found == count:
                        break
        return frozenset(out)

    def backups(self, name: str, chosen: Optional[str]) -> list[str]:
        """The nodes other than ``chosen`` that can take VM ``name`` now (by
        the published view, not the simulation), in rendezvous-hash order."""
        able = self.able(name, self.snap.hosts if self.snap.desired.get(name) is not None else ())
        return sorted((n for n in able if n != chosen), key=lambda n: _order_key(n, name))

    def able(self, name: str, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` that can take VM ``name`` now (by the
        published view, not the simulation), in the order given."""
        spec = self.snap.desired.get(name)
        if spec is None:
            return []
        resolved = resolve(spec, self.snap)
        if isinstance(resolved, str):
            return [n for n in nodes if n in self.snap.hosts and self.snap.hosts[n].state == "ready"
                    and in_cell(self.snap, n)]
        vm, flav = resolved
        counts = self.members().get(vm.group, {}) if vm.group is not None else {}
        return [n for n in nodes if (b := self.bins.get(n)) is not None and self._allowed(b, name, vm, flav, counts)]


def plan(node: str, capacity: Capacity, snap: Snapshot, domains: Mapping[str, str],
         hold: Iterable[str] = (), cannot: Iterable[str] = (), quiet: bool = False,
         fenced: bool = False, cordoned: bool = False, draining: bool = False,
         handing: Iterable[str] = (), claimable: Optional[Collection[str]] = None) -> list[Action]:
    """Decide what ``node`` should do, from one consistent view.

    ``snap.actual`` holds only trusted claims (see split_trusted). ``hold``:
    VMs other nodes' owners may still re-claim (grace after a correlated
    loss): not claimed here unless their domain runs here. ``cannot``: VMs
    this node gave up on. ``quiet``: this node itself just lost its lease
    with everyone else: it re-claims its own running domains and nothing
    new. ``fenced``: this node's Ceph clients are cut off: every domain
    goes, every claim is released, nothing is claimed.

    Pure: no I/O, no clock. Rules:
      * a VM claimed by another node is theirs; a domain of ours for it is
        killed at once (never two copies);
      * a VM we own follows its desired state; a malformed desired entry is
        reported as error and the domain is left as it is;
      * a pin to another node, or an error claim whose entry became valid
        but no longer fits here, is released (domain stopped first);
      * an unclaimed VM whose domain runs here is re-claimed first (a lease
        lost in an etcd outage must not reboot anything); other unclaimed
        VMs are claimed when the pin allows and they fit in the free
        capacity left after every claim we hold or plan; an unclaimed
        malformed entry is claimed as an error so the reason is visible;
      * a claim whose desired entry is gone is removed, and so is a domain
        of ours that nobody desires;
      * claims on no live lease are purged by one node (the first live
        node by name), or replaced by a claim of ours.

    Operations (issue #7), all off by default: ``cordoned``: claim nothing
    new (our own running domains are still re-claimed). ``draining``:
    cordoned, and hand our VMs over one at a time: release one (not pinned
    here) only when another node has room for it and none we handed over
    (``handing``: released by the drain, not yet claimed elsewhere) is still
    on its way. A move request (``snap.moves``) from this node hands that VM
    over the same way, and keeps this node from claiming it back. A VM
    whose flavour changed (resize) takes its new size when its domain is
    not running: here if the difference fits, else it is released to a node
    with room. Anti-affinity groups (``group``, ``strict`` in the desired
    entry): a strict VM is not claimed where a VM of its group is claimed
    (the claim's transaction also creates a per-group-per-node guard key,
    see Executor); a non-strict one is not claimed where one is when a node
    holding fewer of the group has room (spread preferred).

    ``claimable`` (None: every unclaimed VM): the unclaimed VMs whose turn
    it is for this node to claim (see Placement and ClaimTurns); the
    others are left to the node whose turn it is. Our own running domains
    are re-claimed whatever it says, and every rule above still applies.
    """
    actions: list[Action] = []
    if fenced:
        for name, claim in sorted(snap.actual.items()):
            if claim.host == node:
                actions.append(Action("release", name, reason="this node is fenced"))
        for name in sorted(set(domains) - {a.vm for a in actions}):
            actions.append(Action("kill", name, reason="this node is fenced: stale copy"))
        return actions
    hold, cannot = frozenset(hold), frozenset(cannot)
    cordoned = cordoned or draining
    handed_over = any(n in snap.desired and n not in snap.actual for n in handing)
    members = {g: {n: len(v) for n, v in by.items()} for g, by in group_members(snap).items()}
    used_cpu, used_ram, _ = usage(node, snap.actual)
    free_cpu, free_ram = capacity.vcpus - used_cpu, capacity.ram_mb - used_ram

    def priority(name: str) -> tuple[int, str]:
        """Our own running domains first (they must not reboot), then VMs
        pinned here (they have nowhere else to go), then a per-node
        pseudo-random order."""
        spec = snap.desired[name]
        pinned_here = isinstance(spec, DesiredVM) and spec.host == node
        rank = 0 if domains.get(name) == "running" else 1 if pinned_here else 2
        return (rank, _order_key(node, name))

    claiming: set[str] = set()
    ours = [n for n in snap.desired
            if n in domains or (n not in snap.actual if claimable is None else n in claimable)
            or (n in snap.actual and snap.actual[n].host == node)]
    for name in sorted(ours, key=priority):
        spec = snap.desired[name]
        claim = snap.actual.get(name)
        if claim is not None and claim.host != node:
            if name in domains:
                actions.append(Action("kill", name, reason=f"claimed by {claim.host or 'an unknown owner'}"))
            continue
        resolved = resolve(spec, snap)
        if claim is None:
            running_here = domains.get(name) == "running"
            if claimable is not None and name not in claimable and not running_here:
                continue  # another node's turn
            if isinstance(resolved, str):
                if not (quiet or cordoned) or running_here:
                    actions.append(Action("claim_error", name, reason=resolved))
                    claiming.add(name)
                continue
            vm, flav = resolved
            if name in cannot:
                if name in domains:
                    actions.append(Action("kill", name, reason="given up on this node"))
                continue
            if (quiet or name in hold) and not running_here:
                continue  # its owner may still come back for it
            move = snap.moves.get(name)
            if (cordoned or (move is not None and move.from_node == node)) and not running_here:
                if name in domains:
                    actions.append(Action("kill", name, reason="unclaimed and not claimable here"))
                continue
            here = members.get(vm.group or "", {}).get(node, 0) if vm.group is not None else 0
            apart = here and not running_here and (vm.strict or (vm.host is None and any(
                members.get(vm.group or "", {}).get(other, 0) < here
                for other in room_elsewhere(node, name, flav, snap))))
            if vm.host not in (None, node) or flav.vcpus > free_cpu or flav.ram_mb > free_ram or apart:
                if name in domains:  # a leftover domain we may not run: never let it race a new owner
                    actions.append(Action("kill", name, reason="unclaimed and not claimable here"))
                continue
            free_cpu -= flav.vcpus
            free_ram -= flav.ram_mb
            if vm.group is not None:
                members.setdefault(vm.group, {})[node] = here + 1
            claiming.add(name)
            actions.append(Action("claim", name, state=vm.state, vcpus=flav.vcpus, ram_mb=flav.ram_mb))
            continue
        # We own it.
        if isinstance(resolved, str):
            if claim.state != "error" or claim.reason != resolved:
                actions.append(Action("report", name, state="error", reason=resolved,
                                      vcpus=claim.vcpus, ram_mb=claim.ram_mb))
            continue
        vm, flav = resolved
        if not claim.serves(vm):
            # destroyed and created again between two looks: the old VM goes first
            actions.append(Action("remove", name, reason="the VM was re-created; removing the old one"))
            continue
        if vm.host not in (None, node):
            actions.append(Action("release", name, reason=f"pinned to {vm.host}"))
            continue
        if name in cannot:
            actions.append(Action("release", name, reason="given up on this node"))
            continue
        move = snap.moves.get(name)
        if move is not None and move.from_node == node and move.mode in MoveRequest.MODES:
            if room_elsewhere(node, name, flav, snap):
                actions.append(Action("release", name, reason=f"moving away ({move.mode} move requested)"))
                continue
        if draining and vm.host != node and not handed_over and room_elsewhere(node, name, flav, snap):
            handed_over = True  # one at a time
            actions.append(Action("release", name, reason="node is draining: handed over"))
            continue
        cpu, ram = claim.vcpus, claim.ram_mb  # what the claim reserved
        if cpu == 0 and ram == 0:  # an error claim whose entry became valid
            if flav.vcpus > free_cpu or flav.ram_mb > free_ram:
                actions.append(Action("release", name, reason="does not fit here"))
                continue
            cpu, ram = flav.vcpus, flav.ram_mb
            free_cpu -= cpu
            free_ram -= ram
        elif (cpu, ram) != (flav.vcpus, flav.ram_mb) and domains.get(name) != "running":
            # resized: the new size takes effect now that the domain is not running
            if flav.vcpus - cpu > free_cpu or flav.ram_mb - ram > free_ram:
                actions.append(Action("release", name, reason="resized: does not fit here"))
                continue
            free_cpu -= flav.vcpus - cpu
            free_ram -= flav.ram_mb - ram
            cpu, ram = flav.vcpus, flav.ram_mb
        kind = "run" if vm.state == "running" else "park"
        actions.append(Action(kind, name, state=vm.state, vcpus=cpu, ram_mb=ram))

    for name, claim in sorted(snap.actual.items()):
        if claim.host == node and name not in snap.desired:
            actions.append(Action("remove", name, reason="desired entry deleted"))
    for name in sorted(domains):
        if name in snap.desired:
            continue
        claim = snap.actual.get(name)
        if claim is None:
            actions.append(Action("kill", name, reason="no desired entry and no claim"))
        elif claim.host != node:
            actions.append(Action("kill", name, reason=f"claimed by {claim.host or 'an unknown owner'}"))
    if snap.untrusted and first_in_cell(snap) == node:
        for name, bogus in sorted(snap.untrusted.items()):
            if name not in claiming:
                actions.append(Action("purge", name, reason=f"claim naming {bogus.host or 'nobody'} "
                                                            f"is on no live lease of that node"))
    return actions


# ---------------------------------------------------------------------------
# Agent: lease keeper, executor, main loop
# ---------------------------------------------------------------------------


class LeaseKeeper(threading.Thread):
    """Keeps the agent's one lease alive, renewing every TTL/3 with jitter,
    but only while the main loop proves progress.

    Contract: ``valid()`` is True while the lease was confirmed by etcd less
    than ``ttl - margin`` seconds ago (time taken at the *start* of the
    confirming request, so etcd's own expiry is never earlier). ``lost``
    is set once etcd says the lease no longer exists. A renewal is sent
    only when ``last_beat()`` (the main loop's last proof of progress) is
    at most ``stall_limit`` seconds old: an agent stuck in a call loses
    its lease, and so its VMs, instead of holding them forever. ``wake``
    is called whenever validity may have changed; ``renewed`` (if given)
    after each renewal and each change of ``failing`` or ``lost``.
    """

    def __init__(self, store: Store, lease_id: int, ttl: int, margin: float, wake: Callable[[], None],
                 last_beat: Callable[[], float], stall_limit: float,
                 renewed: Optional[Callable[[], None]] = None) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.store = store
        self.lease_id = lease_id
        self.ttl = ttl
        self.margin = margin
        self._wake = wake
        self._last_beat = last_beat
        self.stall_limit = stall_limit
        self._renewed = renewed or (lambda: None)
        self.confirmed = time.monotonic()
        self.lost = threading.Event()
        self.failing = False
        self.stalled = False
        self.troubles = 0  # count of failed keep-alives, ever
        self.trouble_since: Optional[float] = None  # monotonic start of the current run of failures
        self._halt = threading.Event()

    def deadline(self) -> float:
        """Monotonic time after which this node may no longer count on its
        lease (it must not start or claim anything)."""
        return self.confirmed + self.ttl - self.margin

    def valid(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.deadline()

    def stop(self) -> None:
        self._halt.set()

    def _notify(self) -> None:
        """Call ``renewed`` unless stopping; its failure never ends the keeper."""
        if self._halt.is_set():
            return
        try:
            self._renewed()
        except Exception as exc:  # e.g. the watchdog feed's disk is full: keep renewing
            log.error("lease %x: after renewing: %s", self.lease_id, exc)

    def run(self) -> None:
        interval = self.ttl / 3.0
        while not self._halt.is_set() and not self.lost.is_set():
            started = time.monotonic()
            beat_age = started - self._last_beat()
            if beat_age > self.stall_limit:
                if not self.stalled:
                    log.error("lease %x: main loop made no progress for %.1fs: not renewing (the watchdog "
                              "stops this node's domains if it stays stuck)", self.lease_id, beat_age)
                self.stalled = True
                self._halt.wait(0.1)
                continue
            if self.stalled:
                log.info("lease %x: main loop makes progress again", self.lease_id)
                self.stalled = False
            try:
                remaining = self.store.refresh_lease(self.lease_id)
            except Exception as exc:  # StoreUnavailable, or anything else: never let the keeper die
                if not self.failing:
                    log.warning("lease %x: keep-alive failed: %s", self.lease_id, exc)
                    self.trouble_since = started
                self.failing = True
                self.troubles += 1
                self._notify()
                self._wake()
                self._halt.wait(RETRY_PAUSE)
                continue
            if remaining <= 0:
                log.error("lease %x: etcd says it has expired", self.lease_id)
                self.lost.set()
                self._notify()
                self._wake()
                return
            self.confirmed = started
            if self.failing:
                log.info("lease %x: keep-alive works again", self.lease_id)
                self.failing = False
                self.trouble_since = None
                self._wake()
            self._notify()
            self._halt.wait(interval * random.uniform(0.9, 1.0))


class Waker:
    """Wakes the main loop: a self-pipe. ``wake()`` is safe from any thread
    and from a signal handler (it takes no lock: a threading.Event would
    deadlock if a signal arrived while the main thread held its lock);
    ``wait(timeout)`` returns when woken or after ``timeout`` seconds and
    drops the pending wake-ups."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe is already awake
            os.write(self._w, b"!")

    def wait(self, timeout: float) -> bool:
        """True when woken (rather than timed out)."""
        import select
        ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass
        return bool(ready)


class NodeTakenError(MetaStackError):
    """A live agent already holds this node name."""


class LeaseUnconfirmed(MetaStackError):
    """The agent's lease is too close to its deadline to start anything."""


class NodeFenced(MetaStackError):
    """This node is fenced: it may not start anything until unfenced."""


class EventLog:
    """A VM's history, written by the agent that acted: one key per event,
    ``events/<vm>/<20-digit epoch usec>-<node>`` = {"at", "node", "vm",
    "event", "detail"}, under a lease of this agent that is never renewed
    (so events live at most LEASE_TTL seconds; a fresh lease is taken every
    ROLL seconds), and at most KEEP per VM (the oldest go first). Never
    needed for correctness: a failure to record is logged and forgotten,
    and recording never raises."""

    LEASE_TTL = 3600
    ROLL = 600.0
    KEEP = 50

    def __init__(self, store: Store, node: str) -> None:
        self.store, self.keys, self.node = store, store.keys, node
        self._lease = 0
        self._lease_at = 0.0
        self._written: dict[str, int] = {}

    def entry(self, vm: str, event: str, detail: str = "") -> list[tuple[str, bytes, int]]:
        """The (key, value, lease) of one event, for a caller that writes it
        in its own transaction (then calls ``written``); [] when no lease
        can be had now. Never raises."""
        try:
            now = time.monotonic()
            if not self._lease or now - self._lease_at > self.ROLL:
                self._lease, self._lease_at = self.store.grant_lease(self.LEASE_TTL), now
        except (StoreUnavailable, LeaseNotFound) as exc:
            self._lease = 0
            log.debug("%s: event %s not recorded: %s", vm, event, exc)
            return []
        usec = time.time_ns() // 1000
        value = {"at": utc_now(), "node": self.node, "vm": vm, "event": event, "detail": detail[:500]}
        return [(self.keys.event(vm, usec, self.node), json.dumps(value).encode(), self._lease)]

    def forget_lease(self) -> None:
        """The history lease was refused (etcd lost it): take a new one next time."""
        self._lease = 0

    def written(self, vm: str) -> None:
        """Count one event written for ``vm``; trims its oldest now and then."""
        self._written[vm] = self._written.get(vm, 0) + 1
        if self._written[vm] % 10 == 0:
            try:
                self._trim(vm)
            except (StoreUnavailable, LeaseNotFound) as exc:
                log.debug("%s: history not trimmed: %s", vm, exc)

    def record(self, vm: str, event: str, detail: str = "") -> None:
        """Write one event on its own."""
        for key, value, lease in self.entry(vm, event, detail):
            try:
                self.store.put(key, value, lease)
                self.written(vm)
            except (StoreUnavailable, LeaseNotFound) as exc:
                self._lease = 0
                log.debug("%s: event %s not recorded: %s", vm, event, exc)

    def _trim(self, vm: str) -> None:
        _, entries = self.store.list_prefix(self.keys.events(vm))
        for key in sorted(entries)[:-self.KEEP]:
            self.store.delete(key)


@dataclasses.dataclass(frozen=True)
class PendingStart:
    """A start whose disk and fencing work is done: only the libvirt start
    and the publication of "running" are left."""

    act: Action
    spec: DomainSpec
    disk: str  # "pool/name", "" if diskless
    reason: str  # the published reason (restart, fencing)


class Executor:
    """Applies the planner's actions for one node: claims in etcd, disks in
    Ceph, domains in libvirt, and the VM's actual state back into etcd.

    Contract: every etcd write about a VM is a compare-and-swap against the
    last revision this node saw, so it never overwrites a claim that is not
    its own; a domain is started only after its disk exists and its former
    writers are fenced (the former owner node recorded under ``fences/``
    and, where its address is its own, range-blocklisted; every client
    that has the disk open blocklisted); nothing blocks for long: a
    graceful shutdown is asked for, then checked on later ticks. A failing
    action affects only its own VM: it is retried with back-off, and after
    MAX_TRIES failures to run a VM here the VM is handed back (domain
    removed, claim released) and this node leaves it alone for GIVE_UP_FOR
    seconds, with the reason published in the host record.
    """

    CONSOLE_BYTES = 4096  # tail of the serial console published to etcd
    CONSOLE_PERIOD = 2.0  # seconds between console publications of one VM
    BACKOFF_MAX = 60.0
    NO_BACKOFF = ("kill", "release", "claim_error", "report", "purge")  # safety and reporting never wait
    MAX_TRIES = 3  # failures to run a VM here before handing it to another node
    START_PARALLEL = 4  # libvirt starts of one tick's claims that run at once
    GIVE_UP_FOR = 600.0  # seconds a node leaves a VM it gave up on alone
    FENCE_EXPIRE = 10 * 365 * 86400  # a node range-blocklist lasts until it is lifted

    def __init__(self, cfg: AgentConfig, store: Store, view: ClusterView, hv: Hypervisor,
                 storage: Optional[Storage], capacity: "Capacity", lease: Callable[[], int],
                 lease_headroom: Callable[[], float], beat: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self._headroom = lease_headroom
        self._beat = beat
        self.node = cfg.node_name
        self.capacity = capacity
        self.placement = "spread"  # from /metastack/config, set by the agent each tick
        self.store, self.keys, self.view, self.hv, self.storage = store, store.keys, view, hv, storage
        self._lease = lease
        self.secret_uuid = ""
        self.stopping: dict[str, float] = {}  # vm -> monotonic deadline of a graceful shutdown
        self._console_sent: dict[str, tuple[float, bytes]] = {}
        self._mon_hosts: Optional[tuple[tuple[str, int], ...]] = None
        self._backoff: dict[str, tuple[int, float]] = {}  # vm -> (failures, monotonic time of next try)
        self.gave_up: dict[str, tuple[str, str, float]] = {}  # vm -> (identity, reason, monotonic until)
        self.ceph_refused = False  # Ceph refused our own client (blocklisted): we are fenced
        self.events = EventLog(store, self.node)
        self.races_lost = 0  # claims that another node's claim beat (for benchmarks and logs)
        self.chosen: Mapping[str, str] = {}  # vm -> node this node's placement chose (the agent sets it; logs)
        self._offer_holders: dict[str, str] = {}  # offered VM -> its last holder (Spill.holder), until it starts
        self.deferred: list[Action] = []  # run/park actions of VMs claimed this tick
        # Set by the agent: this node's host record as (key, value, lease) when it changed
        # (written in the same transaction as a VM's state), and what to do if that write failed.
        self.host_ride: Callable[[], list[tuple[str, bytes, int]]] = list
        self.host_ride_failed: Callable[[], None] = lambda: None
        self._held_writes: Optional[list[tuple[str, ActualVM, Entry, Optional[tuple[str, str]]]]] = None

    # -- dispatch ----------------------------------------------------------------
    def apply(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        """Apply one action; returns a short note of what changed ('' if nothing).
        A VM whose last attempt failed is retried with exponential back-off
        (1 s doubling up to BACKOFF_MAX), except for safety actions. Only
        the loss of etcd (StoreUnavailable, LeaseNotFound) propagates: any
        other failure is this VM's alone."""
        if act.kind not in self.NO_BACKOFF and not self.ready(act.vm):
            return ""
        return self._guarded(act, snap, domains, lambda: getattr(self, f"_do_{act.kind}")(act, snap, domains))

    def _guarded(self, act: Action, snap: Snapshot, domains: Mapping[str, str], step: Callable[[], str]) -> str:
        """Run one step of ``act`` with apply's failure rules: success ends
        the VM's back-off; a lost or unconfirmed lease and a fenced node are
        notes; only the loss of etcd propagates; any other failure is the
        VM's own (back-off, error report, hand-back after MAX_TRIES)."""
        failures, _ = self._backoff.get(act.vm, (0, 0.0))
        try:
            note = step()
            self._backoff.pop(act.vm, None)
            return note
        except (LeaseUnconfirmed, NodeFenced) as exc:
            return str(exc)
        except (StoreUnavailable, LeaseNotFound):
            raise
        except Exception as exc:  # noqa: BLE001 - one VM's trouble, whatever it is, stays that VM's
            if isinstance(exc, StorageFenced):
                self.ceph_refused = True
            if not isinstance(exc, (HypervisorError, StorageError)):
                log.exception("%s: unexpected error in %s", act.vm, act.kind)
            return self._failed(act, snap, domains, failures, exc)

    def _failed(self, act: Action, snap: Snapshot, domains: Mapping[str, str], failures: int,
                exc: BaseException) -> str:
        """Record a failure of ``act``: back off, report the error (an error
        claim reserves nothing), and give the VM up after MAX_TRIES."""
        delay = min(self.BACKOFF_MAX, 2.0 ** failures)
        self._backoff[act.vm] = (failures + 1, time.monotonic() + delay)
        why = str(exc) or type(exc).__name__
        spec = snap.desired.get(act.vm)
        if (act.kind in ("claim", "run", "park") and failures + 1 >= self.MAX_TRIES
                and domains.get(act.vm) != "running" and isinstance(spec, DesiredVM)):
            return self._give_up(act.vm, spec, why)
        if failures == 0:
            self.events.record(act.vm, "error", why)
        self.publish(act.vm, "error", why, 0, 0)
        return f"{act.vm}: {why} (retry in {delay:.0f}s)"

    def _give_up(self, vm: str, spec: DesiredVM, why: str) -> str:
        """Hand ``vm`` to another node: remove the domain here (never two
        copies), release the claim, and leave it alone for GIVE_UP_FOR."""
        with contextlib.suppress(HypervisorError):
            self.hv.remove(vm)
        self.stopping.pop(vm, None)
        self._delete_claim(vm)
        self._delete_console(vm)
        self._backoff.pop(vm, None)
        self.gave_up[vm] = (spec.identity, why, time.monotonic() + self.GIVE_UP_FOR)
        self.events.record(vm, "gave up", f"after {self.MAX_TRIES} failures: {why}")
        log.warning("vm=%s gave up after %d failures here, handing it over: %s", vm, self.MAX_TRIES, why)
        return f"gave up {vm} after {self.MAX_TRIES} failures ({why})"

    def gave_up_reasons(self) -> dict[str, str]:
        """``cannot()`` as last computed (no clean-up): vm -> reason."""
        return {vm: why for vm, (_, why, _) in sorted(self.gave_up.items())[:100]}

    def cannot(self, snap: Snapshot) -> dict[str, str]:
        """VMs this node gave up on and still leaves alone: vm -> reason.
        An entry ends after GIVE_UP_FOR, or when the VM's identity changes."""
        now = time.monotonic()
        for vm, (ident, _, until) in list(self.gave_up.items()):
            spec = snap.desired.get(vm)
            if now >= until or not isinstance(spec, DesiredVM) or spec.identity != ident:
                del self.gave_up[vm]
        return self.gave_up_reasons()

    def prune(self, acted: Iterable[str]) -> None:
        """Forget back-off state of VMs that got no action this tick (their
        claim moved away or they are gone): no retry timer for them."""
        keep = set(acted)
        for vm in list(self._backoff):
            if vm not in keep:
                del self._backoff[vm]

    def ready(self, vm: str) -> bool:
        """Whether ``vm`` is not waiting out a back-off."""
        return time.monotonic() >= self._backoff.get(vm, (0, 0.0))[1]

    def next_retry(self) -> Optional[float]:
        """Monotonic time of the earliest pending retry, if any."""
        return min((t for _, t in self._backoff.values()), default=None)

    def _do_claim(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        first = "starting" if act.state == "running" else "stopped"
        spec = snap.desired[act.vm]
        assert isinstance(spec, DesiredVM)
        value = self._value(first, "", act.vcpus, act.ram_mb, generation=0 if spec.uuid else spec.generation,
                            vm_uuid=spec.uuid or "")
        running_here = domains.get(act.vm) == "running"
        history = ("claimed", "re-claimed its running domain" if running_here
                   else f"{act.vcpus} vcpus, {act.ram_mb} MiB reserved")
        if not self._create_claim(act.vm, value, snap, history):
            return ""
        if not running_here:  # claims first, starts after: the other nodes see this claim at once
            self.deferred.append(dataclasses.replace(act, kind="run" if act.state == "running" else "park"))
            return f"claimed {act.vm}"
        note = self._converge(act, snap, domains)
        return f"claimed {act.vm}" + (f", {note}" if note else "")

    CLAIM_BATCH = 24  # claims written in one transaction at most (etcd allows 128 operations in one)

    def taken_meanwhile(self, vms: Sequence[str]) -> set[str]:
        """Of ``vms`` (unclaimed in this node's view), those etcd says are
        claimed now; their claims are folded into the view. One read per
        VM, made before a backup's claim: a backup's turn comes after time
        has passed, and a view that lags (an agent starved of CPU reads its
        watch late) would otherwise turn every such claim into a failed
        transaction. Stops at the first etcd error (the claim's own
        compare-and-swap still decides)."""
        taken: set[str] = set()
        for vm in vms:
            key = self.keys.actual(vm)
            try:
                entry = self.store.get(key)
                if entry is None:
                    key = self.keys.legacy_actual(vm)
                    entry = self.store.get(key)
            except StoreUnavailable:
                break
            if entry is not None:
                taken.add(vm)
                self.view.note(key, entry.value, entry.mod_revision, entry.lease)
                with contextlib.suppress(SpecError):
                    log.info("vm=%s backup turn: claimed by %s meanwhile (this view was behind)", vm,
                             ActualVM.parse(entry.value).host or "?")
        return taken

    def claim_batch(self, acts: Sequence[Action], snap: Snapshot) -> list[Action]:
        """Claim the VMs of several plain claim actions (new VMs, not
        re-claims of running domains, not replacements of untrusted claims)
        in one transaction, with their history and strict-group guards: all
        or none. Returns the actions claimed (their starts deferred, as
        _do_claim does), [] when any key was taken: the caller then claims
        them one by one. Never raises for one VM's trouble."""
        creates: list[tuple[str, bytes]] = []
        plus: list[tuple[str, bytes, int]] = []
        for act in acts:
            spec = snap.desired[act.vm]
            assert isinstance(spec, DesiredVM)
            value = self._value("starting" if act.state == "running" else "stopped", "", act.vcpus, act.ram_mb,
                                generation=0 if spec.uuid else spec.generation, vm_uuid=spec.uuid or "")
            creates.append((self.keys.actual(act.vm), value.encode()))
            if spec.strict and spec.group is not None:
                creates.append((self.keys.group_guard(spec.group, self.node), json.dumps({"vm": act.vm}).encode()))
            plus += self.events.entry(act.vm, "claimed", f"{act.vcpus} vcpus, {act.ram_mb} MiB reserved")
        absent = [self.keys.legacy_actual(act.vm) for act in acts]  # a claim of the old layout blocks too
        try:
            rev, _ = self.store.create(creates[0][0], creates[0][1], self._lease(), also=creates[1:], plus=plus,
                                       absent=absent)
        except LeaseNotFound:
            if not plus:
                raise
            self.events.forget_lease()
            return []  # one by one, each with its own history
        if rev is None:
            return []
        for key, value in creates:
            self.view.note(key, value, rev, self._lease())
        for act in acts:
            self.events.written(act.vm)
            self._backoff.pop(act.vm, None)
            self.deferred.append(dataclasses.replace(act, kind="run" if act.state == "running" else "park"))
        return list(acts)

    def hold_publishes(self) -> None:
        """From now on publish() collects its writes; flush_publishes()
        writes them in one transaction (a burst of starts costs one
        revision)."""
        self._held_writes = []

    def flush_publishes(self) -> None:
        """Write what publish() collected since hold_publishes(): one
        transaction if no key changed meanwhile, else each on its own."""
        held, self._held_writes = self._held_writes, None
        if not held:
            return
        writes, plus = [], []
        for vm, new, entry, history in held:
            writes.append((self.view.claim(vm)[0], new.encode(), entry.mod_revision, self._lease()))
            if history is not None:
                plus += self.events.entry(vm, *history)
        host = self.host_ride()
        try:
            rev = self.store.replace_many(writes, plus + host)
        except LeaseNotFound:
            self.events.forget_lease()
            rev = None
        if rev is None:
            if host:
                self.host_ride_failed()
            for vm, new, _, history in held:  # one by one: each as a plain publish
                self.publish(vm, new.state, new.reason, new.vcpus, new.ram_mb, new.disk, history)
            return
        for key, value, _, lease in writes:
            self.view.note(key, value, rev, lease)
        for hkey, hval, hlease in host:
            self.view.note(hkey, hval, rev, hlease)
        for vm, _, _, history in held:
            if history is not None:
                self.events.written(vm)

    def take_deferred(self) -> list[Action]:
        """The starts that claims of this tick left for after the claims."""
        out, self.deferred = self.deferred, []
        return out

    def _do_purge(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        """Delete a claim on no live lease, unless it changed since seen."""
        key, entry = self.view.claim(act.vm)
        if entry is None:
            return ""
        rev = self.store.delete_if(key, entry.mod_revision)
        if rev is None:
            return ""
        self.view.note(key, None, rev)
        log.warning("vm=%s purged an untrusted claim (%s)", act.vm, act.reason)
        return f"purged untrusted claim of {act.vm} ({act.reason})"

    def _do_claim_error(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        if self._create_claim(act.vm, self._value("error", act.reason, 0, 0), snap):
            log.warning("vm=%s desired entry rejected: %s", act.vm, act.reason)
            return f"{act.vm}: error ({act.reason})"
        return ""

    def _do_run(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        return self._converge(act, snap, domains)

    _do_park = _do_run

    def _do_report(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        if self.publish(act.vm, act.state, act.reason, act.vcpus, act.ram_mb):
            log.warning("vm=%s desired entry rejected: %s", act.vm, act.reason)
            return f"{act.vm}: {act.state} ({act.reason})"
        return ""

    def _do_remove(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        self.hv.remove(act.vm)
        self.stopping.pop(act.vm, None)
        claim = self._own_claim(act.vm)
        disk = claim.disk if claim else ""
        if disk:
            if self.storage is None:
                raise StorageError(f"cannot remove disk {disk}: no [ceph] storage configured on {self.node}")
            pool, _, name = disk.partition("/")
            try:
                self.storage.remove_disk(pool, name)
            except StorageBusy as exc:  # a client still has it open: keep the claim, retry next tick
                self.publish(act.vm, "error", f"disk {disk} still in use, retrying its removal ({exc})",
                             claim.vcpus if claim else 0, claim.ram_mb if claim else 0)
                return f"{act.vm}: disk {disk} busy, will retry"
        self._delete_claim(act.vm)
        self._delete_console(act.vm)
        self.events.record(act.vm, "removed", (f"disk {disk} deleted; " if disk else "") + act.reason)
        return f"removed {act.vm}" + (f" and its disk {disk}" if disk else "") + f" ({act.reason})"

    def _do_release(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        self.hv.remove(act.vm)  # the domain goes first: never two copies; the disk stays
        self.stopping.pop(act.vm, None)
        self._delete_claim(act.vm)
        self._delete_console(act.vm)
        self.events.record(act.vm, "released", act.reason)
        return f"released {act.vm} ({act.reason})"

    def _do_kill(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        self.hv.remove(act.vm)
        self.stopping.pop(act.vm, None)
        self.events.record(act.vm, "stale copy killed", act.reason)
        return f"killed local domain {act.vm} ({act.reason})"

    def use_ceph_secret(self, fsid: str) -> None:
        """Name the libvirt secret that will hold this node's cephx key."""
        assert self.storage is not None
        client = self.storage.cfg.client
        self.secret_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"metastack:{fsid}:client.{client}"))
        self._secret_usage = f"metastack {fsid} client.{client}"
        self.hv.ensure_ceph_secret(self.secret_uuid, self._secret_usage, self.storage.key)

    # -- bringing a VM to its desired state ------------------------------------
    def _converge(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> str:
        """Bring the domain to the desired state and publish what it is."""
        vm = snap.desired[act.vm]
        assert isinstance(vm, DesiredVM)
        current = domains.get(act.vm)
        if vm.state == "running":
            self.stopping.pop(act.vm, None)
            if current == "running":  # (re-claimed after a lease loss, or simply up): name its disk
                changed = self.publish(act.vm, "running", self._kept_reason(act.vm), act.vcpus, act.ram_mb,
                                       self._disk_of(vm, snap))
                return f"running {act.vm}" if changed else ""
            start = self._ready_to_start(act, snap, domains)
            self._confirm_headroom([act.vm])
            return self._started(start, self.hv.ensure_running(start.spec))
        if current is None:
            spec, disk, _ = self._prepare(vm, act, snap, fence=False)
            self.hv.ensure_defined(spec)
            changed = self.publish(act.vm, "stopped", "", act.vcpus, act.ram_mb, disk)
            return f"defined {act.vm} (stopped)" if changed else ""
        if current == "running":
            if self._shut_down(act.vm):
                self.publish(act.vm, "stopped", "", act.vcpus, act.ram_mb)
                self.events.record(act.vm, "stopped", "desired state stopped")
                return f"stopped {act.vm}"
            changed = self.publish(act.vm, "stopping", "", act.vcpus, act.ram_mb)
            return f"stopping {act.vm}" if changed else ""
        changed = self.publish(act.vm, "stopped", "", act.vcpus, act.ram_mb)
        return f"{act.vm} stopped" if changed else ""

    def _is_start(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> bool:
        """True if ``act`` would start a domain that is not running here."""
        vm = snap.desired.get(act.vm)
        return (act.kind in ("run", "park") and isinstance(vm, DesiredVM) and vm.state == "running"
                and domains.get(act.vm) != "running")

    def _ready_to_start(self, act: Action, snap: Snapshot, domains: Mapping[str, str]) -> PendingStart:
        """Everything before a start: the restart reason (how the domain
        went down, asked of libvirt now), the disk (cloned once) and the
        fencing of its former writers. Raises what _prepare raises."""
        vm = snap.desired[act.vm]
        assert isinstance(vm, DesiredVM)
        self.stopping.pop(act.vm, None)
        reason = ""
        before = self._own_claim(act.vm)
        if domains.get(act.vm) == "stopped" and before is not None and before.state == "running":
            reason = f"restarted after {self.hv.how_stopped(act.vm)}"
        spec, disk, fenced = self._prepare(vm, act, snap)
        if fenced:
            reason = (reason + "; " if reason else "") + f"fenced the disk's former writer(s): {', '.join(fenced)}"
        return PendingStart(act, spec, disk, reason)

    def _confirm_headroom(self, vms: Sequence[str]) -> None:
        """The disk work before a start may have taken a while: start only
        if the lease is still confirmed with room to spare (never run a VM
        we may no longer own). Raises LeaseUnconfirmed."""
        if self._headroom() < self.cfg.etcd.timeout:
            raise LeaseUnconfirmed(f"not starting {', '.join(vms)}: lease not confirmed recently enough")

    def _started(self, start: PendingStart, started: bool) -> str:
        """Publish that ``start``'s VM runs (its history says "started" if
        this call started it); the note for the log."""
        act, reason = start.act, start.reason
        self._offer_holders.pop(act.vm, None)  # fenced before this start: no longer a former writer
        self.publish(act.vm, "running", reason, act.vcpus, act.ram_mb, start.disk,
                     history=("started", reason) if started else None)
        return f"started {act.vm}" + (f" ({reason})" if reason else "") if started else ""

    def start_many(self, acts: Sequence[Action], snap: Snapshot, domains: Mapping[str, str],
                   go_on: Callable[[], bool]) -> list[tuple[Action, str]]:
        """Apply the actions a tick's claims left for after them (``acts``,
        in order), and return (action, note) for each one applied. Domain
        starts overlap: the disk and fencing work of every start is done
        first, one VM after another, then up to START_PARALLEL libvirt
        starts run at once (a node taking over a failed node's VMs boots
        them together, not one by one); every other action, and every
        publication, stays on the calling thread. ``go_on()`` is asked
        before each action (False: stop, e.g. the lease is unconfirmed);
        the loop's beat comes before each step and as each start ends, as
        often as a serial loop would beat, never while a start is stuck."""
        out: list[tuple[Action, str]] = []
        pending: list[PendingStart] = []
        for act in acts:
            self._beat()
            if not go_on():
                break
            if not (self._is_start(act, snap, domains) and self.ready(act.vm)):
                out.append((act, self.apply(act, snap, domains)))
                continue

            def prepare(act: Action = act) -> str:
                pending.append(self._ready_to_start(act, snap, domains))
                return ""
            note = self._guarded(act, snap, domains, prepare)
            if note:
                out.append((act, note))
        if not pending or not go_on():
            return out
        try:
            self._confirm_headroom([p.act.vm for p in pending])
        except LeaseUnconfirmed as exc:
            return out + [(p.act, str(exc)) for p in pending]
        if len(pending) == 1:  # one start: on this thread, as a pool of one would have it
            p = pending[0]
            self._beat()
            try:
                started: Any = self.hv.ensure_running(p.spec)
            except Exception as exc:  # noqa: BLE001 - handed to _guarded below, as fut.result() would raise it
                started = exc

            def result(p: PendingStart = p, started: Any = started) -> str:
                if isinstance(started, Exception):
                    raise started
                return self._started(p, started)
            self._beat()
            return out + [(p.act, self._guarded(p.act, snap, domains, result))]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.START_PARALLEL, len(pending)),
                                                   thread_name_prefix="start") as pool:
            futures = {pool.submit(self.hv.ensure_running, p.spec): p for p in pending}
            for fut in concurrent.futures.as_completed(futures):
                self._beat()
                p = futures[fut]
                out.append((p.act, self._guarded(p.act, snap, domains,
                                                 lambda fut=fut, p=p: self._started(p, fut.result()))))
        return out

    def _disk_of(self, vm: DesiredVM, snap: Snapshot) -> str:
        """"pool/name" of ``vm``'s RBD disk by its identity ("" if diskless)."""
        image = snap.images.get(vm.image) if vm.image is not None else None
        return f"{image.pool}/{disk_name(vm.name, vm.identity)}" if isinstance(image, Image) else ""

    def _kept_reason(self, vm: str) -> str:
        """Keep a 'restarted after ...' note while the VM stays up."""
        claim = self._own_claim(vm)
        return claim.reason if claim is not None and claim.state == "running" else ""

    def _prepare(self, vm: DesiredVM, act: Action, snap: Snapshot,
                 fence: bool = True) -> tuple[DomainSpec, str, list[str]]:
        """The domain spec for ``vm``; makes sure its disk exists (a clone of
        its image, made once and then reused) and, before a start, breaks any
        lock a former writer still holds. Returns (spec, "pool/disk", fenced)."""
        disk: Optional[RBDDisk] = None
        boot: Optional[DirectBoot] = None
        fenced: list[str] = []
        if vm.image is not None:
            image = snap.images.get(vm.image)
            if not isinstance(image, Image):
                raise StorageError(f"image {vm.image!r} is unknown or malformed")
            if self.storage is None:
                raise StorageError(f"VM needs image {vm.image!r} but {self.node} has no [ceph] storage configured")
            name = disk_name(vm.name, vm.identity)
            cloned = self.storage.ensure_disk(image.pool, name, image)
            if cloned:
                log.info("vm=%s cloned disk %s/%s from %s/%s@%s", vm.name, image.pool, name,
                         image.pool, image.image, image.snapshot)
            if fence:
                for node in self._former_writers(vm.name, self.storage.watchers(image.pool, name), snap,
                                                 fresh=cloned):
                    fenced.append(f"node {node} ({self.fence_node(node, snap, vm.name)[1]})")
                fenced += self.storage.fence_disk(image.pool, name)
                if fenced:
                    log.warning("vm=%s broke the lock of %s on %s/%s (blocklisted)", vm.name, fenced, image.pool, name)
            if self._mon_hosts is None:
                self._mon_hosts = tuple(self.storage.mon_hosts())
            self.hv.ensure_ceph_secret(self.secret_uuid, self._secret_usage, self.storage.key)
            disk = RBDDisk(image.pool, name, self._mon_hosts, self.storage.cfg.client, self.secret_uuid)
            if image.direct_boot:
                boot = self._boot_files(image)
        console = os.path.join(self.cfg.state_dir, "console", f"{vm.name}.log")
        os.makedirs(os.path.dirname(console), mode=0o755, exist_ok=True)
        spec = DomainSpec(vm=vm.name, node=self.node, domain_type=self.hv.domain_type, vcpus=act.vcpus,
                          ram_mb=act.ram_mb, flavour=vm.flavour, image=vm.image, disk=disk, boot=boot,
                          console=console)
        return spec, (f"{disk.pool}/{disk.name}" if disk else ""), fenced

    def _former_writers(self, vm: str, watchers: Iterable[str], snap: Snapshot, fresh: bool = False) -> list[str]:
        """Nodes that may still write ``vm``'s disk and are not alive: the
        node whose claim of it vanished, and any node whose registered
        address has the disk open. Live nodes are left out: they see the
        new claim and kill their copy, and their open clients are fenced
        one by one (Storage.fence_disk). With cells, a claim that vanished
        while this node did not watch its shard (its cell adopts the shard
        of a cell whose last node died, or takes a VM pinned to it or
        offered to its cell) left no memory: for a disk that existed before
        (not ``fresh``) of a VM outside this node's home cell, every node of
        the VM's home cell seen to lapse lately and not back is a former
        writer, and so is the node an offer names as the VM's last holder
        (Spill.holder: the cell that serves the VM saw its claim vanish;
        with overflow that holder may be in any cell)."""
        targets: set[str] = set()
        gone = self.view.vanished.get(vm)
        if gone is not None and gone.host:
            targets.add(gone.host)
        elif snap.interest is not None and snap.cells is not None and not fresh:
            cells = snap.cells
            home = cells.home(Keys.shard(vm))
            if home != snap.interest.cell:  # adopted (or pinned here): its cell's nodes held it, unwatched, or
                # those of a cell gone since that had adopted its shards
                gone_cells = {home} | (set(range(cells.cells)) - cells.live)
                targets.update(self.view.lapsed_in_cells(gone_cells, cells.cells))
        self._offer_holders = {v: h for v, h in self._offer_holders.items() if v in snap.desired}
        spill = snap.overflow.get(vm)
        if spill is not None and spill.holder:  # offered: the serving cell saw its claim vanish (any cell's node)
            self._offer_holders[vm] = spill.holder  # kept for a start retried once the offer is deleted
        if vm in self._offer_holders and not fresh:
            targets.add(self._offer_holders[vm])
        ips = {watcher_ip(w) for w in watchers}
        targets.update(n for n, rec in snap.nodes.items() if rec.address and rec.address in ips)
        targets.discard(self.node)
        return sorted(t for t in targets if t not in snap.hosts)

    def fence_node(self, node: str, snap: Snapshot, vm_of_fence: str = "") -> tuple[FenceRecord, str]:
        """Record that ``node`` is fenced (``fences/<node>``, first writer
        wins) and, when its address is its own (no other node registered
        it), blocklist every Ceph client from that address: whatever it
        runs or starts late can no longer write. Idempotent. Returns the
        fence record in force and how the node was fenced, for the log and
        the VM's reason (``vm_of_fence``: the VM whose start fences it, or
        "" for none, as in an evacuation). StorageError when the range
        blocklist fails, or this node has no Ceph connection to add it."""
        key = self.keys.fence(node)
        entry = self.view.entry(key)
        record: Optional[FenceRecord] = None
        if entry is not None:
            with contextlib.suppress(SpecError):
                record = FenceRecord.parse(node, entry.value)
        if record is None:
            addr = snap.nodes[node].address if node in snap.nodes else ""
            shared = [n for n, rec in snap.nodes.items() if addr and rec.address == addr]
            own = bool(addr) and shared == [node] and addr != self.cfg.address
            record = FenceRecord(node=node, by=self.node, at=utc_now(), mode="range" if own else "clients",
                                 address=addr if own else "")
            rev, existing = self.store.create(key, record.encode())
            if rev is not None:
                self.view.note(key, record.encode(), rev)
                self.events.record(vm_of_fence, "fenced", f"node {node} ({record.mode})")
                log.warning("vm=%s fencing fenced=%s: %s", vm_of_fence or "-", node,
                            f"blocklisting every client from {addr}" if own else
                            "its address is unknown or shared: blocklisting the disk clients it has open")
            elif existing is not None:
                with contextlib.suppress(SpecError):
                    record = FenceRecord.parse(node, existing.value)
        if record.mode == "range" and record.address:
            if self.storage is None:
                raise StorageError(f"no Ceph connection here to blocklist {record.address}")
            self.storage.blocklist_range(record.address, self.FENCE_EXPIRE)
            return record, f"every client from {record.address} blocklisted"
        return record, "its open disk clients blocklisted"

    def _boot_files(self, image: Image) -> DirectBoot:
        """Local copies of an image's kernel and initrd (fetched from RADOS
        once; the cache path names the base image and snapshot, so a new
        import never meets a stale copy)."""
        assert self.storage is not None and image.kernel and image.initrd
        try:
            paths = image.boot_cache_paths(os.path.join(self.cfg.state_dir, "cache"))
        except SpecError as exc:
            raise StorageError(str(exc)) from None
        os.makedirs(os.path.dirname(paths[0]), mode=0o755, exist_ok=True)
        for obj, path in zip((image.kernel, image.initrd), paths):
            if not os.path.exists(path):
                self.storage.fetch_object(image.pool, obj, path)
        return DirectBoot(paths[0], paths[1], image.cmdline or "console=ttyS0")

    def _shut_down(self, vm: str) -> bool:
        """Graceful shutdown, then a hard power-off after shutdown_timeout.
        Never blocks; True once the domain is off."""
        now = time.monotonic()
        deadline = self.stopping.setdefault(vm, now + self.cfg.shutdown_timeout)
        if self.hv.request_shutdown(vm):
            self.stopping.pop(vm, None)
            return True
        if now >= deadline:
            log.warning("vm=%s no shutdown after %.0fs, powering off", vm, self.cfg.shutdown_timeout)
            self.hv.power_off(vm)
            self.stopping.pop(vm, None)
            return True
        return False

    # -- etcd writes -----------------------------------------------------------------
    def _value(self, state: str, reason: str, vcpus: int, ram_mb: int, disk: str = "",
               generation: int = 0, vm_uuid: str = "") -> ActualVM:
        return ActualVM(host=self.node, state=state, reason=reason, vcpus=vcpus, ram_mb=ram_mb,
                        disk=disk, generation=generation, uuid=vm_uuid, updated=utc_now())

    def _own_claim(self, vm: str) -> Optional[ActualVM]:
        """Our claim of ``vm``: naming this node and on our current lease."""
        _, entry, claim = self.view.parsed_claim(vm)
        if entry is None or claim is None or entry.lease != self._lease():
            return None
        return claim if claim.host == self.node else None

    def _create_claim(self, vm: str, value: ActualVM, snap: Optional[Snapshot] = None,
                      history: Optional[tuple[str, str]] = None) -> bool:
        """Claim ``vm``: create its actual key on our lease if it is absent,
        or replace a claim on no live lease (``snap.untrusted``) if it is
        unchanged since seen. True if we own it now. ``history`` (event,
        detail) is recorded in the same transaction."""
        plus = self.events.entry(vm, *history) if history is not None else []
        try:
            won = self._claim_txn(vm, value, snap, plus)
        except LeaseNotFound:
            if not plus:
                raise
            self.events.forget_lease()  # the history lease, or ours: once more without history tells
            plus = []
            won = self._claim_txn(vm, value, snap, plus)
        if won and history is not None:
            if plus:
                self.events.written(vm)
            else:
                self.events.record(vm, *history)
        return won

    def _claim_txn(self, vm: str, value: ActualVM, snap: Optional[Snapshot],
                   plus: Sequence[tuple[str, bytes, int]]) -> bool:
        key = self.keys.actual(vm)
        held, bogus = self.view.claim(vm)
        bogus = bogus if snap is not None and vm in snap.untrusted else None
        if bogus is not None and held != key:  # on no live lease, in the old folder: moved to its shard
            rev, _ = self.store.create(key, value.encode(), self._lease(), plus=plus,
                                       supersede=(held, bogus.mod_revision))
            if rev is not None:
                log.warning("vm=%s replaced an untrusted claim naming %s", vm, snap.untrusted[vm].host or "nobody")
                self.view.note(held, None, rev)
                self.view.note(key, value.encode(), rev, self._lease())
            return rev is not None
        if bogus is not None:
            rev = self.store.replace(key, value.encode(), bogus.mod_revision, self._lease(), plus)
            if rev is not None:
                log.warning("vm=%s replaced an untrusted claim naming %s", vm, snap.untrusted[vm].host or "nobody")
                self.view.note(key, value.encode(), rev, self._lease())
            return rev is not None
        spec = snap.desired.get(vm) if snap is not None else None
        guards: list[tuple[str, bytes]] = []
        if isinstance(spec, DesiredVM) and spec.strict and spec.group is not None:
            # strict anti-affinity: one VM of the group per node, decided by etcd, not by our view
            guards.append((self.keys.group_guard(spec.group, self.node), json.dumps({"vm": vm}).encode()))
        rev, existing = self.store.create(key, value.encode(), self._lease(), also=guards, plus=plus,
                                          absent=[self.keys.legacy_actual(vm)])
        if rev is not None:
            self.view.note(key, value.encode(), rev, self._lease())
            for gkey, gval in guards:
                self.view.note(gkey, gval, rev, self._lease())
            return True
        if existing is None and guards:
            log.info("vm=%s not claimed: strict group %s already has a VM here", vm,
                     spec.group if isinstance(spec, DesiredVM) else "?")
        if existing is not None:
            self.races_lost += 1
            with contextlib.suppress(SpecError):
                log.info("vm=%s lost the claim race to %s (placement here chose %s)", vm,
                         ActualVM.parse(existing.value).host or "?", self.chosen.get(vm) or "nobody")
            self.view.note(key, existing.value, existing.mod_revision, existing.lease)
        return False

    def _delete_claim(self, vm: str) -> None:
        """Delete our claim (CAS on its last revision); never another node's."""
        key, entry = self.view.claim(vm)
        if entry is None or self._own_claim(vm) is None:
            return
        rev = self.store.delete_if(key, entry.mod_revision)
        if rev is not None:
            self.view.note(key, None, rev)

    def publish(self, vm: str, state: str, reason: str, vcpus: int, ram_mb: int, disk: str = "",
                history: Optional[tuple[str, str]] = None) -> bool:
        """Write our actual key if its content changes; True if written. The
        disk is kept from the current record unless given. The write is a CAS
        on the key's last revision: if another node has claimed the VM
        meanwhile, nothing is written. ``history`` (event, detail) is
        recorded in the same transaction, or on its own if nothing else is
        written."""
        key, entry, current = self.view.parsed_claim(vm)
        if entry is None or current is None:
            return False
        if current.host != self.node or entry.lease != self._lease():
            return False
        new = self._value(state, reason, vcpus, ram_mb, disk or current.disk, current.generation, current.uuid)
        if new.same_content(current):
            if history is not None:
                self.events.record(vm, *history)
            return False
        if self._held_writes is not None:
            self._held_writes.append((vm, new, entry, history))
            return True
        story = self.events.entry(vm, *history) if history is not None else []
        host = self.host_ride()  # this node's host record, when it changed: one revision for both
        try:
            rev = self.store.replace(key, new.encode(), entry.mod_revision, self._lease(), story + host)
        except LeaseNotFound:
            if not (story or host):
                raise
            self.events.forget_lease()
            if host:
                self.host_ride_failed()  # not written after all: the end of the tick writes it
            story = host = []
            rev = self.store.replace(key, new.encode(), entry.mod_revision, self._lease())
        if rev is None:
            log.warning("vm=%s claim changed under us; not writing %s", vm, state)
            if host:
                self.host_ride_failed()
            return False
        if story:
            self.events.written(vm)
        elif history is not None:
            self.events.record(vm, *history)
        self.view.note(key, new.encode(), rev, self._lease())
        for hkey, hval, hlease in host:
            self.view.note(hkey, hval, rev, hlease)
        return True

    def publish_consoles(self, domains: Mapping[str, str]) -> bool:
        """Publish the tail of each running VM's serial console under
        ``console/<vm>`` (on change, at most every CONSOLE_PERIOD seconds).
        True while some VM has a console worth polling again."""
        now = time.monotonic()
        polling = False
        for vm, state in domains.items():
            if state != "running" or self._own_claim(vm) is None:
                continue
            path = os.path.join(self.cfg.state_dir, "console", f"{vm}.log")
            try:
                with open(path, "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    size = fh.tell()
                    fh.seek(max(0, size - self.CONSOLE_BYTES))
                    tail = fh.read()
            except OSError:
                continue
            polling = True
            last_at, last = self._console_sent.get(vm, (0.0, b""))
            if tail == last or now - last_at < self.CONSOLE_PERIOD:
                continue
            self.store.put(self.keys.console(vm), tail, self._lease())
            self._console_sent[vm] = (now, tail)
        return polling

    def collect_orphan_disks(self, snap: Snapshot) -> list[str]:
        """Remove VM disks left behind when a VM was destroyed while no agent
        owned it (its owner was dead). A candidate is removed only if etcd,
        asked again right now, has no desired entry of its identity and no
        claim, and no client has it open. Every agent may do this; removal is
        idempotent. Returns the disks removed."""
        assert self.storage is not None
        pools = {i.pool for i in snap.images.values() if isinstance(i, Image)}
        removed = []
        for pool in sorted(pools):
            for disk in orphan_disks(pool, self.storage.vm_disks(pool), snap):
                self._beat()
                vm, ident = parse_disk_name(disk) or ("", "")
                desired = self.store.get_desired(vm)
                if desired is not None:
                    try:
                        spec = dataclasses.replace(DesiredVM.parse(vm, desired.value),
                                                   generation=desired.create_revision)
                    except SpecError:
                        continue  # cannot tell what it wants: keep
                    if spec.identity == ident:
                        continue
                claim = self.store.get_claim(vm)
                if claim is not None and ActualVM.parse(claim.value).disk == f"{pool}/{disk}":
                    continue
                if self.storage.in_use(pool, disk):
                    log.info("orphan disk %s/%s is still open by a client; left for now", pool, disk)
                    continue
                try:
                    self.storage.remove_disk(pool, disk)
                except StorageBusy:
                    continue
                log.info("removed orphan disk %s/%s (its VM is gone)", pool, disk)
                removed.append(f"{pool}/{disk}")
        return removed

    def lease_changed(self) -> None:
        """Our lease is gone: what was published under it (console tails)
        vanished with it and must be written again under the new one."""
        self._console_sent.clear()

    def _delete_console(self, vm: str) -> None:
        """Drop the published console, unless another node now owns the VM."""
        self._console_sent.pop(vm, None)
        key = self.keys.console(vm)
        entry = self.store.get(key)  # the view keeps no console keys
        if entry is not None and entry.lease == self._lease():
            self.store.delete_if(key, entry.mod_revision)


class WatchdogFeed:
    """The agent's side of the node watchdog (see Watchdog): a small file
    in state_dir holding the CLOCK_MONOTONIC deadline by which the main
    loop must feed again, and the feeding agent's pid. Written atomically;
    ``disarm()`` tells the watchdog to exit without touching domains."""

    def __init__(self, state_dir: str, node: str) -> None:
        self.path = os.path.join(state_dir, f"watchdog-{node}.feed")
        self.pidfile = os.path.join(state_dir, f"watchdog-{node}.pid")
        self.lockfile = os.path.join(state_dir, f"watchdog-{node}.lock")
        self._last = 0.0

    def feed(self, deadline: float, force: bool = False) -> None:
        """Move the deadline. A move earlier is always written; a move
        later only when it is 0.2 s or more, or ``force`` (rate limit)."""
        if not force and self._last <= deadline < self._last + 0.2:
            return
        self._write(f"{deadline:.3f} {os.getpid()}\n")
        self._last = deadline

    def disarm(self) -> None:
        self._write(f"disarm {os.getpid()}\n")

    def _write(self, text: str) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(text)
        os.replace(tmp, self.path)

    def running(self) -> bool:
        """True when a watchdog process holds this node's watchdog lock."""
        import fcntl
        fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the lock if we took it
        return False

    def ensure_running(self, config_path: str, timeout: float = 5.0) -> None:
        """Start the watchdog process (own session: it outlives the agent)
        unless one runs; wait until it holds its lock."""
        if self.running():
            return
        import subprocess
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--watchdog", "-c", config_path],
                         start_new_session=True, stdin=subprocess.DEVNULL, close_fds=True)
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise MetaStackError(f"the watchdog did not start within {timeout:.0f}s (see the log)")
            time.sleep(0.05)

    @staticmethod
    def read(path: str) -> tuple[Optional[float], int]:
        """(deadline or None when disarmed, feeder pid); (inf, 0) if unreadable."""
        try:
            with open(path, encoding="ascii") as fh:
                word, _, pid = fh.read().strip().partition(" ")
            return (None if word == "disarm" else float(word)), int(pid or 0)
        except (OSError, ValueError):
            return float("inf"), 0


class Watchdog:
    """``metastack.py --watchdog``: a separate process per node that stops
    the node's domains when the agent's main loop stops proving progress.

    Contract: it holds ``watchdog-<node>.lock`` (one per node) and polls the
    feed file every 0.1 s. When the deadline passes it powers off every
    domain tagged with this node, through its own libvirt connection with a
    bounded wait, and, if libvirt does not answer in time, by killing the
    QEMU processes (found in /proc by their ``-name guest=<vm>.<node>``);
    it keeps doing so while the deadline stays in the past. It exits when
    disarmed, on SIGTERM (touching nothing), or once it has fired, no domain
    of the node runs and the feeding agent is gone. A SIGSTOP of the agent
    does not stop it: it is its own process.
    """

    POLL = 0.1
    LIBVIRT_WAIT = 2.0

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.node = cfg.node_name
        self.feed = WatchdogFeed(cfg.state_dir, cfg.node_name)
        self._stop = False

    def request_stop(self) -> None:
        self._stop = True

    def run(self) -> int:
        import fcntl
        os.makedirs(self.cfg.state_dir, mode=0o755, exist_ok=True)
        fd = os.open(self.feed.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("watchdog: another watchdog guards node %s", self.node)
            return 0
        with open(self.feed.pidfile + ".tmp", "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(self.feed.pidfile + ".tmp", self.feed.pidfile)
        log.info("watchdog armed for node %s (pid %d)", self.node, os.getpid())
        fired = False
        try:
            while not self._stop:
                deadline, feeder = WatchdogFeed.read(self.feed.path)
                if deadline is None:
                    log.info("watchdog: disarmed by the agent; exiting")
                    return 0
                if time.monotonic() > deadline:
                    if not fired:
                        log.error("watchdog: node %s's agent (pid %d) stopped feeding %.1fs ago: stopping the "
                                  "node's domains before its lease can lapse", self.node, feeder,
                                  time.monotonic() - deadline)
                    fired = True
                    left = self.stop_domains()
                    if left == 0 and not _pid_alive(feeder):
                        log.info("watchdog: no domain of %s runs and its agent is gone; exiting", self.node)
                        return 0
                    time.sleep(0.5)
                    continue
                if fired:
                    log.info("watchdog: fed again; standing guard")
                    fired = False
                time.sleep(self.POLL)
            log.info("watchdog: stopped by signal; domains left as they are")
            return 0
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.feed.pidfile)
            os.close(fd)

    def stop_domains(self) -> int:
        """Power off every running domain of this node; returns how many
        still run afterwards (by /proc)."""
        result: list[Any] = []

        def via_libvirt() -> None:
            hv = Hypervisor(self.cfg.libvirt_uri, self.node, "qemu")
            try:
                for vm, state in hv.domains().items():
                    if state == "running":
                        hv.power_off(vm)
                        log.warning("watchdog: powered off %s", domain_name(vm, self.node))
            finally:
                hv.close()
            result.append(True)
        t = threading.Thread(target=via_libvirt, name="watchdog-libvirt", daemon=True)
        t.start()
        t.join(self.LIBVIRT_WAIT)
        if not result:
            log.error("watchdog: libvirt did not power the domains off within %.0fs: killing QEMU by pid",
                      self.LIBVIRT_WAIT)
        for pid, name in qemu_processes(self.node):
            if not result:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    log.warning("watchdog: killed QEMU %d of %s", pid, name)
        return len(qemu_processes(self.node))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def qemu_processes(node: str) -> list[tuple[int, str]]:
    """(pid, domain name) of every QEMU running a domain of ``node``,
    found by its ``-name guest=<vm>.<node>`` argument."""
    pattern = re.compile(rf"^guest=([a-z0-9-]+\.{re.escape(node)})(,|$)")
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == b"-name":
                m = pattern.match(args[i + 1].decode(errors="replace"))
                if m:
                    out.append((int(entry), m.group(1)))
                break
    return out


def resolve_domain_type(cfg: AgentConfig, beat: Callable[[], None]) -> str:
    """The domain type to use: as configured, or for ``auto`` the result of
    the KVM probe, cached in state_dir (keyed by kernel and emulator) so a
    restarted agent does not spend 10 s probing while its VMs wait. A probe
    that must run runs in a thread while ``beat`` keeps proving progress."""
    if cfg.domain_type != "auto":
        return cfg.domain_type
    import shutil
    kernel, exe = find_probe_kernel(), shutil.which("qemu-system-x86_64")
    key = {"kernel": kernel, "kernel_mtime": os.path.getmtime(kernel) if kernel else 0,
           "qemu": exe, "qemu_mtime": os.path.getmtime(exe) if exe else 0}
    cache = os.path.join(cfg.state_dir, "kvm-probe.json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(cache, encoding="utf-8") as fh:
            cached = json.load(fh)
        if cached["key"] == key:
            log.info("domain_type auto: using %s (cached probe: %s)", cached["type"], cached["why"])
            return str(cached["type"])
    result: list[tuple[bool, str]] = []
    t = threading.Thread(target=lambda: result.append(probe_kvm()), name="kvm-probe", daemon=True)
    t.start()
    while t.is_alive():
        beat()
        t.join(0.2)
    works, why = result[0] if result else (False, "the probe failed")
    domain_type = "kvm" if works else "qemu"
    log.info("domain_type auto: using %s (%s)", domain_type, why)
    with contextlib.suppress(OSError):
        os.makedirs(cfg.state_dir, mode=0o755, exist_ok=True)
        with open(cache + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"key": key, "type": domain_type, "why": why}, fh)
        os.replace(cache + ".tmp", cache)
    return domain_type


class AssignmentMemo:
    """The last answer of ``Placement.assign``, reused while it still holds.

    Contract: ``assign(placement, pending, skip)`` returns exactly what
    ``placement.assign(skip)`` would (``pending``: ``placement.pending(skip)``).
    It reuses the previous answer, restricted to the VMs still pending,
    when the only changes since are that VMs of the previous answer were
    claimed where it put them and that new VMs arrived after the last one
    it looked at: the same offers (hosts, node records, moves, flavours,
    images), policy, skip set and pending specs; each node's reservation
    grown by exactly what the claimed VMs reserve; the replayed recent
    claims those of before plus the new ones. The new arrivals alone are
    then placed, going on from where the previous simulation ended
    (Placement.assign_ended). In a burst most looks see nothing else, and
    each look costs O(new arrivals x log nodes), not O(pending x log
    nodes). VMs of anti-affinity groups (their placement reads every claim
    of the group) are never reused.
    """

    def __init__(self) -> None:
        self._last: Optional[dict[str, Any]] = None
        self.reused = 0  # answers reused (for tests and the benchmark)
        self.extended = 0  # of those, answers that placed new arrivals from where the last one ended
        self.sizes: dict[str, Optional[tuple[int, int]]] = {}  # vm -> (vcpus, ram_mb) of the last answer

    @staticmethod
    def _offers(placement: "Placement", skip: Collection[str]) -> tuple[Any, ...]:
        snap = placement.snap
        return (placement.policy, frozenset(skip),
                tuple(sorted((n, b.cap_cpu, b.cap_ram, b.cannot) for n, b in placement.bins.items())),
                tuple(sorted((n, h.state) for n, h in snap.hosts.items())),
                tuple(sorted((n, m.from_node) for n, m in snap.moves.items())))

    def assign(self, placement: "Placement", pending: Sequence[str], skip: Collection[str]) -> dict[str, str]:
        snap = placement.snap
        specs = {vm: snap.desired[vm] for vm in pending}
        offers = self._offers(placement, skip)
        use = {n: (b.cpu, b.ram) for n, b in placement.bins.items()}

        def size(vm: str) -> Optional[tuple[int, int]]:
            resolved = resolve(specs[vm], snap)
            return (resolved[1].vcpus, resolved[1].ram_mb) if not isinstance(resolved, str) else None

        hit = self._reuse(placement, pending, specs, offers, use)
        if hit is None:
            answer, end = placement.assign_ended(skip)
            sizes = {vm: size(vm) for vm in answer}
        else:
            self.reused += 1
            answer, fresh = hit
            sizes = {vm: s for vm, s in self._last["sizes"].items() if vm in answer}  # type: ignore[index]
            end = self._last["end"]  # type: ignore[index]
            if fresh:
                self.extended += 1
                more, end = placement.assign_ended(skip, end, fresh)
                answer.update(more)
                sizes.update((vm, size(vm)) for vm in more)
        self.sizes = sizes
        grouped = any(isinstance(v, DesiredVM) and v.group is not None for v in specs.values())
        self._last = None if grouped else dict(
            answer=answer, specs=specs, offers=offers, use=use, recent=list(placement.recent), sizes=sizes,
            end=end, flavours=dict(snap.flavours), images=dict(snap.images), nodes=dict(snap.nodes))
        return dict(answer)

    def _reuse(self, placement: "Placement", pending: Sequence[str], specs: Mapping[str, Any],
               offers: tuple[Any, ...], use: Mapping[str, tuple[int, int]]) -> Optional[tuple[dict[str, str], list[str]]]:
        """(the previous answer for the VMs still pending, the new arrivals
        to place from where it ended), or None: assign afresh."""
        last, snap = self._last, placement.snap
        if last is None or offers != last["offers"]:
            return None
        for field in ("flavours", "images", "nodes"):
            now, then = getattr(snap, field), last[field]
            if now.keys() != then.keys() or any(now[k] is not then[k] for k in now):
                return None
        then_specs, answer, end = last["specs"], last["answer"], last["end"]
        fresh = [vm for vm in pending if vm not in then_specs]
        # New VMs are placed from where the last run ended only when all of
        # them are newer than its last VM (else one released or seen late
        # changes the order before it) and a VM it looked at still waits
        # (else the recent claims start after the oldest new VM, and a claim
        # made between the last VM looked at and that one, which the end
        # state leaves out of the ranking, would go unseen).
        if fresh and not (end.last is not None and placement.created(pending[0]) <= end.last
                          < placement.created(fresh[0])):
            return None
        if any(then_specs.get(vm) is not spec for vm, spec in specs.items() if vm in then_specs):
            return None  # a pending VM whose desired entry changed
        if any(vm not in answer for vm in specs if vm in then_specs):
            return None  # it waited (no room) then: the claims since may have made room
        grown = {n: [cpu, ram] for n, (cpu, ram) in last["use"].items()}
        recent = list(last["recent"])
        for vm in then_specs.keys() - specs.keys():  # left pending: claimed where the answer put it?
            node, size = answer.get(vm), last["sizes"].get(vm)
            if node is None or size is None or node not in grown:
                return None
            grown[node][0] += size[0]
            grown[node][1] += size[1]
            recent.append((then_specs[vm].generation, vm, node, size[0], size[1]))  # sized: a DesiredVM
        if use != {n: (cpu, ram) for n, (cpu, ram) in grown.items()}:
            return None
        oldest = placement.created(pending[0]) if pending else None  # pending is in creation order
        if oldest is None or sorted(r for r in recent if (r[0], r[1]) > oldest) != placement.recent:
            return None
        return {vm: answer[vm] for vm in specs if vm in then_specs}, fresh


class ClaimTurns:
    """Whose turn it is to claim each unclaimed VM, as this node sees it.

    Contract: ``due(snap, policy, skip, now)`` returns (the unclaimed VMs
    this node may claim now, the monotonic time of its next turn or None).
    A VM is this node's at once when Placement chose this node for it; else,
    when this node is the r-th backup for it (Placement.backups), at
    ``base + (r - 1) x step``: ``base`` is one step after this agent first
    saw the VM unclaimed, or one step after the chosen node last made
    progress (its claims' reservation changed, as this agent saw it),
    whichever is later. A chosen node claims in creation order; once it has
    claimed a VM created after this one (it passed this one by), the base
    is at most PATIENCE steps after the first sight. So backups never race
    a chosen node that works through its queue, however slow.
    The step is stretched by the backlog (unclaimed VMs per schedulable
    node, when above 1). So backups leave a busy chosen node its queue in a
    burst, however slow the machine, and step in one step after a dead or
    stuck one stops claiming. ``step`` 0: every node that can take a VM
    tries at once (the old race). VMs in ``skip`` (held for their owners
    after a correlated loss) are nobody's. Work per call: the placement,
    plus, for each VM past its base only, a count over the nodes ahead of
    this one in its rendezvous order (hashed once per VM).
    """

    PATIENCE = 10  # steps: the latest base, for a chosen node that claims other VMs but never this one
    FORECAST = 3  # nodes per flavour first in line for the next arrivals (``expected``)

    def __init__(self, node: str, step: float) -> None:
        self.node = node
        self.step = step
        self.first_seen: dict[str, float] = {}  # unclaimed vm -> when this agent first saw it so (monotonic)
        self.last_chosen: dict[str, str] = {}  # vm -> node Placement chose in the last call (for tests, logs)
        self.progress: dict[str, float] = {}  # node -> when its claims' reservation last changed (monotonic)
        self._reserved: dict[str, tuple[int, int]] = {}  # node -> (vcpus, ram_mb) its claims reserved then
        self._ahead: dict[str, tuple[frozenset[str], list[str]]] = {}  # vm -> (nodes hashed, those before this one)
        self.memo = AssignmentMemo()
        # The nodes first in line for the next arrivals, as of the last call
        # (Placement.next_takers); None: unknown, everyone looks at once.
        self.expected: Optional[frozenset[str]] = None

    def _note_progress(self, snap: Snapshot, use: Optional[Mapping[str, tuple[int, int]]], now: float) -> None:
        if use is None:
            totals: dict[str, list[int]] = {n: [0, 0] for n in snap.hosts}
            for claim in snap.actual.values():
                if claim.host in totals:
                    totals[claim.host][0] += claim.vcpus
                    totals[claim.host][1] += claim.ram_mb
            use = {n: (t[0], t[1]) for n, t in totals.items()}
        for n, reserved in use.items():
            if self._reserved.get(n) != reserved:
                self._reserved[n] = reserved
                self.progress[n] = now
        for n in [n for n in self._reserved if n not in use]:
            del self._reserved[n]
            self.progress.pop(n, None)

    def _nodes_ahead(self, vm: str, nodes: frozenset[str]) -> list[str]:
        """Those of ``nodes`` before this one in ``vm``'s rendezvous order
        (hashed once per VM while the set of nodes stays the same)."""
        hit = self._ahead.get(vm)
        if hit is None or hit[0] != nodes:
            mine = _order_key(self.node, vm)
            hit = self._ahead[vm] = (nodes, [n for n in nodes if n != self.node and _order_key(n, vm) < mine])
        return hit[1]

    def due(self, snap: Snapshot, policy: str, skip: Collection[str], now: float,
            use: Optional[Mapping[str, tuple[int, int]]] = None,
            recent: Optional[Sequence[tuple[int, str, str, int, int]]] = None) -> tuple[set[str], Optional[float]]:
        """See the class contract; ``use`` and ``recent`` as for Placement."""
        placement = Placement(snap, policy, use, recent)
        pending = placement.pending(skip)
        self.first_seen = {vm: self.first_seen.get(vm, now) for vm in pending}
        self._ahead = {vm: hit for vm, hit in self._ahead.items() if vm in self.first_seen}
        if self.step <= 0:
            self.expected = None
            return set(pending), None
        self._note_progress(snap, use, now)
        chosen = self.memo.assign(placement, pending, skip)
        self.last_chosen = chosen
        given: dict[str, tuple[int, int]] = {}
        for vm, n in chosen.items():
            size = self.memo.sizes.get(vm)
            if size is not None:
                had = given.get(n, (0, 0))
                given[n] = (had[0] + size[0], had[1] + size[1])
        self.expected = placement.next_takers(given, self.FORECAST)
        mine = {vm for vm, n in chosen.items() if n == self.node}
        next_turn: Optional[float] = None
        # In a burst every chosen node has a queue: the step grows with the
        # backlog per node, so backups wait for a busy node instead of racing it.
        step = self.step * max(1.0, len(pending) / max(1, len(placement.bins)))
        nodes: Optional[frozenset[str]] = None
        newest: dict[str, tuple[int, str]] = {}  # node -> the newest VM it claimed (creation order)
        for created, claimed, host, _, _ in placement.recent:  # sorted: the last one per node wins
            newest[host] = (created, claimed)
        for vm in pending:
            if vm in mine:
                continue
            since = self.first_seen[vm]
            base = since + step
            owner = chosen.get(vm)
            if owner is not None and owner in self.progress:  # a chosen node still claiming: its queue
                # Claims go in creation order: one newer than this VM means
                # the owner passed it by (it cannot take it, as far as it
                # knows); only then is its patience bounded.
                passed = newest.get(owner, (0, "")) > placement.created(vm)
                latest = since + self.PATIENCE * step if passed else math.inf
                base = max(base, min(self.progress[owner] + step, latest))
            if now < base:  # the chosen node's own turn: nobody else looks yet
                next_turn = min(next_turn or math.inf, base)
                continue
            if not placement.able(vm, (self.node,)):
                continue
            nodes = frozenset(placement.bins) if nodes is None else nodes
            ahead = [n for n in self._nodes_ahead(vm, nodes) if n != owner]
            turn = base + len(placement.able(vm, ahead)) * step
            if now >= turn:
                mine.add(vm)
            else:
                next_turn = min(next_turn or math.inf, turn)
        return mine, next_turn


class CellOverflow:
    """With cells: a VM that no node of the cell serving its shard can take
    is offered to another cell, and offers this node's cell cannot take are
    passed on (Spill records, ``overflow/<vm>``, in the range every agent
    watches). Without it a full cell leaves VMs waiting while another cell
    has room: each cell sees only its own nodes' use.

    Contract: only the first node of a cell (first_in_cell) writes, by
    compare-and-swap, at most BATCH records per call (the rest at the next
    call, at once), and only when a VM waits (nothing in steady state).
    ``tend`` does, for the VMs of the shards this node's cell serves:
    offer (oldest first) each one that waited AFTER seconds unchosen by
    the cell's placement (or OWN_PATIENCE seconds chosen and unclaimed),
    not pinned, to the next live cell in ring order,
    when the cell has a ready node and not all of those gave the VM up;
    delete the record once the VM is claimed (anywhere), gone or pinned,
    when it names this cell (its shard was adopted), or is malformed;
    offer again, from the start of the ring, RETRY seconds after every cell
    said no, or at once when the cell named has no live node (the record
    is deleted when no other cell is live). And for the VMs offered to
    this node's cell: pass each on (to the next live cell not tried yet,
    or to none) when no node of the cell has room for it, when it waited
    AFTER seconds watched here and unchosen, or PATIENCE seconds chosen and
    unclaimed. ``wanted`` names the VMs offered to this node's cell that it
    has room for: every node of the cell watches them (Interest.extra, a
    re-list) and places them like its own. The claim is the usual one, in
    the VM's shard; a record is a hint and never decides who runs a VM."""

    AFTER = 2.0  # seconds a VM waits unchosen in its cell (or in the cell offered it) before it is offered on
    RETRY = 60.0  # seconds before a VM that no cell had room for is offered round again
    BATCH = 16  # records written per reconcile at most (offers, passes on, offers again, deletes)
    PATIENCE = 5 * AFTER  # seconds an offered VM its cell's placement picks may stay unclaimed before it is passed on
    OWN_PATIENCE = 15 * AFTER  # the same for a VM its own cell's placement picks (a burst's queue may be long)

    def __init__(self, store: "Store", view: "ClusterView", node: str) -> None:
        self.store, self.view, self.node, self.keys = store, view, node, store.keys
        self._seen: dict[str, tuple[int, float]] = {}  # vm -> (mod revision of its record, when first seen so)
        self._budget = self.BATCH  # writes left in this call of tend
        self._holders: dict[str, str] = {}  # vm -> the holder a record deleted unclaimed named (for the next offer)
        self.written = 0  # records written or deleted (for tests and benchmarks)

    @staticmethod
    def room(snap: Snapshot, vm: str, spill: Spill) -> bool:
        """Whether a ready, schedulable node of the snapshot's cell has
        ``spill``'s vcpus and RAM free and did not give ``vm`` up."""
        for n, h in snap.hosts.items():
            cpu, ram = free_capacity(h)
            if (placeable(snap, n, h) and cpu >= spill.vcpus and ram >= spill.ram_mb
                    and all(vm != gave_up for gave_up, _ in h.cannot)):
                return True
        return False

    def wanted(self, snap: Snapshot) -> list[str]:
        """The VMs offered to this node's cell that it has room for."""
        if snap.interest is None:
            return []
        return [vm for vm, sp in snap.overflow.items() if sp.cell == snap.interest.cell and self.room(snap, vm, sp)]

    @staticmethod
    def next_cell(cells: CellMap, after: int, tried: Collection[int]) -> Optional[int]:
        """The first live cell after ``after`` in ring order not in ``tried``."""
        for step in range(1, cells.cells):
            cell = (after + step) % cells.cells
            if cell in cells.live and cell not in tried:
                return cell
        return None

    def tend(self, snap: Snapshot, chosen: Callable[[], Mapping[str, str]], waiting: Mapping[str, float],
             held: Collection[str], now: float) -> Optional[float]:
        """See the class contract. ``chosen``: the cell's placement (vm ->
        node), asked only when a VM may be offered; ``waiting``: unclaimed
        VM -> since when this node saw it so (ClaimTurns.first_seen).
        Returns the monotonic time it wants to be called again, or None."""
        self._seen = {vm: seen for vm, seen in self._seen.items() if vm in snap.overflow}
        self._holders = {vm: h for vm, h in self._holders.items() if vm in snap.desired and vm not in snap.actual}
        self._budget = self.BATCH
        interest, cells = snap.interest, snap.cells
        if interest is None or cells is None:  # one cell: records left from cells are nobody's
            names = self.view.names_of("overflow")
            if names and self.node == min(snap.hosts, default=None):
                for vm in sorted(names):
                    self._delete(vm)
                return now + 0.1 if self._budget <= 0 else None
            return None
        if first_in_cell(snap) != self.node:
            return None
        mine, ats = interest.cell, []
        ready = [h for n, h in snap.hosts.items() if placeable(snap, n, h)]
        cannot = [frozenset(vm for vm, _ in h.cannot) for h in ready]
        picks: Optional[Mapping[str, str]] = None

        def offerable(vm: str) -> bool:
            """Not for this cell: it has a ready node, not all gave it up, and
            its placement leaves it out (or picked it OWN_PATIENCE ago, unclaimed)."""
            nonlocal picks
            if not ready or all(vm in c for c in cannot):  # with no ready node the cell is not full, it does not work
                return False
            picks = chosen() if picks is None else picks
            return vm not in picks or now >= waiting.get(vm, now) + self.OWN_PATIENCE
        for vm in sorted(self.view.names_of("overflow")):  # malformed (as it is now): its serving cell deletes it
            entry = self.view.entry(self.keys.overflow(vm))
            if entry is not None and interest.in_cell(vm) and vm not in snap.overflow:
                try:
                    Spill.parse(vm, entry.value)
                except SpecError:
                    self._delete(vm)
        for vm, spill in sorted(snap.overflow.items()):
            seen = self._since(vm, now)
            spec = snap.desired.get(vm)
            if interest.in_cell(vm):  # ours to offer
                if (vm in snap.actual or not isinstance(spec, DesiredVM) or spec.host is not None
                        or spill.cell == mine):  # claimed, gone, pinned, or ours now (adopted): it waits here
                    self._delete(vm)
                elif spill.cell is None and now < seen + self.RETRY:
                    ats.append(seen + self.RETRY)
                elif spill.cell is None or spill.cell not in cells.live:  # round again, or the cell went
                    target = self.next_cell(cells, mine, (mine,))
                    if target is not None and not ready:  # no node of ours works now: look again later
                        ats.append(now + self.AFTER)
                    elif target is None or not offerable(vm):
                        self._holders[vm] = spill.holder  # for an offer made again later
                        self._delete(vm)
                    else:
                        self._write(vm, dataclasses.replace(spill, cell=target, tried=(mine,), by=self.node,
                                                            at=utc_now()), fresh=False)
            elif spill.cell == mine and vm not in snap.actual:  # offered to us
                if self.room(snap, vm, spill):
                    if not interest.keeps(vm) or now < seen + self.AFTER:
                        ats.append(max(seen + self.AFTER, now + 0.5))  # its nodes list again first
                        continue
                    picks = chosen() if picks is None else picks
                    if vm in picks and now < seen + self.PATIENCE:
                        ats.append(seen + self.PATIENCE)
                        continue
                tried = spill.tried + (mine,)
                self._write(vm, dataclasses.replace(spill, cell=self.next_cell(cells, mine, tried), tried=tried,
                                                    by=self.node, at=utc_now()), fresh=False)
        due = [vm for vm, since in waiting.items()
               if vm not in snap.overflow and vm not in held and vm not in snap.actual and interest.in_cell(vm)
               and isinstance(spec := snap.desired.get(vm), DesiredVM) and spec.host is None]
        ats += [waiting[vm] + self.AFTER for vm in due if now < waiting[vm] + self.AFTER]
        due = sorted((vm for vm in due if now >= waiting[vm] + self.AFTER), key=lambda v: (waiting[v], v))
        target = self.next_cell(cells, mine, (mine,))
        for vm in due if target is not None else ():
            if self._budget <= 0:
                break
            resolved = resolve(snap.desired[vm], snap)
            if isinstance(resolved, tuple) and offerable(vm):
                gone = self.view.vanished.get(vm)
                holder = gone.host if gone is not None and gone.host else self._holders.get(vm, "")
                self._write(vm, Spill(target, (mine,), resolved[1].vcpus, resolved[1].ram_mb, self.node, utc_now(),
                                      holder), fresh=True)
        if self._budget <= 0:
            ats.append(now + 0.1)  # more to write: at once, in the next call
        return min((t for t in ats if t > now), default=None)

    def _since(self, vm: str, now: float) -> float:
        """When this node first saw ``vm``'s record as it is now (its mod revision)."""
        entry = self.view.entry(self.keys.overflow(vm))
        rev = entry.mod_revision if entry is not None else 0
        seen = self._seen.get(vm)
        if seen is None or seen[0] != rev:
            seen = self._seen[vm] = (rev, now)
        return seen[1]

    def _write(self, vm: str, spill: Spill, fresh: bool) -> None:
        """Create (``fresh``) or replace by compare-and-swap ``vm``'s record;
        a record gone meanwhile is left gone. Nothing once this call's
        budget of BATCH writes is spent (the next call goes on)."""
        key, value = self.keys.overflow(vm), spill.encode()
        entry = self.view.entry(key)
        if self._budget <= 0 or (entry is None and not fresh):
            return
        self._budget -= 1
        if fresh:
            rev, _ = self.store.create(key, value)
        else:
            rev = self.store.replace(key, value, entry.mod_revision)
        if rev is not None:
            self.view.note(key, value, rev)
            self.written += 1
            where = f"to cell {spill.cell}" if spill.cell is not None else "to no cell: none had room"
            log.info("vm=%s node=%s decision=overflow: offered %s (cells without room: %s)", vm, self.node, where,
                     ", ".join(map(str, spill.tried)))

    def _delete(self, vm: str) -> None:
        """Delete ``vm``'s record by compare-and-swap (within the budget)."""
        key = self.keys.overflow(vm)
        entry = self.view.entry(key)
        if entry is None or self._budget <= 0:
            return
        self._budget -= 1
        rev = self.store.delete_if(key, entry.mod_revision)
        if rev is not None:
            self.view.note(key, None, rev)
            self.written += 1


class Agent:
    """One node's agent: claims, runs and reports VMs; see the module doc.

    ``tick()`` is one level-triggered reconcile of the full desired set
    against what this node owns and runs; it returns a one-line decision.
    ``run()`` loops on ticks, woken early by watch events and the lease
    keeper, until ``request_stop()`` (signal handlers only call that). Each
    loop turn, and each action, is a beat: proof of progress that the lease
    keeper and the watchdog depend on.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.node = cfg.node_name
        self._waker = Waker()
        self._beat_at = time.monotonic()
        self._feed_lock = threading.Lock()  # the main loop and the keeper both feed the watchdog
        self._feed_final = False  # stopping: the last feed is written, no other may follow
        self._keeper: Optional[LeaseKeeper] = None
        self.watchdog: Optional[WatchdogFeed] = None
        if not cfg.libvirt_uri.startswith("test:"):  # test:/// domains live and die with this process
            self.watchdog = WatchdogFeed(cfg.state_dir, cfg.node_name)
            if os.path.isdir(cfg.state_dir):  # a watchdog of the previous run may guard running guests
                self.beat()
        self.store = Store(cfg.etcd)
        self.keys = self.store.keys
        known = cfg.domain_type if cfg.domain_type != "auto" else "qemu"  # resolved in start(), after adoption
        self.hv = Hypervisor(cfg.libvirt_uri, cfg.node_name, known, on_event=self._on_domain_event)
        hv_cpu, hv_ram = self.hv.capacity()
        self.base_capacity = Capacity(cfg.vcpus or hv_cpu, cfg.ram_mb or hv_ram)  # before allocation ratios
        self.capacity = self.base_capacity
        self._cluster_config: tuple[int, ClusterConfig] = (0, ClusterConfig())
        self.view = ClusterView(self.keys)
        self.storage = (Storage(cfg.ceph, op_timeout=max(1.0, cfg.watchdog_delay - 1.0))
                        if cfg.ceph is not None else None)
        self.executor = Executor(cfg, self.store, self.view, self.hv, self.storage, self.capacity,
                                 lambda: self.lease_id, self._lease_headroom, self.beat)
        self.executor.host_ride, self.executor.host_ride_failed = self._host_ride, self._host_ride_failed
        self._console_polling = False
        self._stop_requested = False  # set by request_stop (signal handlers), read by the loop
        self._watch_cancel: Optional[Callable[[], None]] = None
        self._watch_dead = threading.Event()
        self._last_resync = 0.0
        self._troubles_at_watch = 0
        self._store_trouble = False
        self._need_relist = False
        self._quiet_until = 0.0  # after our own lease loss: re-claim our running VMs, nothing new
        self._doubt: list[list[float]] = []  # [start, end] (monotonic) of spells our own lease was in doubt
        self._cannot_lift: set[str] = set()  # fences we were refused the right to lift
        self._last_host: Optional[HostState] = None
        self._handed: dict[str, float] = {}  # VMs the drain released -> when (monotonic)
        self._defined: frozenset[str] = frozenset()  # the domains defined here, as of the last listing with cells
        self._domains_unlisted = False  # the last listing could not ask libvirt for them
        self._evacuating: set[str] = set()  # evacuated nodes fenced whose agent must release its VMs (logged once)
        self._cannot_evacuate: set[str] = set()  # evacuated nodes this node failed to fence (logged once)
        self._evacuate_seen: dict[str, float] = {}  # evacuated nodes still live -> when first seen so (monotonic)
        self._evacuate_at: Optional[float] = None  # when this node's fallback turn to fence one comes (monotonic)
        self._evacuate_done: set[tuple[str, int]] = set()  # (node, lease) this node fenced (and revoked if it could)
        self._departures_asked: dict[str, int] = {}  # vm -> the vanishing (revision) whose lease etcd was asked about
        self._seen_dead: set[str] = set()  # nodes whose death we logged
        self.last_decision = ""
        self.turns = ClaimTurns(self.node, cfg.claim_step)
        self.overflow = CellOverflow(self.store, self.view, self.node)
        self._overflow_at: Optional[float] = None  # when CellOverflow.tend wants to look again (monotonic)
        self.ticks, self.tick_cpu = 0, 0.0  # reconciles so far, and the CPU time they took (for benchmarks)
        self.looks, self.look_cpu = 0, 0.0  # looks for new work (see _new_work_here), and their CPU time
        self._ticked_at = 0.0  # monotonic end of the last reconcile (see _next_tick)
        self.look_causes: Counter[str] = Counter()  # what asked for each look: work (at once), later, turn (a timer)
        self.tick_causes: Counter[str] = Counter()  # what asked for each reconcile: news, timer, work (a look found some)
        self._full_due = True  # news (or a wake-up) asks for a full reconcile
        self._ride_ok = False  # during a reconcile of a node not fenced: the host record may ride along
        self._libvirt_down = False  # the last reconcile failed to reach libvirt: host state "degraded"
        self._next_turn: Optional[float] = None  # monotonic time this node's next claim turn comes
        self._look_now = False  # new work for a node first in line (ClaimTurns.expected): look at once
        self._look_at: Optional[float] = None  # new work for another node: look then (monotonic), if not before
        self._looked_at = 0.0  # when the last look or reconcile began (monotonic)
        self._hold_ends: Optional[float] = None  # monotonic time the first failover hold ends

    # -- lifecycle -----------------------------------------------------------
    @property
    def lease_id(self) -> int:
        assert self._keeper is not None
        return self._keeper.lease_id

    def wake(self) -> None:
        """Ask for a full reconcile soon (any thread)."""
        self._full_due = True
        self._waker.wake()

    def beat(self) -> None:
        """Proof that the main loop makes progress: the lease keeper renews
        only while beats are fresh, and the watchdog is fed from here."""
        self._beat_at = time.monotonic()
        self._feed_watchdog()

    def watchdog_deadline(self) -> float:
        """The monotonic time by which the watchdog must have stopped this
        node's domains unless fed again.

        Contract: at most the last beat plus ``watchdog_delay``; and while
        the keeper's last renewal succeeded, at most the lease's earliest
        end (the start of its last confirmed renewal plus its TTL) less
        ``WATCHDOG_ALLOWANCE``, so a frozen process (keeper included) has
        its guests off before any other node may take its VMs over. While
        renewals fail (etcd trouble) the lease's end does not count: a
        healthy agent keeps its guests through an etcd outage, and storage
        fencing guards the disks if other nodes still reach etcd."""
        deadline = self._beat_at + self.cfg.watchdog_delay
        keeper = self._keeper
        if keeper is not None and not keeper.failing and not keeper.lost.is_set():
            deadline = min(deadline, keeper.confirmed + keeper.ttl - WATCHDOG_ALLOWANCE)
        return deadline

    def _feed_watchdog(self, force: bool = False) -> None:
        """Write ``watchdog_deadline()`` to the feed (main loop at each
        beat; keeper thread after each renewal or change of health)."""
        if self.watchdog is not None:
            with self._feed_lock:
                if not self._feed_final:
                    self.watchdog.feed(self.watchdog_deadline(), force)

    def _lease_headroom(self) -> float:
        """Seconds left before this node's lease may lapse (<= 0: now)."""
        if self._keeper is None or not self._keeper.valid():
            return 0.0
        return self._keeper.deadline() - time.monotonic()

    def _on_domain_event(self, vm: str, what: str) -> None:
        """libvirt lifecycle event of one of our domains (event thread)."""
        if what.startswith(("stopped", "crashed", "shut down")):
            log.info("vm=%s domain %s", vm, what)
        self.wake()

    def request_stop(self) -> None:
        """Ask the main loop to stop (safe from a signal handler)."""
        self._stop_requested = True
        self._waker.wake()

    def start(self) -> None:
        """Arm the watchdog, take a lease, register the node (refusing a
        name a live agent holds), list the prefix and start watching it. A
        lease left by this node's previous run that is still alive is taken
        over first, so its claims and running domains are adopted without a
        restart; only then may slow start-up work (the Ceph connection and
        its libvirt secret, the KVM probe) run."""
        self._lock_node()
        if self.watchdog is not None:
            self.beat()
            self._feed_watchdog(force=True)
            self.watchdog.ensure_running(self.cfg.config_path)
        if self._keeper is None and not self._adopt_lease():
            self._register_node()  # before the host record: readers of a live node find its record
            self._acquire_lease(wait_for_stale=self.cfg.lease_ttl + 2.0)
        else:
            self._register_node()
        if self.storage is not None and not self.executor.secret_uuid:
            self.executor.use_ceph_secret(self.storage.fsid())  # connects to Ceph: after the adoption
        self.hv.domain_type = resolve_domain_type(self.cfg, self.beat)
        self._resync()

    def _lock_node(self) -> None:
        """One agent per node name on this machine: an exclusive flock on
        ``state_dir/agent-<node>.lock``, held for the life of the process
        (the kernel drops it when the process dies, even by kill -9)."""
        import fcntl
        if getattr(self, "_lock_fd", None) is not None:
            return  # held since an earlier attempt to start
        os.makedirs(self.cfg.state_dir, mode=0o755, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.cfg.state_dir, f"agent-{self.node}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise NodeTakenError(f"node name {self.node!r} is held by a live agent on this machine "
                                 f"(lock {self.cfg.state_dir}/agent-{self.node}.lock); refusing to start") from None

    def _register_node(self) -> None:
        """Create ``nodes/<node>`` on first start; keep its address current
        and clear ``lost_at``. Compare-and-swap, keeping every other field
        (an operator's cordon/drain state): retried on a lost race."""
        key = self.keys.node(self.node)
        for _ in range(10):
            entry = self.store.get(key)
            old: Optional[NodeRecord] = None
            if entry is not None:
                with contextlib.suppress(SpecError):
                    old = NodeRecord.parse(self.node, entry.value)
            if old is not None and old.address == self.cfg.address and not old.lost_at:
                return
            base = old or NodeRecord(first_seen=utc_now())
            rec = dataclasses.replace(base, address=self.cfg.address, lost_at="")
            if entry is None:
                rev, _ = self.store.create(key, rec.encode())
            else:
                rev = self.store.replace(key, rec.encode(), entry.mod_revision)
            if rev is not None:
                return
        log.warning("node record %s keeps changing; not updated this time", key)

    @property
    def _lease_file(self) -> str:
        return os.path.join(self.cfg.state_dir, f"agent-{self.node}.lease")

    def _adopt_lease(self) -> bool:
        """Take over the previous run's lease if it still lives and the
        node's host record hangs on it. The keeper then uses the TTL the
        lease was granted with, whatever the configuration says now."""
        try:
            with open(self._lease_file, encoding="ascii") as fh:
                lease = int(fh.read().strip(), 16)
        except (OSError, ValueError):
            return False
        started = time.monotonic()
        if self.store.refresh_lease(lease) <= 0:
            return False
        _, granted = self.store.lease_ttl(lease)
        host = self.store.get(self.keys.host(self.node))
        if host is None or host.lease != lease or granted <= 0:
            return False
        self.view.note(self.keys.host(self.node), host.value, host.mod_revision, lease)
        if granted != self.cfg.lease_ttl:
            log.warning("adopted lease %x was granted %ss, not the configured %ss: keeping %ss until it is "
                        "replaced", lease, granted, self.cfg.lease_ttl, granted)
        self._start_keeper(lease, confirmed=started, ttl=granted)
        log.info("adopted lease %x of this node's previous run: its claims and domains are kept", lease)
        return True

    def _start_keeper(self, lease: int, confirmed: Optional[float] = None, ttl: Optional[int] = None) -> None:
        self._keeper = LeaseKeeper(self.store, lease, ttl or self.cfg.lease_ttl, self.cfg.fence_margin, self.wake,
                                   lambda: self._beat_at, self.cfg.stall_limit, renewed=self._feed_watchdog)
        if confirmed is not None:
            self._keeper.confirmed = confirmed
        self._keeper.start()
        try:
            os.makedirs(self.cfg.state_dir, mode=0o755, exist_ok=True)
            with open(self._lease_file + ".tmp", "w", encoding="ascii") as fh:
                fh.write(f"{lease:x}\n")
            os.replace(self._lease_file + ".tmp", self._lease_file)
        except OSError as exc:
            log.warning("cannot record the lease in %s (%s): a restart will not adopt running VMs",
                        self._lease_file, exc.strerror)

    def _acquire_lease(self, wait_for_stale: float) -> None:
        confirmed = time.monotonic()  # before the grant: etcd's own expiry is never earlier
        cell: Optional[int] = None
        if self.view.interest is None and not self.view.synced:  # the first record, before any listing:
            cell = node_cell(self.node, self._cells(self.store.get(self.keys.config)), self.cfg.cell)  # its cell
        lease = self.store.grant_lease(self.cfg.lease_ttl)
        host = self._host_state(lease=lease)
        if cell is not None:
            host = dataclasses.replace(host, cell=cell)
        deadline = time.monotonic() + wait_for_stale
        while True:
            self.beat()
            rev, existing = self.store.create(self.keys.host(self.node), host.encode(), lease)
            if rev is not None:
                break
            if time.monotonic() >= deadline:
                try:
                    self.store.revoke_lease(lease)
                except (StoreUnavailable, LeaseNotFound):
                    pass  # it expires by itself
                raise NodeTakenError(
                    f"node name {self.node!r} is held by a live agent "
                    f"(lease {existing.lease if existing else 0:x}); refusing to start")
            time.sleep(0.25)
            sent = time.monotonic()
            if self.store.refresh_lease(lease) > 0:  # our own lease must outlive the wait
                confirmed = sent
        self._last_host = host
        self.view.note(self.keys.host(self.node), host.encode(), rev, lease)
        self._start_keeper(lease, confirmed=confirmed)
        log.info("registered node %s (lease %x, ttl %ss, %d vcpus, %d MiB)",
                 self.node, lease, self.cfg.lease_ttl, self.capacity.vcpus, self.capacity.ram_mb)

    def _resync(self, chores: bool = True) -> None:
        """Full re-list, then watch from the listed revision; then (unless
        not ``chores``: a re-list for the interest alone, which leaves the
        periodic one its time) collect disks nobody wants any more (judged
        from this fresh listing) and lift fences that their nodes proved
        clean."""
        revision, entries = self.store.list_prefix(self.keys.all, until=self.keys.watched_end)
        self.view.node = self.node
        self.view.load(revision, entries, interest=self._interest_from(entries))
        self._need_relist = False
        if chores:
            self._last_resync = time.monotonic()
        self._watch_from(revision + 1)
        if self.storage is not None and chores:
            snap = self.view.snapshot()
            try:
                self.executor.collect_orphan_disks(snap)
            except StorageError as exc:
                log.warning("disk clean-up skipped: %s", exc)
            for node, record in snap.fences.items():
                evacuated = node in snap.nodes and snap.nodes[node].evacuate  # fenced until uncordoned
                if record.state == "clean" and node != self.node and node not in self._cannot_lift and not evacuated:
                    self._lift_fence(record)

    def _cells(self, conf_entry: Optional[Entry]) -> int:
        """The cluster config's cell count (1 when absent or malformed)."""
        if conf_entry is None:
            return 1
        try:
            return ClusterConfig.parse(conf_entry.value).cells
        except SpecError:
            return 1

    def _interest_from(self, entries: Mapping[str, Entry]) -> Optional[Interest]:
        """What this node's view keeps, from a full listing (None: all, with
        one cell): the shards its cell serves by the CellMap of the listed
        host records, plus the VMs it claims, that are pinned to it or
        defined on its hypervisor, wherever their shard is (when libvirt
        fails, the domains of the last listing that it answered)."""
        cells = self._cells(entries.get(self.keys.config))
        if cells <= 1:
            return None
        cell = node_cell(self.node, cells, self.cfg.cell)
        hosts: dict[str, HostState] = {}
        records: dict[str, NodeRecord] = {}
        extra: set[str] = set()
        for key, entry in entries.items():
            split = self.keys.split(key)
            if split is None:
                continue
            kind, name = split
            if kind == "hosts" and entry.lease:
                with contextlib.suppress(SpecError):
                    hosts[name] = dataclasses.replace(HostState.parse(entry.value), lease=entry.lease)
            elif kind == "nodes":
                with contextlib.suppress(SpecError):
                    records[name] = NodeRecord.parse(name, entry.value)
            elif kind == "actual" and ActualVM.parse(entry.value).host == self.node:
                extra.add(name)
            elif kind == "desired" and self.node.encode() in entry.value:
                with contextlib.suppress(SpecError):
                    if DesiredVM.parse(name, entry.value).host == self.node:
                        extra.add(name)
            elif kind == "pins" and name.startswith(f"{self.node}/"):
                extra.add(name.partition("/")[2])
            elif kind == "overflow":  # offered to this cell (CellOverflow): its nodes place it
                with contextlib.suppress(SpecError):
                    if Spill.parse(name, entry.value).cell == cell:
                        extra.add(name)
        shards = CellMap(cells, self._live_cells(cells, hosts, records)).watched_by(cell)
        try:
            defined = frozenset(self.hv.domains())
        except HypervisorError as exc:  # keep the domains known before: a listing must not forget them
            log.warning("listing: libvirt error (%s); keeping the %d domain(s) known to be defined here",
                        exc, len(self._defined))
            defined = self._defined
            self._domains_unlisted = True  # list again once libvirt answers
        else:
            self._domains_unlisted = False
        self._defined = defined
        extra |= defined
        interest = Interest(cell, shards, frozenset(vm for vm in extra if Keys.shard(vm) not in shards))
        log.info("cell %d of %d: watching %d of %d shards and %d VM(s) of other cells", cell, cells, len(shards),
                 Keys.SHARDS, len(interest.extra))
        return interest

    def _live_cells(self, cells: int, hosts: Mapping[str, HostState],
                    records: Mapping[str, NodeRecord]) -> frozenset[int]:
        """The cells with a node that takes work (``takes_work``: CellMap.of,
        as every agent computes it), from live host records and node
        records. This node counts by its own host record, or, while it has
        none on a lease (a moment after losing its lease), by its node
        record alone."""
        live = {h.cell % cells for n, h in hosts.items() if n != self.node and takes_work(h, records.get(n))}
        own, rec = hosts.get(self.node), records.get(self.node)
        if (takes_work(own, rec) if own is not None and own.lease else not (rec is not None and rec.unschedulable)):
            live.add(node_cell(self.node, cells, self.cfg.cell))
        return frozenset(live)

    def _interest_stale(self, snap: Snapshot) -> bool:
        """Whether the view keeps the wrong shards: the cell count or the
        live cells changed (a cell's last node went or its first came), or
        a VM of another cell was pinned to this node since the listing."""
        cells = self._cluster_config[1].cells
        interest = self.view.interest
        if cells <= 1 or interest is None:
            return (cells > 1) != (interest is not None)
        cell = node_cell(self.node, cells, self.cfg.cell)
        live = self._live_cells(cells, snap.hosts, snap.nodes)
        if cell != interest.cell or CellMap(cells, live).watched_by(cell) != interest.cell_shards or self.view.missed:
            return True
        hinted = [split[1].partition("/")[2] for key in self.view.entries_under(f"{self.keys.dir('pins')}{self.node}/")
                  if (split := self.keys.split(key)) is not None]
        return any(not interest.keeps(vm) for vm in hinted + self.overflow.wanted(snap))

    def _tend_overflow(self, snap: Snapshot, held: Collection[str]) -> None:
        """CellOverflow.tend, with this cell's placement as ClaimTurns last
        made it (or anew, when claim turns are off)."""
        def chosen() -> Mapping[str, str]:
            if self.turns.step > 0:
                return self.turns.last_chosen
            return Placement(snap, self.executor.placement).assign(held)
        self._overflow_at = self.overflow.tend(snap, chosen, self.turns.first_seen, held, time.monotonic())

    def _tend_pin_hints(self, snap: Snapshot) -> None:
        """With cells, the first node of a cell keeps ``pins/<node>/<vm>``
        in step with its cell's VMs pinned to a node outside the cell (that
        node watches no shard of the cell: the hint makes it watch the VM),
        and deletes the hints of its cell's VMs no longer pinned so.
        Best effort, compare-and-swap."""
        interest = snap.interest
        if interest is None or first_in_cell(snap) != self.node:
            return
        want = {self.keys.pin_hint(spec.host, vm) for vm, spec in snap.desired.items()
                if isinstance(spec, DesiredVM) and spec.host is not None and interest.in_cell(vm)
                and not in_cell(snap, spec.host)}
        have = self.view.entries_under(self.keys.dir("pins"))
        for key in sorted(want - have.keys()):
            rev, _ = self.store.create(key, b"{}")
            if rev is not None:
                self.view.note(key, b"{}", rev)
        for key, entry in sorted(have.items()):
            if key not in want and interest.in_cell(key.rsplit("/", 1)[1]):
                rev = self.store.delete_if(key, entry.mod_revision)
                if rev is not None:
                    self.view.note(key, None, rev)

    def _rewatch(self) -> None:
        """Re-create the watch from the last revision seen; re-list if etcd
        compacted that revision away. With cells (several watches, each at
        its own revision): a re-list."""
        if self.view.interest is not None:
            self._resync()
            return
        try:
            self._watch_from(self.view.revision + 1)
            log.info("watch re-created from revision %d", self.view.revision + 1)
        except RevisionCompacted as exc:
            log.warning("watch: %s; re-listing", exc)
            self._resync()

    def _watch_from(self, revision: int) -> None:
        if self._watch_cancel is not None:
            self._watch_cancel()
            self._watch_cancel = None
        self._watch_dead.clear()
        self._store_trouble = False
        self._troubles_at_watch = self._keeper.troubles if self._keeper else 0
        interest = self.view.interest
        ranges = ([(self.keys.all, self.keys.watched_end)] if interest is None
                  else [(self.keys.all, self.keys.shards)] + interest.ranges(self.keys))
        cancels = []
        try:
            for start, end in ranges:
                cancels.append(self.store.watch_prefix(start, revision, self._on_events, self._on_watch_error,
                                                       until=end))
        except BaseException:
            for cancel in cancels:
                cancel()
            raise

        def cancel_all() -> None:
            for cancel in cancels:
                cancel()
        self._watch_cancel = cancel_all

    NOT_NEWS, NEW_WORK, NEWS = 0, 1, 2  # what a change means to this node (_concerns_us)

    LOOK_LATER = 0.3  # seconds: how stale a node's forecast may get before it looks at new work (_on_events)

    def _on_events(self, revision: int, events: list[KeyEvent]) -> None:
        """Fold in watch events and wake the loop as they ask (watch thread).

        News: a reconcile at once. New work: a look at once when this node
        is first in line for the next arrivals by its last look's forecast
        (ClaimTurns.expected, or when there is none), else one look at most
        LOOK_LATER seconds after its last one: then the few nodes placement
        will give the next VMs to look at each arrival, not every node (the
        others' forecast is at most LOOK_LATER old; a VM given to a node
        outside every forecast, pinned or in a group, waits as long)."""
        level = max((self._concerns_us(c) for c in self.view.changes(revision, events)), default=self.NOT_NEWS)
        if level == self.NEWS:
            self._full_due = True
            self._waker.wake()
        elif level == self.NEW_WORK:
            expected = self.turns.expected
            if expected is None or self.node in expected:
                self._look_now = True
                self._waker.wake()
            elif self._look_at is None:
                self._look_at = max(time.monotonic(), self._looked_at + self.LOOK_LATER)
                self._waker.wake()  # the loop's wait ends at the new time

    def _concerns_us(self, change: Change) -> int:
        """What a change means to this node (watch thread).

        NOT_NEWS: another node's claim changing its state (the same lease
        before and after), another node's host record changing only its use
        (written by an agent of before the records held no use: the claims
        carry that), a desired entry of a VM another node owns
        (its owner acts; a hand-over deletes the claim, which is news).
        NEW_WORK: it can only change who should claim unclaimed VMs: a VM
        created, changed or deleted while unclaimed, another node's new
        claim (unless it went where this node's last look placed it: that
        leaves the placement of the rest as it was, and what it changes in
        the backups' timing waits for the next look, at the latest when the
        timer that look set for this node's next turn fires), another node's offer (capacity, state, what it gave up on)
        changing; the main loop then looks whether any is this node's turn
        (cheap) before it reconciles. Our own claims and host record written
        or changed on our lease are NOT_NEWS too: only this agent writes on its lease, so
        such an event is the echo of a write the tick that made it knows
        (it may arrive before that tick notes the write). NEWS: everything
        else (our own keys deleted or overwritten by another, other claims
        deleted, nodes that come or go, node records, fences, moves, config,
        flavours, images): a full reconcile."""
        split = self.keys.split(change.key)
        if split is None:
            return self.NEWS
        kind, name = split
        lease = self._keeper.lease_id if self._keeper is not None else 0
        old, new = change.old, change.new
        if kind == "actual":
            if new is not None and lease and new.lease == lease:
                # Our own write: nobody else holds our lease. Its echo often
                # comes before the writing tick has noted it (then it counts
                # as a change); that tick knows what it wrote.
                return self.NOT_NEWS
            if new is None or (old is not None and lease == old.lease):
                return self.NEWS  # a claim gone (hand-over, death, destroy), or one of ours overwritten
            if old is None or old.lease != new.lease:  # another node's new claim: news only while work waits
                if not self.view.has_unclaimed():
                    return self.NOT_NEWS
                # Where this node's last look placed it: the placement of the
                # rest is as it was; the turn timer set then stays in force.
                chosen = self.turns.last_chosen.get(name)
                return self.NOT_NEWS if chosen is not None and chosen == self.view.holder(name) else self.NEW_WORK
            return self.NOT_NEWS
        if kind == "hosts":
            if name == self.node and new is not None and lease and new.lease == lease:
                return self.NOT_NEWS  # our own host record as we wrote it (the echo of our write)
            if name == self.node or old is None or new is None:
                return self.NEWS
            return self.NOT_NEWS if HostState.same_offer(old.value, new.value) else self.NEW_WORK
        if kind == "pins":  # a VM of another cell pinned here: a re-list takes it in
            return self.NEWS if name.startswith(f"{self.node}/") else self.NOT_NEWS
        if kind == "overflow":  # news to the cell serving the VM and to the cells offered it (CellOverflow)
            interest = self.view.interest
            if interest is None or interest.in_cell(name):
                return self.NEWS
            for entry in (old, new):
                with contextlib.suppress(SpecError):
                    if entry is not None and Spill.parse(name, entry.value).cell == interest.cell:
                        return self.NEWS
            return self.NOT_NEWS
        if kind == "desired":
            _, claim = self.view.claim(name)
            if claim is None:
                return self.NEW_WORK
            return self.NEWS if claim.lease == lease else self.NOT_NEWS
        return self.NEWS

    def _new_work_here(self) -> bool:
        """Whether any unclaimed VM is this node's turn now, looked at from
        the view's index (no full snapshot); sets the time of the next turn.
        A VM of an anti-affinity group needs every claim of its group:
        then the answer is yes, and the full reconcile decides."""
        snap, use = self.view.light()
        if not snap.desired:
            self._next_turn = None
            return False
        due = self._due_from_index(snap, use, self._held(snap))
        if due is None:
            return True
        mine, self._next_turn = due
        return bool(mine)

    def _due_from_index(self, light: Snapshot, use: Mapping[str, tuple[int, int]],
                        held: Collection[str]) -> Optional[tuple[set[str], Optional[float]]]:
        """ClaimTurns.due from ``self.view.light()`` (``light``, ``use``) and
        the view's recent claims: O(unclaimed + hosts). None when an
        unclaimed VM is in an anti-affinity group: its rule needs every
        claim, so only the full snapshot can answer."""
        if any(isinstance(v, DesiredVM) and v.group is not None for v in light.desired.values()):
            return None
        recent = self.view.recent_claims(light.desired, light.hosts)
        return self.turns.due(light, self.executor.placement, held, time.monotonic(), use, recent)

    def _turns_due(self, snap: Snapshot, held: Collection[str]) -> tuple[set[str], Optional[float]]:
        """ClaimTurns.due for a reconcile of ``snap``: from the view's index
        (_due_from_index) when that gives Placement the same input, i.e. no
        claim is untrusted (then every claimed VM is out of ``snap``'s
        pending set) and no unclaimed VM is in a group; else from ``snap``
        (O(cluster))."""
        if not snap.untrusted:
            due = self._due_from_index(*self.view.light(), held)
            if due is not None:
                return due
        return self.turns.due(snap, self.executor.placement, held, time.monotonic())

    def _looking(self) -> None:
        """A look (or a reconcile, which looks too) begins: the requests for
        one so far are answered by it."""
        self._look_now, self._look_at, self._looked_at = False, None, time.monotonic()

    def _on_watch_error(self, exc: BaseException) -> None:
        if isinstance(exc, RevisionCompacted):
            log.warning("watch ended: %s; re-listing", exc)
            self._need_relist = True
        else:
            log.warning("watch ended: %s", self.store.describe(exc))
        self._watch_dead.set()
        self.wake()

    def run(self) -> None:
        """Main loop: tick on every wake-up; on stop, keep the guests
        running for the next agent (``on_stop = keep``) or drain them.
        etcd trouble during start-up is waited out, not fatal."""
        while True:
            try:
                self.start()
                break
            except StoreDenied:
                raise  # a wrong password or certificate does not heal by waiting
            except (StoreUnavailable, LeaseNotFound) as exc:
                if self._stop_requested:
                    return
                log.warning("start-up: %s; retrying", exc)
                self.beat()
                self._waker.wait(1.0)
        failures = 0
        due = "tick"
        while not self._stop_requested:
            self.beat()
            if due == "look":  # only new work arrived: a reconcile only if some of it is ours
                self._looking()
                started = time.thread_time()
                try:
                    due = "tick" if self._new_work_here() else ""
                except Exception:  # noqa: BLE001 - a failed look is not worth less than a reconcile
                    log.exception("looking for new work failed; reconciling")
                    due = "tick"
                self.looks, self.look_cpu = self.looks + 1, self.look_cpu + time.thread_time() - started
                if due == "tick":
                    self.tick_causes["work"] += 1
                    self._gather()
            if due != "tick":  # a beat alone: nothing for us, no timer due
                due = self._pause(failures)
                continue
            try:
                started = time.thread_time()
                try:
                    decision = self.tick()
                finally:
                    self._ride_ok = False
                self.ticks, self.tick_cpu = self.ticks + 1, self.tick_cpu + time.thread_time() - started
                failures = 0
            except LeaseNotFound:
                assert self._keeper is not None
                self._keeper.lost.set()
                failures += 1
                decision = "lease lost (etcd says it expired)"
            except StoreUnavailable as exc:
                failures += 1
                self._store_trouble = True
                decision = f"etcd unreachable ({exc}); retrying"
            except HypervisorError as exc:
                failures += 1
                decision = f"libvirt error: {exc}"
                self._libvirt_down = True
                with contextlib.suppress(MetaStackError):  # say so, so nobody places new work here meanwhile
                    self._publish_host(self.view.entry(self.keys.fence(self.node)) is not None
                                       or self.executor.ceph_refused)
            except Exception:  # a bug must not kill the agent while VMs run
                failures += 1
                log.exception("unexpected error in reconcile")
                decision = "unexpected error (see traceback); retrying"
            self._ticked_at = time.monotonic()
            if decision != self.last_decision or decision.startswith("acted"):
                log.info("%s", decision)
            self.last_decision = decision
            self.beat()
            due = self._pause(failures)
        log.info("stopping after %d reconciles (%.2f s CPU in them; asked for by %s) and %d looks for new work "
                 "(%.2f s CPU; asked for by %s); %.2f s CPU in all", self.ticks, self.tick_cpu,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.tick_causes.items())) or "nothing but the start",
                 self.looks, self.look_cpu,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.look_causes.items())) or "nothing",
                 time.process_time())
        if self.cfg.on_stop == "drain":
            self.drain()
        else:
            self.leave_running()

    EVACUATE_STEP = 10.0  # seconds: the r-th node that takes work fences an evacuated node still live after r steps
    IDLE_TICK = 15.0  # seconds between reconciles when nothing wakes the agent (level-triggered repair; O(cluster) each)
    GATHER_QUIET = 0.01  # coalescing of new work: wait for a quiet spell this long ...
    GATHER_MAX = (0.05, 0.25)  # ... at most this long (the second while more VMs wait than there are nodes)

    def _gather(self) -> None:
        """New work is ours: wait until no more arrives for GATHER_QUIET
        seconds (at most GATHER_MAX), so one reconcile claims and starts
        what arrives together, in one transaction each (a burst of
        arrivals costs a few revisions, not a few per VM). In a burst
        (more VMs unclaimed than live nodes) it waits GATHER_MAX[1]
        whatever arrives: latency is traded for fewer revisions that
        every agent must read. A single waiting VM is claimed at once.
        With cells, the VMs and nodes counted are the cell's (its view holds
        only its cell's VMs)."""
        snap, _ = self.view.light()
        if len(snap.desired) <= 1:
            return  # one VM waits (a steady stream): nothing to gather, claim it now
        burst = len(snap.desired) > sum(1 for n in snap.hosts if in_cell(snap, n))
        until = time.monotonic() + self.GATHER_MAX[1 if burst else 0]
        while not self._full_due and time.monotonic() < until:
            woken = self._waker.wait(min(self.GATHER_QUIET, until - time.monotonic()))
            if not (woken or burst):
                break  # quiet: nothing more is coming

    def _pause(self, failures: int) -> str:
        """Wait for a wake-up or the next timer. Returns "tick" when a
        reconcile is due (news, or a timer fired), "look" when only new
        work arrived (see _on_events: at once, or at the deferred time) or
        this node's next claim turn came, "" for a beat alone. The wait is
        at most half the stall limit, so the loop beats in time."""
        now = time.monotonic()
        at = self._next_tick(failures, now)
        looks = [t for t in (self._next_turn, self._look_at) if t is not None and t < at]
        until = at if not looks else max(now + 0.02, min(looks))
        self._waker.wait(min(until - now, self.cfg.stall_limit / 2))
        now = time.monotonic()
        if self._full_due or now >= at:
            self.tick_causes["news" if self._full_due else "timer"] += 1
            return "tick"
        # A claim turn coming is new work like an arrival: a look (O(unclaimed),
        # from the view's index) decides whether a reconcile is worth it.
        if self._stop_requested:
            return ""
        if self._look_now:
            self.look_causes["work"] += 1
            return "look"
        if self._look_at is not None and now >= self._look_at:
            self.look_causes["later"] += 1
            return "look"
        if self._next_turn is not None and now >= self._next_turn:
            self.look_causes["turn"] += 1
            return "look"
        return ""

    def _next_tick(self, failures: int, now: float) -> float:
        """Monotonic time of the next reconcile that no wake-up asks for.
        The periods (IDLE_TICK, the back-off after failures, a stop's and
        the console's polling) count from the end of the last reconcile,
        not from now: a wait is cut short every stall_limit / 2 seconds for
        the loop's beat, and a period counted afresh after each beat would
        never end."""
        periods = [self.IDLE_TICK]
        if failures:
            periods.append(min(0.2 * failures, 1.0))
        if self.executor.stopping:
            periods.append(0.5)
        if self._console_polling:
            periods.append(Executor.CONSOLE_PERIOD)
        ats = [self._last_resync + self.cfg.resync_interval, self._ticked_at + min(periods)]
        timers = (self.executor.next_retry(), self._hold_ends, self._quiet_until, self._overflow_at, self._evacuate_at)
        ats += [at for at in timers if at is not None and at > now]
        return max(now + 0.02, min(ats))

    # -- one reconcile -------------------------------------------------------
    def tick(self) -> str:
        """One level-triggered reconcile; returns the decision as one line."""
        assert self._keeper is not None
        self._full_due = False  # news from now on asks for another one
        now = time.monotonic()
        if self._keeper.failing or self._keeper.lost.is_set() or self._keeper.stalled:
            if self._doubt and self._doubt[-1][1] >= now - 1.0:
                self._doubt[-1][1] = now  # the same spell goes on
            else:
                self._doubt = self._doubt[-9:] + [[now, now]]
        if self._keeper.lost.is_set():
            self._keeper.stop()
            self._quiet_until = now + self.cfg.grace
            self.executor.lease_changed()
            self._acquire_lease(wait_for_stale=self.cfg.lease_ttl + 2.0)
            self._resync()
            # The re-claim is the next reconcile's: ask for it now. No watch
            # event need come to wake the loop (the re-list saw every change,
            # and the keys of the other nodes' lapsed leases are gone already),
            # and the next timer may be past this node's grace.
            self.wake()
            running = sum(1 for s in self.hv.domains().values() if s == "running")
            return (f"lease lost: re-registered with a new lease; re-claiming the {running} VM(s) running here, "
                    f"claiming nothing else for {self.cfg.grace:.0f}s")
        if not self._keeper.valid():
            running = sum(1 for s in self.hv.domains().values() if s == "running")
            return (f"etcd unreachable: lease not confirmed; keeping {running} VM(s) running, "
                    f"claiming and starting nothing")
        if self._need_relist or time.monotonic() - self._last_resync >= self.cfg.resync_interval:
            self._resync()  # periodic repair of anything missed
        elif (self._watch_dead.is_set() or self._store_trouble
              or self._keeper.troubles != self._troubles_at_watch):
            self._rewatch()  # after trouble with etcd the stream may be dead or stuck
        self._looking()
        left = self.executor.take_deferred()
        if left:  # claimed by a reconcile that failed before it started them: this one decides again
            log.info("dropping %d start(s) left by an interrupted reconcile (%s); deciding again",
                     len(left), ", ".join(a.vm for a in left[:5]))
        self._confirm_departures()
        snap = self.view.snapshot()
        self._apply_cluster_config()
        if self._interest_stale(snap):  # the wrong shards (a cell came or went): plan from the right ones
            self._resync(chores=False)
            snap = self.view.snapshot()
        domains = self.hv.domains()
        self._libvirt_down = False  # libvirt answers: the host record says ready again below
        if self._domains_unlisted:  # the last listing did without them: list again, with them
            self._domains_unlisted, self._need_relist = False, True
            self.wake()
        fence = snap.fences.get(self.node)
        fenced = fence is not None or self.executor.ceph_refused
        self._ride_ok = not fenced
        cannot = self.executor.cannot(snap)
        rec = snap.nodes.get(self.node)
        held = self._held(snap)
        claimable, self._next_turn = self._turns_due(snap, held)
        self.executor.chosen = self.turns.last_chosen
        actions = plan(self.node, self.capacity, snap, domains, hold=held, cannot=cannot,
                       quiet=time.monotonic() < self._quiet_until, fenced=fenced,
                       cordoned=rec is not None and rec.cordon, draining=rec is not None and rec.drain,
                       handing=self._handing(snap), claimable=claimable)
        done: list[str] = []
        # plain claims: new VMs, not re-claims of running domains nor replacements of untrusted claims
        plain = [a for a in actions if a.kind == "claim" and domains.get(a.vm) != "running"
                 and a.vm not in snap.untrusted]
        backups = [a.vm for a in plain if self.turns.last_chosen.get(a.vm) != self.node]
        if backups:  # another node's turn came first: has it claimed them meanwhile?
            taken = self.executor.taken_meanwhile(backups)
            actions = [a for a in actions if not (a.kind == "claim" and a.vm in taken)]
            plain = [a for a in plain if a.vm not in taken]
        batch = [a for a in plain if self.executor.ready(a.vm)][:Executor.CLAIM_BATCH]
        if len(batch) > 1 and self._keeper.valid() and not self._stop_requested:
            claimed = {a.vm for a in self.executor.claim_batch(batch, snap)}
            for vm in sorted(claimed):
                done.append(f"claimed {vm}")
                log.info("vm=%s decision=claim: claimed", vm)
            actions = [a for a in actions if not (a.kind == "claim" and a.vm in claimed)]
        for act in actions:
            self.beat()
            if self._stop_requested or not self._keeper.valid():
                break
            if act.kind == "release" and act.reason.startswith("node is draining"):
                self._handed[act.vm] = time.monotonic()
            note = self.executor.apply(act, snap, domains)
            if note:
                done.append(note)
                # one line per VM decision, the VM named once, as a field
                log.info("vm=%s decision=%s: %s", act.vm, act.kind, re.sub(rf" {re.escape(act.vm)}\b", "", note))
        deferred = self.executor.take_deferred()
        self.executor.hold_publishes()
        try:  # the starts of what this tick claimed, after every claim; they overlap
            for act, note in self.executor.start_many(
                    deferred, snap, domains, lambda: not self._stop_requested and self._keeper.valid()):
                if note:
                    done.append(note)
                    log.info("vm=%s decision=%s: %s", act.vm, act.kind,
                             re.sub(rf" {re.escape(act.vm)}\b", "", note))
        finally:
            self.executor.flush_publishes()
        self.executor.prune([a.vm for a in actions] + [a.vm for a in deferred])
        if fenced:
            note = self._while_fenced(fence, snap)
            if note:
                done.append(note)
        # moves: from a snapshot taken now, with this tick's claims (a move
        # that this tick completed is finished now, not at the next reconcile)
        for chore in (lambda: self._tend_evacuations(snap),
                      lambda: self._record_lost(snap), lambda: self._finish_moves(self.view.snapshot()),
                      self._tidy_group_guards, lambda: self._tend_pin_hints(snap),
                      lambda: self._tend_overflow(snap, held)):
            try:  # best effort, for operators: never in the way of publishing the host record
                chore()
            except Exception:
                log.exception("bookkeeping (lost nodes, moves, group guards) failed; going on")
        self._ride_ok = False
        host = self._publish_host(fenced)
        self._console_polling = self.executor.publish_consoles(self.hv.domains())
        summary = (f"{host.vms} VM(s) here, {host.vcpus_used}/{host.vcpus} vcpus, "
                   f"{host.ram_mb_used}/{host.ram_mb} MiB" + (", FENCED" if fenced else ""))
        if done:
            return f"acted: {'; '.join(done)} | {summary}"
        return f"no action: {summary}"

    def _apply_cluster_config(self) -> None:
        """Capacity and placement from ``/metastack/config`` (parsed once per
        change; a malformed record keeps the defaults, with a warning) and
        the ``[node]`` overrides of the allocation ratios."""
        entry = self.view.entry(self.keys.config)
        rev = entry.mod_revision if entry is not None else 0
        if rev != self._cluster_config[0]:
            conf = ClusterConfig()
            if entry is not None:
                try:
                    conf = ClusterConfig.parse(entry.value)
                except SpecError as exc:
                    log.warning("%s: %s; using the defaults", self.keys.config, exc)
            self._cluster_config = (rev, conf)
        conf = self._cluster_config[1]
        cpu_ratio = self.cfg.cpu_allocation_ratio or conf.cpu_allocation_ratio
        ram_ratio = self.cfg.ram_allocation_ratio or conf.ram_allocation_ratio
        cap = Capacity(*effective_capacity(self.base_capacity.vcpus, self.base_capacity.ram_mb, cpu_ratio, ram_ratio))
        if cap != self.capacity:
            log.info("capacity %d vcpus, %d MiB (allocation ratios %g/%g)", cap.vcpus,
                     cap.ram_mb, cpu_ratio, ram_ratio)
        self.capacity = self.executor.capacity = cap
        self.executor.placement = conf.placement

    HANDOVER_WAIT = 60.0  # a drain waits at most this long for a handed-over VM to be claimed elsewhere

    def _handing(self, snap: Snapshot) -> set[str]:
        """VMs this node's drain released that no node has claimed yet (for
        at most HANDOVER_WAIT s): the drain hands over the next one only
        when none is on its way."""
        now = time.monotonic()
        self._handed = {vm: at for vm, at in self._handed.items()
                        if vm in snap.desired and vm not in snap.actual and now - at < self.HANDOVER_WAIT}
        return set(self._handed)

    def _tidy_group_guards(self) -> None:
        """Delete our strict-group guard keys whose VM is no longer ours
        (released, moved, destroyed): the group may then use this node
        again. They hang on our lease, so a dead node's go by themselves."""
        suffix = "/" + self.node
        mine = {k: e for k, e in self.view.entries_under(self.keys.dir("groups")).items()
                if k.endswith(suffix) and e.lease == self.lease_id}
        if not mine:
            return
        snap = self.view.snapshot()
        for key, entry in sorted(mine.items()):
            try:
                vm = json.loads(entry.value).get("vm")
            except (ValueError, AttributeError, RecursionError):
                vm = None
            claim = snap.actual.get(vm) if isinstance(vm, str) else None
            if claim is not None and claim.host == self.node:
                continue
            try:
                rev = self.store.delete_if(key, entry.mod_revision)
            except StoreUnavailable:
                return
            if rev is not None:
                self.view.note(key, None, rev)

    def _finish_moves(self, snap: Snapshot) -> None:
        """Delete the move requests that are done: the VM is ours now and
        the request named another node, or the VM is gone (then the first
        live node by name does it). Best effort, compare-and-swap."""
        for vm, move in sorted(snap.moves.items()):
            claim = snap.actual.get(vm)
            done = claim is not None and claim.host == self.node and move.from_node != self.node
            gone = (vm not in snap.desired and first_in_cell(snap) == self.node
                    and (snap.interest is None or snap.interest.keeps(vm)))
            if not (done or gone):
                continue
            key = self.keys.move(vm)
            entry = self.view.entry(key)
            if entry is None:
                continue
            try:
                rev = self.store.delete_if(key, entry.mod_revision)
            except StoreUnavailable:
                return
            if rev is not None:
                self.view.note(key, None, rev)
                log.info("vm=%s move from %s done: the request is deleted", vm, move.from_node)

    def _record_lost(self, snap: Snapshot) -> None:
        """Record ``lost_at`` in the node record of each node whose host
        record we saw vanish and that is still not live (compare-and-swap on
        a record without one: the first node to see it writes it, once),
        and clear our own when it is set (we are live). Best effort: only
        for ``metastackctl hosts``; never needed for correctness."""
        _, lapsed = self.view.departures(time.monotonic() - max(3600.0, 2 * self.cfg.grace))
        dead = {n for n in lapsed if n not in snap.hosts and n != self.node}
        for n in sorted(dead - self._seen_dead):
            log.warning("lost=%s: node seen dead (its host record vanished: its lease lapsed)", n)
        self._seen_dead = dead
        todo = {n for n in dead if n in snap.nodes and not snap.nodes[n].lost_at}
        mine = snap.nodes.get(self.node)
        if mine is not None and mine.lost_at:
            todo.add(self.node)
        for node in sorted(todo):
            key = self.keys.node(node)
            entry = self.view.entry(key)
            if entry is None:
                continue
            try:
                rec = NodeRecord.parse(node, entry.value)
            except SpecError:
                continue
            new = dataclasses.replace(rec, lost_at="" if node == self.node else utc_now())
            try:
                rev = self.store.replace(key, new.encode(), entry.mod_revision)
            except StoreUnavailable:
                return
            if rev is not None:
                self.view.note(key, new.encode(), rev)
                if node != self.node:
                    log.info("lost=%s: lost_at recorded in its node record", node)

    def _confirm_departures(self) -> None:
        """With cells an agent has several watches, and a lease's expiry
        reaches it in pieces: the claims on their shards' watches, the host
        record on the base range's; a reconcile may run in between. Then
        the holder of a vanished claim still looks alive, and its loss
        would be taken for a release: no hold for its owner after a
        correlated loss (_held), no fence of it as a former writer. For the
        VMs of ClusterView.unconfirmed_departures, ask etcd once per lease
        (and vanishing) whether the claims' lease still exists; when it does
        not, fold in the host record's deletion at the revision of the last
        of its claims seen to vanish (etcd deletes a lease's keys in one
        revision, and the expiry is at least as late as any release on
        it), as the watch will bring it. With one watch (no cells) nothing
        comes in pieces: nothing to do. An etcd error leaves it to the
        watch."""
        if self.view.interest is None:
            return
        pending = {vm: gone for vm, gone in self.view.unconfirmed_departures().items() if gone.host != self.node}
        self._departures_asked = {vm: r for vm, r in self._departures_asked.items() if vm in pending}
        by_lease: dict[tuple[str, int], list[tuple[str, Vanished]]] = {}
        for vm, gone in sorted(pending.items()):
            if self._departures_asked.get(vm) != gone.revision:
                by_lease.setdefault((gone.host, gone.lease), []).append((vm, gone))
        for (host, lease), claims in sorted(by_lease.items()):
            try:
                remaining, _ = self.store.lease_ttl(lease)
            except LeaseNotFound:
                remaining = 0
            except StoreUnavailable as exc:
                log.warning("node=%s: could not ask etcd whether lease %x still exists: %s", host, lease, exc)
                return
            for vm, gone in claims:
                self._departures_asked[vm] = gone.revision
            if remaining <= 0:
                log.info("node=%s: the claims of %s vanished with lease %x, which has expired: the node lapsed "
                         "(its host record's deletion is on its way)", host,
                         ", ".join(vm for vm, _ in claims[:5]) + (", ..." if len(claims) > 5 else ""), lease)
                self.view.fold_lapse(host, max(gone.revision for _, gone in claims))

    def _held(self, snap: Snapshot) -> set[str]:
        """VMs whose owner lost its lease in a correlated loss (etcd
        trouble) less than ``grace`` ago: their owners get the chance to
        re-claim them before anyone fences and takes them. A lapse counts as
        correlated when we saw it while our own lease was in doubt or just
        after (etcd expires every lease at once when it comes back from a
        freeze); a lapse while our lease was fine is that node's own death
        or isolation, and is failed over at once (fence first). After an
        etcd restart leases are extended, so a node that died meanwhile
        lapses a TTL later: not correlated."""
        now = time.monotonic()
        grace = self.cfg.grace
        vanished, lapsed = self.view.departures(now - max(3600.0, 2 * grace))
        after = self.cfg.lease_ttl / 2 + 1.0  # the watch delivers the expiries shortly after etcd is back
        recent = {n: (rev, at) for n, (rev, at) in lapsed.items()
                  if now - at < grace and any(start - 1.0 <= at <= end + after for start, end in self._doubt)}
        held = {vm for vm, gone in vanished.items()
                if gone.host in recent and recent[gone.host][0] == gone.revision}
        ends = [at + grace for n, (_, at) in recent.items()]
        self._hold_ends = min(ends) if held and ends else None  # reconcile again when a hold ends
        return held

    def _tend_evacuations(self, snap: Snapshot) -> None:
        """``metastackctl host evacuate NODE`` (NODE's node record says
        evacuate, and cordon): the first node by name that takes work
        (``takes_work``) fences NODE at the storage layer (Executor.fence_node:
        a fence record, and every Ceph client from NODE's address blocklisted
        when that address is its own: a range fence).

        With a range fence it then revokes the lease NODE's host record and
        claims hang on: etcd deletes them in one revision, as if NODE had
        died, and every agent fails NODE's VMs over as after a death (the
        new owner also blocklists the disk's open clients before it boots
        it), whether or not NODE's agent still answers; a QEMU that agent
        starts late cannot write. Without one (NODE's address is shared or
        unknown) nothing guards the disks against a late start while NODE's
        lease lives, so nothing is revoked: NODE's agent releases its VMs
        itself once it sees its fence (as any fenced node does: each domain
        removed before its claim is deleted), and a stuck agent's lease
        lapses by itself, as after a death.

        NODE's agent, if it runs, kills what it still runs and claims
        nothing; it stays fenced and cordoned until ``metastackctl host
        uncordon NODE``. Once per registration: a host record NODE created
        after its fence record is left alone. Nothing is revoked unless the
        fence succeeded (a Ceph error: the next reconcile tries again).

        Fallback: while NODE's host record stays live, the r-th node by name
        that takes work does the same from r x EVACUATE_STEP seconds after
        it first saw NODE evacuated (every step is idempotent), so a first
        node that cannot fence (no Ceph section, Ceph refusing it) or does
        not act (stuck) delays the evacuation, not stops it."""
        evacuated = {n for n, rec in snap.nodes.items() if rec.evacuate}
        self._evacuating &= evacuated
        self._cannot_evacuate &= evacuated
        now, self._evacuate_at = time.monotonic(), None
        self._evacuate_seen = {n: self._evacuate_seen.get(n, now) for n in evacuated & set(snap.hosts)}
        self._evacuate_done = {(n, lease) for n, lease in self._evacuate_done if n in self._evacuate_seen}
        fencers = sorted(n for n, h in snap.hosts.items() if takes_work(h, snap.nodes.get(n)))
        if not evacuated or self.node not in fencers:
            return
        rank = fencers.index(self.node)
        for node in sorted(evacuated & set(snap.hosts)):
            host = self.view.entry(self.keys.host(node))
            fence = self.view.entry(self.keys.fence(node))
            if host is None or not host.lease or (fence is not None and fence.create_revision > 0
                                                   and host.create_revision > fence.create_revision):
                continue  # gone meanwhile, or registered again after its fence: done
            if fence is not None and (node, host.lease) in self._evacuate_done:
                continue  # fenced by this node already (no revoke: its agent releases its VMs, or its lease lapses)
            if now < self._evacuate_seen[node] + rank * self.EVACUATE_STEP:
                self._evacuate_at = min(self._evacuate_at or math.inf,
                                        self._evacuate_seen[node] + rank * self.EVACUATE_STEP)
                continue  # a node before this one by name has its turn first
            try:
                record, how = self.executor.fence_node(node, snap)
            except StorageError as exc:  # no Ceph here, or Ceph refused: the next reconcile tries again
                if node not in self._cannot_evacuate:
                    self._cannot_evacuate.add(node)
                    log.error("node=%s evacuate: cannot fence it (%s); its lease is not touched", node, exc)
                continue
            self._cannot_evacuate.discard(node)
            registered = snap.nodes[node].address if node in snap.nodes else ""
            if not (record.mode == "range" and record.address and record.address == registered):
                # No blocklist of its address: a QEMU its agent starts late could still write, so
                # nothing may take its VMs while its lease lives. Its agent releases them itself
                # once it sees the fence (a fenced node does); a stuck agent's lease lapses.
                if node not in self._evacuating:
                    self._evacuating.add(node)
                    log.warning("node=%s evacuate: fenced (%s); its agent releases its VMs when it sees the "
                                "fence, or its lease lapses", node, how)
                self._evacuate_done.add((node, host.lease))
                continue
            log.warning("node=%s evacuate: fenced (%s); revoking its lease %x: its VMs fail over now",
                        node, how, host.lease)
            with contextlib.suppress(LeaseNotFound):
                self.store.revoke_lease(host.lease)
            self._evacuate_done.add((node, host.lease))

    def _while_fenced(self, fence: Optional[FenceRecord], snap: Snapshot) -> str:
        """Our node is fenced: once no domain of ours runs, mark the fence
        record clean, and lift it if this node may (else whoever can does:
        any agent with the right, or an operator). A Ceph refusal without a
        record clears once our client works again."""
        if any(s == "running" for s in self.hv.domains().values()):
            return ""
        if fence is None:  # Ceph refused us, with no record: see whether a fresh client works
            if self.storage is not None:
                self.storage.close()
                try:
                    self.storage.fsid()
                    self.storage.vm_disks(self.cfg.ceph.pool if self.cfg.ceph else "metastack")
                except StorageError:
                    return ""
            self.executor.ceph_refused = False
            return "Ceph accepts this node's client again: taking work"
        key = self.keys.fence(self.node)
        if fence.state != "clean":
            entry = self.view.entry(key)
            if entry is None:
                return ""
            clean = dataclasses.replace(fence, state="clean")
            rev = self.store.replace(key, clean.encode(), entry.mod_revision)
            if rev is None:
                return ""
            self.view.note(key, clean.encode(), rev)
            log.warning("fenced: no stale domain runs here any more; fence record marked clean")
            fence = clean
        rec = snap.nodes.get(self.node)
        if rec is not None and rec.evacuate:
            return "fenced (evacuated): stale domains gone; fenced until metastackctl host uncordon"
        if self.node not in self._cannot_lift and self._lift_fence(fence):
            self.executor.ceph_refused = False
            return "unfenced: stale domains gone, fence lifted"
        return "fenced: stale domains gone; waiting for the fence to be lifted"

    def _lift_fence(self, record: FenceRecord) -> bool:
        """Lift a clean fence: remove the node's range blocklist (needs more
        than ``profile rbd``), then the record. False if not allowed."""
        if record.mode == "range" and record.address:
            if self.storage is None:
                return False
            try:
                self.storage.unblocklist_range(record.address)
            except StorageError as exc:
                self._cannot_lift.add(record.node)
                log.warning("cannot lift the fence of %s (%s); an operator or a node with the right must "
                            "(metastackctl host unfence %s)", record.node, exc, record.node)
                return False
            self.storage.close()  # new client instance: the old one stays blocklisted
        key = self.keys.fence(record.node)
        entry = self.view.entry(key)
        if entry is not None:
            rev = self.store.delete_if(key, entry.mod_revision)
            if rev is not None:
                self.view.note(key, None, rev)
        log.warning("lifted the fence of node %s (it proved its stale domains gone)", record.node)
        return True

    def _host_state(self, fenced: bool = False, lease: Optional[int] = None) -> HostState:
        """This node's host record now: what it offers and what the claims
        on its lease (``lease``, default: the keeper's) reserve."""
        lease = self.lease_id if lease is None else lease
        cpu, ram, vms = self.view.usage(self.node, lease)
        cannot = tuple(sorted(self.executor.gave_up_reasons().items()))
        state = ("fenced" if fenced else "recovering" if time.monotonic() < self._quiet_until
                 else "degraded" if self._libvirt_down else "ready")
        cell, foreign = 0, (0, 0, 0)
        if self.view.interest is not None:
            cell, foreign = self.view.interest.cell, self.view.foreign_use(self.node, lease)
            cpu, ram, vms = cpu + foreign[0], ram + foreign[1], vms + foreign[2]
        return HostState(self.capacity.vcpus, self.capacity.ram_mb, cpu, ram, vms, state, self.cfg.address, cannot,
                         cell=cell, foreign=foreign)

    def _host_ride(self) -> list[tuple[str, bytes, int]]:
        """Our host record as (key, value, lease) if its content changed
        (for the executor to write with a VM's state, one revision for
        both); counted as written at once, see _host_ride_failed."""
        if not self._ride_ok or self._keeper is None or self._last_host is None or self._last_host.state != "ready":
            return []  # outside a reconcile, not registered yet, or fenced: the tick writes it
        host = self._host_state()
        if host.same_content(self._last_host):
            return []
        self._last_host = host
        return [(self.keys.host(self.node), host.encode(), self.lease_id)]

    def _host_ride_failed(self) -> None:
        self._last_host = None  # the end of the tick writes it again

    def _publish_host(self, fenced: bool = False) -> HostState:
        """Write this node's host key if its content changed; returns it."""
        host = self._host_state(fenced)
        if host.same_content(self._last_host):
            return host
        key = self.keys.host(self.node)
        entry = self.view.entry(key)
        rev = self.store.replace(key, host.encode(), entry.mod_revision, self.lease_id) if entry else None
        if rev is None:  # vanished (lease expired): the keeper will notice
            rev, _ = self.store.create(key, host.encode(), self.lease_id)
        if rev is not None:
            self.view.note(key, host.encode(), rev, self.lease_id)
            self._last_host = host
        return host

    # -- shutdown ------------------------------------------------------------
    def leave_running(self) -> None:
        """SIGTERM with ``on_stop = keep``: the guests keep running and the
        lease stays, renewed one last time on the way out; an agent
        restarted in time adopts both. The watchdog is fed one last time, up
        to the lease's own deadline: if no agent comes back by then it stops
        the guests before the lease can lapse."""
        if self._watch_cancel is not None:
            self._watch_cancel()
        running = sum(1 for s in self.hv.domains().values() if s == "running")
        self.beat()  # the keeper may renew, and the watchdog waits, while libvirt and Ceph close
        self.hv.close()
        if self.storage is not None:
            self.storage.close()
        if self._keeper is not None:
            self._keeper.stop()
            self._last_keep_alive(self._keeper)
            if self.watchdog is not None:
                with self._feed_lock:
                    self._feed_final = True
                    self.watchdog.feed(self._keeper.deadline(), force=True)
            log.info("stopping (on_stop = keep): %d VM(s) keep running; lease %x stays until %.1fs from now",
                     running, self._keeper.lease_id, self._keeper.deadline() - time.monotonic())
        self.store.close()

    def _last_keep_alive(self, keeper: LeaseKeeper) -> None:
        """Renew the lease once more as the last thing before exiting (after
        closing libvirt and Ceph), so the next agent has a whole TTL to
        adopt it, not what was left since the keeper's last renewal (up to
        a third of a TTL less). The main loop is alive (it is stopping), so
        renewing is within the keeper's rule; the caller then feeds the
        watchdog up to the new deadline. A failure keeps the old deadline;
        a lease past its deadline is left to lapse."""
        if not keeper.valid():
            return
        started = time.monotonic()
        try:
            if self.store.refresh_lease(keeper.lease_id) > 0:
                keeper.confirmed = max(keeper.confirmed, started)
        except (StoreUnavailable, LeaseNotFound) as exc:
            log.warning("lease %x: last keep-alive before stopping failed: %s", keeper.lease_id, exc)

    def drain(self) -> None:
        """SIGTERM with ``on_stop = drain``: stop every VM here (graceful,
        then hard after shutdown_timeout), and only then revoke the lease so
        other nodes start them. Never hands over a VM that may still run
        here: if libvirt cannot confirm the domains are down, the lease is
        left to expire, and the next owner fences the disks before it boots
        them."""
        try:
            stopped = self._stop_all_domains()
        except HypervisorError as exc:
            stopped = None
            log.error("drain: cannot confirm the domains are down (%s); leaving the lease to expire", exc)
        if self._watch_cancel is not None:
            self._watch_cancel()
        if self.watchdog is not None and stopped is not None:
            with self._feed_lock:
                self._feed_final = True  # the keeper must not arm it again
                self.watchdog.disarm()
        if self._keeper is not None:
            self._keeper.stop()
            if stopped is not None:
                try:
                    self.store.revoke_lease(self._keeper.lease_id)
                    with contextlib.suppress(OSError):
                        os.unlink(self._lease_file)
                    log.info("drained: %d VM(s) stopped, lease revoked", stopped)
                except (StoreUnavailable, LeaseNotFound) as exc:
                    log.warning("drained: %d VM(s) stopped; lease not revoked (%s), it expires in %ss",
                                stopped, exc, self.cfg.lease_ttl)
        self.hv.close()
        self.store.close()
        if self.storage is not None:
            self.storage.close()

    def _stop_all_domains(self) -> int:
        """Shut down (ACPI, then hard after shutdown_timeout) and undefine
        every domain of ours; returns how many were running."""
        running = [n for n, s in self.hv.domains().items() if s == "running"]
        log.info("draining: stopping %d running domain(s) before releasing claims", len(running))
        for n in running:
            try:
                self.hv.request_shutdown(n)
            except HypervisorError as exc:
                log.error("drain: %s", exc)
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while time.monotonic() < deadline and any(s == "running" for s in self.hv.domains().values()):
            self.beat()
            time.sleep(0.2)
        for n in list(self.hv.domains()):
            self.hv.remove(n)  # powers off first
        return len(running)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def _fresh_watchdog_feed(cfg: AgentConfig) -> None:
    """A watchdog started by a service manager (before the agent, at boot or
    after a crash) may find the feed file of an earlier run: ``disarm``
    (the agent drained) or a deadline written by an agent that is gone (or
    on an earlier boot's clock). It then starts from a fresh deadline of one
    ``watchdog_delay`` with no feeder, for the agent to take over; if no
    agent feeds by then it fires (stops the node's domains) and exits. A
    feed of a live agent is left alone, and so is one guarded already."""
    feed = WatchdogFeed(cfg.state_dir, cfg.node_name)
    with contextlib.suppress(OSError):
        os.makedirs(cfg.state_dir, mode=0o755, exist_ok=True)
        deadline, feeder = WatchdogFeed.read(feed.path)
        if (deadline is None or not _pid_alive(feeder)) and not feed.running():
            feed._write(f"{time.monotonic() + cfg.watchdog_delay:.3f} 0\n")


EXIT_CODES = """exit codes:
  0  clean stop
  1  runtime failure (etcd or libvirt unreachable at start)
  2  bad configuration (the message names the section and key)
  3  a live agent already holds this node name
  4  etcd refused the agent (user/password, certificate, or permission)"""


def version() -> str:
    """The installed package's version (``metastack --version``)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as _version
        return _version("metastack")
    except PackageNotFoundError:
        return __version__  # run from a checkout


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python metastack.py`` and the ``metastack`` command.

    Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration,
    3 the node name is held by a live agent, 4 etcd refused the agent's
    credentials (user/password, certificate, or its role's permissions).
    """
    parser = argparse.ArgumentParser(prog="metastack", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", metavar="FILE",
                        default=os.environ.get("METASTACK_CONFIG", "/etc/metastack/metastack.ini"),
                        help="the agent's ini file (every key: config.example.ini, installed under "
                             "share/metastack/); env METASTACK_CONFIG; default %(default)s")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--check-config", action="store_true", help="validate the config file and exit")
    parser.add_argument("--watchdog", action="store_true",
                        help="run as the node's watchdog (the agent starts it; a service manager may too)")
    parser.add_argument("--wait-watchdog", action="store_true",
                        help="exit 0 once this node's watchdog holds its lock (waits up to 10 s), else 1; "
                             "for the watchdog unit's ExecStartPost")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        setup_logging(cfg.node_name, cfg.log_level, cfg.syslog)
    except ConfigError as exc:
        print(f"metastack: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"metastack: {args.config} is valid (node {cfg.node_name})")
        return 0
    if args.wait_watchdog:
        feed = WatchdogFeed(cfg.state_dir, cfg.node_name)
        deadline = time.monotonic() + 10.0
        while not (os.path.isdir(cfg.state_dir) and feed.running()):
            if time.monotonic() > deadline:
                print(f"metastack: no watchdog holds {feed.lockfile}", file=sys.stderr)
                return 1
            time.sleep(0.1)
        return 0
    if args.watchdog:
        _fresh_watchdog_feed(cfg)
        dog = Watchdog(cfg)
        signal.signal(signal.SIGTERM, lambda _s, _f: dog.request_stop())
        signal.signal(signal.SIGINT, lambda _s, _f: dog.request_stop())
        return dog.run()
    try:
        agent = Agent(cfg)
    except ConfigError as exc:  # e.g. a certificate file it may not read
        log.error("configuration error: %s", exc)
        return 2
    except (HypervisorError, StoreUnavailable, StorageError, LeaseNotFound) as exc:
        log.error("cannot start: %s", exc)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        agent.request_stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: stacks to stderr
    try:
        agent.run()
    except NodeTakenError as exc:
        log.error("%s", exc)
        return 3
    except StoreDenied as exc:
        log.error("cannot start: %s", exc)
        return 4
    except (StoreUnavailable, StorageError, HypervisorError, LeaseNotFound, MetaStackError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot start: %s (%s)", exc.strerror, exc.filename)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
