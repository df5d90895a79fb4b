"""End to end install on real (containerised) hosts: deploy/hostbed.py boots
3 Debian 12 hosts as systemd-nspawn containers (systemd as PID 1, own
network on 10.214.0.0/24, SSH), then the real playbook runs over SSH:
etcd on all 3, compute on host2 and host3, management, syslog and the dev
Ceph on host1; host4 is added later with --limit. Opt-in (root, several minutes, a cached root file system
of about 1 GB): METASTACK_TESTBED=1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness import ROOT, wait_for

pytestmark = pytest.mark.skipif(os.environ.get("METASTACK_TESTBED") != "1",
                                reason="the nspawn install testbed is opt-in: METASTACK_TESTBED=1")

sys.path.insert(0, str(ROOT / "deploy"))

TOOLS = ROOT / ".venv-deploy" / "bin"


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
        print(f"\nhostbed up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        (d / "inventory.yml").write_text(inventory(d))
        yield b
    finally:
        b.down()


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
    print(f"\nfirst playbook run: {took:.0f}s", file=sys.stderr)
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
    print(f"\nadding host4 (--limit): {took:.0f}s", file=sys.stderr)
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
    print(f"\nidempotent re-run: {took:.0f}s", file=sys.stderr)
    changed = {h: v["changed"] for h, v in recap(r.stdout).items()}
    assert changed and all(c == 0 for c in changed.values()), (changed, r.stdout[-6000:])
