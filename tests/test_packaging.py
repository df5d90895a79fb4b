"""Packaging and the systemd units: compatible ranges in setup.py, exact pins
in constraints.txt, ``--version`` and ``-c`` in ``--help``, the example ini
and the units shipped in the wheel, the units valid for systemd, and the
watchdog unit coexisting with the agent's own spawning of a watchdog."""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import ROOT, wait_for
import metastack as ms
import metastackctl as ctl

UNITS = ROOT / "deploy" / "systemd"
PY = sys.executable


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[name.lower().replace("_", "-")] = version
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("metastack-*.whl")
    return zipfile.ZipFile(whl)


def test_install_requires_are_ranges_and_constraints_pin_them(wheel: zipfile.ZipFile) -> None:
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in reqs if "extra ==" not in r]
    assert {requirement_name(r) for r in runtime} >= {"cslab-etcd3", "grpcio", "protobuf", "click",
                                                     "libvirt-python", "aiohttp"}
    pinned = pins()
    for r in reqs:
        assert "==" not in r.split(";")[0], f"exact pin in setup.py: {r} (belongs in constraints.txt)"
        assert requirement_name(r) in pinned, f"{r} has no exact pin in constraints.txt"
    for tool in ("ansible-core", "ansible-lint"):
        assert tool in pinned, f"{tool} is not pinned in constraints.txt"


def test_setup_and_ci_install_with_the_constraints() -> None:
    setup = (ROOT / "deploy" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup or "--constraint constraints.txt" in setup


def test_wheel_ships_the_example_ini_and_the_units(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    data = "metastack-0.1.0.data/data/share/metastack/"
    for f in ("config.example.ini", "systemd/metastack.service", "systemd/metastack-watchdog.service",
              "web/index.html"):
        assert data + f in names, f"{f} is not in the wheel"
    assert wheel.read(data + "config.example.ini") == (ROOT / "config.example.ini").read_bytes()


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        ms.main(["--version"])
    assert exit_.value.code == 0
    assert re.match(r"metastack \S+", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        ms.main(["--help"])
    text = capsys.readouterr().out
    assert "-c FILE, --config FILE" in text and "config.example.ini" in text and "4  etcd refused" in text
    r = CliRunner().invoke(ctl.cli, ["--version"], prog_name="metastackctl")
    assert r.exit_code == 0 and r.output.startswith("metastackctl ")
    r = CliRunner().invoke(ctl.cli, ["--help"])
    assert "-c, --config" in r.output and "5  etcd refused" in r.output and "4  a wait timed out" in r.output
    r = subprocess.run([PY, str(ROOT / "metastackweb.py"), "--help"], capture_output=True, text=True, timeout=30)
    assert "-c FILE, --config FILE" in r.stdout


# -- systemd units ------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


def test_units_are_valid_for_systemd(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for name in ("metastack.service", "metastack-watchdog.service"):  # binaries that exist here
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/opt/metastack/bin/metastack", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "metastack.service"),
                        str(tmp_path / "metastack-watchdog.service")], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if str(tmp_path) in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_agent_unit_keeps_guests_on_stop_restarts_on_failure_and_orders_after_libvirt() -> None:
    agent = unit("metastack.service")
    svc, u = agent["Service"], agent["Unit"]
    assert svc["KillMode"] == "process"  # SIGTERM to the agent only: on_stop = keep leaves guests running
    assert svc["Restart"] == "on-failure"
    assert set(svc["RestartPreventExitStatus"].split()) == {"2", "4"}
    after = u["After"].split()
    assert {"libvirtd.service", "network-online.target", "metastack-watchdog.service"} <= set(after)
    assert "metastack-watchdog.service" in u["Wants"].split()
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    for breaks in ("PrivateDevices", "MemoryDenyWriteExecute", "ProtectProc", "PrivateNetwork", "DynamicUser"):
        assert breaks not in svc, f"{breaks} breaks libvirt, Ceph, the KVM probe or the watchdog"
    dog = unit("metastack-watchdog.service")
    assert "--watchdog" in dog["Service"]["ExecStart"] and "--wait-watchdog" in dog["Service"]["ExecStartPost"]
    assert "PartOf" not in dog["Unit"] and "BindsTo" not in dog["Unit"]  # it outlives agent restarts


def unit_command(text: str, ini: Path) -> list[str]:
    """A unit's command line with the venv's entry point replaced by this checkout's."""
    argv = shlex.split(text)
    assert argv[0] == "/opt/metastack/bin/metastack"
    return [PY, str(ROOT / "metastack.py")] + [str(ini) if a == "/etc/metastack/metastack.ini" else a
                                               for a in argv[1:]]


@pytest.fixture
def node_ini(tmp_path: Path) -> Path:
    ini = tmp_path / "node.ini"
    ini.write_text(textwrap.dedent(f"""\
        [etcd]
        endpoints = 127.0.0.1:9
        timeout = 0.5
        [node]
        name = unitnode
        state_dir = {tmp_path}/state
        [libvirt]
        uri = test:///default
        domain_type = test
        [agent]
        lease_ttl = 4
        [logging]
        syslog = none
        """))
    return ini


@pytest.mark.parametrize("stale", ["none", "disarm", "dead-feeder"])
def test_watchdog_unit_holds_the_lock_so_the_agent_spawns_none(node_ini: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, stale: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    feed_path = state / "watchdog-unitnode.feed"
    if stale == "disarm":  # the agent drained last time
        feed_path.write_text("disarm 4242\n")
    elif stale == "dead-feeder":  # an earlier boot's agent
        feed_path.write_text("12.000 999999\n")
    dog = unit("metastack-watchdog.service")["Service"]
    proc = subprocess.Popen(unit_command(dog["ExecStart"], node_ini), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        post = subprocess.run(unit_command(dog["ExecStartPost"], node_ini), capture_output=True, text=True,
                              timeout=30)
        assert post.returncode == 0, post.stderr + (proc.stderr.read() if proc.poll() is not None else "")
        feed = ms.WatchdogFeed(str(state), "unitnode")
        assert feed.running()

        def no_spawn(*_a: object, **_k: object) -> None:
            raise AssertionError("the agent spawned a second watchdog")
        monkeypatch.setattr(subprocess, "Popen", no_spawn)
        feed.ensure_running(str(node_ini))  # what the agent does at start
        monkeypatch.undo()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_watchdog_unit_without_an_agent_fires_then_exits(node_ini: Path) -> None:
    """At boot with no agent coming: after one watchdog delay it stops the
    node's domains (none run here) and exits 0, so Restart=on-failure
    leaves it down until the agent's start pulls it in again."""
    dog = unit("metastack-watchdog.service")["Service"]
    proc = subprocess.Popen(unit_command(dog["ExecStart"], node_ini), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped feeding" in (proc.stderr.read() if proc.stderr else "")


def test_wait_watchdog_fails_without_a_watchdog(node_ini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(ms.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(ms.time, "sleep", lambda _s: None)
    import logging
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        assert ms.main(["-c", str(node_ini), "--wait-watchdog"]) == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
