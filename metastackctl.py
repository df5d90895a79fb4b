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
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Any, Callable, Optional, Sequence

import click

import metastack as ms

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="Output format.")


class StoreDown(click.ClickException):
    """etcd is unreachable (exit code 3)."""

    exit_code = 3


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

    def ceph_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a storage call, turning a Ceph failure into a clean error."""
        try:
            return fn(*args, **kwargs)
        except ms.StorageError as exc:
            raise click.ClickException(str(exc)) from None

    @property
    def store(self) -> ms.Store:
        if self._store is None:
            self._store = ms.Store(self.etcd)
        return self._store

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call, turning an etcd outage into exit code 3."""
        try:
            return fn(*args)
        except ms.StoreUnavailable as exc:
            raise StoreDown(f"{exc} (endpoints: {self.endpoint_text})") from None

    @property
    def endpoint_text(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.etcd.endpoints)

    def listing(self, kind: str) -> dict[str, ms.Entry]:
        """name -> entry for every key of one kind (desired, actual, ...)."""
        _, entries = self.call(self.store.list_prefix, self.keys.dir(kind))
        out = {}
        for key, entry in entries.items():
            split = self.keys.split(key)
            if split is not None and split[0] == kind:
                out[split[1]] = entry
        return out


def name_arg(what: str) -> Callable[[click.Context, click.Parameter, Optional[str]], Optional[str]]:
    """click callback rejecting names the agents would refuse."""
    def check(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[str]:
        if value is not None and not ms.valid_name(value):
            raise click.BadParameter(
                f"{value!r} is not a valid {what} name: lower-case letters, digits and '-', "
                f"1-63 characters, starting and ending with a letter or digit")
        return value
    return check


def print_output(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> None:
    """Print rows as an aligned table or as a JSON list of objects keyed by column."""
    if fmt == "json":
        keys = [c.lower() for c in columns]
        click.echo(json.dumps([dict(zip(keys, r)) for r in rows], indent=2, sort_keys=False))
        return
    text = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@click.group(help=__doc__)
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
    except ms.ConfigError as exc:
        raise click.UsageError(str(exc)) from None


pass_ctx = click.make_pass_decorator(Context)

# -- VMs ----------------------------------------------------------------------


def _desired_obj(c: Context, name: str) -> tuple[dict[str, Any], ms.Entry]:
    entry = c.call(c.store.get, c.keys.desired(name))
    if entry is None:
        raise click.ClickException(f"no VM named {name!r}")
    try:
        obj = json.loads(entry.value)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    except ValueError:
        raise click.ClickException(
            f"the desired entry of {name!r} is not a JSON object; fix it with etcdctl or destroy the VM") from None
    return obj, entry


def _vms_using(c: Context, field: str, name: str) -> list[str]:
    """VMs whose desired entry names ``name`` as its ``field`` (flavour or image)."""
    users = []
    for vm, d in sorted(c.listing("desired").items()):
        try:
            if getattr(ms.DesiredVM.parse(vm, d.value), field) == name:
                users.append(vm)
        except ms.SpecError:
            continue
    return users


def _flavour_exists(c: Context, name: str) -> None:
    entry = c.call(c.store.get, c.keys.flavour(name))
    if entry is None:
        known = ", ".join(sorted(c.listing("flavours"))) or "none"
        raise click.ClickException(f"no flavour named {name!r} (known: {known})")


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--flavour", "-f", required=True, callback=name_arg("flavour"), help="Flavour name.")
@click.option("--host", callback=name_arg("node"), help="Pin the VM to this node.")
@click.option("--image", callback=name_arg("image"), help="Base image name.")
@click.option("--stopped", is_flag=True, help="Create it stopped (defined, not started).")
@pass_ctx
def create(c: Context, name: str, flavour: str, host: Optional[str], image: Optional[str], stopped: bool) -> None:
    """Create VM NAME; an agent with room claims and starts it."""
    _flavour_exists(c, flavour)
    if image is not None and c.call(c.store.get, c.keys.image(image)) is None:
        known = ", ".join(sorted(c.listing("images"))) or "none"
        raise click.ClickException(f"no image named {image!r} (known: {known})")
    spec = ms.DesiredVM(name, flavour, "stopped" if stopped else "running", host, image,
                        uuid=str(uuid.uuid4()))  # its identity: only a real destroy ends it
    rev, _ = c.call(c.store.create, c.keys.desired(name), json.dumps(spec.to_json()).encode())
    if rev is None:
        raise click.ClickException(f"a VM named {name!r} already exists")
    click.echo(f"created {name} (flavour {flavour}{', pinned to ' + host if host else ''}"
               f"{', stopped' if stopped else ''})", err=True)


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def destroy(c: Context, name: str, yes: bool) -> None:
    """Destroy VM NAME: its owner powers it off and removes it."""
    entry = c.call(c.store.get, c.keys.desired(name))
    if entry is None:
        raise click.ClickException(f"no VM named {name!r}")
    if not yes:
        click.confirm(f"Destroy VM {name!r}?", abort=True, err=True)
    if c.call(c.store.delete_if, c.keys.desired(name), entry.mod_revision) is None:
        raise click.ClickException(f"VM {name!r} changed while destroying it; try again")
    click.echo(f"destroying {name}", err=True)


def _set_state(c: Context, name: str, state: str) -> None:
    for _ in range(5):
        obj, entry = _desired_obj(c, name)
        if obj.get("state", "running") == state:
            click.echo(f"{name} is already desired {state}", err=True)
            return
        obj["state"] = state
        if c.call(c.store.replace, c.keys.desired(name), json.dumps(obj).encode(), entry.mod_revision):
            click.echo(f"{name}: desired state is now {state}", err=True)
            return
    raise click.ClickException(f"VM {name!r} keeps changing; try again")


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@pass_ctx
def start(c: Context, name: str) -> None:
    """Set VM NAME's desired state to running."""
    _set_state(c, name, "running")


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@pass_ctx
def stop(c: Context, name: str) -> None:
    """Set VM NAME's desired state to stopped."""
    _set_state(c, name, "stopped")


VM_COLUMNS = ("NAME", "FLAVOUR", "DESIRED", "STATE", "HOST", "REASON")


def _vm_row(name: str, desired: Optional[ms.Entry], actual: Optional[ms.Entry],
            hosts: dict[str, ms.Entry]) -> list[Any]:
    flavour = want = ""
    if desired is not None:
        try:
            spec = ms.DesiredVM.parse(name, desired.value)
            flavour, want = spec.flavour, spec.state
        except ms.SpecError:
            flavour, want = "?", "?"
    else:
        want = "(deleted)"
    if actual is None:
        return [name, flavour, want, "pending", "", ""]
    a = ms.ActualVM.parse(actual.value)
    host = hosts.get(a.host)
    if not actual.lease or host is None or host.lease != actual.lease:
        return [name, flavour, want, "untrusted", a.host,
                f"claim is on no live lease of {a.host or 'any node'} (hand-written or stale): ignored"]
    return [name, flavour, want, a.state, a.host, a.reason]


@cli.command("list")
@OUTPUT
@pass_ctx
def list_(c: Context, output: str) -> None:
    """List VMs: desired state next to what their owner reports."""
    desired, actual, hosts_ = c.listing("desired"), c.listing("actual"), c.listing("hosts")
    rows = [_vm_row(n, desired.get(n), actual.get(n), hosts_) for n in sorted(set(desired) | set(actual))]
    print_output(VM_COLUMNS, rows, output)


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@OUTPUT
@pass_ctx
def show(c: Context, name: str, output: str) -> None:
    """Show one VM: its desired entry and its actual state."""
    desired = c.call(c.store.get, c.keys.desired(name))
    actual = c.call(c.store.get, c.keys.actual(name))
    if desired is None and actual is None:
        raise click.ClickException(f"no VM named {name!r}")
    hosts_ = c.listing("hosts")
    row = _vm_row(name, desired, actual, hosts_)
    fields: dict[str, Any] = dict(zip([k.lower() for k in VM_COLUMNS], row))
    fields["desired_entry"] = desired.value.decode(errors="replace") if desired else None
    fields["updated"] = ms.ActualVM.parse(actual.value).updated if actual else None
    fields["disk"] = (ms.ActualVM.parse(actual.value).disk or None) if actual else None
    refused = {}
    for node, entry in sorted(hosts_.items()):
        with contextlib.suppress(ms.SpecError):
            why = dict(ms.HostState.parse(entry.value).cannot).get(name)
            if why:
                refused[node] = why
    fields["given_up_by"] = refused or None  # nodes that failed to run it and handed it on
    if output == "json":
        click.echo(json.dumps(fields, indent=2))
        return
    print_output(("FIELD", "VALUE"), [[k, v] for k, v in fields.items()], "table")


HOST_COLUMNS = ("NODE", "STATE", "VCPUS_USED", "VCPUS", "RAM_MB_USED", "RAM_MB", "VMS", "ADDRESS", "FENCE")


@cli.command()
@OUTPUT
@pass_ctx
def hosts(c: Context, output: str) -> None:
    """List nodes: live ones with their capacity and use, and any node with
    a fence record (FENCE: fenced = it may still run stale domains; clean =
    it proved them gone and waits for the fence to be lifted)."""
    fences: dict[str, str] = {}
    for name, entry in c.listing("fences").items():
        try:
            rec = ms.FenceRecord.parse(name, entry.value)
            fences[name] = f"{rec.state} ({rec.mode}{' ' + rec.address if rec.address else ''}, by {rec.by})"
        except ms.SpecError as exc:
            fences[name] = f"malformed: {exc}"
    rows = []
    listed = c.listing("hosts")
    for name, entry in sorted(listed.items()):
        try:
            h = ms.HostState.parse(entry.value)
        except ms.SpecError:
            rows.append([name, "malformed", None, None, None, None, None, None, fences.get(name)])
            continue
        state = h.state if entry.lease else "no lease (not a live node)"
        rows.append([name, state, h.vcpus_used, h.vcpus, h.ram_mb_used, h.ram_mb, h.vms, h.address or None,
                     fences.get(name)])
    for name in sorted(set(fences) - set(listed)):
        rows.append([name, "down", None, None, None, None, None, None, fences[name]])
    print_output(HOST_COLUMNS, rows, output)


@cli.group()
def host() -> None:
    """Operate on nodes (fences)."""


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


@cli.command()
@click.argument("name", callback=name_arg("VM"))
@pass_ctx
def console(c: Context, name: str) -> None:
    """Print the tail of VM NAME's serial console (published by its owner)."""
    entry = c.call(c.store.get, c.keys.console(name))
    if entry is None:
        if c.call(c.store.get, c.keys.desired(name)) is None:
            raise click.ClickException(f"no VM named {name!r}")
        raise click.ClickException(f"no console output published for {name!r} (is it running?)")
    click.echo(entry.value.decode("utf-8", errors="replace"), nl=False)


@cli.command()
@click.argument("name", required=False, callback=lambda ctx, p, v: name_arg("VM")(ctx, p, v) if v else v)
@OUTPUT
@pass_ctx
def events(c: Context, name: Optional[str], output: str) -> None:
    """Show VM life events (claimed, started, fenced, stopped, errors, ...)
    recorded by the agents that acted, oldest first; all VMs without NAME.
    Events are kept for about an hour, at most 50 per VM."""
    prefix = c.keys.events(name) if name else c.keys.dir("events")
    _, entries = c.call(c.store.list_prefix, prefix)
    rows = []
    for key in sorted(entries, key=lambda k: k.rsplit("/", 1)[1]):
        try:
            ev = json.loads(entries[key].value)
            rows.append([ev.get("at"), ev.get("vm"), ev.get("node"), ev.get("event"), ev.get("detail")])
        except (ValueError, AttributeError, RecursionError):
            rows.append([None, key.split("/")[-2], None, "malformed", None])
    print_output(("AT", "VM", "NODE", "EVENT", "DETAIL"), rows, output)


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
    rows = []
    for name, entry in sorted(c.listing("images").items()):
        try:
            i = ms.Image.parse(name, entry.value)
            rows.append([name, i.pool, f"{i.image}@{i.snapshot}", i.size, "kernel" if i.direct_boot else "disk"])
        except ms.SpecError:
            rows.append([name, None, None, None, "malformed"])
    print_output(("NAME", "POOL", "RBD", "SIZE", "BOOT"), rows, output)


@image.command("delete")
@click.argument("name", callback=name_arg("image"))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def image_delete(c: Context, name: str, yes: bool) -> None:
    """Delete base image NAME (refused while a VM uses it)."""
    entry = c.call(c.store.get, c.keys.image(name))
    if entry is None:
        raise click.ClickException(f"no image named {name!r}")
    users = _vms_using(c, "image", name)
    if users:
        raise click.ClickException(f"image {name!r} is used by {len(users)} VM(s): {', '.join(users[:10])}")
    try:
        rec = ms.Image.parse(name, entry.value)
    except ms.SpecError:
        rec = None
    if rec is not None:
        children = c.ceph_call(c.storage.base_children, rec.pool, rec.image, rec.snapshot)
        if children:
            raise click.ClickException(f"image {name!r} still has {len(children)} disk clone(s): {', '.join(children[:10])}")
    if not yes:
        click.confirm(f"Delete image {name!r}?", abort=True, err=True)
    # The record goes first (no new VM can name the image), then the data.
    if c.call(c.store.delete_if, c.keys.image(name), entry.mod_revision) is None:
        raise click.ClickException(f"image {name!r} changed while deleting it; try again")
    if rec is not None:
        c.ceph_call(c.storage.remove_base, rec.pool, rec.image, rec.snapshot)
        for obj in (rec.kernel, rec.initrd):
            if obj:
                c.ceph_call(c.storage.remove_object, rec.pool, obj)
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
    value = json.dumps(ms.Flavour(vcpus, ram_mb).to_json()).encode()
    rev, _ = c.call(c.store.create, c.keys.flavour(name), value)
    if rev is None:
        raise click.ClickException(f"a flavour named {name!r} already exists")
    click.echo(f"created flavour {name} ({vcpus} vcpus, {ram_mb} MiB)", err=True)


@flavour.command("list")
@OUTPUT
@pass_ctx
def flavour_list(c: Context, output: str) -> None:
    """List flavours."""
    rows = []
    for name, entry in sorted(c.listing("flavours").items()):
        try:
            f = ms.Flavour.parse(name, entry.value)
            rows.append([name, f.vcpus, f.ram_mb])
        except ms.SpecError:
            rows.append([name, None, None])
    print_output(("NAME", "VCPUS", "RAM_MB"), rows, output)


@flavour.command("delete")
@click.argument("name", callback=name_arg("flavour"))
@pass_ctx
def flavour_delete(c: Context, name: str) -> None:
    """Delete flavour NAME (refused while a VM uses it)."""
    entry = c.call(c.store.get, c.keys.flavour(name))
    if entry is None:
        raise click.ClickException(f"no flavour named {name!r}")
    users = _vms_using(c, "flavour", name)
    if users:
        raise click.ClickException(f"flavour {name!r} is used by {len(users)} VM(s): {', '.join(users[:10])}")
    if c.call(c.store.delete_if, c.keys.flavour(name), entry.mod_revision) is None:
        raise click.ClickException(f"flavour {name!r} changed while deleting it; try again")
    click.echo(f"deleted flavour {name}", err=True)


def main() -> None:
    """Entry point of the ``metastackctl`` command."""
    cli(prog_name="metastackctl")


if __name__ == "__main__":
    main()
    sys.exit(0)
