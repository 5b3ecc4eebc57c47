"""Server time of each console page for an account with 10,000 jobs (issue 17: under 100 ms).

Usage: ``.venv/bin/python bench/console_pages.py [--jobs 10000] [--runs 30]``

Creates a scratch PostgreSQL database (migrated with Alembic, dropped at the end), an account
whose jobs are spread over the last 40 days (mostly successes with the three-provider quotes,
routing and attempts a real job stores, some failures and cancellations) with each job's hold,
capture and release in the ledger, then requests each page through the app in this process
(Flask's test client: no network, so the figure is the app's own time, template included) and
prints the median and p95 of ``runs`` requests per page. Redis: ``REDIS_URL`` (default
redis://127.0.0.1:6379/15; only the market page reads it, and nothing is written).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN = os.environ.get(
    "FLOPEX_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
DB_NAME = f"flopex_console_bench_{uuid.uuid4().hex[:8]}"
os.environ["DATABASE_URL"] = ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")

PROVIDERS = ("alpha", "bravo", "charlie")


def _catalog(path: Path) -> None:
    lines = []
    for name in PROVIDERS:
        lines += [
            "[[providers]]",
            f'name = "{name}"',
            f'base_url = "http://127.0.0.1:9/{name}"',
            "",
        ]
    for alias in ("llama-3.1-8b", "qwen-7b"):
        lines += [
            "[[models]]",
            f'alias = "{alias}"',
            "max_output_tokens = 4096",
            "context_length = 16384",
            "",
        ]
        for name in PROVIDERS:
            lines += [
                "[[offerings]]",
                f'model = "{alias}"',
                f'provider = "{name}"',
                f'provider_model_id = "{name}/{alias}"',
                'input_price_usd_per_million = "0.10"',
                'output_price_usd_per_million = "0.12"',
                "",
            ]
    path.write_text("\n".join(lines))


def seed(jobs: int) -> tuple[str, uuid.UUID]:
    from sqlalchemy import insert, update

    from app import accounts
    from app.catalog import load_catalog
    from app.db import session_scope
    from app.models import Job, LedgerEntry, Wallet

    path = ROOT / "var" / "console-bench-catalog.toml"
    path.parent.mkdir(exist_ok=True)
    _catalog(path)
    rng = random.Random(17)
    with session_scope() as session:
        load_catalog(session, path)
        account = accounts.create_account(session, "bench")
        _, raw = accounts.issue_key(session, account.id)
        principal = accounts.authenticate(session, raw)
        assert principal is not None
        wallet_id = principal.wallet_id
        now = datetime.now(UTC)
        balance = 1_000_000_000
        job_rows: list[dict[str, Any]] = []
        ledger_rows: list[dict[str, Any]] = []
        for i in range(jobs):
            created = now - timedelta(seconds=rng.uniform(0, 40 * 86_400))
            status = rng.choices(["success", "failed", "cancelled"], [90, 7, 3])[0]
            provider = rng.choice(PROVIDERS)
            charge = rng.randint(5, 400) if status == "success" else None
            job_id = uuid.uuid4()
            quotes = [
                {
                    "provider": p,
                    "live": True,
                    "estimated_latency_ms": rng.randint(2, 300),
                    "estimated_charge_micros": rng.randint(5, 400),
                    "success_rate": "1.0000",
                }
                for p in PROVIDERS
            ]
            job_rows.append(
                {
                    "id": job_id,
                    "account_id": account.id,
                    "wallet_id": wallet_id,
                    "status": status,
                    "version": 5,
                    "model": rng.choice(["llama-3.1-8b", "qwen-7b"]),
                    "request": {"input": "x" * 200, "model": "llama-3.1-8b"},
                    "performance_profile": "balanced",
                    "routing_strategy": "lowest_cost",
                    "max_output_tokens": 256,
                    "markup": "0.15",
                    "estimated_input_tokens": 50,
                    "expected_quotes": 3,
                    "quotes": quotes,
                    "routing": {
                        "order": [{"provider": provider}],
                        "dropped": [],
                        "winner": provider,
                        "reason": "bench",
                    },
                    "attempts": [{"provider": provider, "outcome": "success", "latency_ms": 40}],
                    "provider_name": provider if status == "success" else None,
                    "output_text": "y" * 400 if status == "success" else None,
                    "input_tokens": 50,
                    "output_tokens": 120,
                    "hold_micros": 500,
                    "charge_micros": charge,
                    "latency_ms": rng.randint(20, 400),
                    "customer_ref": f"ref-{i % 100}",
                    "created_at": created,
                    "updated_at": created,
                    "finished_at": created,
                }
            )
            ledger_rows.append(
                {
                    "wallet_id": wallet_id,
                    "job_id": job_id,
                    "kind": "hold",
                    "amount_micros": 0,
                    "held_delta_micros": 500,
                    "balance_after_micros": balance,
                    "held_after_micros": 500,
                    "memo": "",
                    "created_at": created,
                }
            )
            if charge:
                balance -= charge
                ledger_rows.append(
                    {
                        "wallet_id": wallet_id,
                        "job_id": job_id,
                        "kind": "capture",
                        "amount_micros": -charge,
                        "held_delta_micros": -charge,
                        "balance_after_micros": balance,
                        "held_after_micros": 500 - charge,
                        "memo": "",
                        "created_at": created,
                    }
                )
            ledger_rows.append(
                {
                    "wallet_id": wallet_id,
                    "job_id": job_id,
                    "kind": "release",
                    "amount_micros": 0,
                    "held_delta_micros": -(500 - (charge or 0)),
                    "balance_after_micros": balance,
                    "held_after_micros": 0,
                    "memo": "",
                    "created_at": created,
                }
            )
        session.execute(insert(Job), job_rows)
        session.execute(insert(LedgerEntry), ledger_rows)
        session.execute(update(Wallet).where(Wallet.id == wallet_id).values(balance_micros=balance))
        first_job = str(job_rows[0]["id"])
    with session_scope() as session:
        session.execute(__import__("sqlalchemy").text("ANALYZE"))
    return raw, uuid.UUID(first_job)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    from sqlalchemy import create_engine, text

    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{DB_NAME}"'))
    try:
        from app.migrate import upgrade

        upgrade()
        key, job_id = seed(args.jobs)
        run(key, job_id, args.runs, args.jobs)
    finally:
        from app.db import dispose_engine

        dispose_engine()
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": DB_NAME},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}"'))


def run(key: str, job_id: uuid.UUID, runs: int, jobs: int) -> None:
    import re

    from app import create_app

    app = create_app({"TESTING": True})
    client = app.test_client()
    page = client.get("/console/sign-in").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token
    answer = client.post("/console/sign-in", data={"api_key": key, "csrf_token": token.group(1)})
    assert answer.status_code == 303
    pages = {
        "overview": "/console/",
        "activity": "/console/activity",
        "activity filtered": "/console/activity?status=success&model=qwen-7b&customer_ref=ref-7",
        "activity page 2": None,
        "job": f"/console/jobs/{job_id}",
        "wallet": "/console/wallet",
        "market": "/console/market",
        "playground (form)": "/console/playground",
        "keys": "/console/keys",
    }
    body = client.get("/console/activity").get_data(as_text=True)
    cursor = re.search(r"starting_after=([0-9a-f-]{36})", body)
    assert cursor
    pages["activity page 2"] = f"/console/activity?starting_after={cursor.group(1)}"
    print(f"{jobs} jobs on the account; {runs} requests per page (after 3 warm-up)")
    print(f"{'page':<22} {'median ms':>10} {'p95 ms':>8}")
    for name, path in pages.items():
        assert path is not None
        times = []
        for i in range(runs + 3):
            started = time.perf_counter()
            response = client.get(path)
            elapsed = (time.perf_counter() - started) * 1000
            assert response.status_code == 200, (path, response.status_code)
            if i >= 3:
                times.append(elapsed)
        times.sort()
        p95 = times[max(0, int(len(times) * 0.95) - 1)]
        print(f"{name:<22} {statistics.median(times):>10.1f} {p95:>8.1f}")
    for name, path in (
        ("activity.csv (all)", "/console/activity.csv"),
        ("wallet.csv (all)", "/console/wallet.csv"),
    ):
        started = time.perf_counter()
        response = client.get(path)
        size = len(response.get_data())
        elapsed = (time.perf_counter() - started) * 1000
        print(f"{name:<22} {elapsed:>10.1f} ms for {size:,} bytes (one export, streamed)")


if __name__ == "__main__":
    main()
