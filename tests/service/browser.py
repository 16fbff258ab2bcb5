"""Headless Chromium driven by Selenium, for the pages the service serves.

Debian's `chromium` and `chromium-driver` (the Makefile's APT_PACKAGES): nothing is downloaded at run
time. The browser can reach 127.0.0.1 only: every other host name resolves to nothing and every
other address goes through a proxy that refuses connections, so a page that needs a CDN fails here
as it would on an air-gapped host. Each request the browser makes and each console message is
recorded, so tests can assert that none left 127.0.0.1 and that no error was logged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(profile: Path, width: int = 1280, height: int = 1800) -> Iterator[WebDriver]:
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        raise RuntimeError(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make system-deps` installs "
                           "Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
        # Only loopback: other names do not resolve, other addresses meet a dead proxy (loopback
        # is never proxied).
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        # A microphone that plays a test tone, granted without a prompt.
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """Console messages of level error since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def network_requests(driver: WebDriver) -> list[str]:
    """URLs of the network requests (http, https, ws, wss) the browser made since the last call,
    from its DevTools log; pages of its own (chrome://) and data: or blob: URLs are no network."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.split(":", 1)[0] in ("http", "https", "ws", "wss"):
                urls.append(url)
    return urls


def wait_for(driver: WebDriver, script: str, timeout: float = 20) -> object:
    """Wait until the JavaScript expression `script` is truthy; return its value."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return {script}"))
