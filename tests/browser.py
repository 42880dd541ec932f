"""What the browser tests share: Chromium driven by Selenium, skipped (saying why) without them.

Needs Chromium and its driver (Debian: ``apt-get install -y chromium chromium-driver``; CI's
``.ci/run`` installs them) and the ``selenium`` package (the ``test`` extra). Screenshots go to
``$CHATTUNE_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:  # pragma: no cover - the test extra installs it
    selenium = None

needs_browser = pytest.mark.skipif(
    selenium is None or CHROMIUM is None or DRIVER is None,
    reason="browser tests need Chromium, chromedriver and selenium: apt-get install -y chromium chromium-driver; "
           "pip install selenium (CI installs them)")
TIMEOUT = 60


def screenshot_folder(tmp_path_factory) -> Path:
    """``$CHATTUNE_SCREENSHOTS``, or a temporary folder."""
    folder = Path(os.environ.get("CHATTUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_browser(height: int = 860):
    """Headless Chromium, 1280 pixels wide, in English."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size=1280,{height}",
                     "--lang=en-US"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def wait(driver, condition, seconds: float = TIMEOUT, message: str = ""):
    """``condition(driver)`` once it is true (elements missing or replaced meanwhile are waited out)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: condition(d), message)


def find(driver, css: str):
    """The first element matching ``css``."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(driver, css: str):
    """Every element matching ``css``."""
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)
