"""A headless chromium driven by selenium through the system's chromedriver (Debian's chromium and
chromium-driver; nothing is downloaded), for the review page's test and `make demo-review`'s screenshots."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Iterator

CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM = ("chromium", "chromium-browser", "/usr/bin/chromium")


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'hiad-deploy[test]')"
    if not any(shutil.which(name) for name in CHROMIUM) or not any(shutil.which(name) for name in CHROMEDRIVER):
        return "chromium and its driver are not installed (apt-get install chromium chromium-driver; .ci/run does)"
    return None


@contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator["selenium.webdriver.Chrome"]:  # noqa: F821
    """A headless chromium window of `width` x `height`, closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(p for name in CHROMIUM if (p := shutil.which(name)))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    driver_path = next(p for name in CHROMEDRIVER if (p := shutil.which(name)))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, seconds: float = 60):
    """Wait until `condition(driver)` is truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition)


def log_in(driver, url: str, token: str) -> None:
    """Open the page and give it the token when it asks."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    field = wait(
        driver, lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed() else None
    )
    field.send_keys(token)
    driver.find_element(By.ID, "token-ok").click()


def row(driver, item_id: str, seconds: float = 60):
    """The list's row of the inspection `item_id`, once it is shown."""
    from selenium.webdriver.common.by import By

    return wait(
        driver, lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{item_id}"]')), None), seconds
    )


def open_viewer(driver, item_id: str) -> None:
    """Click the inspection's row and wait until its image and map are drawn."""
    from selenium.webdriver.common.by import By

    row(driver, item_id).click()
    wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "viewer").get_attribute("data-ready") == "1"
            and d.find_element(By.ID, "viewer").get_attribute("data-id") == item_id
        ),
    )
