"""Headless Chromium on a local cluster's status page (``LocalCluster(web=True)``):
the demo's screenshot and the browser tests' driver.

Debian's ``chromium`` and ``chromium-driver`` (deploy/dev-deps.sh), driven
by Selenium with both paths given and ``SE_OFFLINE`` set: selenium-manager
never downloads a browser or a driver. The browser trusts exactly the
replicas' own keys (``--ignore-certificate-errors-spki-list``), not any
certificate error."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def unavailable_reason() -> str | None:
    """Why no browser can be driven here (None: it can)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return f"{' and '.join(missing)} missing (Debian's chromium and chromium-driver: deploy/dev-deps.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def spki_pin(cert_pem: Path) -> str:
    """Base64 of the SHA-256 of a certificate's SubjectPublicKeyInfo (what Chromium's pin list takes)."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def open_browser(server_certs: Iterable[Path], width: int = 1500, height: int = 900) -> Any:
    """A headless Chromium WebDriver trusting the given servers' keys (call ``quit()`` when done)."""
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager: never fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_argument("--headless=new")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument("--ignore-certificate-errors-spki-list=" + ",".join(spki_pin(p) for p in server_certs))
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver


def log_in(driver: Any, url: str, token: str, timeout: float = 30) -> None:
    """Through the login form at ``url`` (which answers 401 with it), until the page behind it shows."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    deadline = time.monotonic() + timeout
    while driver.find_elements(By.ID, "token"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the login at {url} did not go through")
        time.sleep(0.2)


def screenshot(url: str, token: str, server_certs: Iterable[Path], out: Path, *, width: int = 1300) -> Path:
    """Log in at ``url`` with ``token`` and save a PNG of the whole page at ``out``."""
    driver = open_browser(server_certs, width=width)
    try:
        log_in(driver, url, token)
        # The window as tall as the page (WebDriver's own scripts are not the page's: its CSP does not apply).
        page, frame = driver.execute_script(
            "return [document.body.scrollHeight, window.outerHeight - window.innerHeight]")
        driver.set_window_size(width, min(int(page) + int(frame), 4000))
        if not driver.save_screenshot(str(out)):
            raise OSError(f"Chromium saved no screenshot at {out}")
    finally:
        driver.quit()
    return out
