"""metastackctl through click's CliRunner against a real etcd."""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import metastack as ms
from harness import Cluster, EtcdServer, free_port, wait_for
from metastackctl import cli


@pytest.fixture
def ctl(etcd: EtcdServer, prefix: str):
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", prefix, *args], input=input)
    return run


def keys_under(store: ms.Store) -> dict[str, bytes]:
    _, entries = store.list_prefix(store.keys.all)
    return {k: e.value for k, e in entries.items()}


def test_flavour_lifecycle(ctl, store) -> None:
    r = ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "512")
    assert r.exit_code == 0, r.output
    assert json.loads(store.get(store.keys.flavour("small")).value) == {"vcpus": 1, "ram_mb": 512}
    r = ctl("flavour", "create", "small", "--vcpus", "2", "--ram-mb", "512")
    assert r.exit_code == 1 and "already exists" in r.output
    r = ctl("flavour", "list", "-o", "json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == [{"name": "small", "vcpus": 1, "ram_mb": 512}]
    r = ctl("flavour", "list")
    assert r.stdout.splitlines()[0].split() == ["NAME", "VCPUS", "RAM_MB"]
    assert r.stdout.splitlines()[1].split() == ["small", "1", "512"]
    assert ctl("create", "web1", "--flavour", "small").exit_code == 0
    r = ctl("flavour", "delete", "small")
    assert r.exit_code == 1 and "used by 1 VM(s): web1" in r.output
    assert ctl("destroy", "web1", "--yes").exit_code == 0
    assert ctl("flavour", "delete", "small").exit_code == 0
    assert store.get(store.keys.flavour("small")) is None
    r = ctl("flavour", "delete", "small")
    assert r.exit_code == 1 and "no flavour named 'small'" in r.output


def test_create_writes_the_contract_and_rejects_duplicates(ctl, store) -> None:
    ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "512")
    r = ctl("create", "web1", "--flavour", "small", "--host", "node2", "--stopped")
    assert r.exit_code == 0, r.output
    written = json.loads(store.get(store.keys.desired("web1")).value)
    assert ms.valid_uuid(written.pop("uuid"))  # the VM's identity (finding 7)
    assert written.pop("created").endswith("Z")  # when it was created (metastackctl show)
    assert written == {"flavour": "small", "state": "stopped", "host": "node2"}
    r = ctl("create", "web1", "--flavour", "small")
    assert r.exit_code == 1 and "already exists" in r.output


@pytest.mark.parametrize("args,message", [
    (["create", "Web_1", "--flavour", "small"], "not a valid VM name"),
    (["create", "web1", "--flavour", "Small!"], "not a valid flavour name"),
    (["create", "web1", "--flavour", "small", "--host", "-bad"], "not a valid node name"),
    (["create", "web1"], "Missing option '--flavour'"),
    (["flavour", "create", "f", "--vcpus", "0", "--ram-mb", "1"], "0 is not in the range x>=1"),
    (["flavour", "create", "f", "--vcpus", "one", "--ram-mb", "1"], "'one' is not a valid integer"),
    (["list", "-o", "yaml"], "'yaml' is not one of"),
    (["start", "x" * 64], "not a valid VM name"),
])
def test_bad_arguments_exit_2_and_write_nothing(ctl, store, args, message) -> None:
    store.put(store.keys.flavour("small"), b'{"vcpus": 1, "ram_mb": 512}')
    before = keys_under(store)
    r = ctl(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert keys_under(store) == before


def test_create_with_unknown_flavour_is_refused(ctl, store) -> None:
    r = ctl("create", "web1", "--flavour", "nosuch")
    assert r.exit_code == 1 and "no flavour named 'nosuch'" in r.output
    assert store.get(store.keys.desired("web1")) is None


def test_unknown_vm_errors(ctl) -> None:
    for args in (["destroy", "ghost", "--yes"], ["start", "ghost"], ["stop", "ghost"], ["show", "ghost"]):
        r = ctl(*args)
        assert r.exit_code == 1, args
        assert "Error: no VM named 'ghost'" in r.output


def test_destroy_confirms_unless_yes(ctl, store) -> None:
    ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "512")
    ctl("create", "web1", "--flavour", "small")
    r = ctl("destroy", "web1", input="n\n")
    assert r.exit_code == 1 and "Aborted" in r.output
    assert store.get(store.keys.desired("web1")) is not None
    r = ctl("destroy", "web1", input="y\n")
    assert r.exit_code == 0
    assert store.get(store.keys.desired("web1")) is None


def test_stop_start_keep_unknown_keys(ctl, store, etcd, prefix) -> None:
    etcd.etcdctl("put", f"{prefix}/flavours/small", '{"vcpus": 1, "ram_mb": 512}')
    etcd.etcdctl("put", f"{prefix}/desired/db1", '{"flavour": "small", "team": "blue"}')
    assert ctl("stop", "db1").exit_code == 0
    assert json.loads(store.get_desired("db1").value) == {
        "flavour": "small", "team": "blue", "state": "stopped"}
    r = ctl("stop", "db1")
    assert r.exit_code == 0 and "already desired stopped" in r.output
    assert ctl("start", "db1").exit_code == 0
    assert json.loads(store.get_desired("db1").value)["state"] == "running"
    etcd.etcdctl("put", f"{prefix}/desired/broken", "{nope")
    r = ctl("start", "broken")
    assert r.exit_code == 1 and "not a JSON object" in r.output


def test_list_and_hosts_show_what_agents_report(ctl, cluster: Cluster) -> None:
    assert ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "512").exit_code == 0
    cluster.agent("node1", vcpus=2)
    cluster.wait_hosts("node1")
    for n in ("a1", "a2", "a3"):
        assert ctl("create", n, "--flavour", "small").exit_code == 0
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/desired/bad", "not json")
    wait_for(lambda: sum(s == "running" for s, _ in cluster.states().values()) == 2, what="2 running")
    wait_for(lambda: cluster.states().get("bad", ("",))[0] == "error", what="bad in error")
    r = ctl("list", "-o", "json")
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"a1", "a2", "a3", "bad"}
    assert sorted(row["state"] for n, row in rows.items() if n != "bad") == ["pending", "running", "running"]
    pending = next(n for n, row in rows.items() if row["state"] == "pending")
    assert rows[pending]["host"] == "" and rows[pending]["desired"] == "running"
    assert rows["bad"]["state"] == "error" and "not valid JSON" in rows["bad"]["reason"]
    assert rows["bad"]["flavour"] is None  # null, not "?"
    table = ctl("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "FLAVOUR", "DESIRED", "STATE", "HOST", "REASON"]
    assert any(line.split()[:5] == ["a1", "small", "running", "running", "node1"] or
               line.split()[:4] == ["a1", "small", "running", "pending"] for line in table[1:])
    h = json.loads(ctl("hosts", "-o", "json").stdout)
    assert h == [{"node": "node1", "state": "ready", "vcpus_used": 2, "vcpus": 2,
                  "ram_mb_used": 1024, "ram_mb": 16384, "vms": 3,  # 2 VMs + the error claim
                  "address": None, "fence": None, "free_vcpus": 0, "free_ram_mb": 15360,
                  "scheduling": None, "lost_at": None}]
    s = json.loads(ctl("show", "a1", "-o", "json").stdout)
    entry = s["spec"]  # the desired entry as a nested object
    assert entry == json.loads(s["desired_entry"])
    assert s["name"] == "a1" and {k: entry[k] for k in ("flavour", "state")} == {"flavour": "small",
                                                                                   "state": "running"}
    assert ms.valid_uuid(entry["uuid"])  # identity written at create
    # stop through the CLI, the agent follows
    running = next(n for n, row in rows.items() if row["state"] == "running")
    assert ctl("stop", running).exit_code == 0
    wait_for(lambda: cluster.states()[running][0] == "stopped", what="stopped via CLI")


def test_unreachable_etcd_exits_3() -> None:
    r = CliRunner().invoke(cli, ["--endpoints", f"127.0.0.1:{free_port()}", "list"])
    assert r.exit_code == 3
    assert "etcd" in r.output and "Error:" in r.output


def test_bad_config_file_is_a_usage_error(tmp_path) -> None:
    p = tmp_path / "c.ini"
    p.write_text("[etcd]\nendpoints = nonsense\n")
    r = CliRunner().invoke(cli, ["-c", str(p), "list"])
    assert r.exit_code == 2 and "not host:port" in r.output


def test_help_documents_exit_codes() -> None:
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    assert "3  etcd could not be reached" in r.output


def test_a_bad_ceph_section_only_matters_to_commands_that_need_ceph(etcd, prefix, tmp_path) -> None:
    p = tmp_path / "c.ini"
    p.write_text(f"[etcd]\nendpoints = {etcd.endpoint}\nprefix = {prefix}\n[ceph]\nconf = /nonexistent/ceph.conf\n")
    assert CliRunner().invoke(cli, ["-c", str(p), "list"]).exit_code == 0
    r = CliRunner().invoke(cli, ["-c", str(p), "image", "list"])
    assert r.exit_code == 0  # listing reads etcd only
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 512)
    r = CliRunner().invoke(cli, ["-c", str(p), "image", "import", "x", str(img)])
    assert r.exit_code == 2 and "[ceph] conf: /nonexistent/ceph.conf does not exist" in r.output


def test_hand_written_claims_and_hosts_without_lease_are_not_trusted(ctl, cluster: Cluster) -> None:
    """Finding 9: a claim written by hand without a lease (an impostor naming
    an absent node, or a live one) is shown as untrusted, the VM is placed
    anyway, with the flavour's size, and the fake host is no live node."""
    assert ctl("flavour", "create", "small", "--vcpus", "1", "--ram-mb", "512").exit_code == 0
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/actual/imp", json.dumps(
        {"host": "node9", "state": "running", "vcpus": 64, "ram_mb": 99999}))
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/actual/mine", json.dumps(
        {"host": "node1", "state": "running", "vcpus": 64, "ram_mb": 99999}))
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/hosts/node9", json.dumps({"vcpus": 99, "ram_mb": 99}))
    rows = {r["name"]: r for r in json.loads(ctl("list", "-o", "json").stdout)}
    assert rows["imp"]["state"] == "untrusted" and "no live lease" in rows["imp"]["reason"]
    hosts = {r["node"]: r for r in json.loads(ctl("hosts", "-o", "json").stdout)}
    assert hosts["node9"]["state"].startswith("no lease")
    for n in ("imp", "mine"):
        cluster.etcd.etcdctl("put", f"{cluster.prefix}/desired/{n}", '{"flavour": "small"}')
    cluster.agent("node1", vcpus=4)
    wait_for(lambda: cluster.states().get("imp") == ("running", "node1")
             and cluster.states().get("mine") == ("running", "node1"), what="both placed by the real node")
    actual = cluster.actual()
    assert actual["imp"]["vcpus"] == 1 and actual["mine"]["ram_mb"] == 512  # the flavour, not the forgery
    rows = {r["name"]: r for r in json.loads(ctl("list", "-o", "json").stdout)}
    assert rows["imp"]["state"] == "running" and rows["mine"]["state"] == "running"


def test_hosts_show_fences_and_unfence_refuses_an_unproven_node(ctl, store) -> None:
    rec = ms.FenceRecord("node7", "node1", "2026-11-25T00:00:00Z", "clients")
    store.put(store.keys.fence("node7"), rec.encode())
    rows = {r["node"]: r for r in json.loads(ctl("hosts", "-o", "json").stdout)}
    assert rows["node7"]["state"] == "down" and rows["node7"]["fence"].startswith("fenced (clients, by node1)")
    r = ctl("host", "unfence", "node7", "--yes")
    assert r.exit_code == 1 and "has not proved its stale domains gone" in r.output
    assert store.get(store.keys.fence("node7")) is not None
    store.put(store.keys.fence("node7"), dataclasses.replace(rec, state="clean").encode())
    r = ctl("host", "unfence", "node7", "--yes")
    assert r.exit_code == 0, r.output
    assert store.get(store.keys.fence("node7")) is None
    store.put(store.keys.fence("node8"), rec.encode())
    assert ctl("host", "unfence", "node8", "--yes", "--force").exit_code == 0
    assert ctl("host", "unfence", "node8", "--yes").exit_code == 1  # not fenced any more
