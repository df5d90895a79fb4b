"""metastackctl user ... (the web console's users) and the shared helpers
it added, through click's CliRunner against a real etcd."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import metastack as ms
import metastackctl as ctl
from harness import EtcdServer
from metastackctl import cli


@pytest.fixture
def run(etcd: EtcdServer, prefix: str):
    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", prefix, *args], input=input)
    return invoke


def test_user_add_list_delete(run, store: ms.Store, prefix: str) -> None:
    r = run("user", "add", "alice", "--role", "admin", "--password-stdin", input="correct horse\n")
    assert r.exit_code == 0, r.output
    r = run("user", "add", "bob", "--role", "viewer", input="bob-secret\nbob-secret\n")  # asked twice
    assert r.exit_code == 0, r.output
    assert "bob-secret" not in r.output
    entry = store.get(f"{prefix}-auth/users/alice")
    assert entry is not None and b"correct horse" not in entry.value
    user = ctl.User.parse("alice", entry.value)
    assert user.role == "admin" and ctl.verify_password(user.password, "correct horse")
    assert not ctl.verify_password(user.password, "correct horsE")
    _, under_prefix = store.list_prefix(store.keys.all)
    assert not under_prefix  # users are outside the MetaStack prefix
    assert json.loads(run("user", "list", "-o", "json").stdout) == [
        {"name": "alice", "role": "admin", "created": user.created},
        {"name": "bob", "role": "viewer", "created": json.loads(store.get(f"{prefix}-auth/users/bob").value)["created"]}]
    r = run("user", "add", "alice", "--role", "viewer", "--password-stdin", input="another-pass\n")
    assert r.exit_code == 1 and "already exists" in r.output
    assert run("user", "delete", "bob").exit_code == 0
    r = run("user", "delete", "bob")
    assert r.exit_code == 1 and "no user named 'bob'" in r.output


@pytest.mark.parametrize("args,stdin,message", [
    (["user", "add", "carol", "--role", "root", "--password-stdin"], "long-enough\n", "'root' is not one of"),
    (["user", "add", "Carol", "--role", "admin", "--password-stdin"], "long-enough\n", "not a valid user name"),
    (["user", "add", "carol", "--role", "admin", "--password-stdin"], "short\n", "at least 8 characters"),
    (["user", "add", "carol", "--password-stdin"], "long-enough\n", "Missing option '--role'"),
])
def test_bad_user_arguments_exit_2_and_write_nothing(run, store: ms.Store, prefix: str, args, stdin, message) -> None:
    r = run(*args, input=stdin)
    assert r.exit_code == 2 and message in r.output, r.output
    assert store.list_prefix(f"{prefix}-auth/")[1] == {}


@pytest.mark.parametrize("stored", [
    {}, {"alg": "md5"}, {"alg": "scrypt", "n": 2 ** 30, "r": 8, "p": 1, "salt": "", "hash": ""},
    {"alg": "scrypt", "n": 16384, "r": 8, "p": 1, "salt": "!!", "hash": "x"}, None, "text",
])
def test_verify_password_refuses_malformed_hashes(stored) -> None:
    assert ctl.verify_password(stored, "anything") is False


def test_hosts_lists_a_node_that_stopped_renewing_as_lost(run, store: ms.Store) -> None:
    store.put(store.keys.node("gone"), ms.NodeRecord(address="10.0.0.9", first_seen=ms.utc_now()).encode())
    rows = json.loads(run("hosts", "-o", "json").stdout)
    assert rows == [{"node": "gone", "state": "lost", "vcpus_used": None, "vcpus": None, "ram_mb_used": None,
                     "ram_mb": None, "vms": None, "address": "10.0.0.9", "fence": None,
                     "free_vcpus": None, "free_ram_mb": None, "scheduling": None, "lost_at": None}]


def test_shared_admin_operations_refuse_bad_input_without_writing(store: ms.Store) -> None:
    store.put(store.keys.flavour("small"), b'{"vcpus": 1, "ram_mb": 512}')
    for call, kind in [(lambda: ctl.create_vm(store, "web1", "small", state="paused"), "invalid"),
                       (lambda: ctl.create_vm(store, "web1", "nosuch"), "invalid"),
                       (lambda: ctl.create_vm(store, None, "small"), "invalid"),
                       (lambda: ctl.destroy_vm(store, "nosuch"), "missing"),
                       (lambda: ctl.set_vm_state(store, "nosuch", "running"), "missing"),
                       (lambda: ctl.create_flavour(store, "small", 1, 1), "conflict"),
                       (lambda: ctl.create_flavour(store, "f2", 1.5, 1), "invalid"),
                       (lambda: ctl.delete_flavour(store, "nosuch"), "missing")]:
        with pytest.raises(ctl.AdminError) as exc:
            call()
        assert exc.value.kind == kind
    assert store.get(store.keys.desired("web1")) is None and store.get(store.keys.flavour("f2")) is None
    spec = ctl.create_vm(store, "web1", "small")
    assert ms.valid_uuid(spec.uuid) and json.loads(store.get(store.keys.desired("web1")).value)["uuid"] == spec.uuid
