"""The review loop in a real browser (Debian's Chromium, headless, driven by Selenium through Debian's chromedriver):
a model trained on a store's catalog tags its photos, a person answers three of them in review.html with the
keyboard, reloads (the answers stay), exports corrections.csv, and the next training takes the answers as a
second source (relabelled, counted) and compares itself with the first run in its report. And the page with
50,000 rows to review: only the rows in view are in the page.

CLF_REVIEW_SCREENSHOT=docs/review.png makes the first test save its screenshot of the page there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clf.tagging.review import ReviewPage
from clf.tagging.rows import tag_columns
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with its own profile and a download folder; the driver is Debian's (Selenium Manager
    would download one)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed (setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path_factory.mktemp('profile')}", "--window-size=1000,760"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def rendered(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".row")


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    for key in keys:
        body.send_keys(key)


def reviewed(driver) -> str:
    from selenium.webdriver.common.by import By

    return f"{driver.find_element(By.ID, 'reviewed').text} of {driver.find_element(By.ID, 'total').text}"


def job(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_answers_given_in_the_page_become_the_next_trainings_labels(browser, shop, folder_run, tmp_path):
    from selenium.webdriver.common.keys import Keys

    root, _, _ = shop
    catalog, (first, _) = root / "catalog", folder_run  # a store's catalog, and the run trained on it
    tags, second = tmp_path / "tags", tmp_path / "second"
    # Every photo reviewed: a threshold no confidence reaches.
    job("jobs/tag.py", "--checkpoint", str(first), "--input", str(catalog), "--output", str(tags),
        "--review-threshold", "1")
    classes = json.loads((first / "metrics.json").read_text())["classes"]

    browser.get((tags / "review.html").as_uri())
    rows = pd.read_parquet(tags / "tags.parquet")
    total = int((rows["error"] == "").sum())  # the photos to review; those that cannot be read are listed apart
    assert reviewed(browser) == f"0 of {total}"
    answered = {}
    for _ in range(3):  # the current row: a class other than its catalog folder's, by its digit
        path = next(row for row in rendered(browser) if "current" in row.get_attribute("class")).get_attribute("data-path")
        label = next(c for c in classes if c != Path(path).parent.name)
        press(browser, str(classes.index(label) + 1))
        answered[path] = label
    assert reviewed(browser) == f"3 of {total}"
    press(browser, "s")  # a fourth skipped: reviewed, not exported
    browser.refresh()
    assert reviewed(browser) == f"4 of {total}"  # kept in the browser's storage
    press(browser, Keys.HOME)
    shown = {row.get_attribute("data-path"): row.text for row in rendered(browser)}
    assert all(f"answer: {label}" in shown[path] for path, label in answered.items())
    if os.environ.get("CLF_REVIEW_SCREENSHOT"):
        browser.save_screenshot(str(ROOT / os.environ["CLF_REVIEW_SCREENSHOT"]))
    browser.find_element("id", "export").click()
    corrections = browser.downloads / "corrections.csv"
    deadline = time.monotonic() + 30
    while not corrections.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    exported = pd.read_csv(corrections, keep_default_na=False)
    assert dict(zip(exported["path"], exported["label"])) == answered

    out = job("jobs/train.py", "--train-data", str(catalog), "--train-data", str(corrections), "--epochs", "1",
              "--batch-size", "32", "--compare", str(first), "--output", str(second), "--storage-path",
              str(tmp_path / "ray"))
    assert (f"training data: {catalog} ({len(rows)} photos), {corrections} (3 rows: 3 relabelled, 0 added, "
            "0 left out as none of these)") in out.stdout
    metrics = json.loads((second / "metrics.json").read_text())
    assert [s["relabelled"] for s in metrics["sources"]] == [0, 3]
    assert {r["path"]: (r["from"], r["to"]) for r in metrics["relabelled"]} == {
        path: (Path(path).parent.name, label) for path, label in answered.items()}
    assert metrics["compared_with"]["accuracy"] == json.loads((first / "metrics.json").read_text())["accuracy"]
    report = (second / "report.html").read_text()
    assert "before: precision" in report and "recall change" in report


def test_fifty_thousand_rows_to_review_keep_the_page_to_the_rows_in_view(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    classes = ["bags", "dresses", "sneakers", "trousers"]
    page, rng = ReviewPage(tmp_path, classes), np.random.default_rng(0)
    for start in range(0, 50_000, 5_000):
        probabilities = rng.dirichlet(np.ones(4), 5_000)
        top = np.argsort(-probabilities, axis=1)[:, :3]
        columns = tag_columns(top, np.take_along_axis(probabilities, top, axis=1), np.full(5_000, ""), classes, 1.0)
        rows = pd.DataFrame({"index": np.arange(start, start + 5_000),
                             "path": [f"s3://shop/photo-{i:05d}.jpg" for i in range(start, start + 5_000)], **columns})
        page.add(rows, np.full(5_000, b"", dtype=object))
    assert page.write() == 50_000
    browser.get((tmp_path / "review.html").as_uri())
    assert reviewed(browser) == "0 of 50000" and len(rendered(browser)) < 30
    press(browser, Keys.END, "n")
    assert reviewed(browser) == "1 of 50000" and len(rendered(browser)) < 30
    last = json.loads((tmp_path / "review" / "rows.js").read_text().removeprefix("window.CLF_REVIEW = ").rstrip(";\n"))
    assert any(row.get_attribute("data-path") == last["rows"][-1][1] for row in rendered(browser))
