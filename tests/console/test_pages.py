"""The console's pages through Flask's test client: sessions, CSRF, one account never seeing
another's, every page rendering. The browser tests (test_browser.py) drive the same pages in
Chromium against the running stack."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.factories import TestAccount as Account


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client: Any, account: Account) -> None:
    page = client.get("/console/sign-in")
    token = csrf_token(page.get_data(as_text=True))
    answer = client.post(
        "/console/sign-in", data={"api_key": account.api_key, "csrf_token": token, "next": ""}
    )
    assert answer.status_code == 303, answer.get_data(as_text=True)


@pytest.fixture
def console(flask_app: Any, make_account: Any) -> tuple[Any, Account]:
    account = make_account("5.00")
    client = flask_app.test_client()
    sign_in(client, account)
    return client, account


def test_pages_need_a_session(client: Any) -> None:
    for path in ("/console/", "/console/activity", "/console/wallet", "/console/keys"):
        answer = client.get(path)
        assert answer.status_code == 302
        assert "/console/sign-in?next=" in answer.headers["Location"]


def test_the_session_cookie_is_httponly_samesite_and_holds_no_key(
    flask_app: Any, make_account: Any
) -> None:
    account = make_account()
    client = flask_app.test_client()
    page = client.get("/console/sign-in")
    token = csrf_token(page.get_data(as_text=True))
    answer = client.post("/console/sign-in", data={"api_key": account.api_key, "csrf_token": token})
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/console" in cookie
    assert account.api_key not in cookie
    secret = account.api_key.split("_", 2)[2]  # fpx_<prefix>_<secret>
    assert secret not in cookie


def test_a_wrong_key_is_refused(client: Any) -> None:
    page = client.get("/console/sign-in")
    token = csrf_token(page.get_data(as_text=True))
    answer = client.post(
        "/console/sign-in", data={"api_key": "fpx_nope_" + "x" * 20, "csrf_token": token}
    )
    assert answer.status_code == 401
    assert "invalid or revoked" in answer.get_data(as_text=True)


def test_forms_without_the_csrf_token_are_refused(console: tuple[Any, Account]) -> None:
    client, _ = console
    assert client.post("/console/keys", data={"name": "x"}).status_code == 400
    assert client.post("/console/sign-out").status_code == 400
    # Still signed in: the forged sign-out did nothing.
    assert client.get("/console/").status_code == 200


def test_every_page_renders(console: tuple[Any, Account]) -> None:
    client, _ = console
    for path in (
        "/console/",
        "/console/activity",
        "/console/activity?status=success&model=llama-3.1-8b",
        "/console/wallet",
        "/console/market",
        "/console/playground",
        "/console/keys",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.get_data(as_text=True)[:2000])
        assert answer.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    wallet = client.get("/console/wallet").get_data(as_text=True)
    assert "$5.000000" in wallet


def test_bad_filters_are_a_page_not_a_crash(console: tuple[Any, Account]) -> None:
    client, _ = console
    unknown = client.get("/console/nowhere/at/all")
    assert unknown.status_code == 404 and unknown.mimetype == "text/html"
    assert client.get("/console/activity?status=bogus").status_code == 400
    assert client.get("/console/activity?created_after=yesterday").status_code == 400
    assert client.get("/console/activity?starting_after=nope").status_code == 404
    assert client.get("/console/wallet?starting_after=abc").status_code == 404


def test_another_accounts_job_and_key_are_not_found(
    flask_app: Any, make_account: Any, console: tuple[Any, Account]
) -> None:
    from app.db import session_scope
    from app.models import ApiKey, Job

    client, _ = console
    other = make_account()
    with session_scope() as session:
        from sqlalchemy import select

        prefix = session.scalar(select(ApiKey.prefix).where(ApiKey.account_id == other.account_id))
        job = Job(
            account_id=other.account_id,
            wallet_id=other.wallet_id,
            status="failed",
            model="llama-3.1-8b",
            request={"input": "secret"},
            performance_profile="balanced",
            routing_strategy="lowest_cost",
            max_output_tokens=5,
            markup="0.15",
            estimated_input_tokens=1,
            expected_quotes=0,
        )
        session.add(job)
        session.flush()
        job_id = str(job.id)
    assert client.get(f"/console/jobs/{job_id}").status_code == 404
    assert client.get(f"/console/activity?starting_after={job_id}").status_code == 404
    token = csrf_token(client.get("/console/keys").get_data(as_text=True))
    assert (
        client.post(f"/console/keys/{prefix}/revoke", data={"csrf_token": token}).status_code == 404
    )


def test_a_revoked_key_ends_its_sessions(
    flask_app: Any, make_account: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import accounts
    from app.accounts import key_prefix
    from app.db import session_scope

    account = make_account()
    client = flask_app.test_client()
    sign_in(client, account)
    assert client.get("/console/").status_code == 200
    with session_scope() as session:
        accounts.revoke_key(session, key_prefix(account.api_key))
    # Another process revoked it: this one's key cache forgets within FLOPEX_AUTH_CACHE_S.
    flask_app.extensions["flopex_principals"]._entries.clear()
    answer = client.get("/console/")
    assert answer.status_code == 302 and "/console/sign-in" in answer.headers["Location"]


def test_keys_issue_shows_once_and_revoke(console: tuple[Any, Account]) -> None:
    client, account = console
    token = csrf_token(client.get("/console/keys").get_data(as_text=True))
    # The only active key cannot be revoked.
    from app.accounts import key_prefix

    own = key_prefix(account.api_key)
    assert client.post(f"/console/keys/{own}/revoke", data={"csrf_token": token}).status_code == 409
    issued = client.post("/console/keys", data={"name": "ci", "csrf_token": token})
    assert issued.status_code == 201
    raw = re.search(r'id="new-key" readonly value="([^"]+)"', issued.get_data(as_text=True))
    assert raw
    listing = client.get("/console/keys").get_data(as_text=True)
    assert raw.group(1) not in listing and key_prefix(raw.group(1)) in listing
    # The new key works on the API; revoking it from the console stops it at once here.
    assert (
        client.get("/v1/wallet", headers={"Authorization": f"Bearer {raw.group(1)}"}).status_code
        == 200
    )
    answer = client.post(
        f"/console/keys/{key_prefix(raw.group(1))}/revoke", data={"csrf_token": token}
    )
    assert answer.status_code == 303
    assert (
        client.get("/v1/wallet", headers={"Authorization": f"Bearer {raw.group(1)}"}).status_code
        == 401
    )
    # Revoking the session's own key (now that another is active) signs the session out.
    token = csrf_token(client.get("/console/keys").get_data(as_text=True))
    client.post("/console/keys", data={"name": "spare", "csrf_token": token})
    answer = client.post(f"/console/keys/{own}/revoke", data={"csrf_token": token})
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/console/sign-in")
    assert client.get("/console/").status_code == 302


def test_sign_in_never_redirects_off_site(flask_app: Any, make_account: Any) -> None:
    account = make_account()
    client = flask_app.test_client()
    token = csrf_token(client.get("/console/sign-in").get_data(as_text=True))
    answer = client.post(
        "/console/sign-in",
        data={"api_key": account.api_key, "csrf_token": token, "next": "https://evil.example/x"},
    )
    assert answer.headers["Location"] == "/console/"


def test_the_csv_exports_hold_only_the_accounts_own_rows(
    flask_app: Any, make_account: Any, console: tuple[Any, Account]
) -> None:
    import csv
    import io
    from datetime import UTC, datetime

    from app.db import session_scope
    from tests.test_reports import add_job

    client, me = console
    other = make_account()
    with session_scope() as session:
        mine = add_job(
            session,
            me,
            datetime.now(UTC),
            "success",
            charge_micros=1234,
            provider_name="alpha",
            customer_ref="csv",
        )
        add_job(session, other, datetime.now(UTC), "success", charge_micros=1, customer_ref="csv")
        mine_id = str(mine.id)
    answer = client.get("/console/activity.csv?customer_ref=csv")
    assert answer.mimetype == "text/csv"
    assert "attachment" in answer.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.get_data(as_text=True))))
    assert [(r["id"], r["cost_usd"], r["provider"], r["status"]) for r in rows] == [
        (mine_id, "0.001234", "alpha", "success")
    ]
    ledger = list(
        csv.DictReader(io.StringIO(client.get("/console/wallet.csv").get_data(as_text=True)))
    )
    assert [(r["kind"], r["amount_usd"], r["balance_after_usd"]) for r in ledger] == [
        ("topup", "5.000000", "5.000000")
    ]


def test_the_playground_runs_the_apis_command_and_replays_a_resent_form(
    console: tuple[Any, Account], pipeline: Any
) -> None:
    from tests.conftest import ledger_kinds

    client, account = console
    page = client.get("/console/playground").get_data(as_text=True)
    key = re.search(r'id="idempotency_key" [^>]*value="([^"]+)"', page)
    assert key
    form = {
        "csrf_token": csrf_token(page),
        "model": "llama-3.1-8b",
        "input": "hello",
        "max_output_tokens": "16",
        "performance_profile": "economy",
        "routing_strategy": "lowest_cost",
        "metadata": '{"from": "playground"}',
        "idempotency_key": key.group(1),
    }
    first = client.post("/console/playground", data=form).get_data(as_text=True)
    assert 'id="pg-status">success' in first and "pg-replayed" not in first
    again = client.post("/console/playground", data=form).get_data(as_text=True)
    assert 'id="pg-status">success' in again and "pg-replayed" in again
    assert ledger_kinds(account).count("capture") == 1  # ran and charged once
    # The API sees the same job, and the same key replays it there too.
    listed = client.get("/v1/inference", headers=account.headers).get_json()["data"]
    assert len(listed) == 1 and listed[0]["metadata"] == {"from": "playground"}
    # The API's validation, shown on the form.
    refused = client.post("/console/playground", data={**form, "max_output_tokens": "0"})
    assert refused.status_code == 400 and "max_output_tokens" in refused.get_data(as_text=True)
    refused = client.post("/console/playground", data={**form, "metadata": "[1"})
    assert refused.status_code == 400 and "Not valid JSON" in refused.get_data(as_text=True)


def test_a_queued_job_is_cancelled_from_its_page(
    console: tuple[Any, Account], catalog: Any
) -> None:
    from app.catalog import ModelCache
    from app.db import session_scope
    from tests.conftest import ledger_kinds
    from tests.factories import make_submitted_job

    client, account = console
    with session_scope() as session:
        job_id = str(make_submitted_job(session, account, ModelCache(ttl_s=60), defer=False).job.id)
    page = client.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert "Cancel this job" in page and 'http-equiv="refresh"' in page  # live: refreshes itself
    answer = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": csrf_token(page)})
    assert answer.status_code == 303
    page = client.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    assert 'id="job-status">cancelled' in page and "Cancel this job" not in page
    assert ledger_kinds(account)[-2:] == ["hold", "release"]
    # Cancelling again: the API's refusal, as a page.
    again = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": csrf_token(page)})
    assert again.status_code == 409 and "job_not_cancellable" in again.get_data(as_text=True)
