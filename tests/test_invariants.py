"""The money invariants of docs/billing.md as a stateful property test on real PostgreSQL.

One wallet per run. Every rule is its own committed transaction (or a transaction that is
deliberately rolled back), driving a job through its states the way the worker does, without
Celery and without providers: admission (SubmitInference), claim, attempt, recorded answer,
settlement (RouteAndExecute.resume of a ``settling`` job), failure (close_failed), cancel, plus
crashes half-way through a settlement and attempts to settle a job a second time. After every
step the books are checked against the database and against an independent model:

- balance = Σ amount_micros, held = Σ held_delta_micros, 0 ≤ held ≤ balance;
- each entry's balance_after/held_after is the running sum of the entries before it;
- held = Σ hold_micros of the jobs still open;
- an open job has its one hold entry and nothing else; a final job has exactly one capture
  and exactly one release, capture + release = hold, the capture is the job's charge (none for a
  failed or cancelled job), and no charge exceeds the hold or max_price_usd.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app import accounts, wallet
from app.celery_app import make_celery
from app.db import session_factory, session_scope
from app.exceptions import FlopexError
from app.jobs import rows, states
from app.jobs.cancel import cancel
from app.jobs.execution import RouteAndExecute
from app.jobs.settlement import close_failed, finish_values
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, LedgerEntry, utcnow
from app.pricing import estimate_input_tokens
from app.redis_client import get_redis
from config.settings import get_settings
from tests.conftest import MODEL_IDS, PROVIDERS

# The aliases of the test catalog (tests/conftest.py::_catalog_toml) with their output caps.
MODEL_CAPS = {"llama-3.1-8b": 4096, "qwen-7b": 2048}
PROFILES = ("economy", "balanced", "fast")
MICROS = 1_000_000

PROMPTS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=300,
)


def _price_micros(usd: str) -> int:
    return int(Decimal(usd) * MICROS)


def _charge(input_tokens: int, output_tokens: int, price_in: int, price_out: int) -> int:
    """docs/billing.md, computed independently: cost x (1 + markup), rounded up to a micro."""
    markup = Fraction(get_settings().markup)
    exact = Fraction(input_tokens * price_in + output_tokens * price_out, MICROS) * (1 + markup)
    return -((-exact.numerator) // exact.denominator)


def expected_admission(
    model: str, prompt: str, max_output_tokens: int, limit_micros: int | None, available: int
) -> tuple[str, int | None]:
    """The admission rule: hold the largest worst case within max_price_usd that the wallet's
    available balance covers; refuse when it covers none."""
    estimated_input = estimate_input_tokens(prompt)
    estimates = [
        _charge(
            estimated_input,
            max_output_tokens,
            _price_micros(PROVIDERS[p]["price"][0]),
            _price_micros(PROVIDERS[p]["price"][1]),
        )
        for p, models in MODEL_IDS.items()
        if model in models
    ]
    affordable = estimates
    if limit_micros is not None:
        affordable = [e for e in estimates if e <= limit_micros]
        if not affordable:
            return "max_price_exceeded", None
    covered = [e for e in affordable if e <= available]
    if covered:
        return "accepted", max(covered)
    return "insufficient_balance", None


@dataclass
class JobModel:
    hold: int
    max_price: int | None
    status: str = states.QUOTING
    charge: int = 0


@dataclass(frozen=True)
class Snapshot:
    balance: int
    held: int
    entries: int
    jobs: int
    statuses: tuple[tuple[str, str, int], ...]


class WalletMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.settings = get_settings()
        self.redis = get_redis()
        self.celery = make_celery(self.settings)
        self.jobs: dict[uuid.UUID, JobModel] = {}
        self.balance = 0
        self.principal: accounts.Principal | None = None

    # -- helpers --------------------------------------------------------------------------

    @property
    def wallet_id(self) -> uuid.UUID:
        assert self.principal is not None
        return self.principal.wallet_id

    def ids(self, *statuses: str) -> list[uuid.UUID]:
        return [i for i, j in self.jobs.items() if j.status in statuses]

    def has(self, *statuses: str) -> bool:
        return bool(self.ids(*statuses))

    def open_holds(self) -> int:
        return sum(j.hold for j in self.jobs.values() if j.status not in states.FINAL)

    def snapshot(self) -> Snapshot:
        with session_scope() as s:
            state = wallet.get_state(s, self.wallet_id)
            entries = s.scalar(select(func.count()).where(LedgerEntry.wallet_id == self.wallet_id))
            rows = s.execute(
                select(Job.id, Job.status, Job.version)
                .where(Job.wallet_id == self.wallet_id)
                .order_by(Job.id)
            ).all()
        return Snapshot(
            state.balance_micros,
            state.held_micros,
            entries,
            len(rows),
            tuple((str(i), st_, v) for i, st_, v in rows),
        )

    # -- rules ----------------------------------------------------------------------------

    @initialize(initial=st.integers(0, 20_000))
    def open_account(self, initial: int) -> None:
        with session_scope() as s:
            account = accounts.create_account(s, "invariants")
            _, raw = accounts.issue_key(s, account.id)
            self.principal = accounts.authenticate(s, raw)
            assert self.principal is not None
            if initial:
                wallet.top_up(s, self.principal.wallet_id, initial, "initial")
        self.balance = initial

    @rule(amount=st.integers(1, 5_000))
    def top_up(self, amount: int) -> None:
        with session_scope() as s:
            state = wallet.top_up(s, self.wallet_id, amount, "property test")
        self.balance += amount
        assert state.balance_micros == self.balance

    @rule(
        model=st.sampled_from(sorted(MODEL_CAPS)),
        prompt=PROMPTS,
        profile=st.sampled_from(PROFILES),
        # Tenths of a micro-USD: max_price_usd may carry a seventh decimal, which is floored.
        price_tenths=st.none() | st.integers(0, 12_000),
        data=st.data(),
    )
    def submit(
        self,
        model: str,
        prompt: str,
        profile: str,
        price_tenths: int | None,
        data: st.DataObject,
    ) -> None:
        max_output_tokens = data.draw(st.integers(1, MODEL_CAPS[model]), "max_output_tokens")
        max_price_usd = None if price_tenths is None else Decimal(price_tenths).scaleb(-7)
        limit = None if price_tenths is None else price_tenths // 10
        expected, amount = expected_admission(
            model, prompt, max_output_tokens, limit, self.balance - self.open_holds()
        )
        request = InferenceRequest(
            model=model,
            prompt=prompt,
            max_output_tokens=max_output_tokens,
            performance_profile=profile,
            max_price_usd=max_price_usd,
        )
        before = self.snapshot()
        session = session_factory()()
        try:
            try:
                job = SubmitInference(session, self.principal, request, self.settings).run().job
                session.commit()
            except FlopexError as exc:
                session.rollback()
                assert exc.code == expected, (exc.code, expected, amount)
                assert exc.code in ("insufficient_balance", "max_price_exceeded")
                # A refused request leaves no trace: no job, no ledger entry, no hold.
                assert self.snapshot() == before
                return
        finally:
            session.close()
        assert expected == "accepted", (expected, job.hold_micros)
        assert job.hold_micros == amount
        assert job.status == states.QUOTING and job.max_price_micros == limit
        self.jobs[job.id] = JobModel(hold=job.hold_micros, max_price=limit)

    # The worker's steps, each its own committed transaction (app/jobs/execution.py).

    def _claim(self, job_id: uuid.UUID) -> None:
        with session_scope() as s:
            job = s.get(Job, job_id)
            job.status = states.ROUTING
            job.started_at = job.updated_at = utcnow()
        self.jobs[job_id].status = states.ROUTING

    def _start_attempt(self, job_id: uuid.UUID, data: st.DataObject) -> None:
        with session_scope() as s:
            job = s.get(Job, job_id)
            # Only providers whose worst case fits the hold are tried (execution._execute).
            fitting = [
                q["provider"] for q in job.quotes if q["estimated_charge_micros"] <= job.hold_micros
            ]
            provider = data.draw(st.sampled_from(sorted(fitting)), "provider")
            job.status = states.EXECUTING
            job.attempts = [{"provider": provider, "started_at": utcnow().isoformat()}]
            job.updated_at = utcnow()
        self.jobs[job_id].status = states.EXECUTING

    def _record_answer(self, job_id: uuid.UUID, data: st.DataObject) -> None:
        """The provider answered with some usage; the charge is recorded, capped at the hold
        (a provider may count more input tokens than estimated)."""
        with session_scope() as s:
            job = s.get(Job, job_id)
            provider = job.attempts[-1]["provider"]
            quote = next(q for q in job.quotes if q["provider"] == provider)
            input_tokens = data.draw(st.integers(0, 3 * job.estimated_input_tokens), "input")
            output_tokens = data.draw(st.integers(0, job.max_output_tokens), "output")
            exact = _charge(
                input_tokens,
                output_tokens,
                quote["input_price_micros_per_m"],
                quote["output_price_micros_per_m"],
            )
            job.attempts = [{**job.attempts[-1], "outcome": "success"}]
            job.status = states.SETTLING
            job.provider_name = provider
            job.provider_model_id = quote["provider_model_id"]
            job.output_text = "property test"
            job.input_tokens, job.output_tokens = input_tokens, output_tokens
            job.charge_micros = min(exact, job.hold_micros)
            job.updated_at = utcnow()
            charge = job.charge_micros
        model = self.jobs[job_id]
        model.status, model.charge = states.SETTLING, charge

    def _settle(self, job_id: uuid.UUID) -> None:
        """Settlement from the recorded answer: capture + release + success in one commit."""
        session = session_factory()()
        try:
            outcome = RouteAndExecute(session, self.redis, self.settings, self.celery).resume(
                job_id
            )
        finally:
            session.close()
        assert outcome is not None and outcome.status == states.SUCCESS
        model = self.jobs[job_id]
        model.status = states.SUCCESS
        self.balance -= model.charge

    @precondition(lambda self: self.has(states.QUOTING))
    @rule(data=st.data())
    def execute(self, data: st.DataObject) -> None:
        """A queued job runs to success: claim, attempt, answer, settlement."""
        job_id = data.draw(st.sampled_from(self.ids(states.QUOTING)), "job")
        self._claim(job_id)
        self._start_attempt(job_id, data)
        self._record_answer(job_id, data)
        self._settle(job_id)

    @precondition(lambda self: self.has(*states.LIVE))
    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        """One step of one job, so that jobs interleave in every state."""
        job_id = data.draw(st.sampled_from(self.ids(*states.LIVE)), "job")
        status = self.jobs[job_id].status
        if status == states.QUOTING:
            self._claim(job_id)
        elif status == states.ROUTING:
            self._start_attempt(job_id, data)
        elif status == states.EXECUTING:
            self._record_answer(job_id, data)
        else:
            self._settle(job_id)

    @precondition(lambda self: self.has(states.QUOTING, states.ROUTING, states.EXECUTING))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        job_id = data.draw(
            st.sampled_from(self.ids(states.QUOTING, states.ROUTING, states.EXECUTING)), "job"
        )
        with session_scope() as s:
            close_failed(s, s.get(Job, job_id), "provider_error", "every provider failed")
        self.jobs[job_id].status = states.FAILED

    @precondition(lambda self: self.has(*states.CANCELLABLE))
    @rule(data=st.data())
    def cancel_job(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids(*states.CANCELLABLE)), "job")
        with session_scope() as s:
            job = cancel(s, s.get(Job, job_id))
            assert job.status == states.CANCELLED
        self.jobs[job_id].status = states.CANCELLED

    @precondition(lambda self: self.has(states.EXECUTING, states.SETTLING, *states.FINAL))
    @rule(data=st.data())
    def cancel_refused(self, data: st.DataObject) -> None:
        job_id = data.draw(
            st.sampled_from(self.ids(states.EXECUTING, states.SETTLING, *states.FINAL)), "job"
        )
        before = self.snapshot()
        session = session_factory()()
        try:
            with pytest.raises(FlopexError) as err:
                cancel(session, session.get(Job, job_id))
            session.rollback()
        finally:
            session.close()
        assert err.value.code == "job_not_cancellable"
        assert self.snapshot() == before

    @precondition(lambda self: self.has(*states.LIVE))
    @rule(data=st.data(), flush=st.booleans())
    def crash_mid_settlement(self, data: st.DataObject, flush: bool) -> None:
        """A worker dies part-way through a settlement: its transaction never commits."""
        job_id = data.draw(st.sampled_from(self.ids(*states.LIVE)), "job")
        before = self.snapshot()
        session = session_factory()()
        try:
            job = session.get(Job, job_id)
            charge = data.draw(st.integers(0, job.hold_micros), "charge")
            wallet.settle_hold(session, job.wallet_id, job.id, job.hold_micros, charge)
            if flush:
                rows.write(session, job, charge_micros=charge, **finish_values(job, states.SUCCESS))
            session.rollback()
        finally:
            session.close()
        assert self.snapshot() == before

    @precondition(lambda self: self.has(*states.FINAL))
    @rule(data=st.data())
    def settle_again(self, data: st.DataObject) -> None:
        """The same settlement run a second time (a redelivered task) is refused by the unique
        capture/release indexes; resuming a finished job is a no-op."""
        job_id = data.draw(st.sampled_from(self.ids(*states.FINAL)), "job")
        model = self.jobs[job_id]
        before = self.snapshot()
        session = session_factory()()
        try:
            with pytest.raises(IntegrityError):
                wallet.settle_hold(session, self.wallet_id, job_id, model.hold, model.charge)
                session.flush()
            session.rollback()
            assert (
                RouteAndExecute(session, self.redis, self.settings, self.celery).resume(job_id)
                is None
            )
        finally:
            session.close()
        assert self.snapshot() == before

    @precondition(lambda self: self.has(*states.CANCELLABLE))
    @rule(data=st.data())
    def stale_worker_settles_a_cancelled_job(self, data: st.DataObject) -> None:
        """A worker read the job, then the job was cancelled; its late settlement must not
        commit (version fence or unique index), whatever it would have charged."""
        job_id = data.draw(st.sampled_from(self.ids(*states.CANCELLABLE)), "job")
        stale = session_factory()()
        try:
            job = stale.get(Job, job_id)
            charge = data.draw(st.integers(0, job.hold_micros), "charge")
            with session_scope() as s:
                cancel(s, s.get(Job, job_id))
            after_cancel = self.snapshot()
            # The late settlement fails somewhere: the wallet UPDATE (held would go negative),
            # the unique capture/release index, or the job's version check at commit.
            with pytest.raises((StaleDataError, IntegrityError)):
                wallet.settle_hold(stale, job.wallet_id, job.id, job.hold_micros, charge)
                rows.write(
                    stale,
                    job,
                    charge_micros=charge,
                    settled_at=utcnow(),
                    **finish_values(job, states.SUCCESS),
                )
                stale.commit()
            stale.rollback()
        finally:
            stale.close()
        self.jobs[job_id].status = states.CANCELLED
        assert self.snapshot() == after_cancel

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        if self.principal is None:
            return
        with session_scope() as s:
            state = wallet.get_state(s, self.wallet_id)
            sums = wallet.ledger_sums(s, self.wallet_id)
            jobs = {j.id: j for j in s.scalars(select(Job).where(Job.wallet_id == self.wallet_id))}
            entries = list(
                s.scalars(
                    select(LedgerEntry)
                    .where(LedgerEntry.wallet_id == self.wallet_id)
                    .order_by(LedgerEntry.id)
                )
            )

        assert sums == state
        assert 0 <= state.held_micros <= state.balance_micros
        assert state.balance_micros == self.balance
        assert {i: j.status for i, j in jobs.items()} == {i: m.status for i, m in self.jobs.items()}
        open_jobs = [j for j in jobs.values() if j.status not in states.FINAL]
        assert state.held_micros == sum(j.hold_micros for j in open_jobs) == self.open_holds()

        balance = held = 0
        per_job: dict[uuid.UUID, list[LedgerEntry]] = {}
        for e in entries:
            balance += e.amount_micros
            held += e.held_delta_micros
            assert (e.balance_after_micros, e.held_after_micros) == (balance, held), e.id
            if e.kind == "topup":
                assert e.job_id is None and e.amount_micros > 0 and e.held_delta_micros == 0
            else:
                assert e.kind in ("hold", "capture", "release") and e.job_id in jobs
                per_job.setdefault(e.job_id, []).append(e)

        for job_id, job in jobs.items():
            kinds = [e.kind for e in per_job.get(job_id, [])]
            by_kind = {e.kind: e for e in per_job.get(job_id, [])}
            assert kinds.count("hold") == 1 and by_kind["hold"].amount_micros == 0
            assert by_kind["hold"].held_delta_micros == job.hold_micros > 0
            assert job.max_price_micros is None or job.hold_micros <= job.max_price_micros
            if job.status not in states.FINAL:
                assert kinds == ["hold"], (job.status, kinds)
                continue
            # Every settlement writes exactly one release (zero when the charge used the whole
            # hold) and at most one capture.
            assert kinds.count("capture") <= 1 and kinds.count("release") == 1, kinds
            captured = -by_kind["capture"].amount_micros if "capture" in by_kind else 0
            released = -by_kind["release"].held_delta_micros if "release" in by_kind else 0
            if "capture" in by_kind:
                assert by_kind["capture"].held_delta_micros == -captured and captured > 0
            assert by_kind["release"].amount_micros == 0 and released >= 0
            assert captured + released == job.hold_micros
            assert 0 <= captured <= job.hold_micros
            assert job.max_price_micros is None or captured <= job.max_price_micros
            if job.status == states.SUCCESS:
                assert captured == job.charge_micros == self.jobs[job_id].charge
            else:
                assert captured == 0
            closing = [e for e in per_job[job_id] if e.kind != "hold"]
            assert job.balance_after_micros == closing[-1].balance_after_micros
            assert job.settled_at is not None and job.finished_at is not None

    def teardown(self) -> None:
        """Close every job left open, so no later test (or sweep) finds it, and check that the
        wallet is then fully released."""
        if self.principal is None:
            return
        for job_id, model in self.jobs.items():
            if model.status in states.FINAL:
                continue
            session = session_factory()()
            try:
                job = session.get(Job, job_id)
                if job.status == states.SETTLING:
                    RouteAndExecute(session, self.redis, self.settings, self.celery).resume(job_id)
                    self.balance -= model.charge
                elif job.status in states.CANCELLABLE:
                    cancel(session, job)
                    session.commit()
                else:
                    close_failed(session, job, "provider_error", "closed by teardown")
                    session.commit()
            finally:
                session.close()
        with session_scope() as s:
            state = wallet.get_state(s, self.wallet_id)
            assert state.held_micros == 0
            assert wallet.ledger_sums(s, self.wallet_id) == state


def test_wallet_books_stay_exact_under_any_sequence(database, catalog, redis_client):
    run_state_machine_as_test(
        WalletMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
