"""The console in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium) against the running stack (the production web server, the Celery worker, the sandbox
providers). Each page's screenshot is saved under test-artifacts/console/ for review
(docs/console.md shows them)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT
from tests.factories import TestAccount as Account

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-artifacts" / "console"


@pytest.fixture(scope="module")
def live_url(web_server: Any, worker: Any) -> str:
    """The running stack: the production web server (gunicorn, config/gunicorn.conf.py) and the
    Celery worker, on the suite's database, Redis and sandbox providers."""
    return str(web_server.base_url)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "the console's browser tests need Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    # Elements are looked for until they appear (a page still loading), up to 10 s.
    driver.implicitly_wait(10)
    driver.downloads = downloads
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str, width: int = 1280) -> None:
    """A full-page screenshot at ``width`` CSS pixels."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height + 140, 600), 6000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def click_through(driver: Any, element: Any, timeout_s: float = 40) -> None:
    """Clicks a link or a submit button and waits until the next page has replaced this one."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element("tag name", "html")
    element.click()
    WebDriverWait(driver, timeout_s).until(expected_conditions.staleness_of(page))


def by_id(driver: Any, ident: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, ident)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def sign_in(driver: Any, base: str, key: str) -> None:
    driver.get(f"{base}/console/")
    assert "/console/sign-in" in driver.current_url
    by_id(driver, "api_key").send_keys(key)
    click_through(driver, css(driver, "form button[type=submit]")[-1])
    assert driver.current_url.rstrip("/").endswith("/console")


def test_the_console_end_to_end(
    browser: Any, live_url: str, make_account: Any, pipeline: Any, redis_client: Any
) -> None:
    from app.db import session_scope
    from app.providers.breaker import Breaker
    from app.providers.probe import probe_all
    from config.settings import get_settings

    driver, base = browser, live_url
    account: Account = make_account("5.00", name="browser")
    other: Account = make_account("1.00", name="someone else")

    settings = get_settings()

    def check_board() -> None:
        """What beat has the workers do every second (FLOPEX_QUOTE_REFRESH_S)."""
        with session_scope() as session:
            probe_all(
                session, redis_client, Breaker.from_settings(redis_client, settings), timeout_s=2
            )

    check_board()

    # Signing in: the page, a wrong key refused, the right key in.
    driver.get(f"{base}/console/sign-in")
    shot(driver, "sign-in")
    # The keyboard's first stop is the skip link; the field is labelled.
    from selenium.webdriver.common.keys import Keys

    driver.find_element("tag name", "body").send_keys(Keys.TAB)
    assert driver.switch_to.active_element.text == "Skip to content"
    assert css(driver, 'label[for="api_key"]')[0].text == "API key"
    by_id(driver, "api_key").send_keys("fpx_wrong_" + "x" * 24)
    click_through(driver, css(driver, "form button[type=submit]")[-1])
    assert "invalid or revoked" in by_id(driver, "sign-in-error").text
    sign_in(driver, base, account.api_key)

    # Some history first: other profiles and models, and one that every provider fails.
    def submit(**extra: Any) -> Any:
        return requests.post(
            f"{base}/v1/inference",
            json={"model": "llama-3.1-8b", "input": "warm up", "max_output_tokens": 16, **extra},
            headers=account.headers,
            timeout=30,
        )

    submit(performance_profile="fast")
    submit(performance_profile="economy", model="qwen-7b")
    for provider in pipeline.values():
        provider.configure(fault="error")
    failed = submit().json()["error"]["job_id"]
    for provider in pipeline.values():
        provider.configure(fault=None)
    # The board, checked every second in production, sees them answer again.
    check_board()

    # A request through the API appears in Activity with its cost.
    answer = requests.post(
        f"{base}/v1/inference",
        json={
            "model": "llama-3.1-8b",
            "input": "Summarize inference routing in two sentences.",
            "max_output_tokens": 64,
            "customer_ref": "browser-1",
        },
        headers=account.headers,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    other_job = requests.post(
        f"{base}/v1/inference",
        json={"model": "llama-3.1-8b", "input": "not yours", "max_output_tokens": 8},
        headers=other.headers,
        timeout=30,
    ).json()

    driver.get(f"{base}/console/")
    spent = requests.get(
        f"{base}/v1/inference?status=success", headers=account.headers, timeout=10
    ).json()["data"]
    assert by_id(driver, "spend30").text == "${}".format(
        sum(Decimal(str(j["billing"]["cost_usd"])) for j in spent)
    )
    assert "Spend per day" in driver.page_source
    shot(driver, "overview")
    shot(driver, "overview-narrow", width=380)

    driver.get(f"{base}/console/activity")
    rows = css(driver, "#jobs tbody tr")
    assert len(rows) == 4
    assert "failed" in rows[1].text  # the one every provider failed
    cells = [c.text for c in rows[0].find_elements("css selector", "td")]
    assert cells[2] == "llama-3.1-8b"
    assert cells[3] == job["provider"]
    assert cells[5] == job["billing"]["cost_display"]
    assert cells[7] == "success"
    assert other_job["id"][:8] not in driver.page_source
    shot(driver, "activity")

    # Its route.
    click_through(driver, rows[0].find_element("css selector", "td a"))
    assert job["id"] in driver.title
    assert by_id(driver, "job-cost").text == job["billing"]["cost_display"]
    assert by_id(driver, "route-winner").text == job["provider"]
    assert len(css(driver, "#quotes tbody tr")) == len(job["routing"]["quotes"])
    assert css(driver, "svg.chart title")  # the pictures are there, titled
    kinds = [
        r.find_elements("css selector", "td")[2].text for r in css(driver, "#job-ledger tbody tr")
    ]
    assert kinds == ["hold", "capture", "release"]
    shot(driver, "job")
    shot(driver, "job-narrow", width=380)

    # A failed job's route: every attempt, in order.
    driver.get(f"{base}/console/jobs/{failed}")
    assert by_id(driver, "job-status").text == "failed"
    assert by_id(driver, "route-winner").text == "nobody"
    shot(driver, "job-failed")

    # The CSV export, downloaded by the browser.
    driver.get(f"{base}/console/activity?customer_ref=browser-1")
    css(driver, "a[download]")[0].click()
    exported = driver.downloads / "flopex-activity.csv"
    deadline = time.monotonic() + 10
    while not exported.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the browser writes the download on its own schedule
    rows_csv = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert [(r["id"], Decimal(r["cost_usd"])) for r in rows_csv] == [
        (job["id"], Decimal(str(job["billing"]["cost_usd"])))
    ]

    # The wallet's ledger, with its running balance.
    driver.get(f"{base}/console/wallet")
    ledger = css(driver, "#ledger tbody tr")
    assert [r.find_elements("css selector", "td")[2].text for r in ledger][:3] == [
        "release",
        "capture",
        "hold",
    ]
    assert ledger[1].find_elements("css selector", "td")[5].text == (
        f"${Decimal(str(job['billing']['balance_remaining_usd'])):.6f}"
    )
    shot(driver, "wallet")

    # The board is checked every second in production; here, once more now (the failed
    # executions above marked bravo and charlie down until their next good check).
    check_board()
    # And the last 40 minutes as a running exchange would have checked them (the checks above
    # are all in this minute): a history to draw, with two minutes where charlie was down.
    from app.providers import history

    base_rtt = {"alpha": 200, "bravo": 4, "charlie": 20}
    for minutes_ago in range(40, 0, -1):
        at = time.time() - 60 * minutes_ago
        for name, rtt in base_rtt.items():
            down = name == "charlie" and minutes_ago in (12, 13)
            history.record(
                redis_client, name, at, not down, None if down else rtt + minutes_ago % 7
            )
    driver.get(f"{base}/console/market")
    assert {
        r.find_element("css selector", "th").text for r in css(driver, "#providers tbody tr")
    } == {
        "alpha",
        "bravo",
        "charlie",
    }
    assert "no history" not in driver.page_source
    for cell in css(driver, "#providers td.spark"):  # each provider's last hour is drawn
        assert cell.find_elements("css selector", "svg polyline, svg circle")
    assert "down" not in by_id(driver, "providers").text
    # alpha's llama input price, 0.05 USD/M, with the 15 % margin the tests run with.
    assert "$0.057500 / $0.092000" in driver.page_source
    shot(driver, "market")

    # The playground: every parameter of the API document, the answer, its cost and its route.
    driver.get(f"{base}/console/playground")
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "performance_profile")).select_by_value("fast")
    by_id(driver, "customer_ref").send_keys("playground-1")
    by_id(driver, "max_price_usd").send_keys("0.5")
    by_id(driver, "max_latency_ms").send_keys("5000")
    by_id(driver, "metadata").send_keys('{"env": "console"}')
    by_id(driver, "max_output_tokens").clear()
    by_id(driver, "max_output_tokens").send_keys("32")
    click_through(driver, css(driver, "form.grid-form button[type=submit]")[0])
    assert by_id(driver, "pg-status").text == "success"
    assert by_id(driver, "pg-answer").text
    assert by_id(driver, "pg-cost").text.startswith("$")
    assert by_id(driver, "pg-provider").text == by_id(driver, "route-winner").text
    shot(driver, "playground")
    played = requests.get(
        f"{base}/v1/inference?customer_ref=playground-1", headers=account.headers, timeout=10
    ).json()["data"]
    assert len(played) == 1 and played[0]["metadata"] == {"env": "console"}
    assert by_id(driver, "pg-cost").text == played[0]["billing"]["cost_display"]

    # Keys: issue one (shown once), use it, revoke it.
    driver.get(f"{base}/console/keys")
    by_id(driver, "key-name").send_keys("from the browser")
    click_through(driver, css(driver, "form.inline button[type=submit]")[0])
    new_key = by_id(driver, "new-key").get_attribute("value")
    shot(driver, "keys")
    assert requests.get(
        f"{base}/v1/wallet", headers={"Authorization": f"Bearer {new_key}"}, timeout=10
    ).ok
    prefix = new_key.split("_")[1]
    click_through(
        driver, driver.find_element("css selector", f'button[aria-label="Revoke key {prefix}"]')
    )
    assert "new-key" not in driver.page_source
    row = next(r for r in css(driver, "#keys tbody tr") if prefix in r.text)
    assert "revoked" in row.text
    assert (
        requests.get(
            f"{base}/v1/wallet", headers={"Authorization": f"Bearer {new_key}"}, timeout=10
        ).status_code
        == 401
    )

    # Another account's job id typed into the URL: not found.
    driver.get(f"{base}/console/jobs/{other_job['id']}")
    assert "Not found" in driver.find_element("css selector", "h1").text
    assert "not yours" not in driver.page_source
    shot(driver, "not-found")

    # Signing out ends the session.
    click_through(driver, css(driver, ".signout button")[0])
    assert "/console/sign-in" in driver.current_url
    driver.get(f"{base}/console/activity")
    assert "/console/sign-in" in driver.current_url


def test_docs_screenshots_are_committed() -> None:
    """docs/console.md shows a screenshot of each page (copied from test-artifacts/)."""
    doc = (ROOT / "docs" / "console.md").read_text()
    for name in (
        "sign-in",
        "overview",
        "activity",
        "job",
        "wallet",
        "market",
        "playground",
        "keys",
    ):
        assert f"console/{name}.png" in doc
        assert (ROOT / "docs" / "console" / f"{name}.png").exists()
