"""End to end install on real (containerised) hosts: deploy/hostbed.py boots
4 Debian 12 hosts as systemd-nspawn containers (systemd as PID 1, own
network on 10.214.0.0/24, SSH), then the real playbook runs over SSH:
etcd on host1-3, compute on host2 and host3, management, syslog and the dev
Ceph on host1; host4 is added later with --limit. Then, on that cluster:
real guests booting from RBD with their host's own cephx user, a central
rsyslog restart losing no line, an upgrade re-run restarting no guest, the
README's etcd snapshot restore, a host cut off the network and a host
powered off (their VMs fenced and running elsewhere; the times are printed
in the terminal summary). Root; about 9-11 minutes, plus about 2 minutes the
first time for the cached root file system (.cache/hostbed-base).
Runs by default, last in `bash deploy/test.sh` (so in CI), wherever it can:
root with systemd-nspawn and debootstrap; skipped with the reason otherwise,
and switched off with METASTACK_TESTBED=0. A failure's logs stay in the
module's temp dir: central-all.log (every other host's lines, as the
central rsyslog got them) and host1-syslog.log (host1's own: etcd, Ceph).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness import ROOT, wait_for



def _cannot_run() -> str:
    """Why the testbed cannot run here ("" when it can)."""
    if os.environ.get("METASTACK_TESTBED") == "0":
        return "the nspawn install testbed is switched off (METASTACK_TESTBED=0)"
    if os.geteuid() != 0:
        return "the nspawn install testbed needs root (containers, a bridge, overlay mounts)"
    for tool in ("systemd-nspawn", "debootstrap"):
        if shutil.which(tool) is None:
            return f"the nspawn install testbed needs {tool} (apt-get install systemd-container debootstrap)"
    return ""


pytestmark = pytest.mark.skipif(bool(_cannot_run()), reason=_cannot_run() or "-")

sys.path.insert(0, str(ROOT / "deploy"))

TOOLS = ROOT / ".venv-deploy" / "bin"
MEASURED: list[tuple[str, float]] = []  # (what, seconds): shown in the terminal summary (conftest.py)


def inventory(bed_dir: Path, host4: bool = False) -> str:
    return f"""\
all:
  vars:
    ansible_user: root
    ansible_ssh_private_key_file: {bed_dir}/id_ed25519
    ansible_ssh_common_args: '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'
    metastack_pki_dir: {bed_dir}/pki
    ceph_conf_src: {bed_dir}/ceph/ceph.conf
    ceph_admin_keyring_src: {bed_dir}/ceph/ceph.client.admin.keyring
    metastack_pip_args: "--no-index --find-links /opt/wheels"
    metastack_domain_type: qemu
    metastack_vcpus: 2
    metastack_ram_mb: 2048
    libvirt_qemu_conf_lines: ['cgroup_controllers = [ ]']
  children:
    etcd:
      hosts:
        host1: {{ansible_host: 10.214.0.11}}
        host2: {{ansible_host: 10.214.0.12}}
        host3: {{ansible_host: 10.214.0.13}}
    compute:
      hosts:
        host2:
        host3:
{"        host4: {ansible_host: 10.214.0.14}" if host4 else ""}
    management:
      hosts:
        host1:
    syslog:
      hosts:
        host1:
    ceph:
      hosts:
        host1:
"""


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import hostbed
    d = tmp_path_factory.mktemp("hostbed")
    b = hostbed.Hostbed(d, hosts=4)  # host4 joins later, with --limit
    t0 = time.monotonic()
    try:
        b.up()
        measured("hostbed up (incl. a root file system build if not cached)", time.monotonic() - t0)
        (d / "inventory.yml").write_text(inventory(d))
        yield b
    finally:
        logs = d / "hosts" / "host1" / "root" / "var/log"  # kept for a failure's post-mortem:
        for src, dest in (("metastack/all.log", "central-all.log"),  # every other host's lines
                          ("syslog", "host1-syslog.log")):  # host1's own (its etcd, Ceph, web console)
            if (logs / src).exists():
                shutil.copyfile(logs / src, d / dest)
        b.down(grace=5)  # a throw-away bed: a clean shutdown took the whole 60 s in CI runs


def playbook(bed: object, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "deploy" / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOST_KEY_CHECKING="False", PATH=f"{TOOLS}:{os.environ.get('PATH', '')}")
    return subprocess.run([str(TOOLS / "ansible-playbook"), "-i", str(bed.dir / "inventory.yml"),  # type: ignore
                           str(ROOT / "deploy" / "ansible" / "site.yml"), *extra],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)


def recap(out: str) -> dict[str, dict[str, int]]:
    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out, re.M):
        hosts[m.group(1)] = {"ok": int(m.group(2)), "changed": int(m.group(3)), "failed": int(m.group(5)),
                             "unreachable": int(m.group(4))}
    return hosts


def test_playbook_installs_a_secured_cluster(bed: object) -> None:
    t0 = time.monotonic()
    r = playbook(bed)
    took = time.monotonic() - t0
    (bed.dir / "first-run.log").write_text(r.stdout + r.stderr)  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    measured("install from scratch (first playbook run)", took)
    for host in ("host2", "host3"):
        out = bed.ssh(host, "systemctl is-active metastack metastack-watchdog", check=False).stdout  # type: ignore
        assert out.split() == ["active", "active"], out
    hosts = bed.ssh("host1", "/opt/metastack/bin/metastackctl -c /etc/metastack/admin.ini hosts").stdout  # type: ignore
    assert re.search(r"^host2\s+ready", hosts, re.M) and re.search(r"^host3\s+ready", hosts, re.M), hosts
    # the agent's certificate is refused outside the MetaStack prefix; no certificate, no access
    ctl = ("ETCDCTL_API=3 etcdctl --endpoints https://10.214.0.11:2379 --cacert /etc/metastack/pki/ca.crt "
           "--dial-timeout=3s --command-timeout=5s")
    agent = f"{ctl} --cert /etc/metastack/pki/agent.crt --key /etc/metastack/pki/agent.key"
    assert bed.ssh("host2", f"{agent} get /metastack/nodes/host2").returncode == 0  # type: ignore
    r2 = bed.ssh("host2", f"{agent} get --prefix /metastack-auth/", check=False)  # type: ignore
    assert r2.returncode != 0 and "permission denied" in r2.stderr, r2.stderr
    r3 = bed.ssh("host2", f"{ctl} get /metastack/nodes/host2", check=False)  # type: ignore
    assert r3.returncode != 0, r3.stdout
    # every agent's lines reach the central syslog
    for host in ("host2", "host3"):
        wait_for(lambda: bed.ssh("host1", f"grep -c metastack /var/log/metastack/hosts/{host}.log",  # type: ignore
                                 check=False).stdout.strip() not in ("", "0"), 30, what=f"{host}'s lines centrally")


def test_a_vm_runs_on_a_compute_host(bed: object) -> None:
    """libvirt and QEMU (TCG) work under the hardened agent unit in a host:
    a VM without a disk is claimed and its domain runs."""
    ctl = "/opt/metastack/bin/metastackctl -c /etc/metastack/admin.ini"
    bed.ssh("host1", f"{ctl} flavour create tiny --vcpus 1 --ram-mb 96 || true")  # type: ignore[attr-defined]
    bed.ssh("host1", f"{ctl} create tbvm1 --flavour tiny")  # type: ignore[attr-defined]

    def running() -> str:
        out = bed.ssh("host1", f"{ctl} list", check=False).stdout  # type: ignore[attr-defined]
        m = re.search(r"^tbvm1\s+tiny\s+running\s+running\s+(host[23])", out, re.M)
        return m.group(1) if m else ""
    host = wait_for(running, 90, what="tbvm1 running")
    out = bed.ssh(host, "virsh -c qemu:///system list --name").stdout  # type: ignore[attr-defined]
    assert f"tbvm1.{host}" in out, out
    bed.ssh("host1", f"{ctl} destroy tbvm1 --yes")  # type: ignore[attr-defined]
    wait_for(lambda: "tbvm1" not in bed.ssh("host1", f"{ctl} list", check=False).stdout, 60,  # type: ignore
             what="tbvm1 removed")


def test_limit_adds_a_compute_node(bed: object) -> None:
    (bed.dir / "inventory.yml").write_text(inventory(bed.dir, host4=True))  # type: ignore[attr-defined]
    t0 = time.monotonic()
    r = playbook(bed, "--limit", "host4")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    measured("adding host4 (--limit host4)", took)
    assert set(recap(r.stdout)) == {"host4"}
    out = bed.ssh("host4", "systemctl is-active metastack metastack-watchdog", check=False).stdout  # type: ignore
    assert out.split() == ["active", "active"], out
    hosts = bed.ssh("host1", "/opt/metastack/bin/metastackctl -c /etc/metastack/admin.ini hosts").stdout  # type: ignore
    assert re.search(r"^host4\s+ready", hosts, re.M), hosts


def test_second_run_changes_nothing(bed: object) -> None:
    t0 = time.monotonic()
    r = playbook(bed)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-6000:]
    measured("idempotent re-run", took)
    changed = {h: v["changed"] for h, v in recap(r.stdout).items()}
    assert changed and all(c == 0 for c in changed.values()), (changed, r.stdout[-6000:])


# -- real guests, upgrades, logs, etcd restore, failover -----------------------

CTL = "/opt/metastack/bin/metastackctl -c /etc/metastack/admin.ini"
COMPUTE = ("host2", "host3", "host4")
GUESTS = ("g1", "g2", "g3")
BOOT_TIMEOUT = 240  # three TCG guests booting at once on 2 loaded cores


def ctl(bed: object, args: str, check: bool = True) -> subprocess.CompletedProcess:
    return bed.ssh("host1", f"{CTL} {args}", check=check)  # type: ignore[attr-defined]


def vms(bed: object) -> dict[str, dict]:
    """metastackctl list -o json by VM name ({} when the CLI fails)."""
    r = ctl(bed, "list -o json", check=False)
    try:
        return {v["name"]: v for v in json.loads(r.stdout)} if r.returncode == 0 else {}
    except ValueError:
        return {}


def hosts(bed: object) -> dict[str, dict]:
    """metastackctl hosts -o json by node name ({} when the CLI fails)."""
    r = ctl(bed, "hosts -o json", check=False)
    try:
        return {h["node"]: h for h in json.loads(r.stdout)} if r.returncode == 0 else {}
    except ValueError:
        return {}


def show(bed: object, vm: str) -> dict:
    """metastackctl show -o json, once: right after an etcd member's host
    dies, its read fails over to the next member within the command."""
    return json.loads(ctl(bed, f"show {vm} -o json").stdout)


def disk(bed: object, vm: str) -> str:
    return show(bed, vm)["disk"]


def boots(bed: object, vm: str) -> list[int]:
    r = ctl(bed, f"console {vm}", check=False)
    return [int(n) for n in re.findall(r"METASTACK-GUEST-UP boot=(\d+)", r.stdout)] if r.returncode == 0 else []


def placement(bed: object) -> dict[str, str]:
    """VM -> host for every guest that runs."""
    return {n: v["host"] for n, v in vms(bed).items() if n in GUESTS and v["state"] == "running"}


def qemu(bed: object, host: str, vm: str) -> tuple[int, int]:
    """(QEMU pid, libvirt domain id) of VM's domain on HOST."""
    dom = f"{vm}.{host}"
    pid = bed.ssh(host, f"cat /run/libvirt/qemu/{dom}.pid").stdout.strip()  # type: ignore[attr-defined]
    domid = bed.ssh(host, f"virsh -c qemu:///system domid {dom}").stdout.strip()  # type: ignore[attr-defined]
    return int(pid), int(domid)


def running_domains(bed: object, hosts: tuple[str, ...] = COMPUTE) -> dict[str, list[str]]:
    """Running guest domains per reachable host."""
    out = {}
    for h in hosts:
        r = bed.ssh(h, "virsh -c qemu:///system list --name", check=False, timeout=20)  # type: ignore
        if r.returncode == 0:
            out[h] = sorted(d for d in r.stdout.split() if d.split(".")[0] in GUESTS)
    return out


def measured(what: str, seconds: float) -> None:
    MEASURED.append((what, seconds))


def wait_placement(bed: object, want: dict[str, str], timeout: float, what: str) -> None:
    """Wait until the guests run exactly where ``want`` says; on a timeout
    the failure shows the list and the guests' events."""
    try:
        wait_for(lambda: placement(bed) == want, timeout, interval=1, what=what)
    except AssertionError as exc:
        detail = ctl(bed, "list", check=False).stdout + ctl(bed, "events", check=False).stdout[-4000:]
        raise AssertionError(f"{exc}\nwanted {want}\n{detail}") from None


def wait_moved(bed: object, moved: dict[str, str], timeout: float) -> dict[str, str]:
    """Wait until every VM of ``moved`` (VM -> its old host) runs on another
    host; returns the new placement. Polls as fast as the CLI over SSH goes."""
    def elsewhere() -> dict[str, str]:
        now = placement(bed)
        return now if all(now.get(vm) not in (None, old) for vm, old in moved.items()) else {}
    return wait_for(elsewhere, timeout, interval=0.2, what=f"{sorted(moved)} running elsewhere")


def test_real_guests_boot_from_rbd_with_their_hosts_cephx_user(bed: object, guest: Path) -> None:
    """The tiny guest's image is imported from the management host; three
    VMs with RBD clones boot for real (TCG), one per compute host, and each
    domain's disk authenticates as its host's own cephx user."""
    dest = bed.hdir("host1") / "root" / "root" / "guest"  # type: ignore[attr-defined]
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("vmlinuz", "initrd.img", "disk.raw"):
        shutil.copyfile(guest / f, dest / f)
    cmdline = shlex.quote((guest / "cmdline").read_text().strip())
    t0 = time.monotonic()
    ctl(bed, f"image import tiny /root/guest/disk.raw --kernel /root/guest/vmlinuz "
             f"--initrd /root/guest/initrd.img --cmdline {cmdline}")
    measured("image import from host1", time.monotonic() - t0)
    ctl(bed, "flavour create guest --vcpus 1 --ram-mb 128")
    for vm in GUESTS:
        ctl(bed, f"create {vm} --flavour guest --image tiny --group tb")
    for vm in GUESTS:
        wait_for(lambda vm=vm: 1 in boots(bed, vm), BOOT_TIMEOUT, interval=1, what=f"{vm} console: boot=1")
    where = placement(bed)
    assert sorted(where) == sorted(GUESTS), where
    for vm, host in where.items():
        xml = bed.ssh(host, f"virsh -c qemu:///system dumpxml {vm}.{host}").stdout  # type: ignore
        auth = re.findall(r"<auth username='([^']+)'", xml)
        assert auth == [f"metastack-{host}"], xml
        assert "protocol='rbd'" in xml and f"name='metastack/vm-{vm}-" in xml, xml
        keyrings = [f for f in bed.ssh(host, "ls /etc/ceph").stdout.split() if f.endswith(".keyring")]  # type: ignore
        assert keyrings == [f"ceph.client.metastack-{host}.keyring"], keyrings


def test_central_rsyslog_restart_loses_no_lines(bed: object) -> None:
    """A compute host logs N numbered lines while the central rsyslog
    restarts; all N arrive centrally (RELP: what the central host had not
    acknowledged is sent again, so a line may arrive twice: distinct line
    numbers are counted; the disk-assisted queue keeps lines meanwhile)."""
    n, tag = 400, f"tbseq{os.getpid()}"
    logger = subprocess.Popen(  # about 4 s of lines, the restart in the middle
        ["ssh", "-i", str(bed.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",  # type: ignore
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{bed.address('host2')}",  # type: ignore
         f"for i in $(seq 1 {n}); do logger -t {tag} \"line $i\"; sleep 0.01; done"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bed.ssh("host2", f"journalctl -q -t {tag} | wc -l").stdout.strip() not in ("", "0"),  # type: ignore
                 30, interval=0.1, what="the first lines logged")
        bed.ssh("host1", "systemctl restart rsyslog")  # type: ignore[attr-defined]
        assert logger.wait(timeout=120) == 0, logger.stderr.read() if logger.stderr else ""
    finally:
        if logger.poll() is None:
            logger.kill()
            logger.wait()
    assert bed.ssh("host2", f"journalctl -q -t {tag} | wc -l").stdout.strip() == str(n)  # type: ignore

    def central() -> int:
        out = bed.ssh("host1", f"grep -ho '{tag}: line [0-9]*' /var/log/metastack/hosts/host2.log",  # type: ignore
                      check=False).stdout
        return len(set(out.split("\n")) - {""})
    counts = [0]

    def all_arrived() -> bool:
        counts.append(central())
        return counts[-1] == n
    try:
        wait_for(all_arrived, 120, interval=1, what=f"{n} lines centrally")
    except AssertionError:
        raise AssertionError(f"{counts[-1]} of {n} distinct lines arrived centrally within 120 s") from None
    total = bed.ssh("host1", f"grep -c '{tag}: line [0-9]*' /var/log/metastack/hosts/host2.log",  # type: ignore
                    check=False).stdout.strip()
    print(f"central rsyslog: {counts[-1]} of {n} distinct lines ({total} with duplicates) "
          f"after {len(counts) - 1} polls")


def test_upgrade_restarts_agents_one_at_a_time_and_no_guest(bed: object, tmp_path: Path) -> None:
    """A wheel with a raised version, the same playbook: every agent is
    restarted (watchdog then agent, one node at a time) and adopts its
    guests: same QEMU pid and domain id, still running on the same host,
    no new boot on any console."""
    before = placement(bed)
    assert sorted(before) == sorted(GUESTS), before
    domains = {vm: qemu(bed, h, vm) for vm, h in before.items()}
    booted = {vm: max(boots(bed, vm)) for vm in GUESTS}
    agents = {h: bed.ssh(h, "systemctl show -P MainPID metastack").stdout.strip() for h in COMPUTE}  # type: ignore
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".venv-deploy", ".cache", "build", "*.egg-info", "__pycache__", ".demo"))
    old = re.search(r'version="([^"]+)"', (src / "setup.py").read_text()).group(1)  # type: ignore[union-attr]
    new = f"{old}.post1"
    for f, pattern in (("setup.py", f'version="{old}"'), ("metastack.py", f'__version__ = "{old}"')):
        text = (src / f).read_text()
        assert pattern in text, f
        (src / f).write_text(text.replace(pattern, pattern.replace(old, new)))
    t0 = time.monotonic()
    r = playbook(bed, "-e", f"metastack_source_dir={src}")
    took = time.monotonic() - t0
    (bed.dir / "upgrade-run.log").write_text(r.stdout + r.stderr)  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    measured("upgrade re-run (playbook)", took)
    starts = []
    for h in COMPUTE:
        assert bed.ssh(h, "/opt/metastack/bin/metastack --version").stdout.split()[-1] == new  # type: ignore
        pid = bed.ssh(h, "systemctl show -P MainPID metastack").stdout.strip()  # type: ignore[attr-defined]
        assert pid != agents[h], (h, pid)
        # CLOCK_MONOTONIC is the machine's: comparable between the containers
        show = bed.ssh(h, "systemctl show -P ActiveEnterTimestampMonotonic metastack-watchdog metastack")  # type: ignore
        starts.append([int(x) for x in show.stdout.split()])
    # one node at a time: a node's watchdog restarts only after the previous node's agent is up
    for (_, agent_up), (watchdog_next, _) in zip(starts, starts[1:]):
        assert agent_up < watchdog_next, starts
    try:
        wait_placement(bed, before, 60, "guests running where they were")
    except AssertionError as exc:  # the hand-overs, as the agents logged them
        handover = bed.ssh("host1", "grep -E 'on_stop = keep|adopted lease|lease .*(expired|lost)|cannot start|"  # type: ignore
                                    "start-up' /var/log/metastack/all.log | grep -v ' node=' | tail -40",
                           check=False).stdout
        raise AssertionError(f"{exc}\n{handover}") from None
    assert {vm: qemu(bed, h, vm) for vm, h in before.items()} == domains
    assert {vm: max(boots(bed, vm)) for vm in GUESTS} == booted


def test_etcd_snapshot_and_restore(bed: object) -> None:
    """The README's procedure: snapshot on the first member, stop etcd
    everywhere, restore on each member, start. What was written after the
    snapshot is gone; every VM still runs on its node with its disk."""
    before = placement(bed)
    disks = {vm: disk(bed, vm) for vm in GUESTS}
    domains = {vm: qemu(bed, h, vm) for vm, h in before.items()}
    snap = "/var/backups/metastack-etcd.db"
    bed.ssh("host1", f"ETCDCTL_ENDPOINTS=https://127.0.0.1:2379 metastack-etcdctl snapshot save {snap}")  # type: ignore
    ctl(bed, "flavour create after-snapshot --vcpus 1 --ram-mb 64")
    members = ("host1", "host2", "host3")
    snapshot_file = bed.hdir("host1") / "root" / snap.lstrip("/")  # type: ignore[attr-defined]
    for h in members[1:]:
        target = bed.hdir(h) / "root" / snap.lstrip("/")  # type: ignore[attr-defined]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snapshot_file, target)
    t0 = time.monotonic()
    for h in members:
        bed.ssh(h, "systemctl stop etcd")  # type: ignore[attr-defined]
    for h in members:
        bed.ssh(h, ". /etc/default/etcd && rm -rf /var/lib/etcd/metastack.restored && "  # type: ignore
                f'ETCDCTL_API=3 etcdctl snapshot restore {snap} --name "$ETCD_NAME" '
                '--initial-cluster "$ETCD_INITIAL_CLUSTER" --initial-cluster-token "$ETCD_INITIAL_CLUSTER_TOKEN" '
                '--initial-advertise-peer-urls "$ETCD_INITIAL_ADVERTISE_PEER_URLS" '
                "--data-dir /var/lib/etcd/metastack.restored && "
                "rm -rf /var/lib/etcd/metastack && mv /var/lib/etcd/metastack.restored /var/lib/etcd/metastack && "
                "chown -R etcd:etcd /var/lib/etcd/metastack")
    for h in members:
        bed.ssh(h, "systemctl start --no-block etcd")  # type: ignore[attr-defined]
    try:
        wait_for(lambda: bed.ssh("host1", "metastack-etcdctl endpoint health", check=False).returncode == 0,  # type: ignore
                 120, interval=1, what="etcd healthy again")
    except AssertionError as exc:
        why = "".join(bed.ssh(h, "systemctl status --no-pager -n 0 etcd; journalctl -q --no-pager -n 25 -u etcd",  # type: ignore
                              check=False).stdout for h in members)
        raise AssertionError(f"{exc}\n{why}") from None
    measured("etcd down for the restore", time.monotonic() - t0)
    assert "after-snapshot" not in ctl(bed, "flavour list").stdout
    wait_for(lambda: all(hosts(bed).get(h, {}).get("state") == "ready" for h in COMPUTE), 60, interval=1,
             what="compute hosts ready")
    wait_placement(bed, before, 60, "guests running where they were")
    assert {vm: disk(bed, vm) for vm in GUESTS} == disks
    assert {vm: qemu(bed, h, vm) for vm, h in before.items()} == domains


def test_a_host_cut_off_is_fenced_and_its_vms_run_elsewhere_once(bed: object) -> None:
    """A compute host's veth goes down (etcd, Ceph and the other hosts
    unreachable): its VMs are fenced and started elsewhere on the same
    disk, exactly once; back on the network, the host removes its stale
    copies and, unfenced by the operator, takes VMs again."""
    before = placement(bed)
    victim = before["g1"]
    moved = {vm: h for vm, h in before.items() if h == victim}
    disks = {vm: disk(bed, vm) for vm in moved}
    booted = {vm: max(boots(bed, vm)) for vm in moved}
    veth = f"vb-{victim}"
    t0 = time.monotonic()
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        now = wait_moved(bed, moved, 120)
        measured(f"network cut of {victim}: VMs running elsewhere", time.monotonic() - t0)
        for vm in moved:
            shown = show(bed, vm)
            assert shown["disk"] == disks[vm], shown
            assert "fenced the disk's former writer" in shown["reason"], shown
            wait_for(lambda vm=vm: booted[vm] + 1 in boots(bed, vm), BOOT_TIMEOUT, interval=1,
                     what=f"{vm} console: boot={booted[vm] + 1}")
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    wait_for(lambda: bed.ssh(victim, "true", check=False, timeout=10).returncode == 0, 60,  # type: ignore
             interval=1, what=f"{victim} reachable")
    # its stale copies go; every guest runs exactly once, where the list says
    wait_for(lambda: not running_domains(bed, (victim,)).get(victim, ["?"]), 120, interval=1,
             what=f"{victim}'s stale domains gone")
    # the operator lifts the fence (compute nodes may not), once the node marked it clean
    def unfenced() -> bool:
        r = ctl(bed, f"host unfence {victim} --yes", check=False)
        return r.returncode == 0 or "is not fenced" in r.stderr
    wait_for(unfenced, 120, interval=2, what=f"{victim}'s fence lifted")
    wait_for(lambda: hosts(bed).get(victim, {}).get("state") == "ready" and not hosts(bed)[victim]["fence"], 60,
             interval=1, what=f"{victim} ready and unfenced")
    everywhere = running_domains(bed)
    assert sorted(d for ds in everywhere.values() for d in ds) == sorted(
        f"{vm}.{h}" for vm, h in placement(bed).items()), everywhere
    assert placement(bed) == {**before, **now}
    for vm in moved:
        assert max(boots(bed, vm)) == booted[vm] + 1, boots(bed, vm)  # started exactly once elsewhere


def test_a_host_powered_off_has_its_vms_running_elsewhere(bed: object) -> None:
    """A compute host loses power (its container's init killed: the kernel
    kills every process in it, QEMU included): its VMs run on the other
    hosts, fenced, on the same disk. Last: the host stays down."""
    before = placement(bed)
    victim = before["g2"]
    moved = {vm: h for vm, h in before.items() if h == victim}
    disks = {vm: disk(bed, vm) for vm in moved}
    booted = {vm: max(boots(bed, vm)) for vm in moved}
    t0 = time.monotonic()
    bed.power_off(victim)  # type: ignore[attr-defined]
    now = wait_moved(bed, moved, 120)
    measured(f"power-off of {victim}: VMs running elsewhere", time.monotonic() - t0)
    assert victim not in now.values()
    for vm in moved:
        shown = show(bed, vm)
        assert shown["disk"] == disks[vm], shown
        assert "fenced the disk's former writer" in shown["reason"], shown
        wait_for(lambda vm=vm: booted[vm] + 1 in boots(bed, vm), BOOT_TIMEOUT, interval=1,
                 what=f"{vm} console: boot={booted[vm] + 1}")
    wait_for(lambda: hosts(bed).get(victim, {}).get("state") in ("lost", "down"), 30, interval=1,
             what=f"{victim} lost or down")

