"""The playbook (deploy/ansible/): syntax, ansible-lint (offline, production
profile), and what its templates render for the example inventory: agent,
admin and web ini files the MetaStack tools accept, rsyslog configurations
rsyslogd accepts, an etcd member configuration naming every member.

ansible-core and ansible-lint come from .venv-deploy (deploy/setup.sh, at
the versions of constraints.txt). Nothing here touches a host: templates
are rendered with the ``template`` module on a local connection into a
temporary folder.
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import ROOT
import metastack as ms

ANSIBLE = ROOT / "deploy" / "ansible"
TOOLS = ROOT / ".venv-deploy" / "bin"
INVENTORY = ANSIBLE / "inventory.example.yml"


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run bash deploy/setup.sh (it installs the deploy tools)")
    return str(path)


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP="/tmp/.ansible-metastack-tests", ANSIBLE_HOME="/tmp/.ansible-metastack-tests",
               PATH=f"{TOOLS}:{os.environ.get('PATH', '')}")
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=ANSIBLE)


def test_playbook_syntax_with_the_example_inventory() -> None:
    r = run(tool("ansible-playbook"), "-i", str(INVENTORY), "site.yml", "--syntax-check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_playbook_tasks_cover_every_group() -> None:
    r = run(tool("ansible-playbook"), "-i", str(INVENTORY), "site.yml", "--list-tasks")
    assert r.returncode == 0, r.stdout + r.stderr
    for play in ("etcd cluster with TLS", "Ceph users", "Management hosts", "Compute nodes, one at a time",
                 "Central syslog", "Dev Ceph cluster"):
        assert play.lower() in r.stdout.lower(), play


def test_ansible_lint_passes_offline() -> None:
    r = run(tool("ansible-lint"), "--offline", "site.yml", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every template, rendered for every host of the example inventory."""
    out = tmp_path_factory.mktemp("rendered")
    roles = ANSIBLE / "roles"
    jobs = [("compute", roles / "compute/templates/metastack.ini.j2", "metastack.ini"),
            ("management", roles / "management/templates/admin.ini.j2", "admin.ini"),
            ("management", roles / "management/templates/web.ini.j2", "web.ini"),
            ("etcd", roles / "etcd/templates/etcd.default.j2", "etcd.default"),
            ("etcd", roles / "etcd/templates/metastack-etcdctl.j2", "metastack-etcdctl"),
            ("syslog", roles / "syslog_central/templates/10-metastack-central.conf.j2", "central.conf"),
            ("compute", roles / "syslog_forward/templates/90-metastack-forward.conf.j2", "forward.conf"),
            ("management", roles / "management/templates/metastack-web.service.j2", "metastack-web.service")]
    extra = []
    for role in ("compute", "management", "etcd", "syslog_central", "syslog_forward", "ceph_users", "pki"):
        extra += ["-e", f"@{roles / role / 'defaults' / 'main.yml'}"]
    for group, src, name in jobs:
        r = run(tool("ansible"), "-i", str(INVENTORY), group, "-c", "local", "-m", "ansible.builtin.template",
                "-a", f"src={src} dest={out}/{{{{ inventory_hostname }}}}-{name} mode=0644", *extra,
                "-e", "metastack_vcpus=4", "-e", "metastack_ram_mb=8192", "-e", "metastack_address=10.0.0.99")
        assert r.returncode == 0, r.stdout + r.stderr
    return out


def _with_existing_files(text: str, tmp: Path) -> str:
    """Point the rendered paths of certificates and Ceph files at files that exist here."""
    for prefix in ("/etc/metastack/pki/", "/etc/ceph/"):
        for path in {p for p in text.split() if p.startswith(prefix)}:
            local = tmp / Path(path).name
            local.write_text("x")
            text = text.replace(path, str(local))
    return text


def test_rendered_agent_ini_is_valid_and_secure(rendered: Path, tmp_path: Path) -> None:
    for node in ("cmp1", "cmp2"):
        text = (rendered / f"{node}-metastack.ini").read_text()
        ini = tmp_path / f"{node}.ini"
        ini.write_text(_with_existing_files(text, tmp_path))
        cfg = ms.load_config(str(ini))
        assert cfg.node_name == node
        assert cfg.etcd.tls and cfg.etcd.cert and cfg.etcd.key and cfg.etcd.ca_cert and cfg.etcd.user is None
        assert cfg.etcd.endpoints == (("10.0.0.11", 2379), ("10.0.0.12", 2379), ("10.0.0.13", 2379))
        assert cfg.ceph is not None and cfg.ceph.client == f"metastack-{node}"  # its own cephx user
        assert cfg.on_stop == "keep"
        assert "admin" not in text


def test_rendered_admin_and_web_ini_are_valid(rendered: Path, tmp_path: Path) -> None:
    import metastackweb
    for name in ("admin", "web"):
        cp = configparser.ConfigParser()
        cp.read_string(_with_existing_files((rendered / f"ctl1-{name}.ini").read_text(), tmp_path))
        etcd = ms.etcd_config_from(cp)
        assert etcd.tls and etcd.cert is not None and etcd.cert.endswith(f"{name}.crt")
        assert ms.ceph_config_from(cp).client == "metastack-admin"  # type: ignore[union-attr]
    metastackweb.web_config_from(cp)


def test_rendered_rsyslog_configs_are_accepted_by_rsyslogd(rendered: Path) -> None:
    if shutil.which("rsyslogd") is None:
        pytest.fail("rsyslogd is not installed: run bash deploy/setup.sh")
    for name in ("ctl1-central.conf", "cmp1-forward.conf"):
        r = subprocess.run(["rsyslogd", "-N1", "-f", str(rendered / name)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, name + "\n" + r.stdout + r.stderr
    forward = (rendered / "cmp1-forward.conf").read_text()
    assert 'type="omrelp"' in forward and 'port="2514"' in forward and "omfwd" not in forward
    assert 'queue.type="LinkedList"' in forward and "queue.filename" in forward
    assert 'target="10.0.0.11"' in forward and 'action.resumeRetryCount="-1"' in forward
    central = (rendered / "ctl1-central.conf").read_text()
    assert 'input(type="imrelp" port="2514" ruleset="metastack_remote")' in central


def test_rendered_etcd_member_config_names_every_member(rendered: Path) -> None:
    env = dict(line.split("=", 1) for line in (rendered / "ctl2-etcd.default").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["ETCD_NAME"] == '"ctl2"'
    assert env["ETCD_INITIAL_CLUSTER"] == ('"ctl1=https://10.0.0.11:2380,ctl2=https://10.0.0.12:2380,'
                                           'ctl3=https://10.0.0.13:2380"')
    assert env["ETCD_CLIENT_CERT_AUTH"] == '"true"' and env["ETCD_PEER_CLIENT_CERT_AUTH"] == '"true"'
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith('"https://10.0.0.12:2379')
