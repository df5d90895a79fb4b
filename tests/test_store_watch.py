"""The store's watch on a real etcd, over both transports: etcd's JSON
gateway (``JsonWatch``, the default where etcd authenticates by token or
not at all) and gRPC (python-etcd3; a client-certificate identity). Same
contract for both: events in revision order with values, leases and
revisions; deletes with no value; RevisionCompacted for a compacted start;
``on_error`` once when etcd goes away; nothing after ``cancel()``. The
JSON watch also hands responses that waited in the socket to the handler
in one call (a busy agent coalesces them). TLS and etcd users over the JSON
gateway are in tests/test_etcd_security.py.
"""
from __future__ import annotations

import configparser
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

import metastack as ms
from harness import EtcdMembers, EtcdServer, wait_for


class Seen:
    """What a watch delivered: the calls (revision, events) and the errors."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[ms.KeyEvent]]] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def on_events(self, revision: int, events: list[ms.KeyEvent]) -> None:
        with self.lock:
            self.calls.append((revision, events))

    def on_error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)

    def events(self) -> list[ms.KeyEvent]:
        with self.lock:
            return [e for _, evs in self.calls for e in evs]


def make_store(etcd: EtcdServer, prefix: str, watch: str) -> ms.Store:
    return ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix=prefix, timeout=2.0,
                                  watch=watch))


@pytest.fixture(params=["json", "grpc"])
def wstore(request: pytest.FixtureRequest, etcd: EtcdServer, prefix: str) -> Iterator[ms.Store]:
    s = make_store(etcd, prefix, request.param)
    assert s.watch_transport == request.param
    yield s
    s.close()


def test_watch_delivers_puts_deletes_and_leases_in_order(wstore: ms.Store, prefix: str) -> None:
    rev = wstore.put(f"{prefix}/a", b"1")
    seen = Seen()
    cancel = wstore.watch_prefix(f"{prefix}/", rev + 1, seen.on_events, seen.on_error)
    try:
        lease = wstore.grant_lease(10)
        r1 = wstore.put(f"{prefix}/b", b"two", lease=lease)
        wstore.put(f"{prefix}X", b"outside the prefix")
        r2 = wstore.put(f"{prefix}/a", b"\x00\xffbinary")
        assert wstore.delete(f"{prefix}/b")
        wait_for(lambda: len(seen.events()) >= 3, 5, what="three events")
        time.sleep(0.2)
        evs = seen.events()
        assert [(e.key, e.value) for e in evs] == [(f"{prefix}/b", b"two"), (f"{prefix}/a", b"\x00\xffbinary"),
                                                   (f"{prefix}/b", None)]
        assert evs[0].lease == lease and evs[0].mod_revision == r1 and evs[0].create_revision == r1
        assert evs[1].mod_revision == r2 and evs[1].create_revision == rev
        assert [e.mod_revision for e in evs] == sorted(e.mod_revision for e in evs)
        assert seen.calls[-1][0] >= evs[-1].mod_revision  # the header revision covers what it carries
        assert seen.errors == []
    finally:
        cancel()
    wstore.put(f"{prefix}/after-cancel", b"x")
    time.sleep(0.3)
    assert all(e.key != f"{prefix}/after-cancel" for e in seen.events())
    assert seen.errors == []


def test_the_agents_range_lists_and_watches_everything_but_the_side_folder(wstore: ms.Store, prefix: str) -> None:
    """An agent's list and watch (``[keys.all, keys.watched_end)``) hold
    every kind of record, and none of the history and console tails that
    live in the side folder (keys.dir of events and console)."""
    keys = ms.Keys(prefix)
    wanted = [keys.desired("vm1"), keys.actual("vm1"), keys.host("n1"), keys.flavour("small"), keys.image("deb"),
              keys.fence("n2"), keys.node("n1"), keys.move("vm1"), keys.group_guard("g", "n1"), keys.config]
    side = [keys.console("vm1"), keys.event("vm1", 1, "n1"), keys.events("vm2") + "x"]
    assert all(k < keys.watched_end for k in wanted) and all(k >= keys.watched_end for k in side)
    for key in wanted[:3] + side[:1]:
        wstore.put(key, b"{}")
    rev, listed = wstore.list_prefix(keys.all, until=keys.watched_end)
    assert sorted(listed) == sorted(wanted[:3])
    seen = Seen()
    cancel = wstore.watch_prefix(keys.all, rev + 1, seen.on_events, seen.on_error, until=keys.watched_end)
    try:
        for key in side + wanted:
            wstore.put(key, b"{}")
        wait_for(lambda: len(seen.events()) >= len(wanted), 5, what="the wanted keys' events")
        time.sleep(0.2)
        assert [e.key for e in seen.events()] == wanted
        assert seen.errors == []
    finally:
        cancel()
    _, everything = wstore.list_prefix(keys.all)
    assert set(side) <= set(everything)  # readers of the whole prefix (web, metastackctl) still see them


def test_watch_from_a_compacted_revision_says_so(wstore: ms.Store, etcd: EtcdServer, prefix: str) -> None:
    first = wstore.put(f"{prefix}/c", b"0")
    for i in range(3):
        last = wstore.put(f"{prefix}/c", str(i).encode())
    etcd.etcdctl("compact", str(last))
    seen = Seen()
    try:
        cancel = wstore.watch_prefix(f"{prefix}/", first, seen.on_events, seen.on_error)
    except ms.RevisionCompacted as exc:  # the contract allows either way
        assert str(last) in str(exc)
        return
    try:
        wait_for(lambda: seen.errors, 5, what="the compaction to be reported")
        assert isinstance(seen.errors[0], ms.RevisionCompacted), seen.errors
        assert str(last) in str(seen.errors[0])
    finally:
        cancel()


def test_json_watch_hands_waiting_responses_over_in_one_call(etcd: EtcdServer, prefix: str) -> None:
    """While the handler is busy, responses wait in the socket; the next
    call carries all of them (with the gRPC watch it would be one call per
    response)."""
    s = make_store(etcd, prefix, "json")
    release = threading.Event()
    seen = Seen()

    def slow(revision: int, events: list[ms.KeyEvent]) -> None:
        seen.on_events(revision, events)
        release.wait(10)

    rev = s.put(f"{prefix}/start", b"0")
    cancel = s.watch_prefix(f"{prefix}/", rev + 1, slow, seen.on_error)
    try:
        revs = [s.put(f"{prefix}/k{i}", b"v") for i in range(20)]
        wait_for(lambda: seen.calls, 5, what="the first call")
        time.sleep(0.3)  # the other 19 responses are in the socket by now
        release.set()
        wait_for(lambda: len(seen.events()) == 20, 5, what="all 20 events")
        assert [e.mod_revision for e in seen.events()] == revs
        assert len(seen.calls) < 20, [len(evs) for _, evs in seen.calls]
        assert max(len(evs) for _, evs in seen.calls[1:]) >= 2
        assert seen.calls[-1][0] == revs[-1]
    finally:
        cancel()
        s.close()


def test_json_watch_reports_etcd_going_away_once(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path)
    server.start()
    try:
        s = make_store(server, "/gone", "json")
        rev = s.put("/gone/a", b"1")
        seen = Seen()
        s.watch_prefix("/gone/", rev + 1, seen.on_events, seen.on_error)
        server.stop()
        wait_for(lambda: seen.errors, 5, what="the watch's end to be reported")
        time.sleep(0.3)
        assert len(seen.errors) == 1 and isinstance(seen.errors[0], ms.StoreUnavailable), seen.errors
        with pytest.raises(ms.StoreUnavailable, match="no member answered"):
            s.watch_prefix("/gone/", rev + 1, seen.on_events, seen.on_error)
        s.close()
    finally:
        server.stop()


def test_json_watch_handler_failure_ends_the_watch_visibly(etcd: EtcdServer, prefix: str) -> None:
    s = make_store(etcd, prefix, "json")
    seen = Seen()

    def broken(_r: int, _e: list[ms.KeyEvent]) -> None:
        raise RuntimeError("bug in the handler")

    rev = s.put(f"{prefix}/a", b"1")
    cancel = s.watch_prefix(f"{prefix}/", rev + 1, broken, seen.on_error)
    try:
        s.put(f"{prefix}/b", b"2")
        wait_for(lambda: seen.errors, 5, what="the handler's failure to end the watch")
        assert isinstance(seen.errors[0], ms.StoreUnavailable) and "bug in the handler" in str(seen.errors[0])
    finally:
        cancel()
        s.close()


def _watch_on(members: EtcdMembers, name: str, transport: str) -> tuple[ms.Store, Seen]:
    """A store whose only endpoint is member ``name``, watching /w/ there."""
    s = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(members.endpoint(name)), prefix="/w", timeout=2.0,
                               watch=transport))
    seen = Seen()
    rev = s.put("/w/a", b"1")
    s.watch_prefix("/w/", rev + 1, seen.on_events, seen.on_error)
    s.put("/w/b", b"2")
    wait_for(lambda: seen.events(), 10, what="the watch to deliver")
    return s, seen


@pytest.mark.parametrize("transport", ["json", "grpc"])
def test_a_watch_on_a_member_without_a_leader_ends(members: EtcdMembers, transport: str) -> None:
    """The watch's member loses both peers (SIGSTOP): it stays up but has no
    leader, so it would serve a watch that never hears of a change again.
    etcd's require-leader metadata makes it end the watch instead (about
    three election timeouts), and the agent re-lists elsewhere."""
    follower = next(n for n in members.names if n != members.leader())
    s, seen = _watch_on(members, follower, transport)
    try:
        for n in members.names:
            if n != follower:
                members.procs[n].send_signal(signal.SIGSTOP)
        wait_for(lambda: seen.errors, 30, interval=0.2, what="the leaderless member to end the watch")
        assert isinstance(seen.errors[0], (ms.StoreUnavailable, Exception)), seen.errors
        assert len(seen.errors) == 1, seen.errors
    finally:
        s.close()


def test_a_json_watch_leaves_a_hung_member_with_the_client(members: EtcdMembers) -> None:
    """The watch's member hangs (SIGSTOP: no reset ever comes, and its
    kernel still answers TCP keep-alive). The store's next call times out
    there and moves to another member; the JSON watch on the hung member
    ends with it (the store abandons it), so the agent watches again
    elsewhere. (python-etcd3 only half-closes its gRPC watch stream when it
    moves: that one is repaired by the periodic re-list.)"""
    eps = ",".join(members.endpoint(n) for n in members.names)
    s = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(eps), prefix="/w", timeout=1.0, watch="json"))
    seen = Seen()
    rev = s.put("/w/a", b"1")
    host, port = s._endpoint_order()[0]  # where the watch goes: the member the client uses
    s.watch_prefix("/w/", rev + 1, seen.on_events, seen.on_error)
    try:
        s.put("/w/b", b"2")
        wait_for(lambda: seen.events(), 10, what="the watch to deliver")
        hung = next(n for n in members.names if members.endpoint(n) == f"{host}:{port}")
        members.procs[hung].send_signal(signal.SIGSTOP)
        assert not seen.errors
        with pytest.raises(ms.StoreUnavailable):
            s.get("/w/a")
        wait_for(lambda: seen.errors, 5, interval=0.1, what="the watch on the hung member to end")
        assert len(seen.errors) == 1 and isinstance(seen.errors[0], BaseException), seen.errors
        s.read_retry_for = 10.0  # if the hung member led, the others elect a leader first
        assert s.get("/w/a") is not None  # the store goes on with another member
    finally:
        s.close()


def _cfg(text: str) -> ms.EtcdConfig:
    cp = configparser.ConfigParser()
    cp.read_string(text)
    return ms.etcd_config_from(cp)


@pytest.mark.parametrize("extra, transport", [("", "json"), ("watch = grpc\n", "grpc"), ("watch = JSON\n", "json")])
def test_watch_transport_setting(extra: str, transport: str) -> None:
    assert _cfg("[etcd]\nendpoints = 127.0.0.1:1\n" + extra).watch_transport == transport


def test_watch_transport_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ms.ConfigError, match="not one of auto, json, grpc"):
        _cfg("[etcd]\nwatch = http2\n")
    for name in ("c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    cert = f"ca_cert = {tmp_path / 'c.crt'}\ncert = {tmp_path / 'c.crt'}\nkey = {tmp_path / 'c.key'}\n"
    with pytest.raises(ms.ConfigError, match="refuses clients that show a certificate"):
        _cfg("[etcd]\nendpoints = https://127.0.0.1:1\n" + cert + "watch = json\n")
    assert _cfg("[etcd]\nendpoints = https://127.0.0.1:1\n" + cert).watch_transport == "grpc"
    with_user = cert + "user = u\npassword = p\n"
    assert _cfg("[etcd]\nendpoints = https://127.0.0.1:1\n" + with_user).watch_transport == "grpc"
    ca_only = f"ca_cert = {tmp_path / 'c.crt'}\nuser = u\npassword = p\n"
    assert _cfg("[etcd]\nendpoints = https://127.0.0.1:1\n" + ca_only).watch_transport == "json"


def test_json_watch_with_etcd_users_authenticates_again_after_a_restart(tmp_path: Path) -> None:
    """etcd's own users over the JSON gateway: the token travels in the
    Authorization header; a wrong password is StoreDenied; etcd forgets its
    tokens when it restarts, and the next watch authenticates again."""
    server = EtcdServer(tmp_path)
    server.start()
    good = bad = None
    try:
        server.etcdctl("user", "add", "root", "--new-user-password=rootpw", "--interactive=false")
        server.etcdctl("auth", "enable")
        server.user = "root:rootpw"
        eps = ms.parse_endpoints(server.endpoint)
        good = ms.Store(ms.EtcdConfig(endpoints=eps, user="root", password="rootpw", timeout=2.0))
        bad = ms.Store(ms.EtcdConfig(endpoints=eps, user="root", password="wrong", timeout=2.0))
        assert good.watch_transport == "json"
        for attempt in range(2):
            rev = good.put("/auth/probe", b"0")
            seen = Seen()
            cancel = good.watch_prefix("/auth/", rev + 1, seen.on_events, seen.on_error)
            good.put("/auth/probe", f"v{attempt}".encode())
            wait_for(lambda: seen.events(), 5, what="the watch with a token")
            assert [e.value for e in seen.events()] == [f"v{attempt}".encode()] and seen.errors == []
            cancel()
            if attempt == 0:
                server.stop()
                server.start()
        assert good._token_gen == 2  # authenticated again after the restart
        with pytest.raises(ms.StoreDenied, match="authentication failed"):
            bad.watch_prefix("/auth/", 1, seen.on_events, seen.on_error)
    finally:
        for s in (good, bad):
            if s is not None:
                s.close()
        server.stop()


def test_json_watch_over_tls_verifies_the_server(tmp_path: Path) -> None:
    """https:// endpoints without a client certificate (etcd without
    --client-cert-auth): the JSON watch speaks TLS, verifies the server by
    ``ca_cert``, and a server its CA did not sign is refused, not watched."""
    import subprocess
    from harness import free_port
    from test_etcd_security import make_ca, make_cert
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    make_ca(pki, "other-ca")
    make_cert(pki, "ca", "server", "etcd", server=True)
    port, peer_port = free_port(), free_port()
    client, peer = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    with open(tmp_path / "etcd.log", "ab") as log:
        proc = subprocess.Popen(["etcd", "--name", "tls", "--data-dir", str(tmp_path / "data"),
                                 "--listen-client-urls", client, "--advertise-client-urls", client,
                                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                 "--initial-cluster", f"tls={peer}", "--cert-file", str(pki / "server.crt"),
                                 "--key-file", str(pki / "server.key"), "--log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    stores: list[ms.Store] = []
    try:
        good = ms.Store(ms.EtcdConfig(endpoints=(("127.0.0.1", port),), tls=True, ca_cert=str(pki / "ca.crt"),
                                      timeout=2.0))
        stores.append(good)
        assert good.watch_transport == "json"
        rev = wait_for(lambda: _put_or_none(good, "/tls/a", b"1"), 15, what="etcd with TLS to answer")
        seen = Seen()
        cancel = good.watch_prefix("/tls/", rev + 1, seen.on_events, seen.on_error)
        good.put("/tls/b", b"over TLS")
        wait_for(lambda: seen.events(), 5, what="the JSON watch over TLS")
        assert [(e.key, e.value) for e in seen.events()] == [("/tls/b", b"over TLS")] and seen.errors == []
        cancel()
        wrong = ms.Store(ms.EtcdConfig(endpoints=(("127.0.0.1", port),), tls=True,
                                       ca_cert=str(pki / "other-ca.crt"), timeout=2.0))
        stores.append(wrong)
        with pytest.raises(ms.StoreDenied, match="certificate verify failed"):
            wrong.watch_prefix("/tls/", rev + 1, seen.on_events, seen.on_error)
    finally:
        for s in stores:
            s.close()
        proc.terminate()
        proc.wait(10)


def _put_or_none(s: ms.Store, key: str, value: bytes) -> Optional[int]:
    try:
        return s.put(key, value)
    except ms.StoreUnavailable:
        return None
