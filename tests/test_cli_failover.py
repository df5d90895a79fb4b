"""metastackctl against a real 3-member etcd where one member hangs
(SIGSTOP: like a host powered off, its connections get no reset and its
calls only time out): a read fails over to the next member within the
same command (seen on the install testbed: one `metastackctl show` failed
with DEADLINE_EXCEEDED right after an etcd member's host lost power)."""
from __future__ import annotations

import importlib
import json
import signal
import time

import pytest
from click.testing import CliRunner

from harness import EtcdMembers as Members
from metastackctl import cli


@pytest.mark.parametrize("role", ["follower", "leader"])
def test_a_read_answers_while_the_first_member_hangs(members: Members, monkeypatch: pytest.MonkeyPatch,
                                                     role: str) -> None:
    """The hung member is the endpoint the client starts with (python-etcd3
    picks one at random: made deterministic here); `show` and `list` still
    answer. A hung follower costs one timeout (1 s); a hung leader also an
    election, during which the others answer "leader changed" or time out
    (seen under load): the read is tried again for up to 5 timeouts."""
    leader = members.leader()
    hung = leader if role == "leader" else next(n for n in members.names if n != leader)
    endpoints = ",".join(members.endpoint(n) for n in (hung, *(n for n in members.names if n != hung)))
    base = ["--endpoints", endpoints, "--prefix", "/mstest-failover"]
    runner = CliRunner()
    r = runner.invoke(cli, [*base, "flavour", "create", "small", "--vcpus", "1", "--ram-mb", "64"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, [*base, "create", "vm1", "--flavour", "small"])
    assert r.exit_code == 0, r.output
    etcd_client = importlib.import_module("etcd3.client")  # the module (etcd3.client is also a function)
    monkeypatch.setattr(etcd_client.random, "choice", lambda seq: seq[0])  # start on the hung member
    members.procs[hung].send_signal(signal.SIGSTOP)
    try:
        for args in (["show", "vm1", "-o", "json"], ["list", "-o", "json"], ["show", "vm1", "-o", "json"]):
            t0 = time.monotonic()
            r = runner.invoke(cli, [*base, *args])
            took = time.monotonic() - t0
            assert r.exit_code == 0, (args, r.output)
            shown = json.loads(r.output)
            names = [shown["name"]] if isinstance(shown, dict) else [v["name"] for v in shown]
            assert names == ["vm1"], shown
            assert took < 8, (args, took)  # one timeout on the hung member, an election at most
    finally:
        members.procs[hung].send_signal(signal.SIGCONT)
