"""The agent against a real etcd and libvirt's test:/// driver.

Agents run as real ``python metastack.py -c FILE`` processes, each with a
private test:///ABS/PATH/node.xml hypervisor, so kill -9 and SIGTERM are real.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import metastack as ms
from harness import ROOT, Cluster, wait_for


class ClaimRecorder:
    """Watches the actual prefix and records, per VM, every claim creation
    (a put on an absent key) with its owner, and every deletion: etcd's own
    history, not the agents' word."""

    def __init__(self, cluster: Cluster) -> None:
        self.owners: dict[str, list[str]] = {}
        self.deleted: Counter[str] = Counter()
        self.keys = cluster.keys
        rev, entries = cluster.store.list_prefix(cluster.keys.shards)
        self._present = {k.rsplit("/", 1)[1] for k in entries if (self.keys.split(k) or ("",))[0] == "actual"}
        self._cancel = cluster.store.watch_prefix(cluster.keys.shards, rev + 1, self._on, lambda e: None)

    def _on(self, _rev: int, events: list[ms.KeyEvent]) -> None:
        for ev in events:
            if (self.keys.split(ev.key) or ("",))[0] != "actual":
                continue  # the shards hold desired entries too
            vm = ev.key.rsplit("/", 1)[1]
            if ev.value is None:
                self.deleted[vm] += 1
                self._present.discard(vm)
            elif vm not in self._present:
                self._present.add(vm)
                self.owners.setdefault(vm, []).append(json.loads(ev.value)["host"])

    @property
    def created(self) -> Counter[str]:
        return Counter({vm: len(o) for vm, o in self.owners.items()})

    def close(self) -> None:
        self._cancel()


def test_two_agents_race_for_50_vms_each_claimed_once(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 256)
    cluster.agent("node1", vcpus=64, ram_mb=65536)
    cluster.agent("node2", vcpus=64, ram_mb=65536)
    cluster.wait_hosts("node1", "node2")
    host_revs = {n: cluster.store.get(cluster.keys.host(n)).mod_revision for n in ("node1", "node2")}
    rec = ClaimRecorder(cluster)
    names = [f"vm{i:02d}" for i in range(50)]
    for n in names:
        cluster.desire(n)
    states = cluster.wait_running(names, timeout=60)
    time.sleep(0.5)  # let any late, duplicate claim show up if there were one
    rec.close()
    assert set(rec.created) == set(names)
    assert all(c == 1 for c in rec.created.values()), rec.created
    assert not rec.deleted
    hosts = cluster.hosts()
    assert hosts["node1"]["vms"] + hosts["node2"]["vms"] == 50
    per_host = Counter(h for _, h in states.values())
    assert per_host["node1"] == hosts["node1"]["vms"] and per_host["node2"] == hosts["node2"]["vms"]
    # A host record holds the offer, not the use: 50 placements rewrote neither.
    assert {n: cluster.store.get(cluster.keys.host(n)).mod_revision for n in host_revs} == host_revs
    # Each agent's log names each VM it claimed; together exactly once each.
    claimed = Counter()
    for a in cluster.agents:
        for n in names:
            claimed[n] += len(re.findall(rf"^.*vm={n} decision=claim: claimed\b", a.log(), re.M))
    assert all(claimed[n] == 1 for n in names), claimed


def test_claims_respect_capacity_and_pins(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.flavour("fat", 1, 3000)
    cluster.agent("node1", vcpus=2, ram_mb=4096)
    cluster.agent("node2", vcpus=3, ram_mb=4096)
    cluster.wait_hosts("node1", "node2")
    cluster.desire("pinned2", host="node2")
    cluster.desire("nowhere", host="node9")
    for i in range(6):
        cluster.desire(f"v{i}")
    # 5 vcpus in all: pinned2 + 4 of the 6 others run, 2 stay pending.
    wait_for(lambda: sum(s == "running" for s, _ in cluster.states().values()) == 5, 20, what="5 running")
    time.sleep(0.5)
    states = cluster.states()
    assert states["pinned2"] == ("running", "node2")
    assert "nowhere" not in states
    hosts = cluster.hosts()
    assert hosts["node1"]["vcpus_used"] == 2 and hosts["node2"]["vcpus_used"] == 3
    assert len(states) == 5
    # RAM limits too: 'fat' needs 3000 MiB, only node1 has that left after its two 512 MiB VMs? No:
    # node1 has 4096-1024 = 3072 MiB but no vcpu left, so it stays pending.
    cluster.desire("fatvm", flavour="fat")
    time.sleep(1.0)
    assert "fatvm" not in cluster.states()
    # Destroying two VMs frees room: the pending ones get claimed.
    on1 = sorted(v for v, (_, h) in states.items() if h == "node1")
    for v in on1:
        cluster.undesire(v)
    wait_for(lambda: not set(on1) & set(cluster.states()), 10, what="destroyed VMs gone")
    wait_for(lambda: sum(s == "running" for s, _ in cluster.states().values()) == 5, 10, what="pending ones claimed")


def test_destroy_and_stop_start(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("a")
    cluster.desire("b", state="stopped")
    cluster.wait_running(["a"])
    wait_for(lambda: cluster.states().get("b") == ("stopped", "node1"), what="b stopped (defined, not started)")
    # stop a
    cluster.desire("a", state="stopped")
    wait_for(lambda: cluster.states().get("a") == ("stopped", "node1"), what="a stopped")
    # start b
    cluster.desire("b", state="running")
    wait_for(lambda: cluster.states().get("b") == ("running", "node1"), what="b running")
    assert cluster.hosts()["node1"]["vms"] == 2
    # destroy both
    cluster.undesire("a")
    cluster.undesire("b")
    wait_for(lambda: cluster.states() == {}, what="claims removed")
    wait_for(lambda: cluster.hosts()["node1"]["vms"] == 0, what="host use back to 0")
    log = cluster.agents[0].log()
    assert "removed a (desired entry deleted)" in log and "removed b (desired entry deleted)" in log


def test_kill_9_moves_vms_after_ttl(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    names = ["k1", "k2", "k3"]
    for n in names:
        cluster.desire(n)
    cluster.wait_running(names)
    n2 = cluster.agent("node2")
    cluster.wait_hosts("node2")
    assert all(h == "node1" for _, h in cluster.states().values())
    killed_at = time.monotonic()
    n1.signal(signal.SIGKILL)
    n1.wait()
    states = wait_for(lambda: (s := cluster.states()) and all(s.get(n, ("", ""))[1] == "node2"
                                                            and s[n][0] == "running" for n in names) and s,
                      cluster.ttl + 15, what="VMs running on node2")
    took = time.monotonic() - killed_at
    assert took >= cluster.ttl - 1.0, f"moved after {took:.1f}s, before the dead owner's lease could expire"
    assert "node1" not in cluster.hosts()
    assert n2.alive()
    assert set(states) == set(names)


def test_etcd_restart_recovers_without_lost_or_duplicated_vms(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 256)
    cluster.agent("node1", vcpus=32)
    cluster.agent("node2", vcpus=32)
    cluster.wait_hosts("node1", "node2")
    first = [f"e{i}" for i in range(10)]
    for n in first:
        cluster.desire(n)
    cluster.wait_running(first)
    cluster.etcd.stop()
    time.sleep(2.0)
    cluster.etcd.start()
    # Changes made after the restart are seen: the watch was re-created.
    second = [f"f{i}" for i in range(10)]
    for n in second:
        cluster.desire(n)
    cluster.undesire("e0")
    states = cluster.wait_running(first[1:] + second, timeout=40)
    wait_for(lambda: "e0" not in cluster.states(), 20, what="e0 removed")
    time.sleep(1.0)
    states = cluster.states()
    assert set(states) == set(first[1:] + second)
    # host keys follow within a tick or two
    hosts = wait_for(lambda: (h := cluster.hosts()) and set(h) == {"node1", "node2"}
                     and h["node1"]["vms"] + h["node2"]["vms"] == len(states) and h, 10, what="host keys")
    assert set(hosts) == {"node1", "node2"}
    for a in cluster.agents:
        assert a.alive()


def test_malformed_entries_become_errors_and_others_keep_running(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("good1")
    cluster.wait_running(["good1"])
    p = cluster.prefix
    cluster.etcd.etcdctl("put", f"{p}/desired/notjson", "this is {not json")
    cluster.etcd.etcdctl("put", f"{p}/desired/noflavour", '{"flavour": "nosuch"}')
    cluster.etcd.etcdctl("put", f"{p}/desired/Bad_Name", '{"flavour": "small"}')
    cluster.etcd.etcdctl("put", f"{p}/desired/badstate", '{"flavour": "small", "state": "paused"}')
    cluster.desire("good2")
    def errors() -> dict:
        a = cluster.actual()
        return {k: v["reason"] for k, v in a.items() if v["state"] == "error"}
    errs = wait_for(lambda: len(e := errors()) == 4 and e, 15, what="4 error states")
    assert "not valid JSON" in errs["notjson"]
    assert "unknown flavour 'nosuch'" in errs["noflavour"]
    assert "does not match" in errs["Bad_Name"]
    assert "'state' must be" in errs["badstate"]
    cluster.wait_running(["good1", "good2"])
    # Breaking a running VM's entry reports an error but leaves it alone.
    cluster.etcd.etcdctl("put", cluster.keys.desired("good1"), "{broken")  # in its shard: where desire() wrote it
    wait_for(lambda: cluster.states().get("good1", ("",))[0] == "error", what="good1 error")
    assert "good1" in cluster.agents[0].log()
    # Fixing an entry makes it run.
    cluster.etcd.etcdctl("put", f"{p}/desired/noflavour", '{"flavour": "small"}')
    cluster.etcd.etcdctl("put", cluster.keys.desired("good1"), '{"flavour": "small"}')
    cluster.wait_running(["noflavour", "good1", "good2"])
    assert cluster.agents[0].alive()


def test_sigterm_drains_before_handing_over(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    names = ["s1", "s2"]
    for n in names:
        cluster.desire(n)
    cluster.wait_running(names)
    rec = ClaimRecorder(cluster)
    n2 = cluster.agent("node2")
    cluster.wait_hosts("node2")
    n1.signal(signal.SIGTERM)
    assert n1.wait(20) == 0
    log1 = n1.log()
    assert "draining: stopping 2 running domain(s)" in log1
    assert "drained: 2 VM(s) stopped, lease revoked" in log1
    # The lease was revoked, not left to expire: node2 takes over at once.
    states = cluster.wait_running(names, timeout=cluster.ttl)
    assert all(h == "node2" for _, h in states.values())
    rec.close()
    assert all(rec.owners[n] == ["node2"] for n in names)
    assert n2.alive()


def test_second_agent_with_same_name_is_refused(cluster: Cluster) -> None:
    first = cluster.agent("node1")
    cluster.wait_hosts("node1")
    lease_before = cluster.store.get(cluster.keys.host("node1")).lease
    # Same machine (same state_dir): refused at once by the node lock.
    dup = cluster.agent("node1", start=False)
    dup.logpath = cluster.dir / "dup-local.log"
    dup.start()
    assert dup.wait(10) == 3, dup.log()
    assert "is held by a live agent on this machine" in dup.log()
    # Another machine (own state_dir): refused once the registration in etcd stays held.
    other = cluster.agent("node1", start=False)
    other.config.write_text(other.config.read_text().replace("state-node1", "state-elsewhere"))
    other.logpath = cluster.dir / "dup-remote.log"
    other.start()
    assert other.wait(cluster.ttl + 15) == 3, other.log()
    assert "is held by a live agent (lease" in other.log()
    assert first.alive()
    assert cluster.store.get(cluster.keys.host("node1")).lease == lease_before, first.log()


def test_restart_after_kill_within_ttl_adopts_the_lease_and_claims(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.agent("node2")
    cluster.wait_hosts("node1", "node2")
    cluster.desire("r1", host="node1")
    cluster.desire("r2")
    states = cluster.wait_running(["r1", "r2"])
    rec = ClaimRecorder(cluster)
    n1.signal(signal.SIGKILL)
    n1.wait()
    n1.start()  # at once: the lease is still alive
    wait_for(lambda: "adopted lease" in n1.log(), 10, what="lease adopted")
    time.sleep(cluster.ttl + 1.0)  # past the old TTL: had the lease been lost, claims would have moved
    rec.close()
    assert cluster.states() == states  # same owners, still running
    assert not rec.deleted and not rec.owners  # no claim was ever dropped or re-made
    assert n1.alive()


def test_restart_after_the_lease_expired_registers_anew(cluster: Cluster) -> None:
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("r1")
    cluster.wait_running(["r1"])
    n1.signal(signal.SIGKILL)
    n1.wait()
    wait_for(lambda: "node1" not in cluster.hosts(), cluster.ttl + 5, what="old lease expired")
    n1.start()
    wait_for(lambda: cluster.states().get("r1") == ("running", "node1"), 15, what="r1 back")
    assert "adopted lease" not in n1.log()
    assert n1.alive()


def test_sigterm_with_keep_renews_the_lease_on_the_way_out(cluster: Cluster) -> None:
    """on_stop = keep: the stopping agent renews its lease one last time, so
    the next agent has a whole TTL to adopt it, not what was left since the
    keeper's last renewal (up to a third of a TTL less). TTL 30 s: the
    keeper renews at start and then only after about 9 s; the SIGTERM
    comes 4 s after the start."""
    cluster.ttl, cluster.on_stop = 30, "keep"
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    time.sleep(4)
    n1.signal(signal.SIGTERM)
    assert n1.wait() == 0
    m = re.search(r"lease ([0-9a-f]+) stays until ([0-9.]+)s from now", n1.log())
    assert m, n1.log()[-2000:]
    assert float(m.group(2)) > 30 - cluster.etcd_timeout - 1.5, m.group(0)  # 25.5 s without the last renewal
    out = cluster.etcd.etcdctl("lease", "timetolive", m.group(1)).stdout
    remaining = re.search(r"remaining\((\d+)s\)", out)
    assert remaining and int(remaining.group(1)) >= 28, out  # etcd agrees
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log(), 10, what="lease adopted")


def test_bad_config_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_text("[node]\nname = n1\n[agent]\nlease_ttl = 3\n[etcd]\ntimeout = 1\n")
    r = subprocess.run([sys.executable, str(ROOT / "metastack.py"), "-c", str(ini)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "configuration error: [agent] lease_ttl = 3s is too short" in r.stderr


def test_agent_logs_decisions_to_central_rsyslog(cluster: Cluster, tmp_path: Path) -> None:
    from harness import free_port
    rsyslogd = "/usr/sbin/rsyslogd"
    if not Path(rsyslogd).exists():
        pytest.fail("rsyslog is not installed: run bash deploy/setup.sh")
    port = free_port()
    out = tmp_path / "central.log"
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(f'''
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{port}")
$WorkDirectory {tmp_path}
*.* {out}
''')
    proc = subprocess.Popen([rsyslogd, "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslog.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        cluster.flavour("small", 1, 512)
        agent = cluster.agent("node1", start=False)
        agent.config.write_text(agent.config.read_text().replace("syslog = none", f"syslog = udp://127.0.0.1:{port}"))
        agent.start()
        cluster.wait_hosts("node1")
        cluster.desire("logged")
        cluster.wait_running(["logged"])
        text = wait_for(lambda: out.exists() and "claimed logged" in (t := out.read_text()) and t, 10,
                        what="decision line in the central log")
        line = next(l for l in text.splitlines() if "claimed logged" in l)
        assert "metastack[" in line and "node=node1" in line and "acted: claimed logged; started logged" in line
    finally:
        proc.terminate()
        proc.wait(10)


def test_watch_lost_across_compaction_relists(cluster: Cluster) -> None:
    """The agent's watch dies (etcd restarted) while the history it would
    resume from has been compacted: it re-lists and misses nothing."""
    cluster.ttl = 8  # the agent is frozen for a few seconds; its lease must outlive that
    cluster.flavour("small", 1, 512)
    agent = cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("c0")
    cluster.wait_running(["c0"])
    agent.signal(signal.SIGSTOP)
    try:
        # etcd restarts first, so the frozen agent's watch stream is dead and
        # none of the changes below can sit in its socket buffer.
        cluster.etcd.stop()
        cluster.etcd.start()
        cluster.desire("c1")
        cluster.undesire("c0")
        rev = cluster.store.put(cluster.keys.config, b"{}")
        cluster.etcd.etcdctl("compact", str(rev))
    finally:
        agent.signal(signal.SIGCONT)
    wait_for(lambda: cluster.states() == {"c1": ("running", "node1")}, 20, what="c1 running, c0 gone")
    log = agent.log()
    assert "is compacted" in log and "re-listing" in log


def test_frozen_agent_kills_its_stale_copy_when_it_wakes_up(cluster: Cluster) -> None:
    """An agent frozen (SIGSTOP) past its TTL loses its VMs to another node
    (one node's death: failed over at once); when it thaws it kills its
    stale copy and never takes the VM back."""
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("z1")
    cluster.wait_running(["z1"])
    n2 = cluster.agent("node2")
    cluster.wait_hosts("node2")
    n1.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: cluster.states().get("z1") == ("running", "node2"), cluster.ttl + 15, what="z1 on node2")
    finally:
        mark = len(n1.log())
        n1.signal(signal.SIGCONT)
    wait_for(lambda: "killed local domain z1 (claimed by node2)" in n1.log()[mark:], 10, what="node1 kills z1")
    wait_for(lambda: "node1" in cluster.hosts(), 10, what="node1 re-registered")
    time.sleep(1.0)
    assert "claimed z1" not in n1.log()[mark:]  # it never took the VM back
    assert cluster.states()["z1"] == ("running", "node2")
    assert cluster.hosts()["node1"]["vms"] == 0
    assert n1.alive() and n2.alive()


def test_etcd_freeze_of_3_ttl_keeps_every_vm_where_it_runs(cluster: Cluster) -> None:
    """Finding 2: etcd frozen (SIGSTOP) for 3 x TTL expires every lease at
    once. That is a correlated loss, not a death: the owner re-claims its
    running VMs without stopping them, and the idle node takes none."""
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    names = ["o1", "o2"]
    for n in names:
        cluster.desire(n)
    cluster.wait_running(names)
    n2 = cluster.agent("node2")
    cluster.wait_hosts("node2")
    mark1, mark2 = len(n1.log()), len(n2.log())
    assert cluster.etcd.proc is not None
    cluster.etcd.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3 * cluster.ttl)
    finally:
        cluster.etcd.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "re-registered with a new lease" in n1.log()[mark1:], 15, what="node1 re-registers")
    wait_for(lambda: cluster.states() == {n: ("running", "node1") for n in names}, 15, what="re-claimed on node1")
    time.sleep(2 * cluster.ttl + 1)  # past the grace: still nothing moves
    assert cluster.states() == {n: ("running", "node1") for n in names}
    after1, after2 = n1.log()[mark1:], n2.log()[mark2:]
    assert "powered off" not in after1 and "started o" not in after1, after1
    assert "claimed o1, running o1" in after1 and "claimed o2, running o2" in after1
    assert "claimed o" not in after2, after2
    assert n1.alive(), n1.log()[-3000:]
    assert n2.alive(), n2.log()[-3000:]


def test_keeper_renews_only_while_the_main_loop_beats(store) -> None:
    """Finding 5: a stuck main loop must lose its lease. A keeper whose loop
    stopped beating sends no renewal and etcd expires the lease."""
    lease = store.grant_lease(2)
    beat = [time.monotonic()]
    keeper = ms.LeaseKeeper(store, lease, 2, 0.5, lambda: None, lambda: beat[0], stall_limit=0.6)
    keeper.start()
    try:
        for _ in range(8):  # 4 s of beats: the lease lives
            beat[0] = time.monotonic()
            time.sleep(0.5)
        assert store.lease_ttl(lease)[0] > 0
        time.sleep(4.5)  # no beats: no renewals
        assert keeper.stalled
        assert store.lease_ttl(lease)[0] <= 0
    finally:
        keeper.stop()


def test_a_dead_lease_is_reported_as_lost_not_as_etcd_down(store) -> None:
    """Finding 4: "lease not found" is its own error."""
    lease = store.grant_lease(5)
    store.revoke_lease(lease)
    with pytest.raises(ms.LeaseNotFound):
        store.put(store.keys.host("x"), b"{}", lease)
    assert store.refresh_lease(lease) == 0


def test_adoption_keeps_the_granted_ttl(cluster: Cluster) -> None:
    """Finding 4: restarted with another lease_ttl, the agent adopts its
    lease and renews it by the TTL etcd granted: no lapse, nothing moves."""
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("t1")
    cluster.wait_running(["t1"])
    n1.signal(signal.SIGKILL)
    n1.wait()
    n1.config.write_text(n1.config.read_text().replace(f"lease_ttl = {cluster.ttl}", "lease_ttl = 9"))
    before = cluster.store.get(cluster.keys.host("node1"))
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log(), 10, what="adoption")
    assert f"was granted {cluster.ttl}s, not the configured 9s" in n1.log()
    time.sleep(2 * cluster.ttl)
    after = cluster.store.get(cluster.keys.host("node1"))
    assert before is not None and after is not None and after.lease == before.lease
    assert cluster.states()["t1"] == ("running", "node1")


def test_vm_history_is_recorded_by_the_agent_that_acted(cluster: Cluster) -> None:
    """Each VM's life events go to events/<vm>/ under the acting agent's
    own lease (bounded in age), and metastackctl events lists them."""
    from click.testing import CliRunner
    from metastackctl import cli
    cluster.flavour("small", 1, 512)
    cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("h1")
    cluster.wait_running(["h1"])
    cluster.desire("h1", state="stopped")
    wait_for(lambda: cluster.states()["h1"][0] == "stopped", what="h1 stopped")
    cluster.undesire("h1")
    wait_for(lambda: "h1" not in cluster.states(), what="h1 removed")

    def history() -> list[str]:
        r = CliRunner().invoke(cli, ["--endpoints", cluster.etcd.endpoint, "--prefix", cluster.prefix,
                                     "events", "h1", "-o", "json"])
        assert r.exit_code == 0, r.output
        return [e["event"] for e in json.loads(r.stdout) if e["node"] == "node1" and e["vm"] == "h1"]
    wait_for(lambda: history() == ["claimed", "started", "stopped", "removed"], 10, what="h1's history")
    _, entries = cluster.store.list_prefix(cluster.keys.events("h1"))
    lease = next(iter(entries.values())).lease
    assert lease and 0 < cluster.store.lease_ttl(lease)[1] <= 3600


def test_a_re_created_desired_key_with_a_uuid_keeps_its_vm(cluster: Cluster) -> None:
    """Finding 7: identity lives in the value. A tool re-creates the desired
    keys while the agent is restarting (new create_revision, same uuid); the
    agent adopts its lease and claims, and must not destroy the VM. Without a
    uuid the key's revision is the identity, so there it makes a new VM."""
    cluster.flavour("small", 1, 512)
    n1 = cluster.agent("node1")
    cluster.wait_hosts("node1")
    cluster.desire("keep1", uuid="0b3c4d5e-1234-4abc-8def-0123456789ab")
    cluster.desire("anon1")
    cluster.wait_running(["keep1", "anon1"])
    before = cluster.store.get(cluster.keys.actual("keep1"))
    n1.signal(signal.SIGKILL)
    n1.wait()
    for vm in ("keep1", "anon1"):
        key = cluster.keys.desired(vm)
        value = cluster.store.get(key).value
        cluster.store.delete(key)
        cluster.store.put(key, value)
    mark = len(n1.log())
    n1.start()
    wait_for(lambda: "adopted lease" in n1.log()[mark:], 10, what="adoption")
    wait_for(lambda: "removed anon1" in n1.log()[mark:], 10, what="the uuid-less VM re-created")
    cluster.wait_running(["keep1", "anon1"])
    time.sleep(1.0)
    after = cluster.store.get(cluster.keys.actual("keep1"))
    assert "removed keep1" not in n1.log()[mark:]
    assert after is not None and after.create_revision == before.create_revision  # the same claim, kept


def test_a_backup_whose_view_lags_reads_the_claim_instead_of_racing(cluster: Cluster,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An agent reads its watch late (starved of CPU; here its watch is
    cancelled) and its backup turn comes for a VM that the chosen node has
    claimed meanwhile: it reads the claim from etcd, folds it into its view
    and writes nothing, instead of losing a claim race. The agent runs in
    this process, its ticks driven by the test."""
    cluster.flavour("small", 1, 1024)
    proc = cluster.agent("n1", start=False)  # its ini only
    proc.config.write_text(proc.config.read_text().replace(
        "[agent]\n", "[agent]\nclaim_step = 0.3\n").replace("resync_interval = 10", "resync_interval = 300"))
    agent = ms.Agent(ms.load_config(str(proc.config)))
    agent.start()
    lease = cluster.store.grant_lease(30)
    try:
        # a second node, registered by hand: its host record on its own lease
        other = ms.HostState(8, 16384)
        cluster.store.put(cluster.keys.host("n2"), other.encode(), lease)
        wait_for(lambda: agent.view.entry(cluster.keys.host("n2")) is not None, 10, what="n1 sees n2")
        snap = agent.view.snapshot()
        vm = next(f"v{i}" for i in range(100) if ms.Placement(dataclasses.replace(
            snap, desired={f"v{i}": ms.DesiredVM(f"v{i}", "small", generation=1)})).assign().get(f"v{i}") == "n2")
        cluster.desire(vm)
        wait_for(lambda: agent.view.entry(cluster.keys.desired(vm)) is not None, 10, what=f"n1 sees {vm}")
        agent.tick()  # n2's turn first: n1, a backup, waits a step
        assert agent.turns.last_chosen.get(vm) == "n2"
        assert agent.view.entry(cluster.keys.actual(vm)) is None
        agent._watch_cancel()  # from now on n1's view lags
        claim = ms.ActualVM(host="n2", state="starting", vcpus=1, ram_mb=1024)
        rev, _ = cluster.store.create(cluster.keys.actual(vm), claim.encode(), lease)
        assert rev is not None
        time.sleep(0.5)  # past n1's turn
        with caplog.at_level("INFO", logger=ms.log.name):
            agent.tick()
        assert agent.executor.races_lost == 0
        assert f"vm={vm} backup turn: claimed by n2 meanwhile" in caplog.text
        entry = agent.view.entry(cluster.keys.actual(vm))
        assert entry is not None and ms.ActualVM.parse(entry.value).host == "n2"
        assert cluster.store.get(cluster.keys.actual(vm)).mod_revision == rev  # n1 wrote nothing
    finally:
        agent.leave_running()
        cluster.store.revoke_lease(lease)


def _in_process_agent(cluster: Cluster, name: str) -> ms.Agent:
    """An agent run in this process, its ticks driven by the test (no loop)."""
    proc = cluster.agent(name, start=False)  # its ini only
    proc.config.write_text(proc.config.read_text().replace(
        "[agent]\n", "[agent]\nclaim_step = 0.3\n").replace("resync_interval = 10", "resync_interval = 300"))
    agent = ms.Agent(ms.load_config(str(proc.config)))
    agent.start()
    return agent


def _placed_on(snap: ms.Snapshot, node: str) -> str:
    """A VM name that the placement gives to ``node`` in ``snap``."""
    return next(f"v{i}" for i in range(200) if ms.Placement(dataclasses.replace(
        snap, desired={f"v{i}": ms.DesiredVM(f"v{i}", "small", generation=1)})).assign().get(f"v{i}") == node)


def test_another_nodes_claim_where_the_placement_put_it_is_no_news(cluster: Cluster) -> None:
    """While work waits, another node's claim wakes an agent only when it
    went elsewhere than this agent's placement said: a claim as placed
    changes nothing this agent would decide (it no longer looks again for
    each of them in a burst)."""
    cluster.flavour("small", 1, 1024)
    agent = _in_process_agent(cluster, "n1")
    lease = cluster.store.grant_lease(30)
    try:
        cluster.store.put(cluster.keys.host("n2"), ms.HostState(8, 16384).encode(), lease)
        wait_for(lambda: agent.view.entry(cluster.keys.host("n2")) is not None, 10, what="n1 sees n2")
        snap = agent.view.snapshot()
        as_placed = _placed_on(snap, "n2")
        elsewhere = "pinned"
        cluster.desire(as_placed)
        cluster.desire(elsewhere, host="n1")  # pinned to n1: placed there whatever else waits
        cluster.desire("waits", host="nowhere")  # never claimed: work keeps waiting
        for vm in (as_placed, elsewhere, "waits"):
            wait_for(lambda vm=vm: agent.view.entry(cluster.keys.desired(vm)) is not None, 10, what=f"n1 sees {vm}")
        agent._next_turn = None
        agent.turns.due(agent.view.snapshot(), "spread", (), time.monotonic())
        assert agent.turns.last_chosen.get(as_placed) == "n2" and agent.turns.last_chosen.get(elsewhere) == "n1"
        concerns = {}
        for vm in (as_placed, elsewhere):
            key = cluster.keys.actual(vm)
            rev, _ = cluster.store.create(key, ms.ActualVM(host="n2", state="starting", vcpus=1,
                                                           ram_mb=1024).encode(), lease)
            assert rev is not None
            wait_for(lambda key=key: agent.view.entry(key) is not None, 10, what=f"n1 sees the claim of {vm}")
            concerns[vm] = agent._concerns_us(ms.Change(key, None, agent.view.entry(key)))
        assert concerns == {as_placed: agent.NOT_NEWS, elsewhere: agent.NEW_WORK}
    finally:
        agent.leave_running()
        cluster.store.revoke_lease(lease)


def test_our_own_writes_and_starts_wake_no_second_reconcile(cluster: Cluster) -> None:
    """Placing a VM costs its owner one reconcile: the echoes of its own
    claim and state writes (on its own lease: nobody else writes there)
    and the libvirt events of its own start are no news. A write on its
    claim's key by anyone else, or its deletion, is."""
    cluster.flavour("small", 1, 1024)
    agent = _in_process_agent(cluster, "n1")
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    try:
        wait_for(lambda: agent.ticks > 0, 10, what="the first reconcile")
        time.sleep(1.0)
        before = (agent.ticks, dict(agent.tick_causes))
        cluster.desire("solo")
        wait_for(lambda: (e := agent.view.entry(cluster.keys.actual("solo"))) is not None
                 and ms.ActualVM.parse(e.value).state == "running", 10, what="solo runs")
        time.sleep(1.5)  # the echoes and the libvirt events have come
        news = agent.tick_causes.get("news", 0) - before[1].get("news", 0)
        work = agent.tick_causes.get("work", 0) - before[1].get("work", 0)
        assert (news, work, agent.ticks - before[0]) == (0, 1, 1)
        key, lease = cluster.keys.actual("solo"), agent._keeper.lease_id
        mine = agent.view.entry(key)
        assert mine is not None and mine.lease == lease
        assert agent._concerns_us(ms.Change(key, None, mine)) == agent.NOT_NEWS
        assert agent._concerns_us(ms.Change(key, mine, mine)) == agent.NOT_NEWS
        by_hand = ms.Entry(mine.value, mine.mod_revision + 1, 0, mine.create_revision)
        assert agent._concerns_us(ms.Change(key, mine, by_hand)) == agent.NEWS
        assert agent._concerns_us(ms.Change(key, mine, None)) == agent.NEWS
    finally:
        agent.request_stop()
        loop.join(15)


def test_a_claim_turn_coming_is_a_look_not_a_reconcile(cluster: Cluster) -> None:
    """The timer of this node's next claim turn ends the agent's wait with a
    look (cheap: from the view's index), not a full reconcile; a reconcile
    follows only when the look finds work of ours."""
    agent = _in_process_agent(cluster, "n1")
    try:
        agent.tick()  # the first reconcile: nothing is due after it for IDLE_TICK seconds
        agent._ticked_at = time.monotonic()  # as the loop notes after each reconcile
        agent._quiet_until = 0.0
        agent._next_turn = time.monotonic() + 0.2
        started = time.monotonic()
        assert agent._pause(0) == "look"
        assert time.monotonic() - started >= 0.15  # it waited for the turn, not less
        agent._next_turn = None
        started = time.monotonic()
        agent._look_now = True  # new work for a node first in line, as _on_events asks
        agent._waker.wake()
        assert agent._pause(0) == "look"
        assert time.monotonic() - started < 0.15
    finally:
        agent.leave_running()


def test_new_work_is_looked_at_once_only_by_the_nodes_first_in_line(cluster: Cluster) -> None:
    """A VM arrives: a node that its last look's forecast puts first in line
    for the next arrivals looks at once; any other node looks once,
    LOOK_LATER after its last look, however many VMs arrive meanwhile."""
    cluster.flavour("small", 1, 512)
    agent = _in_process_agent(cluster, "n1")
    try:
        agent.tick()
        agent._ticked_at = time.monotonic()
        agent._quiet_until = 0.0
        agent._next_turn = None
        # not first in line (the forecast of its last look): the look waits
        agent.turns.expected = frozenset({"n2"})
        agent._looked_at = time.monotonic()
        for vm in ("a1", "a2", "a3"):
            cluster.desire(vm, host="elsewhere")  # pinned to a node that is not there: nobody claims them
        wait_for(lambda: agent.view.entry(cluster.keys.desired("a3")) is not None, 10, what="n1 sees a3")
        assert agent._look_at is not None and not agent._look_now
        assert agent._look_at >= agent._looked_at + agent.LOOK_LATER - 1e-6
        outcomes = []
        while "look" not in outcomes and time.monotonic() < agent._looked_at + 5:
            outcomes.append(agent._pause(0))
        assert outcomes[-1] == "look" and dict(agent.look_causes) == {"later": 1}, (outcomes, agent.look_causes)
        assert time.monotonic() >= agent._looked_at + agent.LOOK_LATER
        # first in line: a look at once
        agent._look_at, agent._looked_at = None, time.monotonic()
        agent.turns.expected = frozenset({"n1", "n2"})
        cluster.desire("b1", host="elsewhere")
        wait_for(lambda: agent._look_now, 10, what="n1 asked to look at once")
        started = time.monotonic()
        assert agent._pause(0) == "look" and agent.look_causes["work"] == 1
        assert time.monotonic() - started < agent.LOOK_LATER
    finally:
        agent.leave_running()


def test_a_lost_lease_re_claims_the_running_vm_at_once_without_news(cluster: Cluster) -> None:
    """etcd expires the agent's lease (as after a freeze of 3 x TTL) and,
    once the agent has re-registered and re-listed, no watch event comes
    to wake it (the other nodes re-registered before its re-list): it must
    still re-claim the VM running here at once, within its grace, not wait
    for a timer (the re-list's, 10 s here). The agent's own loop runs in a
    thread of this process."""
    cluster.flavour("small", 1, 512)
    proc = cluster.agent("n1", start=False)  # its ini only
    agent = ms.Agent(ms.load_config(str(proc.config)))
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    try:
        cluster.wait_hosts("n1")
        cluster.desire("r1")
        cluster.wait_running(["r1"])
        before = cluster.store.get(cluster.keys.actual("r1"))
        assert before is not None
        old = agent.lease_id
        # As in the freeze: the agent's watch had ended (a re-watch that met
        # the frozen etcd), so only its keeper learns of the loss and no event
        # of the re-listed keys comes afterwards.
        cancel, agent._watch_cancel = agent._watch_cancel, None
        assert cancel is not None
        cancel()
        cluster.store.revoke_lease(old)  # etcd expires the lease: its claim and host record go with it
        wait_for(lambda: agent._keeper is not None and agent.lease_id != old, 10, what="n1 re-registers")
        lost = time.monotonic()
        wait_for(lambda: cluster.store.get(cluster.keys.actual("r1")) is not None, 8, interval=0.02,
                 what="r1 re-claimed")
        took = time.monotonic() - lost
        # at once, well within the grace (the re-claim used to wait for it to end)
        assert took < agent.cfg.grace / 2, f"re-claimed {took:.1f}s after re-registering (grace {agent.cfg.grace:.0f}s)"
        assert cluster.states() == {"r1": ("running", "n1")}
        assert agent.hv.domains() == {"r1": "running"}  # never stopped
    finally:
        agent.request_stop()
        loop.join(15)


def test_the_idle_reconcile_comes_though_each_wait_is_cut_short_for_the_beat(cluster: Cluster) -> None:
    """Nothing wakes the agent: a reconcile still comes IDLE_TICK seconds
    after the last one (level-triggered repair), although every wait ends
    after stall_limit / 2 seconds (here under 1 s) for the loop's beat:
    the idle period counts from the last reconcile, not from each wait."""
    agent = _in_process_agent(cluster, "n1")
    try:
        assert agent.cfg.stall_limit / 2 < agent.IDLE_TICK
        agent.tick()
        agent._ticked_at = time.monotonic()  # as the loop notes after each reconcile
        agent._full_due = False
        agent._quiet_until = 0.0
        ended = agent._ticked_at
        for later in (1.0, 3.0, 4.5):  # the loop beats: each wait asks again when the reconcile is due
            assert agent._next_tick(0, ended + later) == pytest.approx(ended + agent.IDLE_TICK, abs=0.05)
        outcomes = []
        while time.monotonic() - ended < agent.IDLE_TICK + 2 and "tick" not in outcomes:
            outcomes.append(agent._pause(0))
        assert "tick" in outcomes and outcomes.count("") >= 1, outcomes  # the beat's waits came before it
    finally:
        agent.leave_running()


def test_the_watchdog_acts_before_the_lease_can_lapse_though_the_last_renewal_came_before_the_last_beat(
        cluster: Cluster) -> None:
    """A SIGSTOP freezes the keeper with the main loop, so the lease's last
    renewal may have come up to a renew interval before the last beat: the
    deadline fed to the watchdog must then follow the lease's end, not the
    beat's (a CI run saw the watchdog 76 ms too late). While renewals fail
    (etcd trouble) only the beat counts: a live agent keeps its guests."""
    agent = _in_process_agent(cluster, "n1")
    try:
        keeper = agent._keeper
        assert keeper is not None
        keeper.stop()
        keeper.join(5)
        agent.beat()
        keeper.confirmed = agent._beat_at - agent.cfg.renew_interval  # renewed just after the previous beat
        lapse = keeper.confirmed + keeper.ttl  # the earliest moment etcd may expire the lease
        assert agent._beat_at + agent.cfg.watchdog_delay > lapse - ms.WATCHDOG_ALLOWANCE  # the beat alone is late
        deadline = agent.watchdog_deadline()
        assert deadline <= lapse - ms.WATCHDOG_ALLOWANCE
        # never before the keeper would have stopped renewing of its own accord
        assert deadline > agent._beat_at + agent.cfg.stall_limit
        keeper.failing = True
        assert agent.watchdog_deadline() == agent._beat_at + agent.cfg.watchdog_delay
    finally:
        agent.leave_running()


def test_the_watchdog_feed_writes_every_earlier_deadline_and_rate_limits_later_ones(tmp_path: Path) -> None:
    """Rate limiting may only make the watchdog wait less, never more."""
    feed = ms.WatchdogFeed(str(tmp_path), "n1")
    feed.feed(100.0)
    assert ms.WatchdogFeed.read(feed.path)[0] == 100.0
    feed.feed(99.95)  # earlier by 50 ms: written
    assert ms.WatchdogFeed.read(feed.path)[0] == 99.95
    feed.feed(100.05)  # later by 100 ms: not worth a write
    assert ms.WatchdogFeed.read(feed.path)[0] == 99.95
    feed.feed(100.2)
    assert ms.WatchdogFeed.read(feed.path)[0] == 100.2
    feed.feed(100.3, force=True)
    assert ms.WatchdogFeed.read(feed.path)[0] == 100.3


def test_a_reconcile_places_from_the_index_as_it_would_from_the_whole_snapshot(cluster: Cluster) -> None:
    """A reconcile asks whose turn each unclaimed VM is from the view's
    index (O(unclaimed + hosts)) rather than from every claim: it must
    place exactly as Placement over the whole snapshot would, with claims
    of this node and another, and VMs waiting."""
    cluster.flavour("small", 1, 1024)
    cluster.flavour("big", 4, 4096)
    agent = _in_process_agent(cluster, "n1")
    lease = cluster.store.grant_lease(30)
    try:
        cluster.store.put(cluster.keys.host("n2"), ms.HostState(8, 16384).encode(), lease)
        for i in range(3):  # n2's claims reserve part of it
            cluster.desire(f"old{i}", flavour="big" if i == 0 else "small")
            cluster.store.put(cluster.keys.actual(f"old{i}"), ms.ActualVM(
                "n2", "running", vcpus=4 if i == 0 else 1, ram_mb=4096 if i == 0 else 1024).encode(), lease)
        for i in range(6):
            cluster.desire(f"new{i}", flavour="big" if i % 2 else "small", host="nowhere" if i == 5 else None)
        wait_for(lambda: len(agent.view.unclaimed()) == 6 and agent.view.entry(cluster.keys.actual("old2")),
                 10, what="n1 sees every key")
        snap = agent.view.snapshot()
        assert not snap.untrusted and len(snap.actual) == 3
        fresh = ms.ClaimTurns("n1", agent.cfg.claim_step)
        expect = fresh.due(snap, "spread", (), time.monotonic())
        got = agent._turns_due(snap, ())
        assert agent.turns.last_chosen == fresh.last_chosen and len(fresh.last_chosen) >= 3
        assert got[0] == expect[0] and agent.turns.expected == fresh.expected
    finally:
        agent.leave_running()
        cluster.store.revoke_lease(lease)


def test_how_a_domain_stopped_is_libvirts_own_record_not_the_last_event(tmp_path: Path) -> None:
    """The reason a restarted VM reports is read from libvirt when the agent
    decides to restart it, so a "shut down" event that arrived before its
    "stopped (destroyed)" (QEMU killed by the host) cannot stand in for it."""
    from harness import node_xml
    hv = ms.Hypervisor(f"test://{node_xml(tmp_path / 'n1.xml', 4, 4096)}", "n1", "test")
    try:
        spec = ms.DomainSpec(vm="a", node="n1", domain_type="test", vcpus=1, ram_mb=64, flavour="f")
        assert hv.how_stopped("a") == "it stopped"  # no domain, no event: nothing to tell
        assert hv.ensure_running(spec)
        hv.last_event["a"] = "shut down"  # the early event a host kill sends
        hv.power_off("a")
        assert hv.domains() == {"a": "stopped"}
        assert hv.how_stopped("a") == "stopped (destroyed)"
        assert hv.ensure_running(spec)
        assert hv.request_shutdown("a")
        assert hv.how_stopped("a") == "stopped (guest shutdown)"
    finally:
        hv.close()


def test_events_of_our_own_define_and_start_wake_nobody_others_do(tmp_path: Path) -> None:
    """The "defined" and "started" events that the agent's own start of a
    domain causes are not passed on (the reconcile that started it knows;
    each would wake another full reconcile on every start); a stop, and a
    start behind the agent's back, are. libvirt's test driver sends the
    events."""
    from harness import node_xml
    seen: list[tuple[str, str]] = []
    hv = ms.Hypervisor(f"test://{node_xml(tmp_path / 'n1.xml', 4, 4096)}", "n1", "test",
                       on_event=lambda vm, what: seen.append((vm, what)))
    try:
        spec = ms.DomainSpec(vm="a", node="n1", domain_type="test", vcpus=1, ram_mb=64, flavour="f")

        def events_for(seconds: float) -> list[tuple[str, str]]:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)
            out = list(seen)
            seen.clear()
            return out

        assert hv.ensure_running(spec)
        assert events_for(1.0) == []
        hv.power_off("a")
        assert events_for(1.0) == [("a", "stopped (destroyed)")]
        hv._lookup("a").create()  # behind the agent's back (virsh start)
        assert events_for(1.0) == [("a", "started")]
        hv.power_off("a")
        assert hv.ensure_running(spec)  # a restart of ours: quiet again
        assert events_for(1.0) == [("a", "stopped (destroyed)")]
    finally:
        hv.close()


def test_the_starts_of_one_ticks_claims_overlap_and_one_failing_start_stays_its_own(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four VMs claimed in one tick start together (as a node taking over a
    failed node's VMs must: one by one, each boot adds to the failover),
    each start still a real libvirt call, each publication the agent's;
    a fifth whose start fails (a domain of that name exists and is not
    MetaStack's) gets its error reported alone, and the others run; its
    failed starts count towards giving it up, though each preparation
    before them succeeds. The
    agent's own loop runs in a thread of this process; its libvirt starts
    are timed by a wrapper that only counts how many run at once."""
    cluster.flavour("small", 1, 256)
    vms = [f"p{i}" for i in range(5)]
    for vm in vms:
        cluster.desire(vm)
    proc = cluster.agent("n1", start=False)  # its ini only
    agent = ms.Agent(ms.load_config(str(proc.config)))
    agent.hv._conn.defineXML(  # not MetaStack's: no metadata naming the node
        "<domain type='test'><name>p4.n1</name><memory>65536</memory><os><type>hvm</type></os></domain>")
    lock, now, most = threading.Lock(), [0], [0]
    real = agent.hv.ensure_running

    def counted(spec: ms.DomainSpec) -> bool:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.3)  # as long as a slow boot: the starts have time to meet
            return real(spec)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(agent.hv, "ensure_running", counted)
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    try:
        cluster.wait_running(vms[:4])
        wait_for(lambda: cluster.actual().get("p4", {}).get("state") == "error", 20, what="p4's error")
        assert most[0] >= 2, f"at most {most[0]} start(s) at once"
        assert "not MetaStack's" in cluster.actual()["p4"]["reason"]
        # each failed start counts: after MAX_TRIES of them the node gives p4 up
        wait_for(lambda: "p4" in agent.executor.gave_up, 20, what="n1 gives p4 up")
        assert agent.hv.domains() == {vm: "running" for vm in vms[:4]}
        assert {vm: (a["state"], a["host"]) for vm, a in cluster.actual().items() if vm != "p4"} == {
            vm: ("running", "n1") for vm in vms[:4]}
    finally:
        agent.request_stop()
        loop.join(15)
