"""Money under concurrency, through the real pipeline (Flask -> Celery on Redis -> sandbox
providers -> PostgreSQL) and at the domain level: admission holds never over-commit a wallet,
every success is captured exactly once, failures are never charged, and the books balance to
the micro-USD (docs/billing.md)."""

from __future__ import annotations

import queue
import random
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from app.billing import accounts, wallet
from app.billing.money import micros_to_usd
from app.billing.pricing import estimate_input_tokens, estimated_charge
from app.exceptions import FlopexError
from app.infra.db import session_factory, session_scope
from app.jobs import states
from app.jobs.cancel import cancel
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, LedgerEntry
from config.settings import get_settings
from tests.conftest import MODEL_IDS, PROVIDERS, decimal_json, run_together

MICROS = 1_000_000
MODEL_CAPS = {"llama-3.1-8b": 4096, "qwen-7b": 2048}
RACE_BODY = {
    "model": "llama-3.1-8b",
    "input": "Race for the last micro-dollar.",
    "max_output_tokens": 256,
    "performance_profile": "economy",
}


def worst_cases(model: str, prompt: str, max_output_tokens: int) -> dict[str, int]:
    """Each offering's worst-case charge: the estimated input plus every allowed output token."""
    estimated_input = estimate_input_tokens(prompt)
    return {
        provider: estimated_charge(
            estimated_input,
            max_output_tokens,
            int(Decimal(PROVIDERS[provider]["price"][0]) * MICROS),
            int(Decimal(PROVIDERS[provider]["price"][1]) * MICROS),
            get_settings().markup,
        )
        for provider, models in MODEL_IDS.items()
        if model in models
    }


def admission_hold(account: Any, body: dict[str, Any]) -> int:
    """What admission holds for ``body`` on ``account``, read from a rolled-back submission."""
    session = session_factory()()
    try:
        principal = accounts.authenticate(session, account.api_key)
        request = InferenceRequest(
            model=body["model"],
            prompt=body["input"],
            max_output_tokens=body["max_output_tokens"],
            performance_profile=body["performance_profile"],
        )
        return SubmitInference(session, principal, request, get_settings()).run().job.hold_micros
    finally:
        session.rollback()
        session.close()


def books(account: Any) -> tuple[wallet.WalletState, list[LedgerEntry], dict[uuid.UUID, Job]]:
    with session_scope() as session:
        state = wallet.get_state(session, account.wallet_id)
        assert wallet.ledger_sums(session, account.wallet_id) == state
        entries = list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.wallet_id == account.wallet_id)
                .order_by(LedgerEntry.id)
            )
        )
        jobs = {
            j.id: j
            for j in session.scalars(select(Job).where(Job.account_id == account.account_id))
        }
    return state, entries, jobs


def assert_never_overdrawn(entries: list[LedgerEntry]) -> None:
    """Replaying the ledger in commit order: no intermediate state was ever overdrawn."""
    balance = held = 0
    for e in entries:
        balance += e.amount_micros
        held += e.held_delta_micros
        assert (e.balance_after_micros, e.held_after_micros) == (balance, held), e.id
        assert 0 <= held <= balance, e.id


# -- a. N concurrent requests on a wallet that covers exactly ten ---------------------------


def test_forty_concurrent_requests_on_ten_holds_admit_at_most_ten(
    flask_app, pipeline, make_account
):
    w = max(
        worst_cases(RACE_BODY["model"], RACE_BODY["input"], RACE_BODY["max_output_tokens"]).values()
    )
    account = make_account(str(micros_to_usd(10 * w)))
    assert admission_hold(account, RACE_BODY) == w
    # Keep every admitted job in flight while the others are admitted.
    for provider in pipeline.values():
        provider.configure(latency_ms=300)

    def post(_: int) -> tuple[int, Any]:
        resp = flask_app.test_client().post(
            "/v1/inference", json=RACE_BODY, headers=account.headers
        )
        return resp.status_code, decimal_json(resp.data)

    results = run_together([lambda i=i: post(i) for i in range(40)])

    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 402}, results
    successes = [body for status, body in results if status == 200]
    assert 1 <= len(successes) <= 10, statuses
    for status, body in results:
        if status == 402:
            assert body["error"]["code"] == "insufficient_balance", body
            assert "job_id" not in body["error"]
    assert len({b["id"] for b in successes}) == len(successes)

    state, entries, jobs = books(account)
    assert state.held_micros == 0 and state.balance_micros >= 0
    assert_never_overdrawn(entries)
    # A refused request left nothing: every job is a success somebody was answered with.
    assert {str(j) for j in jobs} == {b["id"] for b in successes}
    assert all(j.status == states.SUCCESS for j in jobs.values())
    assert sum(1 for e in entries if e.kind == "hold") == len(successes)
    captures = Counter(e.job_id for e in entries if e.kind == "capture")
    assert set(captures.values()) == {1} and len(captures) == len(successes)
    drop = 10 * w - state.balance_micros
    assert drop == sum(b["billing"]["cost_usd"] for b in successes) * MICROS
    assert drop == -sum(e.amount_micros for e in entries if e.kind == "capture")


def admit_at_once(account: Any, n: int) -> list[Any]:
    """``n`` admissions of RACE_BODY (economy) released together, each in its own session as
    the web runs them: the accepted job, or the error code of a refused one."""
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
    request = InferenceRequest(
        model=RACE_BODY["model"],
        prompt=RACE_BODY["input"],
        max_output_tokens=RACE_BODY["max_output_tokens"],
        performance_profile="economy",
    )

    def submit() -> Any:
        session = session_factory()()
        try:
            job = SubmitInference(session, principal, request, get_settings()).run().job
            session.commit()
            return job
        except FlopexError as exc:
            session.rollback()
            return exc.code
        finally:
            session.close()

    return run_together([submit] * n)


def test_forty_concurrent_admissions_on_ten_holds_admit_exactly_ten(make_account, catalog):
    w = max(
        worst_cases(RACE_BODY["model"], RACE_BODY["input"], RACE_BODY["max_output_tokens"]).values()
    )
    account = make_account(str(micros_to_usd(10 * w)))
    results = [r if isinstance(r, str) else r.id for r in admit_at_once(account, 40)]

    admitted = [r for r in results if isinstance(r, uuid.UUID)]
    assert len(admitted) == 10
    assert Counter(r for r in results if not isinstance(r, uuid.UUID)) == {
        "insufficient_balance": 30
    }
    state, entries, jobs = books(account)
    assert state.balance_micros == 10 * w and state.held_micros == 10 * w
    assert set(jobs) == set(admitted) and all(j.hold_micros == w for j in jobs.values())
    assert [e.kind for e in entries] == ["topup"] + ["hold"] * 10
    assert_never_overdrawn(entries)

    # Cancelling releases every hold; no job is left for a sweeper to find.
    with session_scope() as session:
        for job_id in admitted:
            cancel(session, session.get(Job, job_id))
    state, entries, _ = books(account)
    assert state == wallet.WalletState(10 * w, 0)
    assert Counter(e.kind for e in entries) == {"topup": 1, "hold": 10, "release": 10}


def test_concurrent_admissions_each_hold_the_largest_worst_case_still_covered(
    make_account, catalog
):
    cases = worst_cases(RACE_BODY["model"], RACE_BODY["input"], RACE_BODY["max_output_tokens"])
    cheapest, middle, largest = sorted(cases.values())
    # Two largest holds, then the middle one, then less than the cheapest: serialised, in any
    # order, the admissions must hold exactly largest, largest, middle (holding the cheapest
    # where the middle still fits would have admitted a fourth job and starved the third's
    # fallback).
    assert middle + cheapest - 1 < largest
    start = 2 * largest + middle + cheapest - 1
    account = make_account(str(micros_to_usd(start)))
    results = [r if isinstance(r, str) else r.hold_micros for r in admit_at_once(account, 16)]

    assert sorted(r for r in results if isinstance(r, int)) == [middle, largest, largest]
    assert Counter(r for r in results if isinstance(r, str)) == {"insufficient_balance": 13}
    state, entries, jobs = books(account)
    assert state == wallet.WalletState(start, 2 * largest + middle)
    assert sorted(j.hold_micros for j in jobs.values()) == [middle, largest, largest]
    assert sorted(e.held_delta_micros for e in entries if e.kind == "hold") == [
        middle,
        largest,
        largest,
    ]
    assert_never_overdrawn(entries)
    with session_scope() as session:
        for job in session.scalars(select(Job).where(Job.account_id == account.account_id)):
            cancel(session, job)
    assert books(account)[0] == wallet.WalletState(start, 0)


def test_two_fast_requests_racing_for_a_small_wallet_get_the_fastest_each_can_pay_for(
    flask_app, pipeline, make_account
):
    cases = worst_cases(RACE_BODY["model"], RACE_BODY["input"], RACE_BODY["max_output_tokens"])
    assert cases["alpha"] < cases["charlie"] < cases["bravo"]
    # Enough for bravo's worst case (the fastest provider) and charlie's (the next), not for
    # two of bravo's. Every answer uses every allowed output token, so whether the second
    # request is admitted before or after the first is settled, what is left never covers
    # bravo again (checked below): the outcome does not depend on timing.
    start = cases["bravo"] + cases["charlie"]
    account = make_account(str(micros_to_usd(start)))
    body = {**RACE_BODY, "performance_profile": "fast"}

    def post(_: int) -> tuple[int, Any]:
        resp = flask_app.test_client().post("/v1/inference", json=body, headers=account.headers)
        return resp.status_code, decimal_json(resp.data)

    for provider in pipeline.values():
        provider.configure(output_tokens=MODEL_CAPS[RACE_BODY["model"]])
    try:
        results = run_together([lambda i=i: post(i) for i in range(2)])
    finally:
        for provider in pipeline.values():
            provider.configure(output_tokens=24)  # the sandbox's default

    assert [status for status, _ in results] == [200, 200], results
    state, entries, jobs = books(account)
    by_hold = {j.hold_micros: j for j in jobs.values()}
    assert sorted(by_hold) == [cases["charlie"], cases["bravo"]]
    assert start - by_hold[cases["bravo"]].charge_micros < cases["bravo"]
    # Each job was served by the fastest provider its hold covers: the one holding bravo's
    # worst case by bravo, the other by charlie (bravo dropped as insufficient_balance), and
    # not by alpha, the slowest, as a hold of only the cheapest worst case would have forced.
    assert by_hold[cases["bravo"]].provider_name == "bravo"
    assert by_hold[cases["charlie"]].provider_name == "charlie"
    assert by_hold[cases["charlie"]].routing["dropped"] == [
        {"provider": "bravo", "reason": "insufficient_balance"}
    ]
    assert sorted(b["provider"] for _, b in results) == ["bravo", "charlie"]
    # Never over-committed, settled exactly.
    assert state.held_micros == 0
    assert state.balance_micros == start - sum(j.charge_micros for j in jobs.values())
    assert all(0 < j.charge_micros <= j.hold_micros for j in jobs.values())
    assert_never_overdrawn(entries)
    assert Counter(e.kind for e in entries) == {"topup": 1, "hold": 2, "capture": 2, "release": 2}


# -- b. Several hundred mixed requests on three accounts ------------------------------------

THREADS = 16
REQUESTS = 300
IDEMPOTENT_KEYS = 12  # per account; each key is sent several times with one body


@dataclass
class Spec:
    account: int
    body: dict[str, Any]
    async_: bool = False
    key: str | None = None


@dataclass
class Seen:
    """What the clients of one account were told."""

    statuses: Counter[int] = field(default_factory=Counter)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> final job body
    keys: dict[str, set[str]] = field(default_factory=dict)  # idempotency key -> job ids


def _body(rng: random.Random, n: int) -> dict[str, Any]:
    model = rng.choice(sorted(MODEL_CAPS))
    body: dict[str, Any] = {
        "model": model,
        "input": f"Request {n}: "
        + " ".join(rng.choices(["route", "price", "quote"], k=rng.randint(1, 30))),
        "max_output_tokens": rng.choice([16, 64, 256, 1024, MODEL_CAPS[model]]),
        "performance_profile": rng.choice(["economy", "balanced", "fast"]),
        "routing_strategy": rng.choice(["lowest_cost", "prefer_live"]),
        "customer_ref": f"mix-{n}",
    }
    roll = rng.random()
    if roll < 0.15:
        # Only alpha's worst case fits: when alpha fails there is no fallback (502, no charge).
        cases = worst_cases(model, body["input"], body["max_output_tokens"])
        body["max_price_usd"] = str(micros_to_usd(cases["alpha"]))
        body["max_latency_ms"] = None
    elif roll < 0.20:
        body["max_price_usd"] = "0.000001"  # refused before a job exists (422)
    return body


def _specs(rng: random.Random) -> list[Spec]:
    specs = []
    keyed: dict[tuple[int, int], Spec] = {}
    for n in range(REQUESTS):
        account = n % 3
        roll = rng.random()
        if roll < 0.25:
            k = rng.randrange(IDEMPOTENT_KEYS)
            first = keyed.get((account, k))
            if first is None:
                first = keyed[(account, k)] = Spec(
                    account, _body(rng, n), rng.random() < 0.5, f"mix-key-{k}"
                )
            specs.append(Spec(account, first.body, first.async_, first.key))
        else:
            specs.append(Spec(account, _body(rng, n), roll < 0.55))
    rng.shuffle(specs)
    return specs


def _poll_to_final(client: Any, account: Any, job_id: str) -> dict[str, Any]:
    for _ in range(5):
        resp = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers)
        assert resp.status_code == 200, resp.text
        body = decimal_json(resp.data)
        if body["status"] not in ("queued", "running"):
            return body
    raise AssertionError(f"job {job_id} did not finish: {body}")


def test_hundreds_of_mixed_requests_keep_every_wallet_exact(flask_app, pipeline, make_account):
    rng = random.Random(20_24)
    accts = [
        make_account("5.00", "mix-a"),
        make_account("5.00", "mix-b"),
        make_account("0.002", "mix-c"),
    ]
    initial = [5 * MICROS, 5 * MICROS, 2_000]
    # alpha (the cheapest: economy's first choice and the only one within the alpha-only price)
    # fails some executions; bravo (fast's first choice) a few.
    pipeline["alpha"].configure(fault="error", fault_count=60)
    pipeline["bravo"].configure(fault="error", fault_count=10)
    specs = _specs(rng)
    work: queue.Queue[Spec] = queue.Queue()
    for spec in specs:
        work.put(spec)
    seen = [Seen() for _ in accts]
    lock = threading.Lock()

    def drain(_: int) -> None:
        client = flask_app.test_client()
        while True:
            try:
                spec = work.get_nowait()
            except queue.Empty:
                return
            account = accts[spec.account]
            headers = dict(account.headers)
            if spec.async_:
                headers["Prefer"] = "respond-async"
            if spec.key:
                headers["Idempotency-Key"] = spec.key
            resp = client.post("/v1/inference", json=spec.body, headers=headers)
            body = decimal_json(resp.data)
            status = resp.status_code
            job_id = body.get("id") or body.get("error", {}).get("job_id")
            final = body
            if status == 202:
                final = _poll_to_final(client, account, job_id)
            elif status == 200:
                assert body["status"] == "success", body
            else:
                assert status in (402, 422, 502, 503, 504), (status, body)
            with lock:
                record = seen[spec.account]
                record.statuses[status] += 1
                if job_id is not None:
                    previous = record.final.setdefault(job_id, final)
                    if previous is not final and "status" in previous and "status" in final:
                        # Replays and polls of one job all tell the same outcome.
                        assert previous["status"] == final["status"], (previous, final)
                if spec.key is not None and job_id is not None:
                    record.keys.setdefault(spec.key, set()).add(job_id)

    run_together([lambda i=i: drain(i) for i in range(THREADS)])

    total = Counter()
    for account, start, record in zip(accts, initial, seen, strict=True):
        total.update(record.statuses)
        state, entries, jobs = books(account)
        assert state.held_micros == 0 and state.balance_micros >= 0
        assert_never_overdrawn(entries)
        # Every job that exists was reported to a client, and every one is finished.
        assert {str(j) for j in jobs} == set(record.final)
        assert all(j.status in states.FINAL for j in jobs.values())
        # One Idempotency-Key, one job.
        assert all(len(ids) == 1 for ids in record.keys.values()), record.keys

        captures = Counter(e.job_id for e in entries if e.kind == "capture")
        releases = Counter(e.job_id for e in entries if e.kind == "release")
        holds = Counter(e.job_id for e in entries if e.kind == "hold")
        assert all(n == 1 for n in (*captures.values(), *releases.values(), *holds.values()))
        succeeded = {j.id for j in jobs.values() if j.status == states.SUCCESS}
        assert set(captures) == succeeded  # the sandbox always reports some usage
        for job in jobs.values():
            closed = -sum(
                e.amount_micros for e in entries if e.job_id == job.id and e.kind == "capture"
            ) - sum(
                e.held_delta_micros for e in entries if e.job_id == job.id and e.kind == "release"
            )
            assert holds[job.id] == 1 and closed == job.hold_micros, job.id
            if job.status != states.SUCCESS:
                assert job.id not in captures, job.id  # a failure is never charged

        success_bodies = {
            job_id: body for job_id, body in record.final.items() if body.get("status") == "success"
        }
        assert set(success_bodies) == {str(j) for j in succeeded}
        billed = sum((b["billing"]["cost_usd"] for b in success_bodies.values()), Decimal(0))
        assert billed * MICROS == start - state.balance_micros
        assert (
            -sum(e.amount_micros for e in entries if e.kind == "capture")
            == start - state.balance_micros
        )
        for job_id, body in success_bodies.items():
            job = jobs[uuid.UUID(job_id)]
            assert body["billing"]["cost_usd"] * MICROS == job.charge_micros <= job.hold_micros

    # The mix exercised what it meant to.
    assert total[200] > 0 and total[422] > 0, total
    # Some jobs failed (alpha-only prices while alpha was failing): they were charged nothing.
    failed = sum(1 for r in seen for b in r.final.values() if "error" in b)
    assert failed > 0, total
    assert sum(total.values()) == REQUESTS
