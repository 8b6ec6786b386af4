"""A headless chromium driven by selenium through the system's chromedriver (Debian's chromium and
chromium-driver; nothing is downloaded), for the review page's test and `make demo-review`'s screenshots."""

from __future__ import annotations

import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

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
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def click(d) -> bool:
        try:
            row(d, item_id).click()
            return True
        except StaleElementReferenceException:  # the list was refreshed (every 3 s) between finding and clicking
            return False

    wait(driver, click)
    wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "viewer").get_attribute("data-ready") == "1"
            and d.find_element(By.ID, "viewer").get_attribute("data-id") == item_id
        ),
    )


def demo(bundle: Path, images: Path, out: Path) -> None:
    """`make demo-review`: serve `bundle` with a review store under `out`, post every image under `images`, label
    each in the viewer with the keyboard (good/defect by its folder name), and save screenshots of the list and
    of the viewer on the highest-scoring inspection."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from hiad_runtime.review.store import ReviewStore
    from hiad_runtime.serve.launch import serving

    if reason := missing():
        raise SystemExit(f"demo-review: {reason}")
    store_dir, token_file = out / "review" / "store", out / "review" / "token"
    shutil.rmtree(store_dir, ignore_errors=True)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(secrets.token_urlsafe(16))
    token = token_file.read_text()
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    options = ("--review-dir", str(store_dir), "--token-file", str(token_file), "--drift-window", "30")
    with serving(bundle, out / "review" / "server.log", *options, wait_s=600) as (url, _), chromium() as driver:
        answers = {}
        for path in tqdm(paths, desc="inspect"):
            with path.open("rb") as f:
                r = httpx.post(
                    f"{url}/v1/inspect",
                    files={"image": (str(path.relative_to(images)), f)},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=600,
                )
            r.raise_for_status()
            answers[r.json()["review_id"]] = (path, r.json())
        log_in(driver, url, token)
        for item_id in answers:
            row(driver, item_id)
        driver.find_element(By.ID, "who").send_keys("demo")
        for item_id, (path, _) in tqdm(answers.items(), desc="label"):
            open_viewer(driver, item_id)
            key = "d" if "good" not in path.parts else "g"
            driver.find_element(By.TAG_NAME, "body").send_keys(key)
            wait(driver, lambda d: d.find_element(By.ID, "current-label").text.startswith("labeled"))
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        wait(driver, lambda d: d.find_element(By.ID, "fa-cur").text != "")
        driver.save_screenshot(str(out / "review_list.png"))
        top = max(answers, key=lambda i: answers[i][1]["score"])
        open_viewer(driver, top)
        driver.save_screenshot(str(out / "review_viewer.png"))
        drift = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}).json()["drift"]
    labels = ReviewStore(store_dir).labels()
    print(f"{len(answers)} inspections kept in {store_dir}, {len(labels)} labeled in the browser")
    print(f"drift: {drift['level']} (KS distance {drift['distance']} over {drift['scores']} scores)")
    print(f"screenshots: {out / 'review_list.png'}, {out / 'review_viewer.png'}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=demo.__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    demo(args.bundle, args.images, args.out)
