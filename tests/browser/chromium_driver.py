"""A headless Chromium session through Selenium, or a skip that names how to install what is missing."""

from __future__ import annotations

import os
import shutil

import pytest

INSTALL = "install them with: apt-get install chromium chromium-driver (Debian/Ubuntu; make test does this as root)"


def _find(*names: str) -> str | None:
    for name in names:
        found = os.environ.get(f"ATPSTAR_{name.upper().replace('-', '_')}") or shutil.which(name)
        if found:
            return found
    return None


def start_chromium(offline: bool = False, performance_log: bool = False):
    """A headless Chromium session (skips the test when the browser or Selenium is missing)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser tests need selenium: pip install -e '.[dev]' (or pip install selenium)")
    browser = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip(f"browser tests need Chromium and chromedriver on PATH; {INSTALL}")
    options = Options()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    logs = {"browser": "ALL", **({"performance": "ALL"} if performance_log else {})}
    options.set_capability("goog:loggingPrefs", logs)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    if offline:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
        )
    return driver
