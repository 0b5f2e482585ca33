"""The web status page of a running cluster (issue 14, point 1): two
coordinator replicas serving it, three agents, real certificates from
pebble; Debian's headless Chromium driven through Selenium and Debian's
chromedriver logs in with the token and reads the pages; plain HTTPS checks
who gets in and that nothing but the login takes a POST.

One cluster for the module: peer1 and peer2 get a certificate signed and
deployed; peer3's order is held open (its agent frozen, so the token push
waits) while the browser watches its page."""

from __future__ import annotations

import datetime
import shutil
import signal
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator.web.auth import COOKIE

from clusteracme import pki
from clusteracme.localcluster.browser import log_in, open_browser
from clusteracme.localcluster.browser import unavailable_reason as browser_unavailable
from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, make_cluster, record, register_account, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # agent_call_timeout: the held order's token push to the frozen peer3 waits this long at most; lease_ttl:
    # peer3 stays alive while frozen, however slow the machine.
    for c in make_cluster(tmp_path_factory, "web", peers=3, coordinators=2, web=True,
                          coordinator_timing={"agent_call_timeout": 60, "lease_ttl": 60}):
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
        for i in (1, 2):
            name = f"p{i}.web.example"
            c.set_dns(name, [i])
            c.ctl("csr", "create", f"peer{i}", "--cn", name)
            assert ctl_json(c, "sign", f"peer{i}", "--wait")["succeeded"]
            c.ctl("deploy", f"peer{i}")
        yield c


def status(cluster: LocalCluster) -> dict[str, Any]:
    return {p["peer"]["peer_id"]: p for p in ctl_json(cluster, "status")["peers"]}


def active(cluster: LocalCluster, peer: str) -> dict[str, Any]:
    slot = status(cluster)[peer]["slots"][0]
    assert slot["active_serial"], slot
    return slot


def days_left(not_after: str) -> int:
    end = datetime.datetime.fromisoformat(not_after)
    return int((end - datetime.datetime.now(datetime.UTC)).total_seconds() // 86400)


@pytest.fixture(scope="module")
def browser(cluster: LocalCluster) -> Iterator[Any]:
    reason = browser_unavailable()
    if reason is not None:
        pytest.fail(f"no browser to drive: {reason}")
    driver = open_browser(cluster.pki_dir / f"coordinator-{r.name}.pem" for r in cluster.replicas)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, where: Path, name: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot at {path}"
    assert path.stat().st_size > 1000
    return path


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def text_now(driver: Any, css: str) -> str:
    """``text_of`` on a page that reloads itself: "" while the element is
    being replaced (stale, or not there yet)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return text_of(driver, css)
    except (StaleElementReferenceException, NoSuchElementException):
        return ""


def authorized(cluster: LocalCluster, order_id: str) -> dict[str, Any] | None:
    """The order's record once the CA's authorizations are known by name
    (phase "authorized" or later), else None."""
    rec = record(cluster, f"orders/{order_id}")
    names_known = rec["authorizations"] and all(a["name"] for a in rec["authorizations"])
    return rec if names_known or rec["phase"] not in ("created", "ordered") else None


def logged_in(cluster: LocalCluster, driver: Any) -> Any:
    """The browser with a session cookie of replica c1's login form."""
    if driver.get_cookie(COOKIE) is None:
        log_in(driver, cluster.replica(1).web_url, cluster.web_token_file.read_text().strip())
    return driver


def test_the_browser_logs_in_with_the_token_and_sees_every_peer(cluster: LocalCluster, browser: Any,
                                                                 tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(cluster.replica(1).web_url)
    # No credentials: the login form (the server answered 401), no table.
    assert browser.find_elements(By.ID, "token") and not browser.find_elements(By.ID, "status")
    browser.find_element(By.ID, "token").send_keys("not-the-token-at-all-0123")
    browser.find_element(By.ID, "login").click()
    assert text_of(browser, "#message") == "wrong token"
    assert browser.get_cookie(COOKIE) is None

    logged_in(cluster, browser)
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert cluster.web_token_file.read_text().strip() not in cookie["value"]
    table = text_of(browser, "#status")
    for i in (1, 2):
        slot = active(cluster, f"peer{i}")
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-peer="peer{i}"]').text
        assert slot["active_serial"] in row
        assert row.split()[:3] == [f"peer{i}", "alive", "on"], row
        assert browser.find_element(By.CSS_SELECTOR, f'tr[data-peer="peer{i}"] td.days').text \
            == str(days_left(slot["active_not_after"]))
        assert "manual" in row and "ok" in row  # the mode, the last deploy
    assert "peer3" in table
    shot(browser, tmp_path, "status")
    shutil.copy(shot(browser, tmp_path, "status-page"), cluster.run_dir / "status-page.png")


def test_a_peer_page_shows_its_slot_and_history(cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    logged_in(cluster, browser).get(cluster.replica(1).web_url + "peers/peer1")
    slot = active(cluster, "peer1")
    assert text_of(browser, "#peer-id") == "peer1"
    slots = text_of(browser, "#slots")
    assert slot["active_serial"] in slots and "p1.web.example" in slots and "yes" in slots  # disk = etcd
    events = text_of(browser, "#events")
    assert "sign" in events and "deploy" in events and slot["active_serial"] in events
    shot(browser, tmp_path, "peer1")


def test_an_order_page_follows_a_running_order_to_its_end(cluster: LocalCluster, browser: Any,
                                                          tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    name = "p3.web.example"
    cluster.set_dns(name, [3])
    cluster.ctl("csr", "create", "peer3", "--cn", name)
    agent3 = cluster.agent(3).process
    assert agent3 is not None
    agent3.signal(signal.SIGSTOP)  # the token push to peer3 waits: the order stays open
    try:
        order_id = ctl_json(cluster, "sign", "peer3")["order_id"]
        # Before "authorized" the authorizations are placeholders without a name (the page says "not yet").
        rec = wait_for("the order's authorizations known", lambda: authorized(cluster, order_id), timeout=30)
        assert rec["phase"] == "authorized", rec["phase"]  # held there: the push to peer3 waits
        logged_in(cluster, browser).get(cluster.replica(1).web_url + f"orders/{order_id}")
        assert text_of(browser, "#order-id") == order_id
        running = text_of(browser, "#phase")
        assert running.split()[0] == "authorized", running
        assert "refreshes while the order runs" in running
        row = text_of(browser, "#authorizations").splitlines()[1]
        assert row.startswith(name) and row[len(name):].strip() in ("pending", "not yet"), row
        if running.startswith("authorized"):  # peers are listed once the push has its answers
            assert text_of(browser, "#no-peers") == "tokens being pushed to the serving peers"
        shot(browser, tmp_path, "order-running")
    finally:
        agent3.signal(signal.SIGCONT)
    # The page reloads itself (meta refresh) until the order ends: no reload from here.
    wait_for("the order page showing the end", lambda: text_now(browser, "#phase").split()[:1] in (["done"], ["failed"]),
             timeout=120, interval=0.5)
    assert text_of(browser, "#phase") == "done"
    assert text_of(browser, "#authorizations").splitlines()[1] == f"{name} valid"
    peer3 = browser.find_element(By.CSS_SELECTOR, 'tr[data-peer="peer3"]').text
    assert "acknowledged" in peer3 and "passed" in peer3
    shot(browser, tmp_path, "order-done")
    browser.get(cluster.replica(1).web_url + "orders")
    assert order_id in text_of(browser, "#orders")


def test_the_timeline_draws_a_bar_per_certificate(cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    logged_in(cluster, browser).get(cluster.replica(1).web_url + "timeline")
    serials = {active(cluster, f"peer{i}")["active_serial"] for i in (1, 2)}
    svg = browser.find_element(By.CSS_SELECTOR, "svg.timeline")
    bars = svg.find_elements(By.CSS_SELECTOR, "g.bar")
    assert {b.get_attribute("data-serial") for b in bars} == serials
    assert len(svg.find_elements(By.CSS_SELECTOR, "line.now")) == 1
    assert all(b.find_elements(By.CSS_SELECTOR, "rect") for b in bars)
    shot(browser, tmp_path, "timeline")


def test_the_standby_serves_the_page_too(cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    standby = cluster.replica(2 if cluster.wait_leader(timeout=30) == 1 else 1)
    # The session cookie of c1's login is good on every replica reading the same token file.
    logged_in(cluster, browser).get(standby.web_url)
    assert f"replica {standby.name}" in text_of(browser, "header")
    assert active(cluster, "peer1")["active_serial"] in text_of(browser, "#status")
    shot(browser, tmp_path, f"standby-{standby.name}")
    body = fetch(cluster, standby.web_url + "peers/peer2", token=True)[1]
    assert active(cluster, "peer2")["active_serial"] in body


# --- plain HTTPS: who gets in, and what is refused ---------------------------------------------
def fetch(cluster: LocalCluster, url: str, *, method: str = "GET", token: bool | str = False,
          cert: str | None = None, data: bytes | None = None) -> tuple[int, str, Any]:
    """(status, body, headers) of one request, the cluster CA trusted; ``cert``: a client pair in pki/."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki_dir / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(cluster.pki_dir / f"{cert}.pem"), str(cluster.pki_dir / f"{cert}.key"))
    headers = {}
    if token:
        headers["Authorization"] = "Bearer " + (token if isinstance(token, str)
                                                else cluster.web_token_file.read_text().strip())
    request = urllib.request.Request(url, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


def test_without_credentials_the_page_is_refused(cluster: LocalCluster) -> None:
    url = cluster.replica(1).web_url
    code, body, headers = fetch(cluster, url)
    assert code == 401 and 'name="token"' in body and "peer1" not in body
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert fetch(cluster, url + "timeline", token="wrong-token-wrong-token")[0] == 401
    assert fetch(cluster, url + "peers/peer1")[0] == 401
    assert fetch(cluster, url + "healthz")[:2] == (200, "ok\n")
    code, body, headers = fetch(cluster, url, token=True)
    assert code == 200 and "peer1" in body
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in \
        headers["Content-Security-Policy"]
    assert (headers["X-Frame-Options"], headers["X-Content-Type-Options"], headers["Cache-Control"]) == \
        ("DENY", "nosniff", "no-store")
    assert "<script" not in body


def test_only_the_login_takes_a_post(cluster: LocalCluster) -> None:
    url = cluster.replica(1).web_url
    for method, path in (("POST", ""), ("POST", "orders"), ("PUT", "peers/peer1"), ("DELETE", "orders"),
                         ("PATCH", "timeline"), ("POST", "peers/peer1"), ("PUT", "login")):
        code, _, headers = fetch(cluster, url + path, method=method, token=True, data=b"x=1")
        assert code == 405, (method, path, code)
    assert fetch(cluster, url, method="HEAD", token=True)[0] == 200


def test_an_operator_certificate_gets_in_an_agent_or_denied_one_does_not(cluster: LocalCluster) -> None:
    url = cluster.replica(1).web_url + "peers/peer1"
    code, body, _ = fetch(cluster, url, cert="operator-admin")
    assert code == 200 and active(cluster, "peer1")["active_serial"] in body and "operator:admin" in body
    code, body, _ = fetch(cluster, url, cert="agent-peer1")
    assert code == 403 and "agent:peer1 may not read the status page" in body
    # Even with the token: a certificate that is refused is refused.
    assert fetch(cluster, url, cert="agent-peer1", token=True)[0] == 403
    # An operator certificate on the deny list is refused by every replica once they have read the list.
    pki.issue(cluster.pki_dir, pki.Identity(pki.Role.OPERATOR, "leaver"), out_dir=cluster.pki_dir)
    assert fetch(cluster, url, cert="operator-leaver")[0] == 200
    cluster.ctl("pki", "revoke", str(cluster.pki_dir / "operator-leaver.pem"), "--reason", "left the team")
    for replica in cluster.replicas:
        wait_for(f"{replica.name} refusing the denied certificate",
                 lambda r=replica: fetch(cluster, r.web_url, cert="operator-leaver")[0] == 403, timeout=30)
    assert "left the team" in fetch(cluster, url, cert="operator-leaver")[1]
