"""The web's Catalog and Hub without a server: which stream messages a batch
of watch events makes (pure, on an in-memory ClusterView), and how the hub
fans them out."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import metastack as ms
import metastackweb as mw

KEYS = ms.Keys("/m")


class Feed:
    """A ClusterView fed by hand, the way metastackweb.Feed feeds it."""

    def __init__(self) -> None:
        self.view = ms.ClusterView(KEYS)
        self.view.load(1, {})
        self.catalog = mw.Catalog(self.view)
        self.rev = 1

    def put(self, key: str, value: Any, lease: int = 0) -> list[dict[str, Any]]:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return self._apply(ms.KeyEvent(key, raw, self.rev + 1, lease, self.rev + 1))

    def delete(self, key: str) -> list[dict[str, Any]]:
        return self._apply(ms.KeyEvent(key, None, self.rev + 1))

    def _apply(self, ev: ms.KeyEvent) -> list[dict[str, Any]]:
        self.rev += 1
        before: dict[str, Optional[ms.Entry]] = {ev.key: self.view.entry(ev.key)}
        self.view.apply(self.rev, [ev])
        return self.catalog.changes(self.rev, [ev], before)


def kinds(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((m["kind"], m["name"], m["op"]) for m in messages)


HOST = {"vcpus": 4, "ram_mb": 4096}


def test_each_kind_of_record_makes_one_message_with_the_get_shape() -> None:
    f = Feed()
    [msg] = f.put(KEYS.flavour("small"), {"vcpus": 1, "ram_mb": 512})
    assert msg == {"kind": "flavour", "name": "small", "op": "put", "object": {"name": "small", "vcpus": 1,
                                                                              "ram_mb": 512}, "revision": 2}
    [msg] = f.put(KEYS.desired("web1"), {"flavour": "small"})
    assert msg["kind"] == "vm" and msg["object"]["state"] == "pending" and msg["object"] == f.catalog.vm("web1")
    [msg] = f.delete(KEYS.desired("web1"))
    assert (msg["op"], msg["object"]) == ("delete", {"name": "web1"})
    [msg] = f.put(KEYS.node("n1"), {"address": "", "first_seen": ""})
    assert msg["kind"] == "host" and msg["object"]["state"] == "lost"
    assert f.put(KEYS.config, {"x": 1}) == []  # not a kind the page shows


def test_a_host_lease_change_resends_its_claims_but_a_use_change_does_not() -> None:
    f = Feed()
    f.put(KEYS.desired("web1"), {"flavour": "small"})
    f.put(KEYS.actual("web1"), {"host": "n1", "state": "running"}, lease=7)
    assert f.catalog.vm("web1")["state"] == "untrusted"  # no host record on lease 7 yet
    msgs = f.put(KEYS.host("n1"), HOST, lease=7)
    assert kinds(msgs) == [("host", "n1", "put"), ("vm", "web1", "put")]
    assert next(m for m in msgs if m["kind"] == "vm")["object"]["state"] == "running"
    assert kinds(f.put(KEYS.host("n1"), dict(HOST, vcpus_used=1), lease=7)) == [("host", "n1", "put")]
    # A claim's change re-sends the host it names, whose use the claims make.
    msgs = f.put(KEYS.actual("web1"), {"host": "n1", "state": "running", "vcpus": 2, "ram_mb": 256}, lease=7)
    assert sorted(kinds(msgs)) == [("host", "n1", "put"), ("vm", "web1", "put")]
    host = next(m for m in msgs if m["kind"] == "host")["object"]
    assert (host["vcpus_used"], host["ram_mb_used"], host["vms"]) == (2, 256, 1)
    msgs = f.delete(KEYS.actual("web1"))
    host = next(m for m in msgs if m["kind"] == "host")["object"]
    assert (host["vcpus_used"], host["ram_mb_used"], host["vms"]) == (0, 0, 0)
    f.put(KEYS.actual("web1"), {"host": "n1", "state": "running"}, lease=7)
    msgs = f.put(KEYS.host("n1"), HOST, lease=8)  # re-registered on another lease: its old claims are stale
    assert next(m for m in msgs if m["kind"] == "vm")["object"]["state"] == "untrusted"


def test_a_host_giving_a_vm_up_resends_that_vm() -> None:
    f = Feed()
    f.put(KEYS.desired("web1"), {"flavour": "small"})
    f.put(KEYS.host("n1"), HOST, lease=7)
    msgs = f.put(KEYS.host("n1"), dict(HOST, cannot={"web1": "define failed"}), lease=7)
    vm = next(m for m in msgs if m["kind"] == "vm")
    assert vm["object"]["given_up_by"] == {"n1": "define failed"}


def test_console_and_history_messages_are_scoped_to_their_vm() -> None:
    f = Feed()
    [msg] = f.put(KEYS.console("web1"), b"boot\xff\n")
    assert msg["kind"] == "console" and msg["object"] == {"name": "web1", "text": "boot\ufffd\n"}
    key = f"{KEYS.dir('events')}web1/{1:020d}-n1"
    [msg] = f.put(key, {"at": "2026-01-01T00:00:00Z", "node": "n1", "vm": "web1", "event": "claimed"})
    assert msg["kind"] == "history" and msg["object"] == {"at": "2026-01-01T00:00:00Z", "node": "n1", "vm": "web1",
                                                          "event": "claimed", "detail": "",
                                                          "key": f"{1:020d}-n1"}
    assert f.put(key, b"not json") == [] and f.put(key, b"[1]") == []
    assert f.delete(key) == []

    async def fan_out() -> None:
        hub = mw.Hub(queue_size=3)
        mine, other = hub.subscribe("web1"), hub.subscribe(None)
        hub.publish([{"kind": "console", "name": "web1", "op": "put", "object": {}},
                     {"kind": "vm", "name": "web2", "op": "put", "object": {}}])
        assert mine.queue.qsize() == 2 and other.queue.qsize() == 1
        hub.publish([{"kind": "vm", "name": f"v{i}", "op": "put", "object": {}} for i in range(2)])
        assert mine not in hub.subscribers  # fell behind: dropped, its stream ends (None)
        frames = [mine.queue.get_nowait() for _ in range(mine.queue.qsize())]
        assert frames == [None]
        assert other in hub.subscribers and other.queue.qsize() == 3
    asyncio.run(fan_out())
