"""The page in a real headless Chromium (Debian chromium + chromium-driver,
driven by Selenium; nothing downloaded), against a real metastackweb.py,
its own etcd and an agent on a test:/// host. One browser for the module.
Screenshots of each page go to the module's temp dir (and to
$METASTACK_SCREENSHOTS when set)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from harness import wait_for
from web_harness import PASSWORDS, WebEnv, web_env_fixture

selenium = pytest.importorskip("selenium", reason="selenium is installed by deploy/setup.sh")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

browser_env = web_env_fixture("browser_env")


@pytest.fixture(scope="module")
def env(browser_env: WebEnv) -> WebEnv:
    web_env = browser_env
    web_env.cluster.flavour("tiny", 1, 128)
    web_env.cluster.flavour("small", 1, 256)
    web_env.store.put(web_env.keys.image("tiny"), json.dumps({"pool": "metastack", "image": "base-tiny-1",
                                                              "snapshot": "base", "size": 33554432}).encode())
    web_env.cluster.agent("node1", vcpus=4, ram_mb=2048)
    web_env.cluster.agent("node2", vcpus=2, ram_mb=100)  # too small for any flavour: only shown, later lost
    web_env.cluster.wait_hosts("node1", "node2")
    return web_env


@pytest.fixture(scope="module")
def browser(env: WebEnv) -> Iterator[Any]:
    for path in (CHROMIUM, DRIVER):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: run bash deploy/setup.sh (Debian chromium, chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Small helpers over the driver: wait for elements, click, screenshot."""

    def __init__(self, driver: Any, env: WebEnv) -> None:
        self.d = driver
        self.env = env
        self.shots = env.dir / "screenshots"
        self.shots.mkdir(exist_ok=True)

    def wait(self, pred: Callable[[], Any], what: str, timeout: float = 10) -> Any:
        def safe() -> Any:
            try:
                return pred()
            except (StaleElementReferenceException, WebDriverException):
                return None
        return wait_for(safe, timeout, interval=0.05, what=what)

    def find(self, css: str) -> list[Any]:
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def one(self, css: str, timeout: float = 10) -> Any:
        return self.wait(lambda: next((e for e in self.find(css) if e.is_displayed()), None), css, timeout)

    def text(self, css: str) -> str:
        els = self.find(css)
        return els[0].text if els else ""

    def click(self, css: str) -> None:
        self.wait(lambda: self.one(css).click() or True, f"click {css}")

    def type(self, css: str, value: str) -> None:
        el = self.one(css)
        el.clear()
        el.send_keys(value)

    def confirm(self) -> None:
        self.click("#confirm-yes")
        self.wait(lambda: not self.d.execute_script("return document.getElementById('confirm').open"), "dialog closed")

    def vm_state(self, vm: str) -> str:
        return self.text(f'tr[data-vm="{vm}"] td.vmstate')

    def go(self, hash_: str) -> None:
        self.d.execute_script("location.hash = arguments[0]", hash_)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        extra = os.environ.get("METASTACK_SCREENSHOTS")
        if extra:
            os.makedirs(extra, exist_ok=True)
            shutil.copy(path, os.path.join(extra, path.name))
        return path

    def login(self, user: str, password: str) -> None:
        self.type("#login-user", user)
        self.type("#login-password", password)
        self.click("#login-submit")


@pytest.fixture(scope="module")
def page(browser: Any, env: WebEnv) -> Page:
    browser.get(env.web.url + "/")
    return Page(browser, env)


def test_login(page: Page) -> None:
    page.one("#login-form")
    assert not page.d.find_element(By.ID, "nav").is_displayed()  # nothing but the form before a login
    page.shot("0-login")
    page.login("admin", "wrong-password")
    page.wait(lambda: "wrong user or password" in page.text("#login-error"), "login error shown")
    page.login("admin", PASSWORDS["admin"])
    page.wait(lambda: page.text("#whoami") == "admin (admin)", "logged in")
    assert page.d.get_cookies()[0]["httpOnly"] is True
    assert page.d.execute_script("return document.cookie") == ""  # the session cookie is not readable by JS


def test_a_vm_made_with_etcdctl_appears_live_and_turns_running(page: Page, env: WebEnv) -> None:
    page.one("#vm-table")
    env.etcd.etcdctl("put", f"{env.prefix}/desired/cli1", '{"flavour": "tiny"}')
    page.wait(lambda: page.find('tr[data-vm="cli1"]'), "cli1 in the table without a reload")
    page.wait(lambda: "running" in page.vm_state("cli1"), "cli1 running", 20)
    assert "node1" == page.text('tr[data-vm="cli1"] td.host')
    assert "running 1" in page.text("#vm-counts")


def test_create_stop_start_destroy_through_the_page(page: Page, env: WebEnv) -> None:
    page.type("#create-name", "page1")
    page.d.find_element(By.CSS_SELECTOR, "#create-flavour option[value='small']").click()
    page.click("#create-submit")
    page.wait(lambda: "running" in page.vm_state("page1"), "page1 running", 20)
    entry = json.loads(env.store.get(env.keys.desired("page1")).value)
    assert entry["flavour"] == "small" and entry["state"] == "running" and "uuid" in entry
    page.shot("1-vms")
    page.click('tr[data-vm="page1"] button[data-action="stop"]')
    page.confirm()
    page.wait(lambda: "stopped" in page.vm_state("page1"), "page1 stopped", 20)
    assert env.cluster.states()["page1"][0] == "stopped"
    page.click('tr[data-vm="page1"] button[data-action="start"]')
    page.wait(lambda: "running" in page.vm_state("page1"), "page1 running again", 20)
    page.click('tr[data-vm="page1"] button[data-action="destroy"]')
    page.click("#confirm-no")  # cancelled: nothing happens
    time.sleep(0.3)
    assert env.store.get(env.keys.desired("page1")) is not None
    page.click('tr[data-vm="page1"] button[data-action="destroy"]')
    page.confirm()
    page.wait(lambda: not page.find('tr[data-vm="page1"]'), "page1 gone from the table", 20)
    assert env.store.get(env.keys.desired("page1")) is None


def test_a_bad_name_shows_an_error_and_writes_nothing(page: Page, env: WebEnv) -> None:
    before = env.keys_under()
    page.type("#create-name", "Bad_Name")
    page.click("#create-submit")
    page.wait(lambda: "not a valid VM name" in page.text("#create-error"), "error next to the form")
    assert page.one("#create-name").get_attribute("aria-invalid") == "true"
    page.shot("1b-vms-error")
    assert env.keys_under() == before
    page.type("#create-name", "cli1")  # a taken name: refused too
    page.click("#create-submit")
    page.wait(lambda: "already exists" in page.text("#create-error"), "name taken shown")
    assert env.keys_under() == before
    page.type("#vm-filter", "zzz-no-match")
    page.wait(lambda: not page.find("tr[data-vm]") and "No VM matches" in page.text("main"), "filter hides all")
    page.one("#vm-filter").send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)  # clear() fires no input event
    page.wait(lambda: page.find('tr[data-vm="cli1"]'), "filter cleared")


def test_vm_detail_shows_console_and_history_live(page: Page, env: WebEnv) -> None:
    base = 1_790_000_000_000_000
    # events the agents do not write in this flow (they write claimed/started of their own)
    env.history("cli1", base, "node1", "fenced", "node node9 (clients)")
    page.go("#/vms/cli1")
    page.wait(lambda: page.find('#history tr[data-event="fenced"]'), "history loaded")
    env.history("cli1", base + 1_000_000, "node2", "moved", "to node2")
    page.wait(lambda: page.find('#history tr[data-event="moved"]'), "a new history event appears live")
    env.store.put(env.keys.console("cli1"), b"Booting...\nMETASTACK-GUEST-UP boot=1\n")
    page.wait(lambda: "METASTACK-GUEST-UP boot=1" in page.text("#console"), "console tail appears live")
    rows = [r.text.split()[1] for r in page.find("#history tbody tr")]
    assert [e for e in rows if e in ("fenced", "moved")] == ["fenced", "moved"]  # oldest first
    assert "claimed" in rows  # and the agent's own record of it
    assert '"flavour": "tiny"' in page.text("#desired-entry")
    page.shot("2-vm-detail")


def test_hosts_show_capacity_and_a_node_turning_lost(page: Page, env: WebEnv) -> None:
    page.go("#/hosts")
    page.wait(lambda: "vCPUs: 1 / 4" in page.text('[data-host="node1"]'), "node1 capacity")
    assert "cli1" in page.text('[data-host="node1"] .vms')
    assert "ready" in page.text('[data-host="node2"]')
    page.shot("3-hosts")
    agent = next(a for a in env.cluster.agents if a.name == "node2")
    agent.signal(9)
    agent.wait()
    agent.stop_watchdog()
    page.wait(lambda: "lost" in page.text('[data-host="node2"] h2'), "node2 lost, live", 15)
    page.shot("3b-hosts-lost")


def test_flavours_and_images_pages(page: Page, env: WebEnv) -> None:
    page.go("#/flavours")
    page.type("#flavour-name", "huge")
    page.type("#flavour-vcpus", "8")
    page.type("#flavour-ram", "16384")
    page.click("#flavour-submit")
    page.wait(lambda: page.find('tr[data-flavour="huge"]'), "flavour huge listed")
    assert json.loads(env.store.get(env.keys.flavour("huge")).value) == {"vcpus": 8, "ram_mb": 16384}
    page.click('tr[data-flavour="tiny"] button[data-action="delete"]')  # in use by cli1: refused
    page.confirm()
    page.wait(lambda: "used by 1 VM(s): cli1" in page.text("#flavour-error-tiny"), "in-use error next to the row")
    page.shot("4-flavours")
    page.click('tr[data-flavour="huge"] button[data-action="delete"]')
    page.confirm()
    page.wait(lambda: not page.find('tr[data-flavour="huge"]'), "flavour huge deleted")
    page.go("#/images")
    page.wait(lambda: "base-tiny-1@base" in page.text('tr[data-image="tiny"]'), "image listed")
    page.shot("5-images")


def test_banner_when_the_server_loses_etcd_and_reconnect_after_a_restart(page: Page, env: WebEnv) -> None:
    page.go("#/vms")
    page.one("#vm-table")
    env.etcd.stop()
    try:
        page.wait(lambda: "lost etcd" in page.text("#banner"), "etcd banner", 15)
        page.shot("6-banner-etcd-lost")
    finally:
        env.etcd.start()
    page.wait(lambda: not page.find("#banner:not([hidden])"), "banner gone", 20)
    env.web.stop()
    page.wait(lambda: "reconnecting" in page.text("#banner"), "stream lost banner")
    env.web.start()
    page.wait(lambda: not page.find("#banner:not([hidden])"), "reconnected", 20)
    env.etcd.etcdctl("put", f"{env.prefix}/desired/after1", '{"flavour": "tiny", "state": "stopped"}')
    page.wait(lambda: page.find('tr[data-vm="after1"]'), "a change after the restart shows without a reload")


def test_phone_layout(page: Page) -> None:
    page.d.set_window_size(390, 844)
    try:
        page.go("#/vms")
        page.one("#vm-table")
        width = page.d.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400, width  # the table scrolls inside its box; the page itself does not
        page.shot("7-phone-vms")
    finally:
        page.d.set_window_size(1280, 900)


def test_a_viewer_sees_no_actions_and_a_forged_request_fails(page: Page, env: WebEnv) -> None:
    page.click("#logout")
    page.one("#login-form")
    page.login("viewer", PASSWORDS["viewer"])
    page.wait(lambda: page.text("#whoami") == "viewer (viewer)", "viewer logged in")
    page.go("#/vms")
    page.wait(lambda: page.find('tr[data-vm="cli1"]'), "viewer sees the VMs")
    assert not page.find("button[data-action]") and not page.find("#create-form")
    page.go("#/flavours")
    page.wait(lambda: page.find('tr[data-flavour="tiny"]'), "viewer sees flavours")
    assert not page.find("button[data-action]") and not page.find("#flavour-form")
    page.shot("8-viewer-flavours")
    before = env.keys_under()
    status = page.d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/v1/session').then(r => r.json()).then(me =>
          fetch('/api/v1/vms/cli1', {method: 'DELETE', headers: {'X-CSRF-Token': me.csrf}})
        ).then(r => done(r.status));""")
    assert status == 403
    assert env.keys_under() == before
    page.click("#logout")
    page.one("#login-form")
    status = page.d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/v1/vms').then(r => done(r.status));""")
    assert status == 401
