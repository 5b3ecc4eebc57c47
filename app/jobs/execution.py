"""Routing, execution and settlement of one job.

The route task claims the job, ranks the quotes (app/market/routing.py), then tries candidates in order:
each attempt is committed before the provider is called; a provider's answer is committed
(``settling``) before the wallet is settled; settlement captures the charge and releases the
rest of the hold in the transaction that marks the job ``success``. Every write checks the job's
version, so a worker that lost its claim stops at its next write, and a job is never settled
twice. ``resume()`` continues a job whose worker died, from the last committed step, and never
calls a provider a second time for the same job.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Any

import redis
from celery import Celery
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.billing.money import ceil_micros, customer_charge, display_usd, provider_cost
from app.infra.db import Commit, autocommit, defer_durability, make_durable
from app.infra.failpoints import failpoint, failpoint_raise
from app.infra.metrics import (
    PROVIDER_ERRORS,
    PROVIDER_LATENCY,
    WALLET_CAPTURED_MICROS,
    WALLET_CAPTURES,
    job_finished,
)
from app.jobs import events, rows, states, webhooks
from app.jobs.events import EventWriter, queue_append
from app.jobs.notify import queue_signal
from app.jobs.quoting import quote_job
from app.jobs.render import terminal_event
from app.jobs.settlement import close_failed, close_unserved, finish_values, settle_job
from app.jobs.streaming import (
    StopRequested,
    StreamCut,
    announce_route,
    cut_charge,
    is_streaming,
    stream_completion,
)
from app.market.catalog import ModelCache, ModelEntry
from app.market.providers import board, health, speed
from app.market.providers.breaker import Breaker
from app.market.providers.openai_compat import (
    Completion,
    ProviderFailure,
    complete,
    resolve_api_key,
)
from app.market.routing import Decision, Quote, select
from app.models import Job, utcnow
from config.settings import Settings

log = logging.getLogger(__name__)

_NO_ROUTE_PARAM = {"max_price_exceeded": "max_price_usd", "max_latency_exceeded": "max_latency_ms"}
_FAILURE_MESSAGES = {
    "insufficient_balance": "The wallet's available balance does not cover any eligible quote.",
    "no_provider_available": "No provider could be reached for this model.",
    "timeout": "No provider answered in time.",
    "provider_error": "Every eligible provider failed to serve the request.",
}


@dataclass(frozen=True)
class Outcome:
    job_id: uuid.UUID
    status: str
    error_code: str | None = None


def failure_code(attempts: list[dict[str, Any]]) -> str:
    """The public code for a job whose every candidate failed (docs/routing.md)."""
    kinds = [a.get("failure") for a in attempts]
    if not kinds or all(k == "insufficient_balance" for k in kinds):
        return "insufficient_balance" if kinds else "no_provider_available"
    tried = [k for k in kinds if k != "insufficient_balance"]
    if all(k == "connect" for k in tried):
        return "no_provider_available"
    if all(k in ("connect", "timeout") for k in tried):
        return "timeout"
    return "provider_error"


class RouteAndExecute:
    def __init__(
        self, session: Session, client: redis.Redis, settings: Settings, celery: Celery
    ) -> None:
        self.session = session
        self.redis = client
        self.settings = settings
        self.celery = celery
        self.breaker = Breaker.from_settings(client, settings)

    # -- entry points ---------------------------------------------------------------------

    def run(self, job_id: uuid.UUID) -> Outcome | None:
        """Route a quoted job. None when it is no longer quoting (another delivery routed it)."""
        # No claim of its own: the job is read (one statement, no transaction), routed, and
        # its first write (the attempt, durable; or the failure) is fenced on the version read
        # here. Two deliveries of one job may both route it; only one of their writes matches
        # and the other stops (StaleDataError) before calling anyone. A worker that dies before
        # that write leaves the job `quoting`, which the sweeper sends again: no provider was
        # called. (docs/architecture.md: the commits of a request.)
        autocommit(self.session)
        job = self.session.get(Job, job_id)
        if job is None or job.status != states.QUOTING:
            self.session.rollback()
            return None
        self.session.commit()  # hands the connection back: what follows opens its own
        failpoint("after_claim")
        offered, withdrawn = self._still_offered(job, job.quotes or [])
        options = {o["provider"]: o for o in offered}
        quotes = quote_job(
            self.redis,
            self.breaker,
            list(options.values()),
            self.settings.profiles[job.performance_profile],
            job.max_output_tokens,
            self.settings.health_window_s,
        )
        decision = self._decide(job, quotes, explore=self._explores(job))
        decision.dropped[:0] = [{"provider": p, "reason": "provider_disabled"} for p in withdrawn]
        route: dict[str, Any] = {
            # Keep each option's endpoint with its quote: resume() needs it after a crash.
            "quotes": [
                {
                    **q.to_dict(),
                    "base_url": options[q.provider]["base_url"],
                    "api_key_env": options[q.provider]["api_key_env"],
                }
                for q in quotes
            ],
            "routing": decision.to_dict(),
            "started_at": utcnow(),
        }
        if decision.error_code:
            return self._fail(
                job,
                decision.error_code,
                _no_route_message(decision, job),
                _NO_ROUTE_PARAM.get(decision.error_code),
                attempts=[],
                **route,
            )
        return self._execute(job, decision, [], route["quotes"], route)

    def resume(self, job_id: uuid.UUID, version: int | None = None) -> Outcome | None:
        """Continue a job whose worker died (called by the sweeper's recovery task).
        ``version``: the job's version when the sweeper sent this resume; a resume that waited
        in its queue while another resume (or the sweeper again) moved the job is stale and
        stops, so two resumes never run one job's providers side by side."""
        job = self.session.get(Job, job_id)
        if (
            job is None
            or job.status not in (states.EXECUTING, states.SETTLING)
            or (version is not None and job.version != version)
        ):
            self.session.rollback()
            return None
        if job.status == states.SETTLING:
            return self._settle_answered(job)
        # The in-flight attempt's outcome is unknown: the provider may have run it, so it is
        # never sent again; the job continues with the providers it has not tried.
        attempts = [dict(a) for a in job.attempts or []]
        for attempt in attempts:
            if "outcome" not in attempt and "failure" not in attempt:
                attempt["failure"] = "interrupted"
        cut = self._interrupted_stream(job, attempts)
        if cut is not None:
            return cut
        offered, _ = self._still_offered(job, job.quotes or [])
        decision = self._decide(
            job,
            [Quote.from_dict(q) for q in offered],
            explore=bool((job.routing or {}).get("explored")),
        )
        return self._execute(job, decision, attempts, offered, {"attempts": attempts})

    # -- steps ----------------------------------------------------------------------------

    def _still_offered(
        self, job: Job, entries: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The job's options (or quotes) whose offering the catalog still enables, and the
        providers withdrawn since the job was accepted: a provider disabled by a catalog load
        gets no more work, queued jobs included. Prices and endpoints stay the job's own (its
        hold was computed from those prices; a moved endpoint is picked up by new jobs)."""
        cache = _catalog(self.settings)

        def enabled_ids(entry: ModelEntry | None) -> set[int]:
            return {o.offering_id for o in entry.options} if entry is not None else set()

        current = enabled_ids(cache.get(self.session, job.model))
        if any(item.get("offering_id") not in current for item in entries):
            # The web may have read a newer catalog than this worker's memory (an offering
            # added a moment ago): only a fresh read may withdraw an option.
            current = enabled_ids(cache.refresh(self.session, job.model))
        self.session.commit()  # a catalog read opened a transaction: hand the connection back
        offered = [item for item in entries if item.get("offering_id") in current]
        withdrawn = [item["provider"] for item in entries if item.get("offering_id") not in current]
        return offered, withdrawn

    def _explores(self, job: Job) -> bool:
        """Whether this job may explore (docs/routing.md): decided from its id, so the same
        job always decides the same way; the decision stores the provider it explored."""
        return int(job.id.hex[:8], 16) % 10_000 < self.settings.explore_rate * 10_000

    def _decide(self, job: Job, quotes: list[Quote], explore: bool = False) -> Decision:
        return select(
            quotes,
            profile=job.performance_profile,
            strategy=job.routing_strategy,
            max_price_micros=job.max_price_micros,
            max_latency_ms=job.max_latency_ms,
            weights=self.settings.balanced_weights,
            hold_micros=job.hold_micros,
            # Exact cost comparisons (docs/routing.md): the quotes' prices times these.
            estimated_input_tokens=job.estimated_input_tokens,
            max_output_tokens=job.max_output_tokens,
            explore=explore,
            explore_below=speed.MIN_SAMPLES,
        )

    def _deadline(self, job: Job) -> float:
        """The job's one deadline (Unix time), shared by every attempt: created_at plus
        FLOPEX_JOB_DEADLINE_S, so that with every provider hanging the job still fails before
        a synchronous caller stops waiting."""
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
        return created.timestamp() + self.settings.job_deadline_s

    def _execute(
        self,
        job: Job,
        decision: Decision,
        attempts: list[dict[str, Any]],
        quotes: list[dict[str, Any]],
        pending: dict[str, Any],
    ) -> Outcome:
        """Try the ranked quotes in order, within the job's deadline. ``pending`` holds what
        the caller decided and has not written yet: it goes into the first write of the job."""
        tried = {a["provider"] for a in attempts}
        endpoints = {q["provider"]: q for q in quotes}
        deadline = self._deadline(job)
        out_of_time = False
        # A streaming job's answer goes to its events as it comes (app/jobs/streaming.py).
        writer = EventWriter(self.redis, job.id, self.settings) if is_streaming(job) else None
        for ranked in decision.ranked:
            quote = ranked.quote
            if quote.provider in tried:
                continue
            if deadline - time.time() <= 0.001:
                out_of_time = True
                break
            if writer is not None:
                try:
                    announce_route(writer, job, decision, quote)
                except StopRequested:
                    return self._stopped(job, {**pending, "attempts": attempts})
            try:
                answer = self._attempt(
                    job, quote, endpoints[quote.provider], attempts, pending, deadline, writer
                )
            except StreamCut as cut:
                return self._close_cut(job, quote, cut, attempts)
            pending = {}
            if answer is not None:
                result, elapsed_ms = answer
                self._record_result(job, quote, result, attempts)
                failpoint("after_result_recorded")
                return self._settle_answered(
                    job,
                    served_by=quote.provider,
                    sample=_Sample(quote, result.output_tokens, elapsed_ms),
                )

        code = "timeout" if out_of_time and not _any_answer(attempts) else failure_code(attempts)
        return self._fail(job, code, _FAILURE_MESSAGES[code], **{**pending, "attempts": attempts})

    def _attempt(
        self,
        job: Job,
        quote: Quote,
        endpoint: dict[str, Any],
        attempts: list[dict[str, Any]],
        pending: dict[str, Any],
        deadline: float,
        writer: EventWriter | None = None,
    ) -> tuple[Completion, float] | None:
        """One provider's attempt: recorded durably, then executed. Returns the answer and its
        time in ms, or None when it failed (the failure is recorded on the attempt, the
        provider's health, breaker and board entry). With a ``writer`` the provider's answer is
        streamed into the job's events; a stream cut after its first delta raises StreamCut."""
        attempt: dict[str, Any] = {"provider": quote.provider, "started_at": utcnow().isoformat()}
        attempts.append(attempt)
        # Recovery point: the attempt is durable before the provider is called. One
        # statement, its own transaction where the session has none open.
        rows.write(
            self.session,
            job,
            commit=Commit.ALONE,
            **{**pending, "status": states.EXECUTING, "attempts": [dict(a) for a in attempts]},
        )
        self.session.commit()
        failpoint("before_provider_call")

        window = self.settings.health_window_s

        def failed_try(failure: ProviderFailure) -> None:
            # A retried try counts against the provider as much as a final failure.
            health.record_outcome(self.redis, quote.provider, False, window)

        started = time.perf_counter()
        try:
            if writer is not None:
                try:
                    result = stream_completion(writer, job, quote, endpoint, self.settings)
                except StreamCut:
                    attempt["latency_ms"] = int((time.perf_counter() - started) * 1000)
                    raise
            else:
                result = complete(
                    endpoint["base_url"],
                    resolve_api_key(endpoint["api_key_env"]),
                    quote.provider_model_id,
                    job.request["input"],
                    job.max_output_tokens,
                    connect_timeout_s=self.settings.provider_connect_timeout_s,
                    read_timeout_s=self.settings.provider_read_timeout_s,
                    retries=self.settings.provider_retries,
                    messages=job.messages,
                    params=job.provider_params,
                    budget_s=deadline - time.time(),
                    on_failed_try=failed_try,
                )
        except ProviderFailure as exc:
            elapsed = time.perf_counter() - started
            attempt.update(
                failure=exc.kind, status=exc.status, error=str(exc), latency_ms=int(elapsed * 1000)
            )
            PROVIDER_LATENCY.labels(quote.provider, exc.kind).observe(elapsed)
            PROVIDER_ERRORS.labels(quote.provider, exc.kind).inc()
            # A failed execution counts toward the breaker like a failed check: a provider
            # whose /models answers but whose completions fail is routed around too.
            if exc.provider_at_fault:
                self.breaker.record_failure(quote.provider)
            pipe = self.redis.pipeline(transaction=False)
            health.queue_outcome(pipe, quote.provider, False, window)
            if exc.provider_at_fault:
                # Not live until its next good check (after its Retry-After, for a 429).
                board.queue_execution_outcome(
                    pipe,
                    quote.provider,
                    False,
                    error="rate_limited" if exc.status == 429 else exc.kind,
                    hold_s=exc.retry_after_s if exc.status == 429 else None,
                )
            pipe.execute()
            log.warning("provider %s failed for job %s: %s", quote.provider, job.id, exc)
            return None
        failpoint("after_provider_answer")
        elapsed = time.perf_counter() - started
        attempt.update(outcome="success", latency_ms=int(elapsed * 1000))
        PROVIDER_LATENCY.labels(quote.provider, "success").observe(elapsed)
        # The speed is learned from the answering try alone (retries would read as slowness).
        return result, result.answered_ms if result.answered_ms is not None else elapsed * 1000

    def _record_result(
        self, job: Job, quote: Quote, result: Completion, attempts: list[dict[str, Any]]
    ) -> None:
        """Recovery point: the provider's answer is committed before any money moves, so a
        worker that dies after this is settled from the row and the provider is never asked
        again. Its commit does not wait for the WAL flush (ALONE_DEFERRED): the settlement follows at
        once, and _commit_and_signal's barrier makes both durable before anyone is told. Only a
        crash of PostgreSQL itself in that millisecond would lose it, with the settlement; the
        attempt, durable since before the provider call, then counts as interrupted
        (docs/billing.md)."""
        exact_charge = customer_charge(
            result.input_tokens,
            result.output_tokens,
            quote.input_price_micros_per_m,
            quote.output_price_micros_per_m,
            Decimal(job.markup),
        )
        # One statement, its own transaction; inside a caller's transaction, deferred with it.
        rows.write(
            self.session,
            job,
            commit=Commit.ALONE_DEFERRED,
            status=states.SETTLING,
            attempts=attempts,
            provider_name=quote.provider,
            provider_model_id=quote.provider_model_id,
            output_text=result.text,
            finish_reason=result.finish_reason,
            tool_calls=result.tool_calls,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            # The hold is the binding ceiling (max_price_usd and the wallet): a provider that
            # counts more input tokens than estimated is absorbed by us, not the customer.
            charge_micros=min(exact_charge, job.hold_micros),
            provider_cost_micros=ceil_micros(
                provider_cost(
                    result.input_tokens,
                    result.output_tokens,
                    quote.input_price_micros_per_m,
                    quote.output_price_micros_per_m,
                )
            ),
        )
        self.session.commit()

    def _close_cut(
        self, job: Job, quote: Quote, cut: StreamCut, attempts: list[dict[str, Any]]
    ) -> Outcome:
        """A stream cut after its first delta: no fallback (the client has part of an answer);
        the job ends ``failed`` (the provider broke) or ``cancelled`` (the client left) and is
        charged for what was generated (docs/billing.md), in one settlement."""
        billed = cut_charge(job, quote, cut.usage, cut.delivered)
        attempt = attempts[-1]
        if cut.failure is None:
            attempt["failure"] = "stopped"
            status, code = states.CANCELLED, "job_cancelled"
            message = (
                f"The client disconnected; generation was stopped after {billed.output_tokens} "
                "output tokens, which were charged."
            )
        else:
            failure = cut.failure
            attempt.update(failure=failure.kind, status=failure.status, error=str(failure))
            PROVIDER_ERRORS.labels(quote.provider, failure.kind).inc()
            if failure.provider_at_fault:
                self.breaker.record_failure(quote.provider)
            health.record_outcome(self.redis, quote.provider, False, self.settings.health_window_s)
            status, code = states.FAILED, "provider_error"
            message = (
                f"The provider's stream broke ({failure.kind}) after {cut.delivered} deltas; "
                f"the {billed.output_tokens} output tokens generated were charged."
            )
            log.warning("provider %s cut job %s mid-stream: %s", quote.provider, job.id, failure)
        now = utcnow()
        settle_job(
            self.session,
            job,
            billed.charge_micros,
            {
                "settled_at": now,
                "attempts": attempts,
                "error_code": code,
                "error_message": message,
                "provider_name": quote.provider,
                "provider_model_id": quote.provider_model_id,
                "output_text": cut.text,
                "finish_reason": cut.finish_reason,
                "input_tokens": billed.input_tokens,
                "output_tokens": billed.output_tokens,
                "charge_micros": billed.charge_micros,
                "provider_cost_micros": billed.provider_cost_micros,
                **finish_values(job, status, now),
            },
            commit=Commit.ALONE_DEFERRED,
        )
        return self._commit_and_signal(job)

    def _interrupted_stream(self, job: Job, attempts: list[dict[str, Any]]) -> Outcome | None:
        """A streaming job whose worker died after its client received deltas cannot fall back
        (the next provider's answer would not continue the text): it is settled as a cut
        stream, for what its events show was delivered."""
        if not is_streaming(job) or not attempts:
            return None
        got = events.delivered(self.redis, job.id)
        if got is None or got[1] == 0:
            return None
        text, count = got
        last = attempts[-1]
        quote = next(
            (Quote.from_dict(q) for q in job.quotes or [] if q.get("provider") == last["provider"]),
            None,
        )
        if quote is None:
            return None
        failure = ProviderFailure("interrupted", "the worker streaming this job stopped")
        return self._close_cut(job, quote, StreamCut(text, count, None, None, failure), attempts)

    def _stopped(self, job: Job, pending: dict[str, Any]) -> Outcome:
        """The client of a streaming job left before any provider was called."""
        defer_durability(self.session)
        close_unserved(
            self.session,
            job,
            states.CANCELLED,
            error_code="job_cancelled",
            error_message="The client disconnected before generation started; nothing was charged.",
            **pending,
        )
        return self._commit_and_signal(job)

    def _settle_answered(
        self, job: Job, served_by: str | None = None, sample: _Sample | None = None
    ) -> Outcome:
        """Settles a job whose provider answered: capture the charge, release the rest, mark it
        ``success``. One statement and its own transaction (solo): the wallet row, which every
        request of the account needs, is locked only while the server runs it, and its commit
        does not wait for the fsync; it is made durable before anyone is told
        (_commit_and_signal)."""
        now = utcnow()
        settle_job(
            self.session,
            job,
            job.charge_micros or 0,
            {"settled_at": now, **finish_values(job, states.SUCCESS, now)},
            commit=Commit.ALONE_DEFERRED,
        )
        return self._commit_and_signal(job, served_by, sample)

    def _fail(
        self, job: Job, code: str, message: str, param: str | None = None, **pending: Any
    ) -> Outcome:
        defer_durability(self.session)
        close_failed(self.session, job, code, message, param, **pending)
        return self._commit_and_signal(job)

    def _commit_and_signal(
        self, job: Job, served_by: str | None = None, sample: _Sample | None = None
    ) -> Outcome:
        """Makes the outcome durable, then tells the waiters; ``served_by``: the provider whose
        success is recorded (its health window, breaker and board entry) in the same round
        trip; ``sample``: its execution, learned from once the waiters are told.

        The waiters are woken whatever happens once the outcome has committed: if the
        durability barrier fails (the database connection died), it is tried once more on a
        new connection, and the signal is sent either way (a waiter reads the row, which is
        the truth). Only the webhook waits for durability (the sweeper sends it otherwise)."""
        self.session.commit()
        durable = self._make_durable()
        try:
            job_finished(job.status, job.error_code)
            if job.status == states.SUCCESS and job.charge_micros:
                WALLET_CAPTURES.inc()
                WALLET_CAPTURED_MICROS.inc(job.charge_micros)
            log.info(
                "job %s %s via %s",
                job.id,
                job.status,
                job.provider_name or "-",
                extra={"status": job.status, "provider": job.provider_name},
            )
        finally:
            pipe = self.redis.pipeline(transaction=False)
            # The job's last event, for readers of its stream (one that did not stream keeps it
            # only a minute: long enough to wake a reader attached to it).
            name, data = terminal_event(job)
            ttl_s = None if is_streaming(job) else min(60, self.settings.stream_events_ttl_s)
            queue_append(pipe, job.id, name, data, self.settings, ttl_s=ttl_s)
            queue_signal(pipe, job.id)
            if served_by is not None:
                health.queue_outcome(pipe, served_by, True, self.settings.health_window_s)
                self.breaker.record_success(served_by, pipe)
                board.queue_execution_outcome(pipe, served_by, True)
            pipe.execute()
        if durable:
            webhooks.send(self.celery, job)
        if sample is not None:
            self._learn(sample)
        return Outcome(job.id, job.status, job.error_code)

    def _make_durable(self) -> bool:
        for attempt in range(2):
            try:
                failpoint_raise("durability_barrier")
                make_durable(self.session)
                return True
            except SQLAlchemyError:
                log.exception("durability barrier failed (attempt %d)", attempt + 1)
                self.session.rollback()
                self.session.close()  # the next try checks out another connection
        return False

    def _learn(self, sample: _Sample) -> None:
        """The execution's speed sample (app/market/providers/speed.py): its time less the board's
        round trip to the provider, for its output tokens. Best effort: a lost sample only
        delays learning."""
        quote = sample.quote
        try:
            speed.record(
                self.redis,
                quote.offering_id,
                sample.output_tokens,
                sample.elapsed_ms - (quote.rtt_ms or 0),
                speed.Prior(None, quote.tokens_per_s),
            )
        except redis.RedisError:
            log.warning("speed sample of %s lost", quote.provider, exc_info=True)


@dataclass(frozen=True)
class _Sample:
    quote: Quote
    output_tokens: int
    elapsed_ms: float


def _any_answer(attempts: list[dict[str, Any]]) -> bool:
    return any(a.get("outcome") == "success" for a in attempts)


_models: ModelCache | None = None


def _catalog(settings: Settings) -> ModelCache:
    """This worker process's few seconds of catalog memory (FLOPEX_CATALOG_CACHE_S), as the web
    has: a catalog load reaches routing within that time, without a query per job."""
    global _models
    if _models is None or _models.ttl_s != settings.catalog_cache_s:
        _models = ModelCache(settings.catalog_cache_s)
    return _models


def _no_route_message(decision: Decision, job: Job) -> str:
    if decision.error_code == "insufficient_balance":
        return _FAILURE_MESSAGES["insufficient_balance"]
    if decision.error_code == "max_price_exceeded":
        limit = display_usd(job.max_price_micros or 0)
        return f"Every quote's estimated charge exceeds max_price_usd ({limit})."
    if decision.error_code == "max_latency_exceeded":
        message = (
            f"No live quote's estimated latency is within max_latency_ms ({job.max_latency_ms} ms)"
        )
        # A fast provider dropped for its price is why a customer with both limits got this:
        # say so, or the latency limit alone looks unmeetable.
        over_price = [d["provider"] for d in decision.dropped if d["reason"] == "over_max_price"]
        if over_price:
            limit = display_usd(job.max_price_micros or 0)
            message += (
                f" among the quotes within max_price_usd ({limit}); "
                f"over that price: {', '.join(over_price)}."
            )
        return message + ("" if over_price else ".")
    return decision.reason
