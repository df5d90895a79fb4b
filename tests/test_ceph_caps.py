"""The cephx users the playbook makes (deploy/ansible/roles/ceph_users):
a compute node's key can do what an agent needs (RBD in the MetaStack pool,
adding blocklist entries to fence a failed node) and cannot do what an
admin key can (delete the pool, read another pool, list keys, lift a
fence); the management user can lift fences. Against a real private
single-node Ceph (deploy/cephdev.py, loopback, free ports)."""
from __future__ import annotations

import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from harness import ROOT
from conftest import _deploy_module

DEFAULTS = ROOT / "deploy" / "ansible" / "roles" / "ceph_users" / "defaults" / "main.yml"
POOL = "metastack"


def caps(var: str) -> list[str]:
    """The caps arguments of a playbook variable, with the pool filled in."""
    text = yaml.safe_load(DEFAULTS.read_text())[var]
    return shlex.split(text.replace("{{ metastack_ceph_pool }}", POOL))


@pytest.fixture(scope="module")
def ceph() -> Iterator[tuple[object, Path]]:
    cephdev = _deploy_module("cephdev")
    d = Path(tempfile.mkdtemp(prefix="metastack-caps-"))
    info = cephdev.start(d / "ceph", pool=POOL)
    try:
        admin = ["ceph", "-c", info.conf, "-k", info.keyring, "-n", "client.admin"]
        subprocess.run(admin + ["osd", "pool", "create", "other", "8"], check=True, capture_output=True, timeout=60)
        keyrings = {}
        for user, var in (("metastack-cmp1", "metastack_ceph_compute_caps"),
                          ("metastack-admin", "metastack_ceph_admin_caps")):
            r = subprocess.run(admin + ["auth", "get-or-create", f"client.{user}", *caps(var)],
                               check=True, capture_output=True, text=True, timeout=60)
            (d / f"{user}.keyring").write_text(r.stdout)
            keyrings[user] = d / f"{user}.keyring"
        yield info, d
    finally:
        cephdev.stop(d / "ceph")


def as_user(ceph: tuple[object, Path], user: str, *argv: str) -> subprocess.CompletedProcess:
    info, d = ceph
    return subprocess.run([argv[0], "-c", info.conf, "-k", str(d / f"{user}.keyring"),  # type: ignore[attr-defined]
                           "--id", user, *argv[1:]], capture_output=True, text=True, timeout=60)


def test_compute_key_does_what_an_agent_needs(ceph: tuple[object, Path]) -> None:
    for argv in (("rbd", "create", "--size", "4", f"{POOL}/caps-disk"),
                 ("rbd", "snap", "create", f"{POOL}/caps-disk@s"),
                 ("rbd", "snap", "protect", f"{POOL}/caps-disk@s"),
                 ("rbd", "clone", f"{POOL}/caps-disk@s", f"{POOL}/caps-clone"),
                 ("ceph", "osd", "blocklist", "add", "10.214.0.250:0/1", "60"),  # fencing a client
                 ("ceph", "osd", "blocklist", "range", "add", "10.214.0.249/32", "60")):  # fencing a node
        r = as_user(ceph, "metastack-cmp1", *argv)
        assert r.returncode == 0, f"{argv}: {r.stderr}"


@pytest.mark.parametrize("argv", [
    ("ceph", "osd", "pool", "delete", POOL, POOL, "--yes-i-really-really-mean-it"),
    ("rados", "-p", "other", "ls"),
    ("rados", "-p", "other", "put", "x", "/etc/hostname"),
    ("ceph", "auth", "ls"),
    ("ceph", "auth", "get", "client.admin"),
    ("ceph", "osd", "blocklist", "rm", "10.214.0.250:0/1"),  # lifting a fence
    ("ceph", "osd", "blocklist", "range", "rm", "10.214.0.249/32"),
], ids=["delete-pool", "read-other-pool", "write-other-pool", "list-keys", "read-admin-key", "lift-fence",
        "lift-node-fence"])
def test_compute_key_cannot_do_what_an_admin_key_can(ceph: tuple[object, Path], argv: tuple[str, ...]) -> None:
    r = as_user(ceph, "metastack-cmp1", *argv)
    assert r.returncode != 0, f"{argv} was allowed for a compute node's key: {r.stdout}"
    said = (r.stderr + r.stdout).lower()
    assert any(w in said for w in ("denied", "not permitted", "eacces", "eperm")), said  # refused, not misspelt


def test_management_key_lifts_fences(ceph: tuple[object, Path]) -> None:
    assert as_user(ceph, "metastack-cmp1", "ceph", "osd", "blocklist", "add", "10.214.0.251:0/1", "60").returncode == 0
    r = as_user(ceph, "metastack-admin", "ceph", "osd", "blocklist", "rm", "10.214.0.251:0/1")
    assert r.returncode == 0, r.stderr
    assert as_user(ceph, "metastack-cmp1", "ceph", "osd", "blocklist", "range", "add", "10.214.0.252/32").returncode == 0
    r = as_user(ceph, "metastack-admin", "ceph", "osd", "blocklist", "range", "rm", "10.214.0.252/32")
    assert r.returncode == 0, r.stderr
    r = as_user(ceph, "metastack-admin", "ceph", "osd", "pool", "delete", POOL, POOL, "--yes-i-really-really-mean-it")
    assert r.returncode != 0
