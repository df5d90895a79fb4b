#!/usr/bin/env python3
"""Benchmark: the web console with 1,000 VMs and 50 event-stream clients.

Starts a private etcd and a real metastackweb.py, writes 1,000 VMs (desired
entries, and claims on one live lease next to a host record, so they show
as running), connects 50 clients to /api/v1/events, then measures:
  1. put -> event: ``--puts`` times, change one VM's desired entry with a
     plain etcd put and time, at every client, from just before the put to
     the arrival of that VM's change event (puts are spaced ``--gap`` s);
  2. first page load, logged in already: GET / and its two assets plus the
     session and the four lists the page reads (HTTP only), and, when
     Debian's chromium is there, a real headless browser from navigation
     until all 1,000 rows are drawn (from about:blank each time);
  3. the server's RSS and CPU while idle for ``--idle`` s with the 50
     streams open (from /proc).
Prints a table; asserts nothing. Usage:
  .venv/bin/python bench/web.py [--vms 1000 --clients 50 --puts 100]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import metastack as ms  # noqa: E402
from harness import EtcdServer, wait_for  # noqa: E402
from web_harness import Client, EventStream, WebServer  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from metastackctl import cli  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def populate(store: ms.Store, vms: int) -> None:
    keys = store.keys
    store.put(keys.flavour("small"), b'{"vcpus": 1, "ram_mb": 256}')
    lease = store.grant_lease(600)
    host = ms.HostState(vcpus=4 * vms, ram_mb=1024 * vms, vcpus_used=vms, ram_mb_used=256 * vms, vms=vms)
    store.put(keys.host("bench-node"), host.encode(), lease=lease)
    for i in range(vms):
        name = f"vm{i:04d}"
        store.put(keys.desired(name), json.dumps({"flavour": "small"}).encode())
        claim = ms.ActualVM(host="bench-node", state="running", vcpus=1, ram_mb=256)
        store.put(keys.actual(name), claim.encode(), lease=lease)


def http_get(port: int, path: str, cookie: str = "") -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, len(body)


def page_load_http(web: WebServer) -> tuple[float, int]:
    c = Client(web)
    c.login("bench", "bench-password")  # not timed: a login is its own step (scrypt, about 50 ms)
    t0 = time.perf_counter()
    size = 0
    for path in ("/", "/static/app.js", "/static/app.css"):
        size += http_get(web.port, path)[1]
    for path in ("/api/v1/session", "/api/v1/vms", "/api/v1/hosts", "/api/v1/flavours", "/api/v1/images"):
        status, n = http_get(web.port, path, c.cookie)
        assert status == 200, path
        size += n
    return time.perf_counter() - t0, size


def page_load_browser(web: WebServer, vms: int) -> Any:
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        c = Client(web)
        c.login("bench", "bench-password")
        d.get(web.url + "/static/app.css")  # same origin, to set the cookie
        name, value = c.cookie.split("=", 1)
        d.add_cookie({"name": name, "value": value, "path": "/"})
        times = []
        for _ in range(3):
            d.get("about:blank")
            t0 = time.perf_counter()
            d.get(web.url + "/#/vms")
            wait_for(lambda: d.execute_script("return document.querySelectorAll('tr[data-vm]').length") == vms,
                     60, interval=0.01, what="all rows drawn")
            times.append(time.perf_counter() - t0)
        return times
    finally:
        d.quit()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--puts", type=int, default=100)
    ap.add_argument("--gap", type=float, default=0.05)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="metastack-bench-web-"))
    etcd = EtcdServer(work)
    etcd.start()
    store = ms.Store(ms.EtcdConfig(endpoints=ms.parse_endpoints(etcd.endpoint), prefix="/bench", timeout=2.0))
    web = WebServer(work, etcd, "/bench")
    streams: list[EventStream] = []
    try:
        r = CliRunner().invoke(cli, ["--endpoints", etcd.endpoint, "--prefix", "/bench", "user", "add", "bench",
                                     "--role", "viewer", "--password-stdin"], input="bench-password\n")
        assert r.exit_code == 0, r.output
        t0 = time.perf_counter()
        populate(store, args.vms)
        fill = time.perf_counter() - t0
        web.start()
        pid = web.proc.pid  # type: ignore[union-attr]
        c = Client(web)
        c.login("bench", "bench-password")
        wait_for(lambda: len(c.request("GET", "/api/v1/vms")[2]) == args.vms, 30, what="the server's view")
        for _ in range(args.clients):
            s = EventStream(c)
            assert s.status == 200
            streams.append(s)
        for s in streams:
            s.wait(lambda ev, d: ev == "status")
        # 1. put -> event at every client
        latencies: list[float] = []
        for i in range(args.puts):
            vm = f"vm{i % args.vms:04d}"
            value = json.dumps({"flavour": "small", "bench": i}).encode()
            sent = time.monotonic()
            store.put(store.keys.desired(vm), value)
            for s in streams:
                at, _, _ = s.wait(lambda ev, d: ev == "change" and d["name"] == vm
                                  and json.loads(d["object"]["desired_entry"]).get("bench") == i, timeout=30)
                latencies.append(at - sent)
            time.sleep(args.gap)
        # 2. first page load
        http_times = [page_load_http(web) for _ in range(5)]
        browser_times = page_load_browser(web, args.vms)
        # 3. idle
        time.sleep(1.0)
        cpu0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - w0) * 100
        rss = rss_mib(pid)
        rows = [
            ("VMs / event-stream clients", f"{args.vms} / {args.clients}"),
            ("etcd fill (desired + claims)", f"{fill:.1f} s"),
            (f"put -> event, p50 ({len(latencies)} deliveries, {args.puts} puts)", f"{statistics.median(latencies) * 1000:.1f} ms"),
            ("put -> event, p99", f"{pct(latencies, 99) * 1000:.1f} ms"),
            ("put -> event, max", f"{max(latencies) * 1000:.1f} ms"),
            ("first load over HTTP (page, assets, 4 lists), median of 5",
             f"{statistics.median(t for t, _ in http_times) * 1000:.0f} ms ({http_times[0][1] // 1024} KiB)"),
            ("first load in Chromium until all rows drawn, median of 3",
             f"{statistics.median(browser_times) * 1000:.0f} ms" if browser_times else "(no chromium)"),
            (f"server idle CPU over {args.idle:.0f} s (streams open)", f"{idle_cpu:.2f} % of one core"),
            ("server RSS", f"{rss:.0f} MiB"),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"{'metric'.ljust(width)}  value")
        for k, v in rows:
            print(f"{k.ljust(width)}  {v}")
    finally:
        for s in streams:
            s.close()
        web.stop()
        store.close()
        etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
