"""The web server's JSON API over real HTTP: a real metastackweb.py process,
its own etcd, an agent on a test:/// host, users made with metastackctl."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

import metastack as ms
from harness import wait_for
from web_harness import PASSWORDS, Client, EventStream, WebEnv, WebServer, web_env_fixture

web_env = web_env_fixture("web_env")


@pytest.fixture(scope="module")
def env(web_env: WebEnv) -> WebEnv:
    web_env.cluster.flavour("small", 1, 128)
    web_env.cluster.agent("node1", vcpus=4, ram_mb=4096)
    web_env.cluster.wait_hosts("node1")
    return web_env


@pytest.fixture
def admin(env: WebEnv) -> Client:
    return env.client("admin")


@pytest.fixture
def viewer(env: WebEnv) -> Client:
    return env.client("viewer")


def test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session(env: WebEnv) -> None:
    c = Client(env.web)
    status, _, body = c.login("admin", "wrong-password")
    assert (status, body) == (401, {"error": "wrong user or password"})
    status, _, body = c.login("nobody", PASSWORDS["admin"])
    assert status == 401 and not c.cookie
    status, hdrs, body = c.login("admin", PASSWORDS["admin"])
    assert status == 200 and body["user"] == "admin" and body["role"] == "admin" and len(body["csrf"]) >= 20
    cookie = hdrs["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # no TLS here
    assert c.request("GET", "/api/v1/session")[2] == body
    # the session lives in etcd (shared by every management node), stored by hash only
    _, sessions = env.store.list_prefix(f"{env.prefix}-auth/sessions/")
    assert len(sessions) >= 1 and all(c.cookie.split("=", 1)[1] not in k for k in sessions)
    assert all(b"admin-pass" not in e.value for e in sessions.values())
    status, _, _ = c.request("DELETE", "/api/v1/session")
    assert status == 200
    c.cookie = c.cookie or cookie.split(";", 1)[0]  # replay the old cookie: it is dead
    time.sleep(2.1)  # past the per-process session cache
    assert c.request("GET", "/api/v1/vms")[0] == 401


def test_passwords_are_stored_as_scrypt_hashes(env: WebEnv) -> None:
    entry = env.store.get(f"{env.prefix}-auth/users/admin")
    record = json.loads(entry.value)
    assert record["role"] == "admin" and record["password"]["alg"] == "scrypt"
    assert PASSWORDS["admin"] not in entry.value.decode()
    r = env.ctl("user", "list", "-o", "json")
    assert {u["name"]: u["role"] for u in json.loads(r.stdout)} == {"admin": "admin", "viewer": "viewer"}
    assert "scrypt" not in r.stdout


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/vms"), ("GET", "/api/v1/vms/x"), ("GET", "/api/v1/hosts"), ("GET", "/api/v1/flavours"),
    ("GET", "/api/v1/images"), ("GET", "/api/v1/events"), ("GET", "/api/v1/vms/x/console"),
    ("GET", "/api/v1/vms/x/events"), ("POST", "/api/v1/vms"), ("POST", "/api/v1/vms/x/start"),
    ("DELETE", "/api/v1/vms/x"), ("POST", "/api/v1/flavours"), ("DELETE", "/api/v1/flavours/small"),
    ("DELETE", "/api/v1/images/x"), ("DELETE", "/api/v1/session"),
])
def test_every_request_without_a_session_gets_401(env: WebEnv, method: str, path: str) -> None:
    before = env.keys_under()
    status, _, body = Client(env.web).request(method, path, {"name": "x", "flavour": "small"}
                                              if method == "POST" else None)
    assert status == 401 and body == {"error": "not logged in"}
    forged = Client(env.web)
    forged.cookie = "metastack_session=forged-token"
    assert forged.request(method, path)[0] == 401
    assert env.keys_under() == before


def test_changes_need_the_sessions_csrf_token(env: WebEnv, admin: Client) -> None:
    before = env.keys_under()
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        status, _, body = admin.request("POST", "/api/v1/vms", {"name": "csrf1", "flavour": "small"},
                                        headers=headers, csrf=False)
        assert status == 403 and "X-CSRF-Token" in body["error"]
    other = env.client("admin")  # another session's token does not fit this one
    status, _, _ = admin.request("POST", "/api/v1/vms", {"name": "csrf1", "flavour": "small"},
                                 headers={"X-CSRF-Token": other.csrf}, csrf=False)
    assert status == 403
    assert env.keys_under() == before


def test_a_viewer_reads_everything_and_changes_nothing(env: WebEnv, viewer: Client, admin: Client) -> None:
    assert admin.request("POST", "/api/v1/vms", {"name": "seen", "flavour": "small", "state": "stopped"})[0] == 201
    for path in ("/api/v1/vms", "/api/v1/vms/seen", "/api/v1/hosts", "/api/v1/flavours", "/api/v1/images",
                 "/api/v1/vms/seen/events", "/api/v1/vms/seen/console", "/api/v1/session"):
        assert viewer.request("GET", path)[0] == 200, path
    before = env.keys_under()
    for method, path, body in [("POST", "/api/v1/vms", {"name": "v1", "flavour": "small"}),
                               ("POST", "/api/v1/vms/seen/start", None), ("POST", "/api/v1/vms/seen/stop", None),
                               ("DELETE", "/api/v1/vms/seen", None),
                               ("POST", "/api/v1/flavours", {"name": "f9", "vcpus": 1, "ram_mb": 1}),
                               ("DELETE", "/api/v1/flavours/small", None), ("DELETE", "/api/v1/images/x", None)]:
        status, _, answer = viewer.request(method, path, body)
        assert status == 403 and "viewer" in answer["error"], (method, path)
    assert env.keys_under() == before
    assert viewer.request("DELETE", "/api/v1/session")[0] == 200  # a viewer may log out
    assert admin.request("DELETE", "/api/v1/vms/seen")[0] == 200


def test_vm_mutations_apply_the_clis_validation(env: WebEnv, admin: Client) -> None:
    status, _, vm = admin.request("POST", "/api/v1/vms", {"name": "web1", "flavour": "small", "host": "node1"})
    assert status == 201 and vm["name"] == "web1" and vm["state"] == "pending"
    written = json.loads(env.store.get(env.keys.desired("web1")).value)
    assert ms.valid_uuid(written.pop("uuid"))
    assert written.pop("created").endswith("Z")  # written by the shared create_vm
    assert written == {"flavour": "small", "state": "running", "host": "node1"}
    assert admin.request("POST", "/api/v1/vms", {"name": "web1", "flavour": "small"})[:1] == (409,)
    before = env.keys_under()
    for body, code, text in [
        ({"name": "Web_1", "flavour": "small"}, 400, "not a valid VM name"),
        ({"name": "web2", "flavour": "nosuch"}, 400, "no flavour named 'nosuch'"),
        ({"name": "web2", "flavour": "small", "image": "nosuch"}, 400, "no image named 'nosuch'"),
        ({"name": "web2", "flavour": "small", "state": "paused"}, 400, "state must be one of"),
        ({"name": "web2", "flavour": "small", "host": "-bad"}, 400, "not a valid node name"),
        ({"name": "web2", "flavour": "small", "colour": "red"}, 400, "unknown field(s): colour"),
        ({"name": "web2"}, 400, "not a valid flavour name"),
        ({"name": "x" * 64, "flavour": "small"}, 400, "not a valid VM name"),
        ({"name": 7, "flavour": "small"}, 400, "not a valid VM name"),
        (["web2"], 400, "must be a JSON object"),
    ]:
        status, _, answer = admin.request("POST", "/api/v1/vms", body)
        assert (status, text in answer["error"]) == (code, True), (body, answer)
    assert admin.request("POST", "/api/v1/vms", raw=b"{not json", headers={"Content-Type": "application/json"}
                         )[0] == 400
    assert admin.request("POST", "/api/v1/vms", raw=b"name=web2&flavour=small",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 400
    assert env.keys_under() == before  # nothing written on bad input
    env.cluster.wait_running(["web1"])
    # stop/start keep every other key of the entry
    env.store.put(env.keys.desired("web1"), json.dumps(dict(json.loads(env.store.get(
        env.keys.desired("web1")).value), note="keep me")).encode())
    status, _, body = admin.request("POST", "/api/v1/vms/web1/stop")
    assert status == 200 and body == {"name": "web1", "desired": "stopped", "changed": True}
    assert admin.request("POST", "/api/v1/vms/web1/stop")[2]["changed"] is False
    entry = json.loads(env.store.get(env.keys.desired("web1")).value)
    assert entry["state"] == "stopped" and entry["note"] == "keep me"
    wait_for(lambda: env.cluster.states().get("web1", ("",))[0] == "stopped", what="web1 stopped")
    assert admin.request("POST", "/api/v1/vms/web1/start")[0] == 200
    env.cluster.wait_running(["web1"])
    for method, path in [("POST", "/api/v1/vms/nosuch/start"), ("POST", "/api/v1/vms/nosuch/stop"),
                         ("DELETE", "/api/v1/vms/nosuch"), ("GET", "/api/v1/vms/nosuch")]:
        status, _, body = admin.request(method, path)
        assert status == 404 and "no VM named 'nosuch'" in body["error"], (method, path)
    assert admin.request("POST", "/api/v1/vms/web1/reboot")[0] == 404
    assert admin.request("GET", "/api/v1/vms/BAD_NAME")[0] == 400
    env.store.put(env.keys.desired("broken"), b"not json")
    status, _, body = admin.request("POST", "/api/v1/vms/broken/stop")
    assert status == 409 and "not a JSON object" in body["error"]
    assert admin.request("DELETE", "/api/v1/vms/broken")[0] == 200
    assert admin.request("DELETE", "/api/v1/vms/web1")[0] == 200
    assert env.store.get(env.keys.desired("web1")) is None
    wait_for(lambda: "web1" not in env.cluster.actual(), what="web1 destroyed by its owner")


def test_flavour_and_image_mutations(env: WebEnv, admin: Client) -> None:
    status, _, body = admin.request("POST", "/api/v1/flavours", {"name": "big", "vcpus": 2, "ram_mb": 1024})
    assert status == 201 and body == {"name": "big", "vcpus": 2, "ram_mb": 1024}
    assert json.loads(env.store.get(env.keys.flavour("big")).value) == {"vcpus": 2, "ram_mb": 1024}
    assert admin.request("POST", "/api/v1/flavours", {"name": "big", "vcpus": 1, "ram_mb": 1})[0] == 409
    before = env.keys_under()
    for body in ({"name": "f1", "vcpus": 0, "ram_mb": 1}, {"name": "f1", "vcpus": "1", "ram_mb": 1},
                 {"name": "f1", "vcpus": True, "ram_mb": 1}, {"name": "f1", "vcpus": 1},
                 {"name": "F1", "vcpus": 1, "ram_mb": 1}, {"name": "f1", "vcpus": 1, "ram_mb": 2 ** 60}):
        assert admin.request("POST", "/api/v1/flavours", body)[0] == 400, body
    assert env.keys_under() == before
    assert admin.request("POST", "/api/v1/vms", {"name": "user1", "flavour": "big", "state": "stopped"})[0] == 201
    status, _, body = admin.request("DELETE", "/api/v1/flavours/big")
    assert status == 409 and "used by 1 VM(s): user1" in body["error"]
    assert admin.request("DELETE", "/api/v1/vms/user1")[0] == 200
    assert admin.request("DELETE", "/api/v1/flavours/big")[0] == 200
    assert admin.request("DELETE", "/api/v1/flavours/big")[0] == 404
    # images: a record the agents would refuse can go without Ceph; one in use cannot go
    env.store.put(env.keys.image("junk"), b'{"pool": "../x"}')
    env.store.put(env.keys.image("tiny"), json.dumps({"pool": "p", "image": "base-tiny-1", "snapshot": "base",
                                                      "size": 1048576}).encode())
    assert admin.request("POST", "/api/v1/vms", {"name": "user2", "flavour": "small", "image": "tiny",
                                                 "state": "stopped"})[0] == 201
    status, _, body = admin.request("DELETE", "/api/v1/images/tiny")
    assert status == 409 and "used by 1 VM(s): user2" in body["error"]
    assert admin.request("DELETE", "/api/v1/vms/user2")[0] == 200
    status, _, body = admin.request("DELETE", "/api/v1/images/tiny")
    assert status == 409 and "no [ceph] section" in body["error"]  # its data is in Ceph: refused, kept
    assert env.store.get(env.keys.image("tiny")) is not None
    assert admin.request("DELETE", "/api/v1/images/junk")[0] == 200
    assert admin.request("DELETE", "/api/v1/images/junk")[0] == 404
    env.store.delete(env.keys.image("tiny"))


def test_reads_return_what_metastackctl_prints(env: WebEnv, admin: Client) -> None:
    env.ctl("create", "same1", "--flavour", "small")
    env.store.put(env.keys.image("img1"), json.dumps({"pool": "p", "image": "base-img1-1", "snapshot": "base",
                                                      "size": 4096}).encode())
    env.store.put(env.keys.node("gone"), json.dumps({"address": "", "first_seen": ms.utc_now()}).encode())
    env.cluster.wait_running(["same1"])

    def same() -> bool:
        for path, args in [("/api/v1/hosts", ["hosts"]), ("/api/v1/flavours", ["flavour", "list"]),
                           ("/api/v1/images", ["image", "list"])]:
            if admin.request("GET", path)[2] != json.loads(env.ctl(*args, "-o", "json").stdout):
                return False
        vms = admin.request("GET", "/api/v1/vms")[2]
        listed = json.loads(env.ctl("list", "-o", "json").stdout)
        shown = [json.loads(env.ctl("show", v["name"], "-o", "json").stdout) for v in listed]
        return vms == shown and admin.request("GET", "/api/v1/vms/same1")[2] == shown[
            [v["name"] for v in listed].index("same1")]
    wait_for(same, 5, what="the web's objects to equal metastackctl's")
    hosts = {h["node"]: h for h in admin.request("GET", "/api/v1/hosts")[2]}
    assert hosts["gone"]["state"] == "lost" and hosts["node1"]["state"] == "ready"
    env.ctl("destroy", "same1", "--yes")
    env.store.delete(env.keys.image("img1"))
    env.store.delete(env.keys.node("gone"))


def test_the_event_stream_delivers_an_etcdctl_change_within_a_second(env: WebEnv, admin: Client) -> None:
    stream = EventStream(admin)
    try:
        assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
        stream.wait(lambda ev, d: ev == "status" and d["etcd"] == "ok")
        sent = time.monotonic()
        env.etcd.etcdctl("put", f"{env.prefix}/desired/sse1", '{"flavour": "small", "state": "stopped"}')
        at, _, msg = stream.wait(lambda ev, d: ev == "change" and d["kind"] == "vm" and d["name"] == "sse1")
        assert at - sent < 1.0, f"{at - sent:.3f}s"
        got = admin.request("GET", "/api/v1/vms/sse1")[2]  # same shape (the agent may have claimed it since)
        assert msg["op"] == "put" and set(msg["object"]) == set(got)
        assert {k: msg["object"][k] for k in ("name", "flavour", "desired", "desired_entry")} == {
            "name": "sse1", "flavour": "small", "desired": "stopped",
            "desired_entry": '{"flavour": "small", "state": "stopped"}'}
        env.etcd.etcdctl("put", f"{env.prefix}/flavours/tiny2", '{"vcpus": 1, "ram_mb": 64}')
        _, _, msg = stream.wait(lambda ev, d: ev == "change" and d["kind"] == "flavour")
        assert msg["object"] == {"name": "tiny2", "vcpus": 1, "ram_mb": 64}
        env.etcd.etcdctl("del", f"{env.prefix}/desired/sse1")
        stream.wait(lambda ev, d: ev == "change" and d["name"] == "sse1" and d["op"] == "delete")
        env.etcd.etcdctl("del", f"{env.prefix}/flavours/tiny2")
        stream.wait(lambda ev, d: ev == "change" and d["kind"] == "flavour" and d["op"] == "delete")
    finally:
        stream.close()


def test_history_and_console_of_a_vm(env: WebEnv, admin: Client) -> None:
    assert admin.request("POST", "/api/v1/vms", {"name": "hist1", "flavour": "small", "state": "stopped"})[0] == 201
    stream = EventStream(admin, "?vm=hist1")
    other = EventStream(admin)  # not subscribed to hist1: gets neither its console nor its history
    try:
        stream.wait(lambda ev, d: ev == "status")
        base = 1_790_000_000_000_000
        env.history("hist1", base + 2_000_000, "node2", "started", "on node2")  # written out of order
        env.history("hist1", base, "node1", "claimed")
        env.history("hist1", base + 1_000_000, "node1", "fenced", "node1 was fenced")
        status, _, items = admin.request("GET", "/api/v1/vms/hist1/events")
        assert status == 200
        items = [i for i in items if i["key"] < f"{base + 3_000_000:020d}"]  # not the agents' own records
        assert [(i["event"], i["node"]) for i in items] == [("claimed", "node1"), ("fenced", "node1"),
                                                            ("started", "node2")]
        assert items[0]["key"] == f"{base:020d}-node1" and items[0]["at"].endswith("Z")
        _, _, msg = stream.wait(lambda ev, d: d.get("kind") == "history" and d["object"]["event"] == "fenced")
        assert msg["name"] == "hist1" and msg["object"]["detail"] == "node1 was fenced"
        assert admin.request("GET", "/api/v1/vms/hist1/console")[2] == {"name": "hist1", "text": "",
                                                                          "published": False}
        env.store.put(env.keys.console("hist1"), b"METASTACK-GUEST-UP boot=1\n")
        _, _, msg = stream.wait(lambda ev, d: d.get("kind") == "console")
        assert msg["object"]["text"] == "METASTACK-GUEST-UP boot=1\n"
        assert admin.request("GET", "/api/v1/vms/hist1/console")[2]["text"] == "METASTACK-GUEST-UP boot=1\n"
        env.store.put(env.keys.desired("hist1"), b'{"flavour": "small", "state": "stopped", "x": 1}')
        other.wait(lambda ev, d: d.get("name") == "hist1" and d["kind"] == "vm")  # after the console write
        assert not [d for _, _, d in other.events if d.get("kind") in ("console", "history")]
        assert admin.request("GET", "/api/v1/vms/nosuch/events")[0] == 404
        assert admin.request("GET", "/api/v1/vms/nosuch/console")[0] == 404
    finally:
        stream.close()
        other.close()
        admin.request("DELETE", "/api/v1/vms/hist1")


def test_repeated_login_failures_get_429(env: WebEnv) -> None:
    c = Client(env.web)
    for _ in range(5):
        assert c.login("admin", "bad-password")[0] == 401
    status, hdrs, body = c.login("admin", PASSWORDS["admin"])  # even the right password, for a while
    assert status == 429 and int(hdrs["retry-after"]) >= 1 and "too many" in body["error"]
    time.sleep(3.2)  # the test server's login_window
    assert c.login("admin", PASSWORDS["admin"])[0] == 200


def test_a_host_that_stops_renewing_turns_lost_on_the_stream(env: WebEnv, admin: Client) -> None:
    agent = env.cluster.agent("node2", vcpus=1, ram_mb=64)  # too small for any VM here
    env.cluster.wait_hosts("node2")
    stream = EventStream(admin)
    try:
        stream.wait(lambda ev, d: ev == "status")
        agent.signal(9)
        agent.wait()
        agent.stop_watchdog()
        _, _, msg = stream.wait(lambda ev, d: d.get("kind") == "host" and d["name"] == "node2"
                                and d["object"]["state"] == "lost", timeout=15)
        assert msg["op"] == "put" and msg["object"]["vcpus"] is None
    finally:
        stream.close()


def test_pages_and_headers(env: WebEnv) -> None:
    c = Client(env.web)
    status, hdrs, body = c.request("GET", "/")
    assert status == 200 and b"/static/app.js" in body
    assert "default-src 'self'" in hdrs["content-security-policy"] and hdrs["x-frame-options"] == "DENY"
    for asset in ("app.js", "app.css"):
        status, _, text = c.request("GET", f"/static/{asset}")
        assert status == 200 and b"http://" not in text and b"https://" not in text  # nothing from the internet
    assert c.request("GET", "/static/../metastackweb.py")[0] in (403, 404)



def test_a_session_is_valid_on_every_management_node_and_tls_marks_the_cookie_secure(env: WebEnv,
                                                                                    admin: Client) -> None:
    d = env.dir / "tls"
    d.mkdir(exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    second = WebServer(d, env.etcd, env.prefix, tls=(cert, key)).start()  # another management node, HTTPS
    try:
        there = Client(second)
        there.cookie = admin.cookie  # the session made on the first server works on the second
        assert there.request("GET", "/api/v1/vms")[0] == 200
        viewer = Client(second)
        status, hdrs, _ = viewer.login("viewer", PASSWORDS["viewer"])
        assert status == 200 and "Secure" in hdrs["set-cookie"] and "HttpOnly" in hdrs["set-cookie"]
        assert hdrs["strict-transport-security"].startswith("max-age=")
        back = Client(env.web)  # ...and the viewer's session from the HTTPS server works on the first
        back.cookie = viewer.cookie
        assert back.request("GET", "/api/v1/session")[2]["user"] == "viewer"
        # a deleted user's sessions end everywhere
        assert env.ctl("user", "add", "temp", "--role", "admin", "--password-stdin",
                       input="temp-password\n").exit_code == 0
        temp = Client(env.web)
        assert temp.login("temp", "temp-password")[0] == 200
        temp_there = Client(second)
        temp_there.cookie = temp.cookie
        assert temp_there.request("GET", "/api/v1/vms")[0] == 200
        assert env.ctl("user", "delete", "temp").exit_code == 0
        time.sleep(2.1)  # the per-process session cache
        assert temp.request("GET", "/api/v1/vms")[0] == 401
        assert temp_there.request("GET", "/api/v1/vms")[0] == 401
    finally:
        second.stop()


@pytest.mark.parametrize("web,message", [
    ("listen = nonsense", "[web] listen: 'nonsense' is not host:port"),
    ("listen = 127.0.0.1:99999", "is not host:port"),
    ("tls_cert = /nonexistent.pem", "[web] tls_cert and tls_key go together"),
    ("tls_cert = /nonexistent.pem\ntls_key = /nonexistent.key", "[web] tls_cert: /nonexistent.pem does not exist"),
    ("session_ttl = 10", "[web] session_ttl: 10 is too short"),
    ("login_failures = none", "[web] login_failures: 'none' must be a positive integer"),
    ("static_dir = /nonexistent", "[web] static_dir: /nonexistent has no index.html"),
])
def test_bad_web_config_exits_2_naming_the_key(tmp_path, capsys, web: str, message: str) -> None:
    import metastackweb
    ini = tmp_path / "web.ini"
    ini.write_text(f"[etcd]\nendpoints = 127.0.0.1:2379\n[web]\n{web}\n")
    assert metastackweb.main(["-c", str(ini), "--check-config"]) == 2
    assert message in capsys.readouterr().err
    ini.write_text("[etcd]\nendpoints = 127.0.0.1:2379\n")
    assert metastackweb.main(["-c", str(ini), "--check-config"]) == 0
    assert "http://127.0.0.1:8080/" in capsys.readouterr().out


def test_a_pending_vms_reason_is_re_sent_when_a_node_changes(env: WebEnv, admin: Client) -> None:
    """Why a VM waits depends on every node's capacity and state: a node
    record change re-sends the unclaimed VMs with their new reason."""
    store, keys = env.cluster.store, env.cluster.store.keys
    before = store.get(keys.node("node1"))
    stream = EventStream(admin)
    try:
        stream.wait(lambda ev, d: ev == "status")
        env.etcd.etcdctl("put", f"{env.prefix}/flavours/huge", '{"vcpus": 64, "ram_mb": 1024}')
        env.etcd.etcdctl("put", f"{env.prefix}/desired/bigvm", '{"flavour": "huge"}')
        stream.wait(lambda ev, d: ev == "change" and d["kind"] == "vm" and d["name"] == "bigvm"
                    and "too small: node1" in (d["object"]["reason"] or ""))
        env.etcd.etcdctl("put", f"{env.prefix}/nodes/node1", '{"cordon": true, "reason": "maintenance"}')
        _, _, msg = stream.wait(lambda ev, d: ev == "change" and d["kind"] == "vm" and d["name"] == "bigvm"
                                and "cordoned: node1 (maintenance)" in (d["object"]["reason"] or ""))
        assert msg["object"]["state"] == "pending"
    finally:
        stream.close()
        env.etcd.etcdctl("del", f"{env.prefix}/desired/bigvm")
        env.etcd.etcdctl("del", f"{env.prefix}/flavours/huge")
        if before is not None:
            env.etcd.etcdctl("put", f"{env.prefix}/nodes/node1", before.value.decode())
        else:
            env.etcd.etcdctl("del", f"{env.prefix}/nodes/node1")
