"""Pure layer: the planner, spec parsing, config validation, domain XML."""
from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metastack as ms
from metastack import Action, ActualVM, Capacity, DesiredVM, Flavour, Snapshot, SpecError, plan

SMALL = Flavour(1, 512)
FLAVOURS = {"small": SMALL, "big": Flavour(4, 4096)}


def snap(desired=None, actual=None, flavours=None) -> Snapshot:
    return Snapshot(desired or {}, actual or {}, dict(FLAVOURS if flavours is None else flavours), {})


def vm(name: str, flavour: str = "small", **kw) -> DesiredVM:
    return DesiredVM(name, flavour, **kw)


def mine(state: str = "running", cpu: int = 1, ram: int = 512, host: str = "n1") -> ActualVM:
    return ActualVM(host=host, state=state, vcpus=cpu, ram_mb=ram)


def kinds(actions: list[Action]) -> dict[str, str]:
    return {a.vm: a.kind for a in actions}


CAP = Capacity(4, 8192)


@pytest.mark.parametrize("desired,actual,domains,expected", [
    # free VM that fits: claim
    ({"a": vm("a")}, {}, {}, {"a": "claim"}),
    # claimed by someone else: nothing to do
    ({"a": vm("a")}, {"a": mine(host="n2")}, {}, {}),
    # claimed by someone else while a domain of ours exists: kill it at once
    ({"a": vm("a")}, {"a": mine(host="n2")}, {"a": "running"}, {"a": "kill"}),
    # ours, desired running
    ({"a": vm("a")}, {"a": mine()}, {"a": "running"}, {"a": "run"}),
    # ours, desired stopped
    ({"a": vm("a", state="stopped")}, {"a": mine()}, {"a": "running"}, {"a": "park"}),
    # desired entry deleted: remove
    ({}, {"a": mine()}, {"a": "running"}, {"a": "remove"}),
    # a domain of ours nobody wants and nobody claims: kill
    ({}, {}, {"x": "stopped"}, {"x": "kill"}),
    # pinned elsewhere: not claimed
    ({"a": vm("a", host="n2")}, {}, {}, {}),
    # pinned here: claimed
    ({"a": vm("a", host="n1")}, {}, {}, {"a": "claim"}),
    # we own it but it is now pinned elsewhere: release (domain goes first)
    ({"a": vm("a", host="n2")}, {"a": mine()}, {"a": "running"}, {"a": "release"}),
    # unknown flavour: an error claim with the reason
    ({"a": vm("a", flavour="huge")}, {}, {}, {"a": "claim_error"}),
    # does not fit (4 vcpus free, 5 asked): left for another node
    ({"a": vm("a", flavour="big"), "b": vm("b")}, {"b": mine()}, {"b": "running"}, {"b": "run"}),
    # malformed entry, unclaimed: claim it as an error so the reason shows
    ({"a": SpecError("bad json")}, {}, {}, {"a": "claim_error"}),
    # malformed entry we own: report, never touch the domain
    ({"a": SpecError("bad json")}, {"a": mine()}, {"a": "running"}, {"a": "report"}),
    # already reported with the same reason: nothing to do
    ({"a": SpecError("bad json")}, {"a": ActualVM("n1", "error", "bad json")}, {}, {}),
    # leftover domain, VM unclaimed but pinned elsewhere: kill, never race the new owner
    ({"a": vm("a", host="n2")}, {}, {"a": "stopped"}, {"a": "kill"}),
])
def test_plan_table(desired, actual, domains, expected) -> None:
    assert kinds(plan("n1", CAP, snap(desired, actual), domains)) == expected


def test_plan_respects_capacity_counting_existing_claims() -> None:
    desired = {f"v{i}": vm(f"v{i}") for i in range(6)}
    actual = {"v0": mine(), "v1": mine()}
    acts = plan("n1", Capacity(3, 8192), snap(desired, actual), {"v0": "running", "v1": "running"})
    claims = [a for a in acts if a.kind == "claim"]
    assert len(claims) == 1  # 3 vcpus, 2 already used
    assert kinds(acts)["v0"] == "run" and kinds(acts)["v1"] == "run"


def test_vms_pinned_here_are_claimed_before_unpinned_ones() -> None:
    desired = {f"u{i}": vm(f"u{i}") for i in range(10)}
    desired["pinned"] = vm("pinned", host="n1")
    acts = plan("n1", Capacity(1, 8192), snap(desired), {})
    assert [a.vm for a in acts if a.kind == "claim"] == ["pinned"]


def test_plan_ram_limits_too() -> None:
    desired = {f"v{i}": vm(f"v{i}", flavour="big") for i in range(3)}
    acts = plan("n1", Capacity(64, 9000), snap(desired), {})
    assert sum(a.kind == "claim" for a in acts) == 2


def test_error_claim_that_became_valid_is_released_when_it_does_not_fit() -> None:
    desired = {"a": vm("a", flavour="big")}
    actual = {"a": ActualVM("n1", "error", "unknown flavour 'big'")}
    acts = plan("n1", Capacity(2, 8192), snap(desired, actual), {})
    assert kinds(acts) == {"a": "release"}


def test_unknown_flavour_reason() -> None:
    acts = plan("n1", CAP, snap({"a": vm("a", flavour="nope")}), {})
    assert acts == [Action("claim_error", "a", reason="unknown flavour 'nope'")]


@settings(max_examples=200, deadline=None)
@given(
    cap_cpu=st.integers(1, 16), cap_ram=st.integers(512, 16384),
    vms=st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True),
                        st.tuples(st.sampled_from(["small", "big"]), st.sampled_from(["n1", "n2", None]),
                                  st.sampled_from([None, "n1", "n2"]), st.booleans()),
                        max_size=25),
)
def test_plan_properties(cap_cpu, cap_ram, vms, ) -> None:
    """Whatever the input: never over-commit, never claim a VM someone owns,
    never keep a domain for a VM another node owns."""
    desired, actual, domains = {}, {}, {}
    for name, (flav, pin, owner, has_domain) in vms.items():
        desired[name] = vm(name, flavour=flav, host=pin)
        f = FLAVOURS[flav]
        if owner is not None:
            actual[name] = ActualVM(owner, "running", vcpus=f.vcpus, ram_mb=f.ram_mb)
        if has_domain:
            domains[name] = "running"
    acts = plan("n1", Capacity(cap_cpu, cap_ram), snap(desired, actual), domains)
    by_kind = {}
    for a in acts:
        by_kind.setdefault(a.kind, []).append(a)
    used_cpu = sum(a.vcpus for a in actual.values() if a.host == "n1")
    used_ram = sum(a.ram_mb for a in actual.values() if a.host == "n1")
    new_cpu = sum(a.vcpus for a in by_kind.get("claim", []))
    new_ram = sum(a.ram_mb for a in by_kind.get("claim", []))
    if by_kind.get("claim"):
        assert used_cpu + new_cpu <= cap_cpu and used_ram + new_ram <= cap_ram
    for a in by_kind.get("claim", []):
        assert a.vm not in actual
        assert desired[a.vm].host in (None, "n1")
    for name, owner in actual.items():
        if owner.host != "n1" and name in domains:
            assert Action("kill", name, reason=f"claimed by {owner.host}") in acts
    assert len({a.vm for a in acts}) == len(acts)  # one action per VM


# -- desired-entry parsing ------------------------------------------------------

@pytest.mark.parametrize("name,raw,reason", [
    ("a", b"not json", "not valid JSON"),
    ("a", b"[1,2]", "must be a JSON object"),
    ("a", b"{}", "'flavour' must be a flavour name"),
    ("a", b'{"flavour": "small", "state": "paused"}', "'state' must be 'running' or 'stopped'"),
    ("a", b'{"flavour": "small", "host": "Bad Host"}', "'host' must be a node name"),
    ("Bad_Name", b'{"flavour": "small"}', "does not match"),
    ("a", b"\xff\xfe", "not valid JSON"),
])
def test_desired_rejects(name, raw, reason) -> None:
    with pytest.raises(SpecError, match=reason):
        DesiredVM.parse(name, raw)


def test_desired_defaults_and_unknown_keys_kept() -> None:
    d = DesiredVM.parse("web1", b'{"flavour": "small", "owner": "team-a"}')
    assert (d.state, d.host, d.image) == ("running", None, None)
    assert d.to_json() == {"flavour": "small", "state": "running", "owner": "team-a"}


def test_actual_content_comparison_ignores_timestamp() -> None:
    a = ActualVM("n1", "running", updated="2026-01-01T00:00:00Z")
    assert a.same_content(ActualVM("n1", "running", updated="2027-01-01T00:00:00Z"))
    assert not a.same_content(ActualVM("n1", "stopped"))
    assert ActualVM.parse(b"garbage").state == "error"


@pytest.mark.parametrize("key,expected", [
    ("/ms/desired/web1", ("desired", "web1")),
    ("/ms/actual/x", ("actual", "x")),
    ("/ms/config", None),
    ("/ms/desired/a/b", None),
    ("/other/desired/a", None),
    ("/ms/weird/a", None),
    ("/ms/~/console/web1", ("console", "web1")),
    ("/ms/console/web1", None),  # the console tail lives in the side folder
    ("/ms/~/desired/web1", None),
    ("/ms/~/events/web1/1-n1", None),
])
def test_key_schema_split(key, expected) -> None:
    assert ms.Keys("/ms").split(key) == expected


# -- config ----------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "m.ini"
    p.write_text(text)
    return str(p)


def test_config_defaults(tmp_path: Path) -> None:
    cfg = ms.load_config(write(tmp_path, "[node]\nname = n1\n"))
    assert cfg.lease_ttl == 5 and cfg.etcd.prefix == "/metastack"
    assert cfg.etcd.endpoints == (("127.0.0.1", 2379),)
    assert cfg.libvirt_uri == "qemu:///system" and cfg.domain_type == "kvm"
    assert cfg.vcpus is None and cfg.renew_interval == pytest.approx(5 / 3)


def test_example_config_is_valid() -> None:
    cfg = ms.load_config(str(Path(__file__).parent.parent / "config.example.ini"))
    assert cfg.lease_ttl == 5


@pytest.mark.parametrize("text,message", [
    ("[agent]\nlease_ttl = 1\n", "below etcd's minimum"),
    ("[agent]\nlease_ttl = 3\n[etcd]\ntimeout = 1\n", "too short"),
    ("[agent]\nlease_ttl = five\n", "whole number"),
    ("[node]\nname = Node_1\n", "must match"),
    ("[node]\nvcpus = -2\n", "positive integer"),
    ("[etcd]\nendpoints = localhost\n", "not host:port"),
    ("[etcd]\nprefix = metastack\n", "absolute key path"),
    ("[libvirt]\ndomain_type = xen\n", "not one of"),
    ("[logging]\nlevel = LOUD\n", "not DEBUG"),
    ("not an ini", "not valid ini"),
])
def test_config_rejects(tmp_path: Path, text: str, message: str) -> None:
    if "[node]" not in text:
        text = "[node]\nname = n1\n" + text if text.startswith("[") else text
    with pytest.raises(ms.ConfigError, match=message):
        ms.load_config(write(tmp_path, text))


def test_missing_config_file() -> None:
    with pytest.raises(ms.ConfigError, match="cannot read config file"):
        ms.load_config("/nonexistent/metastack.ini")


# -- domain XML ------------------------------------------------------------------

def test_domain_xml_literal_minimal() -> None:
    spec = ms.DomainSpec(vm="web1", node="node1", domain_type="qemu", vcpus=2, ram_mb=1024, flavour="small")
    expected = (
        '<domain xmlns:metastack="https://metastack.dev/xmlns/domain/1" type="qemu">'
        '<name>web1.node1</name><memory unit="MiB">1024</memory><vcpu>2</vcpu>'
        '<metadata><metastack:instance>'
        '<metastack:node>node1</metastack:node><metastack:vm>web1</metastack:vm>'
        '<metastack:flavour>small</metastack:flavour>'
        '</metastack:instance></metadata><os><type>hvm</type></os><features><acpi /></features>'
        '<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>'
        '<devices><memballoon model="none" /></devices></domain>')
    assert ms.build_domain_xml(spec) == expected


def test_domain_xml_literal_rbd_direct_boot() -> None:
    spec = ms.DomainSpec(
        vm="db1", node="n2", domain_type="kvm", vcpus=1, ram_mb=128, flavour="tiny", image="tiny",
        disk=ms.RBDDisk("rbd", "vm-db1-g7", (("10.0.0.1", 6789), ("10.0.0.2", 6789)), "admin", "11111111-2222-3333-4444-555555555555"),
        boot=ms.DirectBoot("/c/kernel", "/c/initrd", "console=ttyS0 quiet"),
        console="/var/lib/metastack/console/db1.log")
    expected = (
        '<domain xmlns:metastack="https://metastack.dev/xmlns/domain/1" type="kvm">'
        '<name>db1.n2</name><uuid>abcd</uuid><memory unit="MiB">128</memory><vcpu>1</vcpu>'
        '<metadata><metastack:instance>'
        '<metastack:node>n2</metastack:node><metastack:vm>db1</metastack:vm>'
        '<metastack:flavour>tiny</metastack:flavour><metastack:image>tiny</metastack:image>'
        '</metastack:instance></metadata>'
        '<os><type>hvm</type><kernel>/c/kernel</kernel><initrd>/c/initrd</initrd>'
        '<cmdline>console=ttyS0 quiet</cmdline></os><features><acpi /></features>'
        '<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>'
        '<devices><disk type="network" device="disk"><driver name="qemu" type="raw" cache="none" />'
        '<auth username="admin"><secret type="ceph" uuid="11111111-2222-3333-4444-555555555555" /></auth>'
        '<source protocol="rbd" name="rbd/vm-db1-g7"><host name="10.0.0.1" port="6789" />'
        '<host name="10.0.0.2" port="6789" /></source><target dev="vda" bus="virtio" /></disk>'
        '<serial type="file"><source path="/var/lib/metastack/console/db1.log" /><target port="0" /></serial>'
        '<console type="file"><source path="/var/lib/metastack/console/db1.log" />'
        '<target type="serial" port="0" /></console>'
        '<memballoon model="none" /></devices></domain>')
    assert ms.build_domain_xml(spec, uuid="abcd") == expected


def test_domain_xml_escapes_and_boots_from_disk() -> None:
    spec = ms.DomainSpec(vm="a", node="n", domain_type="qemu", vcpus=1, ram_mb=64, flavour="f",
                         disk=ms.RBDDisk("p", "d", (("h", 1),), "u", "x"),
                         boot=None, console="/tmp/a&b<c>.log")
    root = ET.fromstring(ms.build_domain_xml(spec))
    assert root.find("os/boot").get("dev") == "hd"
    assert root.find("devices/serial/source").get("path") == "/tmp/a&b<c>.log"


def test_domain_xml_owner_tag_roundtrip() -> None:
    spec = ms.DomainSpec(vm="a", node="n9", domain_type="kvm", vcpus=1, ram_mb=64, flavour="f")
    meta = ET.fromstring(ms.build_domain_xml(spec)).find("metadata")[0]
    assert ms.owner_of(ET.tostring(meta, encoding="unicode")) == ("n9", "a")
    assert ms.owner_of("<instance><node>n2</node><vm>x</vm></instance>") == ("n2", "x")  # as libvirt returns it
    assert ms.owner_of("<instance><node>n2</node></instance>") is None
    assert ms.owner_of("not xml") is None


def test_kvm_probe_sector_is_a_boot_sector() -> None:
    assert len(ms.PROBE_SECTOR) == 512 and ms.PROBE_SECTOR.endswith(b"\x55\xaa")
    # mov si, imm16 points at the message inside the sector loaded at 0x7c00
    si = int.from_bytes(ms.PROBE_SECTOR[9:11], "little")
    assert ms.PROBE_SECTOR[si - 0x7C00:].startswith(b"KVMOK\n\0")


@pytest.mark.parametrize("mon_host,expected", [
    ("[v2:127.0.0.1:3300/0,v1:127.0.0.1:6789/0]", [("127.0.0.1", 6789)]),
    ("10.0.0.1:6789,10.0.0.2:6789", [("10.0.0.1", 6789), ("10.0.0.2", 6789)]),
    ("[v2:10.0.0.1:3300/0]", [("10.0.0.1", 3300)]),
    ("mon1", [("mon1", 6789)]),
])
def test_parse_mon_hosts(mon_host, expected) -> None:
    assert ms.parse_mon_hosts(mon_host) == expected


@pytest.mark.parametrize("raw,reason", [
    (b'{"pool": "p", "image": "i", "snapshot": "s"}', "'size' must be a positive integer"),
    (b'{"pool": "p", "image": "i", "snapshot": "s", "size": 1, "kernel": "k"}', "go together"),
    (b'{"image": "i", "snapshot": "s", "size": 1}', "'pool' must be"),
])
def test_image_record_rejects(raw, reason) -> None:
    with pytest.raises(SpecError, match=reason):
        ms.Image.parse("tiny", raw)


def test_disk_name_follows_identity_uuid_or_generation() -> None:
    u = "0b3c4d5e-1234-4abc-8def-0123456789ab"
    assert ms.disk_name("web1", "g42") == "vm-web1-g42" != ms.disk_name("web1", "g43")
    assert ms.disk_name("web1", u) == "vm-web1-0b3c4d5e12344abc8def0123456789ab"
    assert ms.parse_disk_name(ms.disk_name("web1", u)) == ("web1", u)
    assert ms.parse_disk_name("vm-web1-g42") == ("web1", "g42")
    assert dataclasses.replace(vm("a"), generation=5).identity == "g5"
    assert dataclasses.replace(vm("a"), generation=5, uuid=u).identity == u


def test_uuid_identity_survives_a_re_created_key() -> None:
    """Finding 7: a restore (or a tool that deletes and puts) gives the key a
    new create_revision; with a uuid the claim still serves it: no remove."""
    u = "0b3c4d5e-1234-4abc-8def-0123456789ab"
    desired = {"a": dataclasses.replace(vm("a"), generation=90, uuid=u)}
    actual = {"a": ActualVM("n1", "running", vcpus=1, ram_mb=512, disk="p/x", uuid=u)}
    assert kinds(plan("n1", CAP, snap(desired, actual), {"a": "running"})) == {"a": "run"}
    other = "1b3c4d5e-1234-4abc-8def-0123456789ab"
    actual["a"] = dataclasses.replace(actual["a"], uuid=other)
    assert kinds(plan("n1", CAP, snap(desired, actual), {"a": "running"})) == {"a": "remove"}


def test_desired_uuid_must_be_canonical() -> None:
    with pytest.raises(SpecError, match="uuid"):
        DesiredVM.parse("a", b'{"flavour": "small", "uuid": "not-a-uuid"}')
    with pytest.raises(SpecError, match="uuid"):
        DesiredVM.parse("a", b'{"flavour": "small", "uuid": 7}')


def test_unknown_image_is_an_error_claim() -> None:
    acts = plan("n1", CAP, snap({"a": vm("a", image="nope")}), {})
    assert acts == [Action("claim_error", "a", reason="unknown image 'nope'")]


def test_vm_re_created_between_two_looks_is_removed_first() -> None:
    desired = {"a": dataclasses.replace(vm("a"), generation=9)}
    actual = {"a": ActualVM("n1", "running", vcpus=1, ram_mb=512, disk="p/vm-a-g4", generation=4)}
    assert kinds(plan("n1", CAP, snap(desired, actual), {"a": "running"})) == {"a": "remove"}
    actual["a"] = dataclasses.replace(actual["a"], generation=9)
    assert kinds(plan("n1", CAP, snap(desired, actual), {"a": "running"})) == {"a": "run"}


def test_domain_of_an_undesired_vm_claimed_elsewhere_is_killed() -> None:
    acts = plan("n1", CAP, snap({}, {"a": mine(host="n2")}), {"a": "running"})
    assert acts == [Action("kill", "a", reason="claimed by n2")]


def test_orphan_disks() -> None:
    u = "0b3c4d5e-1234-4abc-8def-0123456789ab"
    desired = {"a": dataclasses.replace(vm("a", image="t"), generation=7), "bad": SpecError("x"),
               "u": dataclasses.replace(vm("u", image="t"), generation=8, uuid=u)}
    actual = {"b": ActualVM("n2", "running", disk="p/vm-b-g3")}
    disks = ["vm-a-g7", "vm-a-g5", "vm-b-g3", "vm-c-g9", "vm-bad-g2", "base-t-1234", "vm-x",
             "vm-u-0b3c4d5e12344abc8def0123456789ab", "vm-u-g8"]
    assert ms.orphan_disks("p", disks, snap(desired, actual)) == ["vm-a-g5", "vm-c-g9", "vm-u-g8"]
    assert ms.parse_disk_name("vm-my-vm-g12") == ("my-vm", "g12")


def test_waker_returns_when_woken_from_another_thread() -> None:
    import threading
    w = ms.Waker()
    done = threading.Event()

    def waiter() -> None:
        w.wait(60)
        done.set()
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    w.wake()
    w.wake()  # several wake-ups fold into one
    assert done.wait(30)
    w.wait(0)  # nothing pending any more: returns at once with timeout 0


# -- failover rules (issue 6) ------------------------------------------------

def test_own_running_domain_is_re_claimed_first_even_when_quiet() -> None:
    """After a correlated lease loss a node re-claims what runs on it (no
    reboot) and claims nothing else while it is quiet."""
    desired = {"a": vm("a"), "b": vm("b")}
    acts = plan("n1", CAP, snap(desired), {"a": "running"}, quiet=True)
    assert kinds(acts) == {"a": "claim"}
    assert kinds(plan("n1", CAP, snap(desired), {"a": "running"})) == {"a": "claim", "b": "claim"}
    assert acts[0].vm == "a"


def test_held_vms_wait_for_their_owner_but_not_forever() -> None:
    desired = {"a": vm("a"), "b": vm("b")}
    assert kinds(plan("n1", CAP, snap(desired), {}, hold={"a"})) == {"b": "claim"}
    assert kinds(plan("n1", CAP, snap(desired), {})) == {"a": "claim", "b": "claim"}


def test_fenced_node_kills_every_domain_releases_claims_and_claims_nothing() -> None:
    desired = {"a": vm("a"), "b": vm("b"), "c": vm("c")}
    acts = plan("n1", CAP, snap(desired, {"a": mine()}), {"a": "running", "b": "running"}, fenced=True)
    assert kinds(acts) == {"a": "release", "b": "kill"}


def test_given_up_vm_is_left_to_others_and_its_domain_removed() -> None:
    desired = {"a": vm("a"), "b": vm("b")}
    assert kinds(plan("n1", CAP, snap(desired), {"a": "stopped"}, cannot={"a"})) == {"a": "kill", "b": "claim"}
    assert kinds(plan("n1", CAP, snap(desired, {"a": mine("error", 0, 0)}), {}, cannot={"a"})) == \
        {"a": "release", "b": "claim"}


def _leased(claim: ActualVM, lease: int) -> ActualVM:
    return dataclasses.replace(claim, lease=lease)


def test_claims_are_trusted_only_on_the_live_lease_of_their_host() -> None:
    """Finding 9: a hand-written claim (no lease, or not the host's lease)
    is not a claim: the VM is claimable, and the first live node purges it."""
    hosts = {"n1": ms.HostState(4, 8192, lease=11), "n2": ms.HostState(4, 8192, lease=22)}
    s = Snapshot({"a": vm("a"), "b": vm("b"), "c": vm("c")},
                 {"a": _leased(mine(host="n9"), 0), "b": _leased(mine(host="n1"), 0),
                  "c": _leased(mine(host="n2"), 22)}, dict(FLAVOURS), dict(hosts))
    ms.split_trusted(s)
    assert set(s.actual) == {"c"} and set(s.untrusted) == {"a", "b"}
    acts = plan("n1", CAP, s, {})
    assert kinds(acts) == {"a": "claim", "b": "claim"}  # claimed over the untrusted keys, not purged
    s2 = Snapshot({}, {"a": _leased(mine(host="n9"), 0)}, dict(FLAVOURS),
                  {"n1": ms.HostState(4, 8192, lease=0), "n2": ms.HostState(4, 8192, lease=22)})
    ms.split_trusted(s2)
    assert set(s2.hosts) == {"n2"}  # a host record without a lease is no live node
    assert [a.kind for a in plan("n2", CAP, s2, {})] == ["purge"]
    assert plan("n3", CAP, s2, {}) == []  # only the first live node purges


def test_host_state_round_trip_and_rejects() -> None:
    h = ms.HostState(4, 8192, 0, 0, 0, "fenced", "10.0.0.5", (("a", "no ceph"),))
    assert ms.HostState.parse(h.encode()) == h
    # The use is not part of the record: readers take it from the claims.
    used = h.with_use(1, 512, 1)
    assert used.encode() == h.encode() and used.same_content(h)
    assert ms.HostState.parse(b'{"vcpus": 4, "ram_mb": 8192, "vcpus_used": 3, "vms": -1}').vcpus_used == 0
    for raw in (b'{"vcpus": "x", "ram_mb": 1}', b'{"vcpus": 1, "ram_mb": 1, "cannot": [1]}', b'[]'):
        with pytest.raises(SpecError):
            ms.HostState.parse(raw)


def test_fence_record_round_trip() -> None:
    rec = ms.FenceRecord("n2", "n1", "2026-11-25T00:00:00Z", "range", "10.0.0.6", ("10.0.0.6:0/1",), "clean")
    assert ms.FenceRecord.parse("n2", rec.encode()) == rec
    with pytest.raises(SpecError):
        ms.FenceRecord.parse("n2", b'{"mode": "nuke"}')
