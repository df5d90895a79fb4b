"""End to end: real etcd, a real single-node Ceph, libvirtd with QEMU (TCG
here; KVM where it works) booting the tiny guest from RBD disks.

The guest prints ``METASTACK-GUEST-UP boot=N`` on its serial console, N being
a boot counter it keeps on its own (virtio, RBD) disk.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import metastack as ms
from harness import Cluster, wait_for
from metastackctl import cli

BOOT_TIMEOUT = 90  # TCG on 2 loaded cores: a boot takes 3-10 s, leave room


def ctl(cluster: Cluster, *args: str):
    ini = cluster.dir / "ctl.ini"
    if not ini.exists():
        ini.write_text(f"[etcd]\nendpoints = {cluster.etcd.endpoint}\nprefix = {cluster.prefix}\n"
                       + cluster.ceph_section)
    return CliRunner().invoke(cli, ["-c", str(ini), *args])


def import_tiny(cluster: Cluster, guest: Path, name: str = "tiny", direct: bool = True) -> None:
    args = ["image", "import", name, str(guest / "disk.raw")]
    if direct:
        args += ["--kernel", str(guest / "vmlinuz"), "--initrd", str(guest / "initrd.img"),
                 "--cmdline", (guest / "cmdline").read_text().strip()]
    r = ctl(cluster, *args)
    assert r.exit_code == 0, r.output


def boots(cluster: Cluster, vm: str) -> list[int]:
    """Boot counters seen on the VM's console (as metastackctl console shows it)."""
    r = ctl(cluster, "console", vm)
    return [int(n) for n in re.findall(r"METASTACK-GUEST-UP boot=(\d+)", r.output)] if r.exit_code == 0 else []


def wait_boot(cluster: Cluster, vm: str, n: int, timeout: float = BOOT_TIMEOUT) -> None:
    wait_for(lambda: n in boots(cluster, vm), timeout, interval=0.5, what=f"{vm} console: boot={n}")


def rbd_ls(ceph) -> list[str]:
    r = subprocess.run(["rbd", "-c", ceph.conf, "--keyring", ceph.keyring, "--id", ceph.client,
                        "ls", ceph.pool], capture_output=True, text=True, check=True)
    return r.stdout.split()


def virsh(*args: str, check: bool = True) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          check=check).stdout


def setup(cluster: Cluster, guest: Path, *nodes: str) -> None:
    cluster.flavour("tiny", 1, 128)
    import_tiny(cluster, guest)
    for n in nodes:
        cluster.agent(n, vcpus=2, ram_mb=1024)
    cluster.wait_hosts(*nodes)


def test_two_vms_boot_from_rbd_clones_stop_start_and_destroy(real_cluster: Cluster, guest: Path, ceph) -> None:
    c = real_cluster
    setup(c, guest, "node1", "node2")
    assert ctl(c, "create", "web1", "--flavour", "tiny", "--image", "tiny", "--host", "node1").exit_code == 0
    assert ctl(c, "create", "web2", "--flavour", "tiny", "--image", "tiny", "--host", "node2").exit_code == 0
    c.wait_running(["web1", "web2"], timeout=BOOT_TIMEOUT)
    wait_boot(c, "web1", 1)
    wait_boot(c, "web2", 1)
    actual = c.actual()
    disks = {actual["web1"]["disk"], actual["web2"]["disk"]}
    assert all(d.startswith(f"{ceph.pool}/vm-") for d in disks)
    clones = [i for i in rbd_ls(ceph) if i.startswith(("vm-web1-", "vm-web2-"))]
    assert sorted(f"{ceph.pool}/{i}" for i in clones) == sorted(disks)  # exactly their two clones
    # The cephx key never shows in the domain XML or in the logs.
    key = ms.read_keyring_key(ceph.keyring, ceph.client)
    xml = virsh("dumpxml", "web1.node1")
    assert "<secret type='ceph'" in xml and key not in xml
    assert all(key not in a.log() for a in c.agents)
    # stop/start keeps the same disk: the boot counter goes on.
    assert ctl(c, "stop", "web1").exit_code == 0
    wait_for(lambda: c.states()["web1"][0] == "stopped", 30, what="web1 stopped")
    assert "shut off" in virsh("domstate", "web1.node1")
    assert ctl(c, "start", "web1").exit_code == 0
    wait_boot(c, "web1", 2)
    assert c.actual()["web1"]["disk"] in disks
    # destroy removes the domain, then the disk.
    for vm in ("web1", "web2"):
        assert ctl(c, "destroy", vm, "--yes").exit_code == 0
    wait_for(lambda: not ({"web1", "web2"} & set(c.states())), 30, what="claims gone")
    assert not [i for i in rbd_ls(ceph) if i.startswith(("vm-web1-", "vm-web2-"))]
    names = virsh("list", "--all", "--name")
    assert "web1.node1" not in names and "web2.node2" not in names


def test_boot_from_the_disk_itself(real_cluster: Cluster, guest: Path) -> None:
    c = real_cluster
    c.flavour("tiny", 1, 128)
    import_tiny(c, guest, name="tinydisk", direct=False)
    c.agent("node1", vcpus=2, ram_mb=1024)
    c.wait_hosts("node1")
    assert ctl(c, "create", "disk1", "--flavour", "tiny", "--image", "tinydisk").exit_code == 0
    wait_boot(c, "disk1", 1)
    xml = virsh("dumpxml", "disk1.node1")
    assert "<kernel>" not in xml and "<boot dev='hd'/>" in xml


def test_failover_fences_the_old_writer_and_reuses_the_disk(real_cluster: Cluster, guest: Path) -> None:
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "mover", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "mover", 1)
    disk = c.actual()["mover"]["disk"]
    n2 = c.agent("node2", vcpus=2, ram_mb=1024)
    c.wait_hosts("node2")
    n1 = c.agents[0]
    n1.signal(signal.SIGKILL)  # the agent dies; its QEMU keeps running in the shared libvirtd
    n1.wait()
    assert "running" in virsh("domstate", "mover.node1")
    wait_for(lambda: c.states().get("mover") == ("running", "node2"), c.ttl + 30, what="mover on node2")
    a = c.actual()["mover"]
    assert a["disk"] == disk  # the same RBD image, never a new clone
    assert "fenced the disk's former writer" in a["reason"]
    wait_boot(c, "mover", 2)
    # node2 recorded the fence of node1 (shared address here: per-client mode)
    fence = json.loads(c.store.get(c.keys.fence("node1")).value)
    assert fence["by"] == "node2" and fence["mode"] == "clients"
    # The old node's agent comes back, removes its stale copy, proves it and is unfenced.
    mark = len(n1.log())
    n1.start()
    wait_for(lambda: "killed local domain mover (" in n1.log()[mark:], 30, what="stale copy removed")
    wait_for(lambda: c.store.get(c.keys.fence("node1")) is None, 30, what="node1 unfenced")
    assert "mover.node1" not in virsh("list", "--all", "--name")
    assert "claimed mover" not in n1.log()[mark:]
    assert n2.alive()


def test_cells_boot_a_guest_in_its_cell_and_another_cell_takes_it_over_when_its_cell_dies(
        real_cluster: Cluster, guest: Path) -> None:
    """Two cells, one node each: the guest boots from its RBD clone on the
    node of its shard's cell, not on the other one; when that node's agent
    dies, its cell has no live node, the other cell adopts the shard,
    fences the old writer and boots the same disk."""
    c = real_cluster
    c.flavour("tiny", 1, 128)
    import_tiny(c, guest)
    c.store.put(c.keys.config, json.dumps({"cells": 2}).encode())
    cmap = ms.CellMap(2, frozenset({0, 1}))
    vm = next(f"cell{i}" for i in range(100) if cmap.home(ms.Keys.shard(f"cell{i}")) == 0)
    for name, cell in (("node1", 0), ("node2", 1)):
        proc = c.agent(name, vcpus=2, ram_mb=1024, start=False)
        proc.config.write_text(proc.config.read_text().replace("[libvirt]", f"cell = {cell}\n[libvirt]", 1))
        proc.start()
    c.wait_hosts("node1", "node2")
    assert ctl(c, "create", vm, "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, vm, 1)
    assert c.states()[vm] == ("running", "node1")
    disk = c.actual()[vm]["disk"]
    n1 = c.agents[0]
    n1.signal(signal.SIGKILL)
    n1.wait()
    wait_for(lambda: c.states().get(vm) == ("running", "node2"), c.ttl + 30, what=f"{vm} on node2")
    assert c.actual()[vm]["disk"] == disk and "fenced the disk's former writer" in c.actual()[vm]["reason"], \
        c.agents[1].log()[-3000:]
    wait_boot(c, vm, 2)
    assert json.loads(c.store.get(c.keys.fence("node1")).value)["by"] == "node2"
    n1.start()  # comes back in its cell: removes its stale copy; the guest stays on node2
    wait_for(lambda: f"{vm}.node1" not in virsh("list", "--all", "--name"), 30, what="stale copy removed")
    assert c.states()[vm] == ("running", "node2")


@pytest.mark.parametrize("own_address", [False, True], ids=["no-address", "own-address"])
def test_evacuate_fences_the_node_and_its_guest_boots_elsewhere_from_its_disk(real_cluster: Cluster, guest: Path,
                                                                              ceph, own_address: bool) -> None:
    """`host evacuate node1` while its agent still runs; the guest boots on
    node2 from the same RBD disk (its boot counter goes on) and node1 kills
    its stale copy and stays fenced and cordoned until uncordoned. With an
    address of its own, node1 is fenced by a range blocklist on the real
    Ceph (an address nothing real uses here: the disk's clients are cut off
    by node2's blocklist of its open clients) and node2 revokes its lease;
    node10, first by name but without Ceph, cannot blocklist it, so node2
    steps in (the fallback, EVACUATE_STEP later). With no address of its
    own, node1's agent releases the VM itself when it sees its fence, and
    nothing is revoked."""
    c = real_cluster
    c.flavour("tiny", 1, 128)
    import_tiny(c, guest)
    address = "10.213.99.9"  # registered by node1 alone: its own (nothing real lives there)
    n1 = c.agent("node1", vcpus=2, ram_mb=1024, start=False)
    if own_address:
        n1.config.write_text(n1.config.read_text().replace("[libvirt]", f"address = {address}\n[libvirt]", 1))
    n1.start()
    c.wait_hosts("node1")
    assert ctl(c, "create", "evac", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "evac", 1)
    disk = c.actual()["evac"]["disk"]
    n2 = c.agent("node2", vcpus=2, ram_mb=1024)
    c.wait_hosts("node2")
    fencer = "node2"
    if own_address:  # first by name, too small for the VM, no [ceph] section: it cannot add a range blocklist
        n10 = c.agent("node10", vcpus=1, ram_mb=64, start=False)
        n10.config.write_text(n10.config.read_text().replace(c.ceph_section, ""))
        n10.start()
        c.wait_hosts("node10")
        fencer = "node10"
    mark = len(n1.log())
    r = ctl(c, "host", "evacuate", "node1", "--yes", "--reason", "test", "--deadline", "60")
    assert r.exit_code == 0, r.output
    wait_for(lambda: c.states().get("evac") == ("running", "node2"), 60, what="evac on node2")
    assert c.actual()["evac"]["disk"] == disk
    wait_boot(c, "evac", 2)  # the same disk: its counter goes on
    fence = json.loads(c.store.get(c.keys.fence("node1")).value)
    assert fence["by"] == fencer and fence["mode"] == ("range" if own_address else "clients"), fence
    if own_address:
        assert "node=node1 evacuate: cannot fence it (no Ceph connection here" in n10.log(), n10.log()[-2000:]
    cli_ceph = ["ceph", "-c", ceph.conf, "--keyring", ceph.keyring, "--id", ceph.client]

    def blocklisted() -> bool:
        out = subprocess.run(cli_ceph + ["osd", "blocklist", "ls"], capture_output=True, text=True).stdout
        return f"{address}:0/32" in out
    if own_address:  # node2's turn comes EVACUATE_STEP after node10's (node1 may have released the VM before)
        wait_for(blocklisted, 30, what="node2 to add the range blocklist node10 could not")
        wait_for(lambda: "revoking its lease" in n2.log(), 15, what="node2 to revoke node1's lease")
    else:
        assert not blocklisted() and "revoking its lease" not in n2.log()
    wait_for(lambda: "fenced (evacuated)" in n1.log()[mark:], 30, what="node1 to stay fenced")
    assert "evac.node1" not in virsh("list", "--all", "--name")
    # after a revoke node1 registers again (a moment without a host record), and stays fenced
    wait_for(lambda: c.hosts().get("node1", {}).get("state") == "fenced", 30, what="node1's host record: fenced")
    assert c.states()["evac"] == ("running", "node2")
    assert ctl(c, "host", "uncordon", "node1").exit_code == 0
    wait_for(lambda: c.store.get(c.keys.fence("node1")) is None, 30, what="node1's clean fence lifted")
    assert not blocklisted()
    assert c.states()["evac"] == ("running", "node2")


def test_crashed_guest_is_reported_and_restarted(real_cluster: Cluster, guest: Path) -> None:
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "crashy", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "crashy", 1)
    virsh("destroy", "crashy.node1")  # behind the agent's back
    wait_for(lambda: "vm=crashy domain stopped (destroyed)" in c.agents[0].log(), 10, what="lifecycle event")
    wait_boot(c, "crashy", 2)
    assert "restarted after stopped (destroyed)" in c.actual()["crashy"]["reason"]


def test_agent_restart_within_ttl_adopts_running_domain(real_cluster: Cluster, guest: Path) -> None:
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "keeper", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "keeper", 1)
    domid = virsh("domid", "keeper.node1").strip()
    n1 = c.agents[0]
    n1.signal(signal.SIGKILL)
    n1.wait()
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log(), 15, what="lease adopted")
    time.sleep(c.ttl + 1.0)
    assert virsh("domid", "keeper.node1").strip() == domid  # the same QEMU: not restarted
    assert boots(c, "keeper") == [1]
    assert c.states()["keeper"] == ("running", "node1")


def test_foreign_domain_is_left_alone(real_cluster: Cluster, guest: Path, e2e_root: Path) -> None:
    c = real_cluster
    xml = e2e_root / "operator.xml"
    xml.write_text("<domain type='qemu'><name>operator-vm</name><memory unit='MiB'>64</memory>"
                   "<os><type>hvm</type></os></domain>")
    virsh("define", str(xml))
    try:
        setup(c, guest, "node1")
        c.desire("operator-vm", flavour="tiny")  # even a VM of the same name
        wait_for(lambda: c.states().get("operator-vm", ("",))[0] == "running", 60, what="claimed")
        assert "operator-vm" in virsh("list", "--all", "--name")
        assert "operator-vm.node1" in virsh("list", "--all", "--name")
    finally:
        virsh("undefine", "operator-vm", check=False)


def test_image_import_errors_leave_nothing_behind(real_cluster: Cluster, ceph, tmp_path: Path) -> None:
    c = real_cluster
    before = rbd_ls(ceph)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    broken = tmp_path / "broken.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(broken), "64M"], check=True, capture_output=True)
    broken.write_bytes(broken.read_bytes()[:100])  # a qcow2 header cut short
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 4096)
    cases = [
        (["image", "import", "bad1", str(empty)], "is empty"),
        (["image", "import", "bad2", str(odd)], "512-byte sectors"),
        (["image", "import", "bad3", str(broken)], "not a readable disk image"),
        (["image", "import", "bad4", str(good), "--pool", "nosuchpool"], "Ceph pool 'nosuchpool' does not exist"),
        (["image", "import", "bad5", str(tmp_path / "missing.img")], "does not exist"),
        (["image", "import", "bad6", str(good), "--kernel", str(good)], "--kernel and --initrd go together"),
    ]
    for args, message in cases:
        r = ctl(c, *args)
        assert r.exit_code != 0, args
        assert message in r.output, (args, r.output)
    c.flavour("tiny", 1, 128)
    r = ctl(c, "create", "vm1", "--flavour", "tiny", "--image", "missing")
    assert r.exit_code == 1 and "no image named 'missing'" in r.output
    assert rbd_ls(ceph) == before
    assert ctl(c, "image", "list", "-o", "json").output.strip() == "[]"
    assert c.store.get(c.keys.desired("vm1")) is None
    # qcow2 is converted; delete is refused while a VM uses the image.
    q = tmp_path / "ok.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(good), str(q)], check=True)
    assert ctl(c, "image", "import", "fromqcow", str(q)).exit_code == 0
    listed = json.loads(ctl(c, "image", "list", "-o", "json").output)
    assert listed[0]["name"] == "fromqcow" and listed[0]["size"] == 4096
    c.desire("user1", flavour="tiny", image="fromqcow")
    r = ctl(c, "image", "delete", "fromqcow", "--yes")
    assert r.exit_code == 1 and "used by 1 VM(s): user1" in r.output
    c.undesire("user1")
    assert ctl(c, "image", "delete", "fromqcow", "--yes").exit_code == 0
    assert rbd_ls(ceph) == before


def test_disk_of_a_vm_destroyed_while_its_owner_was_dead_is_collected(real_cluster: Cluster, guest: Path,
                                                                       ceph) -> None:
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "orphan1", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "orphan1", 1)
    disk = c.actual()["orphan1"]["disk"].split("/", 1)[1]
    n1 = c.agents[0]
    n1.signal(signal.SIGKILL)  # the owner dies; its QEMU keeps the disk open
    n1.wait()
    assert ctl(c, "destroy", "orphan1", "--yes").exit_code == 0
    wait_for(lambda: "node1" not in c.hosts(), c.ttl + 10, what="node1's lease expired")
    assert disk in rbd_ls(ceph)  # nobody owned it: nothing removed it yet
    n1.start()  # removes its stale domain, then collects the disk at a resync
    try:
        wait_for(lambda: disk not in rbd_ls(ceph), 40, interval=0.5, what="orphan disk removed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnode1 log:\n{n1.log()[-3000:]}") from None
    assert f"removed orphan disk {ceph.pool}/{disk}" in n1.log()
    assert "orphan1.node1" not in virsh("list", "--all", "--name")


# -- issue 6: failover that survives etcd trouble, watchdog, stop/restart -----

def domstate(dom: str) -> str:
    return virsh("domstate", dom, check=False).strip()


def test_watchdog_stops_the_guests_of_a_frozen_agent_before_its_lease_lapses(real_cluster: Cluster,
                                                                           guest: Path) -> None:
    """Finding 5: an agent that stops making progress (SIGSTOP) loses its
    VMs fast: its watchdog, a process of its own, powers the guest off
    before the lease can lapse; then node2 fences and boots the same disk."""
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "frosty", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "frosty", 1)
    n1 = c.agents[0]
    dog = n1.watchdog_pid()
    assert dog is not None and dog != n1.proc.pid
    c.agent("node2", vcpus=2, ram_mb=1024)
    c.wait_hosts("node2")
    n1.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        off_at = wait_for(lambda: "running" not in domstate("frosty.node1") and time.monotonic(), c.ttl + 10,
                          what="the watchdog to stop the frozen node's guest")
        assert "node1" in c.hosts(), "the lease lapsed before the watchdog acted"
        wait_for(lambda: c.states().get("frosty", ("", ""))[1] == "node2", c.ttl + 15, what="frosty on node2")
    finally:
        n1.signal(signal.SIGCONT)
    assert off_at - frozen_at < c.ttl
    wait_boot(c, "frosty", 2)  # the same disk: its counter goes on
    wait_for(lambda: c.store.get(c.keys.fence("node1")) is None, 30, what="node1 unfenced after proving clean")
    assert "frosty.node1" not in virsh("list", "--all", "--name")


def test_sigterm_keeps_guests_and_a_restarted_agent_adopts_them(real_cluster: Cluster, guest: Path) -> None:
    """on_stop = keep (the default): a service restart reboots nothing."""
    c = real_cluster
    c.on_stop = "keep"
    setup(c, guest, "node1")
    assert ctl(c, "create", "stay", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "stay", 1)
    domid = virsh("domid", "stay.node1").strip()
    n1 = c.agents[0]
    n1.signal(signal.SIGTERM)
    assert n1.wait(15) == 0
    assert "on_stop = keep" in n1.log() and "running" in domstate("stay.node1")
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log(), 15, what="lease adopted")
    time.sleep(c.ttl + 1.0)
    assert virsh("domid", "stay.node1").strip() == domid
    assert boots(c, "stay") == [1]
    assert c.states()["stay"] == ("running", "node1")
    c.on_stop = "drain"  # teardown leaves nothing running
    n1.config.write_text(n1.config.read_text().replace("on_stop = keep", "on_stop = drain"))
    n1.signal(signal.SIGKILL)
    n1.wait()
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log()[n1.log().index("stay"):], 15, what="second adoption")


def test_sigterm_keep_without_a_restart_moves_the_vm_before_the_lease_lapses(real_cluster: Cluster,
                                                                             guest: Path) -> None:
    c = real_cluster
    c.on_stop = "keep"
    setup(c, guest, "node1")
    assert ctl(c, "create", "leaver", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "leaver", 1)
    c.on_stop = "drain"
    c.agent("node2", vcpus=2, ram_mb=1024)
    c.wait_hosts("node2")
    n1 = c.agents[0]
    n1.signal(signal.SIGTERM)
    assert n1.wait(15) == 0
    wait_for(lambda: "running" not in domstate("leaver.node1"), c.ttl + 5, what="watchdog stops the guest")
    wait_for(lambda: c.states().get("leaver", ("", ""))[1] == "node2", c.ttl + 15, what="leaver on node2")
    wait_boot(c, "leaver", 2)


def test_etcd_freeze_of_3_ttl_reboots_no_real_guest(real_cluster: Cluster, guest: Path) -> None:
    """Finding 2 end to end: every lease expires at once; the guest keeps
    running (same QEMU, boot counter unchanged) on the node it ran on."""
    c = real_cluster
    setup(c, guest, "node1")
    assert ctl(c, "create", "calm", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "calm", 1)
    c.agent("node2", vcpus=2, ram_mb=1024)
    c.wait_hosts("node2")
    domid = virsh("domid", "calm.node1").strip()
    assert c.etcd.proc is not None
    c.etcd.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3 * c.ttl)
    finally:
        c.etcd.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: c.states().get("calm") == ("running", "node1"), 20, what="calm re-claimed on node1")
    time.sleep(c.ttl)
    assert virsh("domid", "calm.node1").strip() == domid
    assert boots(c, "calm") == [1]
    assert c.store.get(c.keys.fence("node1")) is None
    assert "calm.node2" not in virsh("list", "--all", "--name")


def test_a_vm_that_keeps_failing_on_a_node_is_handed_to_one_that_can_run_it(real_cluster: Cluster,
                                                                           guest: Path) -> None:
    """Finding 8: node1 has no Ceph configured; it gives the VM up after a
    bounded number of tries (the reason stays where show finds it), its
    error claim reserves nothing, and node2 runs the VM."""
    c = real_cluster
    c.flavour("tiny", 1, 128)
    import_tiny(c, guest)
    ceph = c.ceph_section
    c.ceph_section = ""
    n1 = c.agent("node1", vcpus=2, ram_mb=1024)
    c.ceph_section = ceph
    c.wait_hosts("node1")
    assert ctl(c, "create", "picky", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_for(lambda: "gave up picky" in n1.log(), 30, what="node1 gives picky up")
    shown = json.loads(ctl(c, "show", "picky", "-o", "json").stdout)
    assert "no [ceph] storage" in shown["given_up_by"]["node1"]
    assert c.hosts()["node1"]["vcpus_used"] == 0
    lines = len(n1.log().splitlines())
    time.sleep(3)
    assert len(n1.log().splitlines()) - lines < 5  # no busy retry loop
    c.agent("node2", vcpus=2, ram_mb=1024)
    wait_boot(c, "picky", 1)
    assert c.states()["picky"] == ("running", "node2")


def test_node_range_fence_is_added_and_lifted_and_profile_rbd_cannot_lift(ceph, tmp_path: Path) -> None:
    """The storage side of node fencing on the real Ceph: a range blocklist
    with the agent's expiry is listed, lifted by an admin key, and a key with
    only `profile rbd` may add one but not remove it (say so in the note)."""
    admin = ms.Storage(ms.CephConfig(conf=ceph.conf, client=ceph.client, keyring=ceph.keyring, pool=ceph.pool))
    cli_ceph = ["ceph", "-c", ceph.conf, "--keyring", ceph.keyring, "--id", ceph.client]

    def listed() -> str:
        return subprocess.run(cli_ceph + ["osd", "blocklist", "ls"], capture_output=True, text=True).stdout
    admin.blocklist_range("10.213.99.7", ms.Executor.FENCE_EXPIRE)
    assert "10.213.99.7:0/32" in listed()
    admin.unblocklist_range("10.213.99.7")
    assert "10.213.99.7" not in listed()
    keyring = tmp_path / "rbdonly.keyring"
    subprocess.run(cli_ceph + ["auth", "get-or-create", "client.rbdonly", "mon", "profile rbd", "osd",
                               f"profile rbd pool={ceph.pool}", "-o", str(keyring)], check=True)
    keyring.chmod(0o644)
    node = ms.Storage(ms.CephConfig(conf=ceph.conf, client="rbdonly", keyring=str(keyring), pool=ceph.pool))
    try:
        node.blocklist_range("10.213.99.8", 600)
        assert "10.213.99.8:0/32" in listed()
        try:
            node.unblocklist_range("10.213.99.8")
            raise AssertionError("profile rbd lifted a fence")
        except ms.StorageError as exc:
            assert "access denied" in str(exc) or "EACCES" in str(exc) or "ermission" in str(exc)
    finally:
        admin.unblocklist_range("10.213.99.8")
        subprocess.run(cli_ceph + ["auth", "del", "client.rbdonly"], check=False)
        node.close()
        admin.close()


def test_restart_with_domain_type_auto_adopts_before_probing(real_cluster: Cluster, guest: Path) -> None:
    """Finding 3: the 10 s KVM probe of domain_type = auto ran before the
    lease was adopted and outlasted the TTL, so a restart rebooted every
    guest. Now the lease is adopted first and the probe runs while the main
    loop keeps beating (or comes from the cache): nothing restarts."""
    c = real_cluster
    c.domain_type = "auto"
    setup(c, guest, "node1")
    n1 = c.agents[0]
    assert ctl(c, "create", "probed", "--flavour", "tiny", "--image", "tiny").exit_code == 0
    wait_boot(c, "probed", 1)
    assert "domain_type auto: using qemu" in n1.log() or "domain_type auto: using kvm" in n1.log()
    domid = virsh("domid", "probed.node1").strip()
    n1.signal(signal.SIGKILL)
    n1.wait()
    (c.dir / "state-node1" / "kvm-probe.json").unlink()  # force a real probe after the restart
    mark = len(n1.log())
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log()[mark:], 10, what="lease adopted")
    wait_for(lambda: "domain_type auto: using" in n1.log()[mark:], 30, what="probe done")
    time.sleep(1.0)
    assert virsh("domid", "probed.node1").strip() == domid
    assert boots(c, "probed") == [1]
    assert c.states()["probed"] == ("running", "node1")
    log = n1.log()[mark:]
    assert log.index("adopted lease") < log.index("domain_type auto: using")
