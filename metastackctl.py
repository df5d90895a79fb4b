#!/usr/bin/env python3
"""metastackctl: the MetaStack admin CLI.

It writes the desired state into etcd and reads what the agents report,
through the store layer and key schema of ``metastack.py`` (never its own).

\b
Exit codes:
  0  success
  1  the request failed (unknown VM, name taken, flavour in use, ...)
  2  bad usage or bad arguments (nothing was written)
  3  etcd could not be reached
  4  a wait timed out (--wait, --restart, host drain's deadline)
  5  etcd refused this client (user/password, certificate, or permission)
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import getpass
import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import click

import metastack as ms

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="Output format.")


def wait_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--wait and --timeout S: wait for the VM to get there; exit 4 on
    timeout, 1 when it lands in error."""
    fn = click.option("--timeout", type=click.FloatRange(min=0), default=300, show_default=True,
                      help="Seconds --wait waits (exit 4 when they pass).")(fn)
    return click.option("--wait", is_flag=True,
                        help="Wait until it is done (exit 1 if the VM lands in error, 4 on timeout).")(fn)


def follow_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The hidden --max-updates N of the --watch/--follow commands (tests)."""
    return click.option("--max-updates", type=int, default=0, hidden=True)(fn)


class StoreDown(click.ClickException):
    """etcd is unreachable (exit code 3)."""

    exit_code = 3


class TimedOut(click.ClickException):
    """A --wait or a drain reached its timeout or deadline (exit code 4)."""

    exit_code = 4


class StoreRefused(click.ClickException):
    """etcd refused our credentials or the permission (exit code 5)."""

    exit_code = 5


class Context:
    """Lazily opened store plus the key schema; one per invocation."""

    def __init__(self, etcd: ms.EtcdConfig, ini: Optional[Any] = None) -> None:
        self.etcd = etcd
        self._ini = ini  # the [ceph] section is read only by commands that need Ceph
        self.keys = ms.Keys(etcd.prefix)
        self._store: Optional[ms.Store] = None
        self._storage: Optional[ms.Storage] = None

    @property
    def ceph(self) -> ms.CephConfig:
        try:
            cfg = ms.ceph_config_from(self._ini) if self._ini is not None else None
        except ms.ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        if cfg is None:
            raise click.UsageError("this needs Ceph: give a config file (-c) with a [ceph] section "
                                   "(conf, client, keyring, pool)")
        return cfg

    @property
    def storage(self) -> ms.Storage:
        if self._storage is None:
            try:
                self._storage = ms.Storage(self.ceph)
            except ms.StorageError as exc:
                raise click.ClickException(str(exc)) from None
        return self._storage

    def close(self) -> None:
        """Shut down the Ceph client, if one was opened (librados torn
        down by the garbage collector at interpreter exit can abort)."""
        if self._storage is not None:
            self._storage.close()
            self._storage = None

    def ceph_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a storage call, turning a Ceph failure into a clean error."""
        try:
            return fn(*args, **kwargs)
        except ms.StorageError as exc:
            raise click.ClickException(str(exc)) from None

    @property
    def store(self) -> ms.Store:
        if self._store is None:
            try:
                self._store = ms.Store(self.etcd)
            except ms.ConfigError as exc:  # a certificate file it may not read
                raise click.UsageError(str(exc)) from None
            self._store.read_retry_for = 5.0 * self.etcd.timeout  # a dead member or an election: the next one answers
        return self._store

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call, turning an etcd outage into exit code 3."""
        try:
            return fn(*args)
        except ms.StoreDenied as exc:
            raise StoreRefused(str(exc)) from None
        except ms.StoreUnavailable as exc:
            raise StoreDown(f"{exc} (endpoints: {self.endpoint_text})") from None

    def admin(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a shared admin operation: a refusal becomes an error (exit 1),
        an etcd outage exit code 3."""
        try:
            return self.call(fn, *args)
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None

    def snapshot(self) -> ms.Snapshot:
        """The agents' parsed view of the cluster now (live hosts, trusted claims)."""
        return snapshot_of(self.keys, {kind: self.listing(kind) for kind in SNAPSHOT_KINDS},
                           self.call(self.store.get, self.keys.config))

    def follow(self, prefix: str, max_updates: int = 0) -> Any:
        """Yield now, then after every change under ``prefix`` (woken by an
        etcd watch; at least every 2 s, so a dead watch only slows it), until
        Ctrl-C or ``max_updates`` yields (0: no limit)."""
        changed = threading.Event()
        revision, _ = self.call(self.store.list_prefix, prefix + "\0")  # the revision, no data
        cancel = self.call(self.store.watch_prefix, prefix, revision + 1,
                           lambda _rev, _evs: changed.set(), lambda _exc: changed.set())
        try:
            n = 0
            while True:
                yield
                n += 1
                if max_updates and n >= max_updates:
                    return
                changed.wait(2.0)
                changed.clear()
        except KeyboardInterrupt:
            return
        finally:
            cancel()

    @property
    def endpoint_text(self) -> str:
        return self.etcd.endpoint_text

    def listing(self, kind: str) -> dict[str, ms.Entry]:
        """name -> entry for every key of one kind (desired, actual, ...)."""
        _, entries = self.call(self.store.list_kind, kind)
        return entries


def name_arg(what: str) -> Callable[[click.Context, click.Parameter, Optional[str]], Optional[str]]:
    """click callback rejecting names the agents would refuse."""
    def check(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[str]:
        why = None if value is None else name_problem(value, what)
        if why:
            raise click.BadParameter(why)
        return value
    return check


def cell(value: Any) -> str:
    """One table cell: nothing for None, ``k=v`` pairs for a nested object."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return ",".join(f"{k}={'yes' if v is True else v}" for k, v in value.items()
                        if v not in (None, "", False)) or "-"
    return str(value)


def print_output(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> None:
    """Print rows as an aligned table or as a JSON list of objects keyed by column."""
    if fmt == "json":
        click.echo(json.dumps(as_objects(columns, rows), indent=2, sort_keys=False))
        return
    text = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


# -- shared with metastackweb: admin operations and output rows ----------------
# The CLI and the web API (metastackweb.py) both call these, so they apply the
# same validation and refusals and print the same objects. Each takes a Store
# and raises AdminError (nothing written) or StoreUnavailable; no click here.


class AdminError(Exception):
    """A refused admin request; nothing was written. ``kind`` says why:
    "invalid" (bad input), "missing" (no such thing), "conflict" (a name
    taken, a thing in use, or changed meanwhile)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def name_problem(value: Any, what: str) -> Optional[str]:
    """Why ``value`` is not a valid ``what`` (VM, flavour, ...) name, or None."""
    if ms.valid_name(value):
        return None
    return (f"{_short(value)} is not a valid {what} name: lower-case letters, digits and '-', "
            f"1-63 characters, starting and ending with a letter or digit")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a valid ``what`` name; else AdminError("invalid")."""
    why = name_problem(value, what)
    if why:
        raise AdminError("invalid", why)
    return value


def _names(store: ms.Store, kind: str) -> list[str]:
    _, entries = store.list_prefix(store.keys.dir(kind))
    splits = (store.keys.split(k) for k in entries)
    return sorted(s[1] for s in splits if s is not None and s[0] == kind)


def vms_using(store: ms.Store, field: str, name: str) -> list[str]:
    """VMs whose desired entry names ``name`` as its ``field`` (flavour or image)."""
    _, entries = store.list_kind("desired")
    users = []
    for vm, d in sorted(entries.items()):
        try:
            if getattr(ms.DesiredVM.parse(vm, d.value), field) == name:
                users.append(vm)
        except ms.SpecError:
            continue
    return users


def new_desired(name: str, flavour: str, host: Optional[str] = None, image: Optional[str] = None,
                state: str = "running", group: Optional[str] = None, strict: bool = False) -> ms.DesiredVM:
    """A new VM's desired entry, with a fresh uuid: its identity, which only a
    real destroy ends."""
    return ms.DesiredVM(name, flavour, state, host, image, extra=(("created", ms.utc_now()),),
                        uuid=str(uuid.uuid4()), group=group, strict=strict)


def create_vm(store: ms.Store, name: Any, flavour: Any, host: Any = None, image: Any = None,
              state: Any = "running", group: Any = None, strict: Any = False) -> ms.DesiredVM:
    """Create the desired entry of a new VM. Refused: a bad name or state
    (invalid), a flavour or image that does not exist (invalid), the name
    taken (conflict). ``group``: an anti-affinity group (spread over nodes;
    ``strict``: never two on one node)."""
    check_name(name, "VM")
    if group is not None:
        check_name(group, "group")
    if not isinstance(strict, bool) or (strict and group is None):
        raise AdminError("invalid", "strict needs a group (and is true or false)")
    check_name(flavour, "flavour")
    if host is not None:
        check_name(host, "node")
    if image is not None:
        check_name(image, "image")
    if state not in ms.VM_STATES:
        raise AdminError("invalid", f"state must be one of {', '.join(ms.VM_STATES)}, got {_short(state)}")
    if store.get(store.keys.flavour(flavour)) is None:
        known = ", ".join(_names(store, "flavours")) or "none"
        raise AdminError("invalid", f"no flavour named {flavour!r} (known: {known})")
    if image is not None and store.get(store.keys.image(image)) is None:
        known = ", ".join(_names(store, "images")) or "none"
        raise AdminError("invalid", f"no image named {image!r} (known: {known})")
    _, hosts = store.list_kind("hosts")
    old = sorted(n for n, e in hosts.items() if e.lease and _layout(e.value) < ms.LAYOUT)
    if old:  # it would not see a VM in a shard, and could take its disk for an orphan
        raise AdminError("conflict", f"node(s) {', '.join(old[:5])} run an agent older than the sharded key "
                                     f"layout: upgrade every agent before creating VMs")
    spec = new_desired(name, flavour, host, image, state, group, strict)
    rev, _ = store.create(store.keys.desired(name), json.dumps(spec.to_json()).encode(),
                          absent=[store.keys.legacy_desired(name)])  # nor one written the old way
    if rev is None:
        raise AdminError("conflict", f"a VM named {name!r} already exists")
    return spec


def _layout(value: bytes) -> int:
    """The key layout a host record says its agent reads (1 when it does not say, or is unusable)."""
    try:
        return ms.HostState.parse(value).layout
    except ms.SpecError:
        return ms.LAYOUT  # not a live agent's record: says nothing about its version


def destroy_vm(store: ms.Store, name: Any) -> None:
    """Delete VM ``name``'s desired entry (its owner then powers it off)."""
    check_name(name, "VM")
    found = [(key, entry) for key in (store.keys.desired(name), store.keys.legacy_desired(name))
             if (entry := store.get(key)) is not None]  # in its shard, and one written the old way
    if not found:
        raise AdminError("missing", f"no VM named {name!r}")
    if store.delete_all_if([(key, entry.mod_revision) for key, entry in found]) is None:  # both, or none
        raise AdminError("conflict", f"VM {name!r} changed while destroying it; try again")


def set_vm_state(store: ms.Store, name: Any, state: str) -> bool:
    """Set VM ``name``'s desired state, keeping every other key of its entry;
    False when it already had that state."""
    def change(obj: dict[str, Any]) -> bool:
        if obj.get("state", "running") == state:
            return False
        obj["state"] = state
        return True
    return edit_desired(store, name, change)


def edit_desired(store: ms.Store, name: Any, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Apply ``change`` (edits the decoded entry in place; False: nothing
    to do) to VM ``name``'s desired entry by compare-and-swap, keeping every
    other key; retried when the entry changed meanwhile. False when there
    was nothing to do."""
    check_name(name, "VM")
    for _ in range(5):
        key, entry = store.find("desired", name)
        if entry is None:
            raise AdminError("missing", f"no VM named {name!r}")
        try:
            obj = json.loads(entry.value)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            raise AdminError("conflict", f"the desired entry of {name!r} is not a JSON object; "
                                         f"fix it with etcdctl or destroy the VM") from None
        if not change(obj):
            return False
        if store.replace(key, json.dumps(obj).encode(), entry.mod_revision):
            return True
    raise AdminError("conflict", f"VM {name!r} keeps changing; try again")


def _live_claim(store: ms.Store, name: str) -> Optional[ms.ActualVM]:
    """VM ``name``'s claim when it is trusted (on its host's live lease)."""
    entry = store.get_claim(name)
    if entry is None:
        return None
    claim = ms.ActualVM.parse(entry.value)
    host = store.get(store.keys.host(claim.host)) if claim.host else None
    return claim if host is not None and host.lease and host.lease == entry.lease else None


def _node_record(store: ms.Store, node: str) -> tuple[Optional[ms.Entry], Optional[ms.NodeRecord]]:
    entry = store.get(store.keys.node(node))
    if entry is None:
        return None, None
    try:
        return entry, ms.NodeRecord.parse(node, entry.value)
    except ms.SpecError as exc:
        raise AdminError("conflict", f"the node record of {node!r} is malformed ({exc}); fix it with etcdctl") from None


def set_node_schedule(store: ms.Store, node: Any, cordon: bool, drain: bool = False,
                      reason: Optional[str] = None, by: str = "", evacuate: bool = False) -> ms.NodeRecord:
    """Cordon (no new VMs), drain (cordon and hand every VM over), evacuate
    (cordon, fence it and fail its VMs over: ms.Agent._tend_evacuations) or
    uncordon (all off) ``node``: its node record's cordon/drain/evacuate
    fields, by compare-and-swap so the agent's own updates are kept. A
    reason given replaces the old one; ``since`` is when it became
    unschedulable."""
    check_name(node, "node")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
        raise AdminError("invalid", "the reason must be text of at most 200 characters")
    for _ in range(5):
        entry, rec = _node_record(store, node)
        if entry is None or rec is None:
            known = ", ".join(_names(store, "nodes")) or "none"
            raise AdminError("missing", f"no node named {node!r} (known: {known})")
        cordon = cordon or drain or evacuate
        if not cordon:
            new = dataclasses.replace(rec, cordon=False, drain=False, evacuate=False, reason="", by="", since="")
        else:
            new = dataclasses.replace(rec, cordon=True, drain=drain, evacuate=evacuate or rec.evacuate,
                                      reason=rec.reason if reason is None else reason,
                                      by=by or rec.by, since=rec.since if rec.unschedulable else ms.utc_now())
        if new == rec:
            return rec
        if store.replace(store.keys.node(node), new.encode(), entry.mod_revision):
            return new
    raise AdminError("conflict", f"the node record of {node!r} keeps changing; try again")


def pin_vm(store: ms.Store, name: Any, node: Any) -> bool:
    """``move NAME --to NODE``: pin the VM to a live, schedulable node; its
    owner hands it over (stop cleanly, release) and NODE claims it and boots
    it from the same disk. False when it is already pinned there."""
    check_name(node, "node")
    _, rec = _node_record(store, node)
    host = store.get(store.keys.host(node))
    if host is None or not host.lease:
        raise AdminError("invalid", f"node {node!r} is not a live node")
    if rec is not None and rec.unschedulable:
        raise AdminError("conflict", f"node {node!r} is {'draining' if rec.drain else 'cordoned'}: it takes no VM")

    def change(obj: dict[str, Any]) -> bool:
        if obj.get("host") == node:
            return False
        obj["host"] = node
        return True
    return edit_desired(store, name, change)


def request_move(store: ms.Store, name: Any, by: str = "") -> ms.MoveRequest:
    """``move NAME``: a cold move to any other node. Writes
    ``moves/<vm>`` naming its current owner; that owner hands it over once
    another node has room, and the new owner deletes the request."""
    check_name(name, "VM")
    entry = store.get_desired(name)
    if entry is None:
        raise AdminError("missing", f"no VM named {name!r}")
    claim = _live_claim(store, name)
    if claim is None:
        raise AdminError("conflict", f"VM {name!r} runs on no live node: there is nothing to move")
    with contextlib.suppress(ms.SpecError):
        spec = ms.DesiredVM.parse(name, entry.value)
        if spec.host is not None:
            raise AdminError("conflict", f"VM {name!r} is pinned to {spec.host}: use move --to NODE")
    move = ms.MoveRequest(claim.host, "cold", by, ms.utc_now())
    key = store.keys.move(name)
    old = store.get(key)
    if old is None:
        rev, _ = store.create(key, move.encode())
    else:
        rev = store.replace(key, move.encode(), old.mod_revision)
    if rev is None:
        raise AdminError("conflict", f"a move of {name!r} was requested meanwhile; try again")
    return move


def resize_vm(store: ms.Store, name: Any, flavour: Any, stop: bool = False) -> bool:
    """Give VM ``name`` flavour ``flavour``; the new size takes effect at
    its next start (its owner redefines the domain, or hands it to a node
    with room). Refused while it runs, unless ``stop`` (the caller then
    waits for it to stop and starts it again). False when unchanged."""
    check_name(name, "VM")
    check_name(flavour, "flavour")
    if store.get(store.keys.flavour(flavour)) is None:
        known = ", ".join(_names(store, "flavours")) or "none"
        raise AdminError("invalid", f"no flavour named {flavour!r} (known: {known})")
    claim = _live_claim(store, name)
    running = claim is not None and claim.state in ("running", "starting", "stopping")

    def change(obj: dict[str, Any]) -> bool:
        if obj.get("flavour") == flavour:
            return False
        if running and obj.get("state", "running") == "running" and not stop:
            raise AdminError("conflict", f"VM {name!r} is running: the new flavour would take effect only at "
                                         f"its next start; stop it first, or use --restart")
        obj["flavour"] = flavour
        if stop and running:
            obj["state"] = "stopped"
        return True
    return edit_desired(store, name, change)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ms.MAX_INT:
        raise AdminError("invalid", f"{what} must be a positive integer, got {_short(value)}")
    return value


def create_flavour(store: ms.Store, name: Any, vcpus: Any, ram_mb: Any) -> ms.Flavour:
    """Create flavour ``name``; refused: bad input, or the name taken."""
    check_name(name, "flavour")
    flavour = ms.Flavour(_count(vcpus, "vcpus"), _count(ram_mb, "ram_mb"))
    rev, _ = store.create(store.keys.flavour(name), json.dumps(flavour.to_json()).encode())
    if rev is None:
        raise AdminError("conflict", f"a flavour named {name!r} already exists")
    return flavour


def delete_flavour(store: ms.Store, name: Any) -> None:
    """Delete flavour ``name``; refused while a VM uses it."""
    check_name(name, "flavour")
    entry = store.get(store.keys.flavour(name))
    if entry is None:
        raise AdminError("missing", f"no flavour named {name!r}")
    users = vms_using(store, "flavour", name)
    if users:
        raise AdminError("conflict", f"flavour {name!r} is used by {len(users)} VM(s): {', '.join(users[:10])}")
    if store.delete_if(store.keys.flavour(name), entry.mod_revision) is None:
        raise AdminError("conflict", f"flavour {name!r} changed while deleting it; try again")


def check_image_delete(store: ms.Store, name: Any,
                       children: Optional[Callable[[ms.Image], list[str]]]) -> tuple[ms.Entry, Optional[ms.Image]]:
    """What deleting image ``name`` would remove: (its entry, its parsed
    record or None when malformed). Refused: no such image, a VM names it,
    or ``children(record)`` (its RBD disk clones) is not empty."""
    check_name(name, "image")
    entry = store.get(store.keys.image(name))
    if entry is None:
        raise AdminError("missing", f"no image named {name!r}")
    users = vms_using(store, "image", name)
    if users:
        raise AdminError("conflict", f"image {name!r} is used by {len(users)} VM(s): {', '.join(users[:10])}")
    try:
        rec: Optional[ms.Image] = ms.Image.parse(name, entry.value)
    except ms.SpecError:
        rec = None
    if rec is not None and children is not None:
        kids = children(rec)
        if kids:
            raise AdminError("conflict", f"image {name!r} still has {len(kids)} disk clone(s): {', '.join(kids[:10])}")
    return entry, rec


def delete_image(store: ms.Store, name: str, entry: ms.Entry, rec: Optional[ms.Image],
                 storage: Optional[ms.Storage]) -> None:
    """Delete image ``name`` after ``check_image_delete``: the record first
    (no new VM can name it), then its data in Ceph (``storage``)."""
    if store.delete_if(store.keys.image(name), entry.mod_revision) is None:
        raise AdminError("conflict", f"image {name!r} changed while deleting it; try again")
    if rec is not None and storage is not None:
        storage.remove_base(rec.pool, rec.image, rec.snapshot)
        for obj in (rec.kernel, rec.initrd):
            if obj:
                storage.remove_object(rec.pool, obj)


def as_objects(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows as ``-o json`` prints them: objects keyed by lower-case column."""
    keys = [c.lower() for c in columns]
    return [dict(zip(keys, r)) for r in rows]


VM_COLUMNS = ("NAME", "FLAVOUR", "DESIRED", "STATE", "HOST", "REASON")


SNAPSHOT_KINDS = ("desired", "actual", "hosts", "flavours", "images", "nodes", "fences", "moves", "overflow")


def snapshot_of(keys: ms.Keys, parts: Mapping[str, Mapping[str, ms.Entry]],
                config: Optional[ms.Entry] = None) -> ms.Snapshot:
    """The agents' parsed view (ms.Snapshot: live hosts, trusted claims) of
    listings by kind ({"desired": {name: entry}, ...}, as
    ``ClusterView.entries_of`` or ``Context.listing`` give them), and of
    the cluster config (``config``: its cells decide which nodes may take
    a VM)."""
    view = ms.ClusterView(keys)
    entries = {keys.dir(kind) + name: e for kind, entries in parts.items() for name, e in entries.items()}
    if config is not None:
        entries[keys.config] = config
    view.load(0, entries)
    return view.snapshot()


def vm_row(name: str, desired: Optional[ms.Entry], actual: Optional[ms.Entry],
           hosts: Mapping[str, ms.Entry], snap: Optional[ms.Snapshot] = None) -> list[Any]:
    """One VM as ``list`` shows it. A claim counts only when attached to the
    lease the named host's record hangs on; any other is "untrusted". A
    pending VM's reason says why no node takes it (``ms.pending_reason``)
    when ``snap`` (``snapshot_of``) is given."""
    flavour = want = ""
    if desired is not None:
        try:
            spec = ms.DesiredVM.parse(name, desired.value)
            flavour, want = spec.flavour, spec.state
        except ms.SpecError:
            flavour, want = None, None  # malformed: the reason says why
    else:
        want = "(deleted)"
    if actual is None:
        return [name, flavour, want, "pending", "", ms.pending_reason(name, snap) if snap is not None else ""]
    a = ms.ActualVM.parse(actual.value)
    host = hosts.get(a.host)
    if not actual.lease or host is None or host.lease != actual.lease:
        return [name, flavour, want, "untrusted", a.host,
                f"claim is on no live lease of {a.host or 'any node'} (hand-written or stale): ignored"]
    return [name, flavour, want, a.state, a.host, a.reason]


def given_up(hosts: Mapping[str, ms.Entry]) -> dict[str, dict[str, str]]:
    """vm -> {node: why} for the VMs that nodes failed to run and handed on."""
    out: dict[str, dict[str, str]] = {}
    for node, entry in sorted(hosts.items()):
        with contextlib.suppress(ms.SpecError):
            for vm, why in ms.HostState.parse(entry.value).cannot:
                out.setdefault(vm, {})[node] = why
    return out


def vm_fields(name: str, desired: Optional[ms.Entry], actual: Optional[ms.Entry],
              hosts: Mapping[str, ms.Entry], gave_up: Optional[Mapping[str, dict[str, str]]] = None,
              snap: Optional[ms.Snapshot] = None) -> dict[str, Any]:
    """One VM as ``show -o json`` prints it: the ``list`` fields plus the raw
    desired entry, when the claim was last updated, its disk, and the nodes
    that gave it up (with why; ``gave_up`` is ``given_up(hosts)``, passed
    in when formatting many VMs)."""
    fields: dict[str, Any] = dict(zip([k.lower() for k in VM_COLUMNS], vm_row(name, desired, actual, hosts, snap)))
    parsed = ms.ActualVM.parse(actual.value) if actual else None
    fields["desired_entry"] = desired.value.decode(errors="replace") if desired else None
    fields["updated"] = parsed.updated if parsed else None
    fields["disk"] = (parsed.disk or None) if parsed else None
    refused = (gave_up if gave_up is not None else given_up(hosts)).get(name)
    fields["given_up_by"] = dict(refused) if refused else None  # nodes that failed to run it and handed it on
    trusted = parsed is not None and fields["state"] != "untrusted"
    fields["domain"] = ms.domain_name(name, parsed.host) if trusted and parsed and parsed.host else None
    fields["reserved"] = ({"vcpus": parsed.vcpus, "ram_mb": parsed.ram_mb} if trusted and parsed else None)
    created = None
    if desired is not None:
        with contextlib.suppress(ValueError, RecursionError):
            obj = json.loads(desired.value)
            if isinstance(obj, dict) and isinstance(obj.get("created"), str):
                created = obj["created"]
    fields["created"] = created
    spec = None
    if desired is not None:
        with contextlib.suppress(ValueError, RecursionError):
            spec = json.loads(desired.value)
    fields["spec"] = spec if isinstance(spec, dict) else None  # the desired entry as a nested object
    return fields


def age_seconds(stamp: Optional[str], now: Optional[float] = None) -> Optional[int]:
    """Whole seconds since an ISO-8601 UTC time as utc_now() writes it; None
    when there is none or it does not parse."""
    import datetime
    if not stamp:
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = now if now is not None else datetime.datetime.now(datetime.timezone.utc).timestamp()
    return max(0, int(now - when.timestamp()))


def age_text(seconds: Optional[int]) -> Optional[str]:
    """``age_seconds`` for people: 42s, 5m, 3h, 2d."""
    if seconds is None:
        return None
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


HOST_COLUMNS = ("NODE", "STATE", "VCPUS_USED", "VCPUS", "RAM_MB_USED", "RAM_MB", "VMS", "ADDRESS", "FENCE",
                "FREE_VCPUS", "FREE_RAM_MB", "SCHEDULING", "LOST_AT")


def scheduling(rec: Optional[ms.NodeRecord]) -> Optional[dict[str, Any]]:
    """A node's cordon/drain state as ``hosts -o json`` gives it, or None
    when it takes new VMs."""
    if rec is None or not rec.unschedulable:
        return None
    return {"cordon": rec.cordon, "drain": rec.drain, "evacuate": rec.evacuate, "reason": rec.reason or None,
            "by": rec.by or None,
            "since": rec.since or None}


def host_rows(hosts: Mapping[str, ms.Entry], fences: Mapping[str, ms.Entry],
              nodes: Mapping[str, ms.Entry], actual: Mapping[str, ms.Entry],
              use: Optional[Mapping[str, tuple[int, int, int]]] = None) -> list[list[Any]]:
    """Nodes as ``hosts`` shows them: each live node with its capacity, use
    (what its trusted claims in ``actual`` reserve, ms.claims_use, unless
    ``use`` gives it: node -> (vcpus, ram_mb, vms)) and free
    capacity; a node with a fence record or a node record but no
    host record is "down" when fenced, "lost" otherwise (it stopped renewing
    its lease; LOST_AT: when a live node saw its host record vanish).
    SCHEDULING: the cordon/drain state of its node record (null: takes new
    VMs)."""
    fence_text: dict[str, str] = {}
    for name, entry in fences.items():
        try:
            rec = ms.FenceRecord.parse(name, entry.value)
            fence_text[name] = f"{rec.state} ({rec.mode}{' ' + rec.address if rec.address else ''}, by {rec.by})"
        except ms.SpecError as exc:
            fence_text[name] = f"malformed: {exc}"
    records: dict[str, ms.NodeRecord] = {}
    for name, entry in nodes.items():
        with contextlib.suppress(ms.SpecError):
            records[name] = ms.NodeRecord.parse(name, entry.value)
    rows = []
    use = ms.claims_use(hosts, actual) if use is None else use
    for name, entry in sorted(hosts.items()):
        sched = scheduling(records.get(name))
        try:
            h = ms.HostState.parse(entry.value).with_use(*use.get(name, (0, 0, 0)))
        except ms.SpecError:
            rows.append([name, "malformed", None, None, None, None, None, None, fence_text.get(name),
                         None, None, sched, None])
            continue
        state = h.state if entry.lease else "no lease (not a live node)"
        free_cpu, free_ram = ms.free_capacity(h)
        rows.append([name, state, h.vcpus_used, h.vcpus, h.ram_mb_used, h.ram_mb, h.vms, h.address or None,
                     fence_text.get(name), free_cpu, free_ram, sched, None])
    for name in sorted((set(fence_text) | set(nodes)) - set(hosts)):
        rec = records.get(name)
        rows.append([name, "down" if name in fence_text else "lost", None, None, None, None, None,
                     (rec.address or None) if rec else None, fence_text.get(name), None, None,
                     scheduling(rec), (rec.lost_at or None) if rec else None])
    return rows


FLAVOUR_COLUMNS = ("NAME", "VCPUS", "RAM_MB")


def flavour_rows(flavours: Mapping[str, ms.Entry]) -> list[list[Any]]:
    rows = []
    for name, entry in sorted(flavours.items()):
        try:
            f = ms.Flavour.parse(name, entry.value)
            rows.append([name, f.vcpus, f.ram_mb])
        except ms.SpecError:
            rows.append([name, None, None])
    return rows


IMAGE_COLUMNS = ("NAME", "POOL", "RBD", "SIZE", "BOOT")


def image_rows(images: Mapping[str, ms.Entry]) -> list[list[Any]]:
    rows = []
    for name, entry in sorted(images.items()):
        try:
            i = ms.Image.parse(name, entry.value)
            rows.append([name, i.pool, f"{i.image}@{i.snapshot}", i.size, "kernel" if i.direct_boot else "disk"])
        except ms.SpecError:
            rows.append([name, None, None, None, "malformed"])
    return rows

# -- end of the block shared with metastackweb ---------------------------------


@click.group(help=__doc__)
@click.version_option(ms.version(), "--version", prog_name="metastackctl", message="%(prog)s %(version)s")
@click.option("-c", "--config", type=click.Path(dir_okay=False), envvar="METASTACK_CONFIG",
              help="ini file with an [etcd] section (the agent's file works). Env: METASTACK_CONFIG.")
@click.option("--endpoints", envvar="METASTACK_ENDPOINTS",
              help="etcd endpoints host:port[,...]; overrides the config file. Env: METASTACK_ENDPOINTS.")
@click.option("--prefix", help="etcd key prefix; overrides the config file (default /metastack).")
@click.pass_context
def cli(ctx: click.Context, config: Optional[str], endpoints: Optional[str], prefix: Optional[str]) -> None:
    try:
        cp = ms.read_ini(config)
        if endpoints:
            cp.read_dict({"etcd": {"endpoints": endpoints}})
        if prefix:
            cp.read_dict({"etcd": {"prefix": prefix}})
        ctx.obj = Context(ms.etcd_config_from(cp), cp)
        ctx.call_on_close(ctx.obj.close)  # the Ceph client shut down with the command, not at interpreter exit
    except ms.ConfigError as exc:
        raise click.UsageError(str(exc)) from None


pass_ctx = click.make_pass_decorator(Context)

# -- VMs ----------------------------------------------------------------------


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--flavour", "-f", required=True, callback=name_arg("flavour"), help="Flavour name.")
@click.option("--host", callback=name_arg("node"), help="Pin the VM to this node.")
@click.option("--image", callback=name_arg("image"), help="Base image name.")
@click.option("--stopped", is_flag=True, help="Create it stopped (defined, not started).")
@click.option("--group", callback=name_arg("group"), help="Anti-affinity group: spread its VMs over nodes.")
@click.option("--strict", is_flag=True, help="With --group: never two VMs of the group on one node.")
@wait_options
@pass_ctx
def create(c: Context, name: str, flavour: str, host: Optional[str], image: Optional[str], stopped: bool,
           group: Optional[str], strict: bool, wait: bool, timeout: float) -> None:
    """Create VM NAME; an agent with room claims and starts it. --wait:
    until it runs (or is defined, with --stopped)."""
    if strict and group is None:
        raise click.UsageError("--strict needs --group")
    c.admin(create_vm, c.store, name, flavour, host, image, "stopped" if stopped else "running", group, strict)
    click.echo(f"created {name} (flavour {flavour}{', pinned to ' + host if host else ''}"
               f"{', stopped' if stopped else ''})", err=True)
    if wait:
        _report(name, _wait_state(c, name, ("stopped",) if stopped else ("running",), timeout))


def _report(name: str, claim: ms.ActualVM) -> None:
    click.echo(f"{name} is {claim.state} on {claim.host}", err=True)


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@wait_options
@pass_ctx
def destroy(c: Context, name: str, yes: bool, wait: bool, timeout: float) -> None:
    """Destroy VM NAME: its owner powers it off and removes it. --wait:
    until its claim is gone (domain and disk removed)."""
    entry = c.call(c.store.get_desired, name)
    if entry is None:
        raise click.ClickException(f"no VM named {name!r}")
    if not yes:
        click.confirm(f"Destroy VM {name!r}?", abort=True, err=True)
    c.admin(destroy_vm, c.store, name)
    click.echo(f"destroying {name}", err=True)
    if wait:
        end = time.monotonic() + timeout
        while c.call(c.store.get_claim, name) is not None:
            if time.monotonic() >= end:
                raise TimedOut(f"{name} is not removed after {timeout:.0f}s")
            time.sleep(0.25)
        click.echo(f"{name} is removed", err=True)


def _set_state(c: Context, name: str, state: str, wait: bool = False, timeout: float = 0) -> None:
    if c.admin(set_vm_state, c.store, name, state):
        click.echo(f"{name}: desired state is now {state}", err=True)
    else:
        click.echo(f"{name} is already desired {state}", err=True)
    if wait:
        _report(name, _wait_state(c, name, (state,), timeout))


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@wait_options
@pass_ctx
def start(c: Context, name: str, wait: bool, timeout: float) -> None:
    """Set VM NAME's desired state to running (--wait: until it runs)."""
    _set_state(c, name, "running", wait, timeout)


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@wait_options
@pass_ctx
def stop(c: Context, name: str, wait: bool, timeout: float) -> None:
    """Set VM NAME's desired state to stopped (--wait: until it is stopped)."""
    _set_state(c, name, "stopped", wait, timeout)


@cli.command("list")
@OUTPUT
@click.option("--watch", "-w", is_flag=True, help="Print the list again on every change, until Ctrl-C.")
@follow_options
@pass_ctx
def list_(c: Context, output: str, watch: bool, max_updates: int) -> None:
    """List VMs: desired state next to what their owner reports. A
    pending VM's REASON says why no node takes it (no live node with the
    vcpus or RAM, with the largest free amounts; its pin names a node that
    is not live or is cordoned; its flavour or image is missing; nodes that
    gave it up), computed here from what the nodes publish. --watch: a
    new list after every change (JSON: one list per line)."""
    last = None
    for _ in (c.follow(c.keys.all, max_updates) if watch else [None]):
        parts = {kind: c.listing(kind) for kind in SNAPSHOT_KINDS}
        snap = snapshot_of(c.keys, parts, c.call(c.store.get, c.keys.config))
        desired, actual, hosts_ = parts["desired"], parts["actual"], parts["hosts"]
        rows = [vm_row(n, desired.get(n), actual.get(n), hosts_, snap) for n in sorted(set(desired) | set(actual))]
        if rows == last:
            continue
        last = rows
        if watch and output == "json":
            click.echo(json.dumps(as_objects(VM_COLUMNS, rows)))
        else:
            if watch:
                click.echo(f"-- {ms.utc_now()}")
            print_output(VM_COLUMNS, rows, output)


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@OUTPUT
@pass_ctx
def show(c: Context, name: str, output: str) -> None:
    """Show one VM: its desired entry and its actual state, the libvirt
    domain (VM.NODE), what its claim reserves, when it was created and
    last updated (and, in the table, the age of that update). JSON: the
    desired entry also as a nested object (spec), null for what is not
    known."""
    desired = c.call(c.store.get_desired, name)
    actual = c.call(c.store.get_claim, name)
    if desired is None and actual is None:
        raise click.ClickException(f"no VM named {name!r}")
    parts = {kind: c.listing(kind) for kind in SNAPSHOT_KINDS if kind != "desired"}  # every claim: the hosts' use
    parts["desired"] = {name: desired} if desired is not None else {}
    if actual is not None:
        parts["actual"][name] = actual
    fields = vm_fields(name, desired, actual, parts["hosts"],
                       snap=snapshot_of(c.keys, parts, c.call(c.store.get, c.keys.config)))
    if output == "json":
        click.echo(json.dumps(fields, indent=2))
        return
    rows = [[k, v] for k, v in fields.items() if k != "spec"]
    rows.append(["age", age_text(age_seconds(fields["updated"]))])
    print_output(("FIELD", "VALUE"), rows, "table")


@cli.command()
@OUTPUT
@pass_ctx
def hosts(c: Context, output: str) -> None:
    """List nodes: live ones with their capacity and use; a node that
    stopped renewing its lease is "lost" ("down" when fenced). FENCE:
    fenced = it may still run stale domains; clean = it proved them gone
    and waits for the fence to be lifted."""
    rows = host_rows(c.listing("hosts"), c.listing("fences"), c.listing("nodes"), c.listing("actual"))
    print_output(HOST_COLUMNS, rows, output)


@cli.group()
def host() -> None:
    """Operate on nodes: cordon, drain, uncordon, fences."""


@host.command("unfence")
@click.argument("node", callback=name_arg("node"))
@click.option("--force", is_flag=True, help="Lift it even though the node has not proved its stale domains gone.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def host_unfence(c: Context, node: str, force: bool, yes: bool) -> None:
    """Lift the fence of NODE: remove its blocklist and its fence record.

    Refused while the node has not marked its fence clean (it may still run
    stale domains that would write again), unless --force. A range fence
    needs Ceph credentials that may remove blocklist entries (an admin or
    management key: -c with a [ceph] section)."""
    entry = c.call(c.store.get, c.keys.fence(node))
    if entry is None:
        raise click.ClickException(f"node {node!r} is not fenced")
    _, record = c.call(_node_record, c.store, node)
    if record is not None and record.evacuate and not force:
        raise click.ClickException(f"node {node!r} is evacuated: its fence stays until `host uncordon {node}` "
                                   f"(lifting it now would only see it fenced again); or use --force")
    try:
        rec = ms.FenceRecord.parse(node, entry.value)
    except ms.SpecError as exc:
        rec = None
        if not force:
            raise click.ClickException(f"the fence record of {node!r} is malformed ({exc}); use --force") from None
    if rec is not None and rec.state != "clean" and not force:
        raise click.ClickException(
            f"node {node!r} has not proved its stale domains gone (fence state {rec.state}); "
            f"lifting the fence now could let them write again. Wait, or use --force")
    if not yes:
        click.confirm(f"Lift the fence of {node!r}?", abort=True, err=True)
    if rec is not None and rec.mode == "range" and rec.address:
        c.ceph_call(c.storage.unblocklist_range, rec.address)
    if c.call(c.store.delete_if, c.keys.fence(node), entry.mod_revision) is None:
        raise click.ClickException(f"the fence record of {node!r} changed meanwhile; try again")
    click.echo(f"unfenced {node}", err=True)


def operator() -> str:
    """Who asks (for the ``by`` of cordons and moves): user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@host.command("cordon")
@click.argument("node", callback=name_arg("node"))
@click.option("--reason", help="Why (shown by hosts and in pending VMs' reasons).")
@pass_ctx
def host_cordon(c: Context, node: str, reason: Optional[str]) -> None:
    """Cordon NODE: it claims no new VM; its VMs stay."""
    c.admin(set_node_schedule, c.store, node, True, False, reason, operator())
    click.echo(f"cordoned {node}", err=True)


@host.command("uncordon")
@click.argument("node", callback=name_arg("node"))
@pass_ctx
def host_uncordon(c: Context, node: str) -> None:
    """Uncordon NODE (ends a cordon, a drain or an evacuation): it takes new
    VMs again (an evacuated node first lifts its own clean fence)."""
    c.admin(set_node_schedule, c.store, node, False)
    click.echo(f"uncordoned {node}", err=True)


def _on_node(snap: ms.Snapshot, node: str) -> dict[str, ms.ActualVM]:
    return {vm: a for vm, a in snap.actual.items() if a.host == node}


def _pinned_to(snap: ms.Snapshot, vm: str, node: str) -> bool:
    spec = snap.desired.get(vm)
    return isinstance(spec, ms.DesiredVM) and spec.host == node


def _stays(snap: ms.Snapshot, vm: str, node: str) -> Optional[str]:
    """Why a drain leaves VM ``vm`` on ``node``, or None when it moves."""
    if _pinned_to(snap, vm, node):
        rec = snap.nodes.get(node)
        return "stays: pinned here" + (" (stopped while it is evacuated)" if rec is not None and rec.evacuate else "")
    spec = snap.desired.get(vm)
    if spec is not None and isinstance(ms.resolve(spec, snap), str):
        return "stays: its desired entry cannot run anywhere (see list)"
    return None


@host.command("drain")
@click.argument("node", callback=name_arg("node"))
@click.option("--deadline", type=click.FloatRange(min=0), default=600, show_default=True,
              help="Seconds to wait for the drain to finish (it goes on after that).")
@click.option("--reason", help="Why (shown by hosts).")
@pass_ctx
def host_drain(c: Context, node: str, deadline: float, reason: Optional[str]) -> None:
    """Drain NODE: cordon it and hand its VMs over to other nodes one at a
    time (each is stopped cleanly, released, claimed by a node with room
    and booted there from the same disk). Prints progress, waits until
    only VMs pinned to NODE are left or the deadline passes (exit 4; the
    drain goes on), and ends with a report. Re-running it continues an
    interrupted drain. `host uncordon NODE` ends it."""
    c.admin(set_node_schedule, c.store, node, True, True, reason, operator())
    snap = c.snapshot()
    if node not in snap.hosts:
        click.echo(f"{node} is not live: its VMs fail over to other nodes by themselves", err=True)
    first = _on_node(snap, node)
    click.echo(f"draining {node}: {len(first)} VM(s) here", err=True)
    moved: dict[str, str] = {}
    end = time.monotonic() + deadline
    last = ""
    while True:
        left = _on_node(snap, node)
        for vm in sorted(first):
            claim = snap.actual.get(vm)
            if vm not in moved and claim is not None and claim.host != node:
                moved[vm] = claim.host
                click.echo(f"  moved {vm} -> {claim.host} ({claim.state})", err=True)
        movable = sorted(vm for vm in left if _stays(snap, vm, node) is None)
        on_way = sorted(vm for vm in first if vm in snap.desired and vm not in snap.actual)
        status = f"{len(movable)} to hand over" + (f", on the way: {', '.join(on_way)}" if on_way else "")
        if status != last:
            click.echo(f"  {status}", err=True)
            last = status
        if not movable and not on_way:
            break
        if time.monotonic() >= end:
            _drain_report(node, moved, left, snap)
            raise TimedOut(f"drain of {node} not finished after {deadline:.0f}s (it goes on; "
                           f"re-run to follow it): {status}")
        time.sleep(0.5)
        snap = c.snapshot()
    _drain_report(node, moved, left, snap)


@host.command("evacuate")
@click.argument("node", callback=name_arg("node"))
@click.option("--deadline", type=click.FloatRange(min=0), default=300, show_default=True,
              help="Seconds to wait until its VMs are claimed elsewhere (the evacuation goes on after that).")
@click.option("--reason", help="Why (shown by hosts and in pending VMs' reasons).")
@click.option("--force", is_flag=True, help="Evacuate even when the other nodes lack room for some of its VMs "
                                            "(those wait, stopped, until room appears).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def host_evacuate(c: Context, node: str, deadline: float, reason: Optional[str], force: bool, yes: bool) -> None:
    """Evacuate NODE at once, without its help: for a node that is broken or
    must go now (use `host drain` for a clean hand-over). NODE is cordoned
    and marked evacuate; the first node that takes work fences it at the
    storage layer (its Ceph clients blocklisted) and, when its whole
    address is blocklisted, revokes its lease; else its agent releases its
    VMs when it sees the fence, or its lease lapses. So its VMs fail over
    as after a death: each restarts on another node from
    its own disk, without a clean shutdown. VMs pinned to NODE wait,
    stopped. Refused (nothing written) when the other nodes lack room for
    its VMs, unless --force. Waits until they are claimed elsewhere or the
    deadline passes (exit 4). NODE stays fenced and cordoned until `host
    uncordon NODE`."""
    snap = c.snapshot()
    if node not in snap.nodes and node not in snap.hosts:
        known = ", ".join(sorted(snap.nodes)) or "none"
        raise click.ClickException(f"no node named {node!r} (known: {known})")
    first = _on_node(snap, node)
    leaving = {vm: a for vm, a in first.items() if not _pinned_to(snap, vm, node)}
    pinned = sorted(vm for vm in snap.desired if _pinned_to(snap, vm, node))  # claimed there or not
    short = evacuation_shortfall(snap, node, leaving)
    if short and not force:
        raise click.ClickException(
            f"the other nodes lack room for {len(short)} of the {len(leaving)} VM(s) on {node} "
            f"({', '.join(short[:5])}{' ...' if len(short) > 5 else ''}): they would wait, stopped. "
            f"Nothing was changed; use --force to evacuate anyway, or add room first")
    if not yes:
        stop = f"; {len(pinned)} pinned to it stop and wait ({', '.join(pinned[:5])})" if pinned else ""
        click.confirm(f"Evacuate {node}: fence it and restart its {len(leaving)} VM(s) elsewhere from their "
                      f"disks, without a clean shutdown{stop}?", abort=True, err=True)
    c.admin(set_node_schedule, c.store, node, True, False, reason, operator(), True)
    if node not in snap.hosts:
        click.echo(f"{node} is not live: its VMs fail over by themselves; it is fenced if it comes back", err=True)
    click.echo(f"evacuating {node}: {len(leaving)} VM(s) to restart elsewhere"
               + (f", {len(pinned)} pinned to it" if pinned else ""), err=True)
    moved: dict[str, str] = {}
    end = time.monotonic() + deadline
    while True:
        for vm in sorted(leaving):
            claim = snap.actual.get(vm)
            if vm not in moved and claim is not None and claim.host != node:
                moved[vm] = claim.host
                click.echo(f"  {vm} -> {claim.host} ({claim.state})", err=True)
        waiting = sorted(vm for vm in leaving if vm in snap.desired and vm not in moved)
        if not waiting:
            break
        if time.monotonic() >= end:
            _drain_report(node, moved, waiting, snap, "not restarted elsewhere yet")
            raise TimedOut(f"evacuation of {node} not finished after {deadline:.0f}s (it goes on): "
                           f"{len(waiting)} VM(s) not claimed elsewhere yet")
        time.sleep(0.5)
        snap = c.snapshot()
    _drain_report(node, moved, (set(first) | set(pinned)) - set(moved), snap)
    fence = snap.fences.get(node)
    click.echo(f"{node}: " + (f"fenced by {fence.by} ({fence.mode}, {fence.state})" if fence else
                              "not fenced yet (the first node that takes work fences it while it is live)"),
               err=True)


def evacuation_shortfall(snap: ms.Snapshot, node: str, leaving: Mapping[str, ms.ActualVM]) -> list[str]:
    """The VMs of ``leaving`` (those of ``node`` that may go elsewhere) that
    would find no room on the other nodes that take work, placed largest
    first, each on the node with the most free vcpus among those of the
    cell that would serve its shard once ``node`` is out, else (that cell
    being full, the VM is offered to the other cells: ms.CellOverflow)
    among those of any cell; [] when all fit. An estimate from what the
    nodes publish, not a reservation."""
    others = {n: h for n, h in snap.hosts.items() if n != node}
    cmap = ms.CellMap.of(snap.cells.cells, others, snap.nodes) if snap.cells is not None else None
    free = {n: list(ms.free_capacity(h)) for n, h in others.items()
            if h.state == "ready" and ms.takes_work(h, snap.nodes.get(n))}
    short = []
    for vm, a in sorted(leaving.items(), key=lambda kv: (-kv[1].vcpus, -kv[1].ram_mb, kv[0])):
        cell = cmap.serving(ms.Keys.shard(vm)) if cmap is not None else None
        room = [n for n, f in free.items() if f[0] >= a.vcpus and f[1] >= a.ram_mb]
        fits = [n for n in room if cmap is None or others[n].cell % cmap.cells == cell] or room
        if not fits:
            short.append(vm)
            continue
        best = max(fits, key=lambda n: (free[n][0], free[n][1], n))
        free[best][0] -= a.vcpus
        free[best][1] -= a.ram_mb
    return sorted(short)


def _drain_report(node: str, moved: Mapping[str, str], left: Iterable[str], snap: ms.Snapshot,
                  waiting: str = "not handed over yet") -> None:
    rows = [[vm, node, to, (snap.actual[vm].state if vm in snap.actual else "pending")] for vm, to in sorted(moved.items())]
    for vm in sorted(left):
        rows.append([vm, node, None, _stays(snap, vm, node) or waiting])
    print_output(("VM", "FROM", "TO", "STATE"), rows, "table")


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--to", "to", callback=name_arg("node"), help="Move it to this node and pin it there.")
@wait_options
@pass_ctx
def move(c: Context, name: str, to: Optional[str], wait: bool, timeout: float) -> None:
    """Move VM NAME to another node (cold: stopped cleanly, booted there
    from the same disk). With --to NODE it is pinned to NODE; without, it
    goes to any other node with room (a request in moves/NAME that its
    owner acts on; the new owner deletes it)."""
    entry = c.call(c.store.get_desired, name)
    want = ("running",)
    with contextlib.suppress(ms.SpecError):
        if entry is not None:
            want = (ms.DesiredVM.parse(name, entry.value).state,)
    if to is not None:
        changed = c.admin(pin_vm, c.store, name, to)
        click.echo(f"{name}: pinned to {to}" if changed else f"{name} is already pinned to {to}", err=True)
        if wait:
            _report(name, _wait_state(c, name, want, timeout, host=to))
        return
    req = c.admin(request_move, c.store, name, operator())
    click.echo(f"{name}: moving off {req.from_node}", err=True)
    if wait:
        _report(name, _wait_state(c, name, want, timeout, avoid=req.from_node))


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--flavour", "-f", required=True, callback=name_arg("flavour"), help="The new flavour.")
@click.option("--restart", is_flag=True, help="Stop it, resize, start it again (when it runs).")
@click.option("--timeout", type=click.FloatRange(min=0), default=120, show_default=True,
              help="Seconds to wait for the stop with --restart.")
@pass_ctx
def resize(c: Context, name: str, flavour: str, restart: bool, timeout: float) -> None:
    """Give VM NAME flavour F. It takes effect at its next start (the owner
    redefines the domain, or hands the VM to a node with room); refused
    while it runs unless --restart (stop, wait, start)."""
    claim = c.call(_live_claim, c.store, name)
    was_running = claim is not None and claim.state in ("running", "starting", "stopping")
    if not c.admin(resize_vm, c.store, name, flavour, restart):
        click.echo(f"{name} already has flavour {flavour}", err=True)
        return
    if not (restart and was_running):
        click.echo(f"{name}: flavour {flavour} (takes effect at its next start)", err=True)
        return
    click.echo(f"{name}: flavour {flavour}; stopping it", err=True)
    _wait_state(c, name, ("stopped",), timeout)
    c.admin(set_vm_state, c.store, name, "running")
    click.echo(f"{name}: stopped; starting it with flavour {flavour}", err=True)


def _wait_state(c: Context, name: str, states: Sequence[str], timeout: float,
                host: Optional[str] = None, avoid: Optional[str] = None) -> ms.ActualVM:
    """Wait until VM NAME's trusted claim is in one of ``states`` (on
    ``host``, or not on ``avoid``, when given); exit 1 when it lands in
    error, 4 on timeout."""
    end = time.monotonic() + timeout
    while True:
        claim = c.call(_live_claim, c.store, name)
        if claim is not None and (host is None or claim.host == host) and (avoid is None or claim.host != avoid):
            if claim.state in states:
                return claim
            if claim.state == "error" and "error" not in states:
                raise click.ClickException(f"{name} is in error on {claim.host}: {claim.reason}")
        if time.monotonic() >= end:
            now = f"{claim.state} on {claim.host}" if claim is not None else "pending"
            raise TimedOut(f"{name} is not {'/'.join(states)} after {timeout:.0f}s (now {now})")
        time.sleep(0.25)


def new_console_text(old: str, new: str) -> str:
    """What ``new`` (the published last 4 KiB) adds to ``old``: the part after
    the longest end of ``old`` that ``new`` starts with (the window slides)."""
    if not old:
        return new
    for k in range(min(len(old), len(new)), 0, -1):
        if old.endswith(new[:k]):
            return new[k:]
    return new


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--follow", "-f", is_flag=True, help="Keep printing what the console adds, until Ctrl-C.")
@follow_options
@pass_ctx
def console(c: Context, name: str, follow: bool, max_updates: int) -> None:
    """Print the tail of VM NAME's serial console (published by its owner,
    at most every 2 s). --follow: then what it adds."""
    entry = c.call(c.store.get, c.keys.console(name))
    if entry is None and not follow:
        if c.call(c.store.get_desired, name) is None:
            raise click.ClickException(f"no VM named {name!r}")
        raise click.ClickException(f"no console output published for {name!r} (is it running?)")
    if not follow:
        click.echo(entry.value.decode("utf-8", errors="replace"), nl=False)
        return
    if c.call(c.store.get_desired, name) is None and entry is None:
        raise click.ClickException(f"no VM named {name!r}")
    shown = ""
    for _ in c.follow(c.keys.console(name), max_updates):
        entry = c.call(c.store.get, c.keys.console(name))
        text = entry.value.decode("utf-8", errors="replace") if entry is not None else ""
        if text != shown:
            click.echo(new_console_text(shown, text), nl=False)
            shown = text


@cli.command()
@click.argument("name", required=False, callback=lambda ctx, p, v: name_arg("VM")(ctx, p, v) if v else v)
@OUTPUT
@click.option("--follow", "-f", is_flag=True, help="Then print each new event as it comes, until Ctrl-C.")
@follow_options
@pass_ctx
def events(c: Context, name: Optional[str], output: str, follow: bool, max_updates: int) -> None:
    """Show VM life events (claimed, started, fenced, stopped, errors, ...)
    recorded by the agents that acted, oldest first; all VMs without NAME.
    Events are kept for about an hour, at most 50 per VM. --follow: then
    each new event as it comes, one line each (JSON: one object per line),
    until Ctrl-C."""
    prefix = c.keys.events(name) if name else c.keys.dir("events")
    columns = ("AT", "VM", "NODE", "EVENT", "DETAIL")
    seen: set[str] = set()
    for turn in (c.follow(prefix, max_updates) if follow else [None]):
        _, entries = c.call(c.store.list_prefix, prefix)
        rows = []
        for key in sorted(entries, key=lambda k: k.rsplit("/", 1)[1]):
            if key in seen:
                continue
            seen.add(key)
            try:
                ev = json.loads(entries[key].value)
                rows.append([ev.get("at"), ev.get("vm"), ev.get("node"), ev.get("event"), ev.get("detail")])
            except (ValueError, AttributeError, RecursionError):
                rows.append([None, key.split("/")[-2], None, "malformed", None])
        if not follow:
            print_output(columns, rows, output)
        elif output == "json":
            for obj in as_objects(columns, rows):
                click.echo(json.dumps(obj))
        else:
            for r in rows:
                click.echo("  ".join(cell(v) for v in r))


# -- images -------------------------------------------------------------------


@cli.group()
def image() -> None:
    """Manage base images (in Ceph RBD; VMs boot from copy-on-write clones)."""


IMAGE_FORMATS = ("raw", "qcow2")


def _image_format(path: str) -> tuple[str, int]:
    """(format, virtual size in bytes) of a disk image file, via qemu-img.

    The format is probed once, by ``qemu-img info``, which reads the file's
    own header and opens no backing file. Only raw and qcow2 are accepted,
    and a qcow2 that refers to another file (a backing file, an external
    data file) is refused: converting it would read that file, so an
    untrusted image could pull host files into the base image. Later
    qemu-img calls must pass the returned format with ``-f``. Raises
    click.BadParameter (exit 2) for a file that is not acceptable.
    """
    def bad(why: str) -> click.BadParameter:
        return click.BadParameter(f"{path} {why}", param_hint="FILE")
    if os.path.getsize(path) == 0:
        raise bad("is empty: not a disk image")
    exe = shutil.which("qemu-img")
    if exe is None:
        raise click.ClickException("qemu-img is not installed (Debian package qemu-utils)")
    r = subprocess.run([exe, "info", "--output=json", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise bad(f"is not a readable disk image: {r.stderr.strip().splitlines()[-1:]}")
    try:
        info = json.loads(r.stdout)
        fmt, size = str(info.get("format", "")), int(info.get("virtual-size", 0))
        specific = info.get("format-specific") or {}
        data = (specific.get("data") or {}) if isinstance(specific, dict) else {}
    except (ValueError, TypeError, AttributeError):
        raise bad("is not a readable disk image: qemu-img info gave no usable answer") from None
    if fmt not in IMAGE_FORMATS:
        raise bad(f"is in {fmt or 'an unknown'} format: only {' and '.join(IMAGE_FORMATS)} images are accepted")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        raise bad(f"has a backing file ({backing}): refused, it would pull another file into the image "
                  f"(flatten it first: qemu-img convert -O qcow2 IN OUT)")
    if isinstance(data, dict) and data.get("data-file"):
        raise bad(f"keeps its data in an external file ({data['data-file']}): refused "
                  f"(flatten it first: qemu-img convert -O qcow2 IN OUT)")
    if fmt == "raw" and os.path.getsize(path) % 512:
        raise bad(f"is not a disk image: {os.path.getsize(path)} bytes is not a "
                  f"whole number of 512-byte sectors")
    if size <= 0:
        raise bad("has no content")
    return fmt, size


def _convert_to_raw(path: str, fmt: str, dest: str) -> None:
    """Write the raw content of image ``path`` to ``dest``, reading it as
    ``fmt`` (given with -f: the file is never probed again)."""
    r = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, dest], capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"cannot convert {path} from {fmt}: {r.stderr.strip()}")


@image.command("import")
@click.argument("name", callback=name_arg("image"))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, readable=True),
              help="Kernel for direct boot (with --initrd).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, readable=True),
              help="Initrd for direct boot (with --kernel).")
@click.option("--cmdline", help="Kernel command line for direct boot (default console=ttyS0).")
@click.option("--pool", help="Ceph pool (default: [ceph] pool of the config file).")
@pass_ctx
def image_import(c: Context, name: str, file: str, kernel: Optional[str], initrd: Optional[str],
                 cmdline: Optional[str], pool: Optional[str]) -> None:
    """Upload disk image FILE (raw or qcow2; qcow2 is converted to raw, and
    refused if it refers to a backing or data file) into RBD as base image
    NAME, snapshot and protect it. The file and the record are checked
    before Ceph or etcd is touched; nothing is left behind if any step
    fails."""
    if (kernel is None) != (initrd is None):
        raise click.UsageError("--kernel and --initrd go together")
    if cmdline is not None and kernel is None:
        raise click.UsageError("--cmdline needs --kernel and --initrd")
    fmt, size = _image_format(file)
    pool = pool or c.ceph.pool
    rbd_name = f"base-{name}-{secrets.token_hex(4)}"
    record = ms.Image(pool=pool, image=rbd_name, snapshot="base", size=size,
                      kernel=f"{rbd_name}.kernel" if kernel else None,
                      initrd=f"{rbd_name}.initrd" if initrd else None,
                      cmdline=(cmdline or "console=ttyS0") if kernel else None)
    try:  # the agents would refuse a record they cannot trust: refuse it here first
        ms.Image.parse(name, json.dumps(record.to_json()).encode())
    except ms.SpecError as exc:
        raise click.UsageError(str(exc)) from None
    storage = c.storage
    if c.call(c.store.get, c.keys.image(name)) is not None:
        raise click.ClickException(f"an image named {name!r} already exists")
    if not c.ceph_call(storage.pool_exists, pool):
        raise click.ClickException(f"Ceph pool {pool!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="metastack-import-") as tmp:
        src = file
        if fmt != "raw":
            src = os.path.join(tmp, "image.raw")
            _convert_to_raw(file, fmt, src)
        with open(src, "rb") as fh:
            c.ceph_call(storage.import_base, pool, rbd_name, "base", fh, size)
    try:
        if kernel and initrd:
            c.ceph_call(storage.put_object, pool, f"{rbd_name}.kernel", kernel)
            c.ceph_call(storage.put_object, pool, f"{rbd_name}.initrd", initrd)
        rev, _ = c.call(c.store.create, c.keys.image(name), json.dumps(record.to_json()).encode())
        if rev is None:
            raise click.ClickException(f"an image named {name!r} was created meanwhile")
    except BaseException:
        for obj in (record.kernel, record.initrd):
            if obj:
                c.ceph_call(storage.remove_object, pool, obj)
        c.ceph_call(storage.remove_base, pool, rbd_name, "base")
        raise
    click.echo(f"imported {name}: {pool}/{rbd_name}@base, {size} bytes ({fmt})"
               f"{', direct kernel boot' if kernel else ''}", err=True)


@image.command("list")
@OUTPUT
@pass_ctx
def image_list(c: Context, output: str) -> None:
    """List base images."""
    print_output(IMAGE_COLUMNS, image_rows(c.listing("images")), output)


@image.command("delete")
@click.argument("name", callback=name_arg("image"))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def image_delete(c: Context, name: str, yes: bool) -> None:
    """Delete base image NAME (refused while a VM uses it)."""
    entry, rec = c.admin(check_image_delete, c.store, name,
                         lambda r: c.ceph_call(c.storage.base_children, r.pool, r.image, r.snapshot))
    if not yes:
        click.confirm(f"Delete image {name!r}?", abort=True, err=True)
    storage = c.storage if rec is not None else None
    c.ceph_call(c.admin, delete_image, c.store, name, entry, rec, storage)
    click.echo(f"deleted image {name}", err=True)


# -- flavours -----------------------------------------------------------------


@cli.group()
def flavour() -> None:
    """Manage flavours (vcpus and RAM sizes)."""


@flavour.command("create")
@click.argument("name", callback=name_arg("flavour"))
@click.option("--vcpus", required=True, type=click.IntRange(min=1), help="Virtual CPUs.")
@click.option("--ram-mb", required=True, type=click.IntRange(min=1), help="RAM in MiB.")
@pass_ctx
def flavour_create(c: Context, name: str, vcpus: int, ram_mb: int) -> None:
    """Create flavour NAME."""
    c.admin(create_flavour, c.store, name, vcpus, ram_mb)
    click.echo(f"created flavour {name} ({vcpus} vcpus, {ram_mb} MiB)", err=True)


@flavour.command("list")
@OUTPUT
@pass_ctx
def flavour_list(c: Context, output: str) -> None:
    """List flavours."""
    print_output(FLAVOUR_COLUMNS, flavour_rows(c.listing("flavours")), output)


@flavour.command("delete")
@click.argument("name", callback=name_arg("flavour"))
@pass_ctx
def flavour_delete(c: Context, name: str) -> None:
    """Delete flavour NAME (refused while a VM uses it)."""
    c.admin(delete_flavour, c.store, name)
    click.echo(f"deleted flavour {name}", err=True)


# -- users of the web interface (metastackweb) ---------------------------------
# Users live under "<prefix>-auth/", outside the MetaStack prefix, so that
# compute agents' etcd credentials (limited to "<prefix>/") cannot read them.
# Passwords are kept only as salted scrypt hashes and are never logged.

USER_ROLES = ("admin", "viewer")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1  # about 50 ms and 16 MiB per hash
MIN_PASSWORD = 8


class AuthKeys:
    """Key layout of the web's users and sessions: ``<prefix>-auth/users/<name>``
    and ``<prefix>-auth/sessions/<sha256 of the session token>``."""

    def __init__(self, prefix: str) -> None:
        self.root = f"{prefix.rstrip('/')}-auth/"

    def user(self, name: str) -> str:
        return f"{self.root}users/{name}"

    def session(self, token_hash: str) -> str:
        return f"{self.root}sessions/{token_hash}"

    @property
    def users(self) -> str:
        return f"{self.root}users/"


def hash_password(password: str, salt: Optional[bytes] = None) -> dict[str, Any]:
    """A slow salted hash of ``password`` as stored in a user record."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return {"alg": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(), "hash": base64.b64encode(digest).decode()}


def verify_password(stored: Any, password: str) -> bool:
    """Whether ``password`` matches a hash made by ``hash_password``; False
    for anything malformed. Constant-time comparison."""
    try:
        n, r, p = int(stored["n"]), int(stored["r"]), int(stored["p"])
        if stored.get("alg") != "scrypt" or not (2 <= n <= 2 ** 20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        salt, want = base64.b64decode(stored["salt"]), base64.b64decode(stored["hash"])
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want),
                             maxmem=256 * 1024 * 1024)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return hmac.compare_digest(got, want)


@dataclasses.dataclass(frozen=True)
class User:
    """``<prefix>-auth/users/<name>``: {"role": "admin"|"viewer",
    "password": hash_password(...), "created": ISO-8601 UTC}."""

    name: str
    role: str
    password: dict[str, Any]
    created: str = ""

    @classmethod
    def parse(cls, name: str, raw: bytes) -> "User":
        """Raises SpecError for a record that is not a usable user."""
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ms.SpecError(f"user {name!r}: not JSON") from None
        if not isinstance(obj, dict) or obj.get("role") not in USER_ROLES or not isinstance(obj.get("password"), dict):
            raise ms.SpecError(f"user {name!r}: not a user record")
        return cls(name, obj["role"], obj["password"], str(obj.get("created", "")))

    def encode(self) -> bytes:
        return json.dumps({"role": self.role, "password": self.password, "created": self.created}).encode()


def add_user(store: ms.Store, auth: AuthKeys, name: Any, role: Any, password: str) -> User:
    """Create web user ``name``; refused: bad name, role or password
    (invalid), the name taken (conflict)."""
    check_name(name, "user")
    if role not in USER_ROLES:
        raise AdminError("invalid", f"role must be one of {', '.join(USER_ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise AdminError("invalid", f"the password must have at least {MIN_PASSWORD} characters")
    user = User(name, role, hash_password(password), ms.utc_now())
    rev, _ = store.create(auth.user(name), user.encode())
    if rev is None:
        raise AdminError("conflict", f"a user named {name!r} already exists")
    return user


def get_user(store: ms.Store, auth: AuthKeys, name: str) -> Optional[User]:
    """The user record of ``name``, or None (absent or malformed)."""
    if not ms.valid_name(name):
        return None
    entry = store.get(auth.user(name))
    if entry is None:
        return None
    try:
        return User.parse(name, entry.value)
    except ms.SpecError:
        return None


@cli.group()
def user() -> None:
    """Manage users of the web interface (metastack-web)."""


def _auth(c: Context) -> AuthKeys:
    return AuthKeys(c.etcd.prefix)


@user.command("add")
@click.argument("name", callback=name_arg("user"))
@click.option("--role", required=True, type=click.Choice(USER_ROLES), help="admin: read and change; viewer: read only.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@pass_ctx
def user_add(c: Context, name: str, role: str, password_stdin: bool) -> None:
    """Add user NAME (asks for the password unless --password-stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if len(password) < MIN_PASSWORD:
        raise click.BadParameter(f"the password must have at least {MIN_PASSWORD} characters")
    c.admin(add_user, c.store, _auth(c), name, role, password)
    click.echo(f"added user {name} ({role})", err=True)


@user.command("list")
@OUTPUT
@pass_ctx
def user_list(c: Context, output: str) -> None:
    """List users with their role (never their password hash)."""
    auth = _auth(c)
    _, entries = c.call(c.store.list_prefix, auth.users)
    rows = []
    for key, entry in sorted(entries.items()):
        name = key[len(auth.users):]
        try:
            u = User.parse(name, entry.value)
            rows.append([name, u.role, u.created])
        except ms.SpecError:
            rows.append([name, "malformed", None])
    print_output(("NAME", "ROLE", "CREATED"), rows, output)


@user.command("delete")
@click.argument("name", callback=name_arg("user"))
@pass_ctx
def user_delete(c: Context, name: str) -> None:
    """Delete user NAME; their web sessions end at their next request."""
    if not c.call(c.store.delete, _auth(c).user(name)):
        raise click.ClickException(f"no user named {name!r}")
    click.echo(f"deleted user {name}", err=True)


def main() -> None:
    """Entry point of the ``metastackctl`` command."""
    cli(prog_name="metastackctl")


if __name__ == "__main__":
    main()
    sys.exit(0)
