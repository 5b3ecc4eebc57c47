"""Routing and execution of one job: pick the winner from the quotes, hold the worst case, call
the provider (falling back down the ranking), then settle the wallet and complete the job in one
transaction.

Every step that must not happen twice is a conditional UPDATE on the job's status, so a duplicated
or redelivered task finds the work claimed and does nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy import update
from sqlalchemy.orm import Session

from app import wallet
from app.jobs import states
from app.jobs.notify import signal_done
from app.jobs.quoting import collect_quotes, discard_quotes
from app.models import Job, utcnow
from app.money import ceil_micros, customer_charge, provider_cost
from app.providers import health
from app.providers.openai_compat import ProviderFailure, complete, resolve_api_key
from app.routing import Decision, select
from config.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    job_id: uuid.UUID
    status: str
    error_code: str | None = None


def _claim(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == states.QUOTING)
        .values(status=states.ROUTING, updated_at=utcnow(), started_at=utcnow())
        .returning(Job)
    ).scalar_one_or_none()


def _failure_code(attempts: list[dict[str, Any]]) -> str:
    """The public code for a job whose every candidate failed (docs/routing.md)."""
    kinds = [a.get("failure") for a in attempts]
    if kinds and all(k == "insufficient_balance" for k in kinds):
        return "insufficient_balance"
    tried = [k for k in kinds if k != "insufficient_balance"]
    if tried and all(k == "connect" for k in tried):
        return "no_provider_available"
    if tried and all(k in ("connect", "timeout") for k in tried):
        return "timeout"
    return "provider_error"


_FAILURE_MESSAGES = {
    "insufficient_balance": "The wallet's available balance does not cover any eligible quote.",
    "no_provider_available": "No provider could be reached for this model.",
    "timeout": "No provider answered in time.",
    "provider_error": "Every eligible provider failed to serve the request.",
}


def _finish(
    session: Session,
    job: Job,
    *,
    status: str,
    error_code: str | None = None,
    message: str | None = None,
    param: str | None = None,
) -> None:
    now = datetime.now(UTC)
    job.status = status
    job.error_code = error_code
    job.error_message = message
    job.error_param = param
    job.finished_at = now
    job.updated_at = now
    job.latency_ms = int((now - job.created_at).total_seconds() * 1000)


class RouteAndExecute:
    def __init__(self, session: Session, client: redis.Redis, settings: Settings) -> None:
        self.session = session
        self.redis = client
        self.settings = settings

    def run(self, job_id: uuid.UUID) -> Outcome | None:
        """None when another task already claimed this job."""
        job = _claim(self.session, job_id)
        if job is None:
            self.session.rollback()
            return None
        options = {o["provider"]: o for o in job.quotes or []}
        quotes = collect_quotes(self.redis, str(job.id), list(options.values()))
        decision = select(
            quotes,
            profile=job.performance_profile,
            strategy=job.routing_strategy,
            max_price_micros=job.max_price_micros,
            max_latency_ms=job.max_latency_ms,
            weights=self.settings.balanced_weights,
        )
        job.quotes = [q.to_dict() for q in quotes]
        job.routing = decision.to_dict()
        job.attempts = []
        if decision.error_code:
            param = {
                "max_price_exceeded": "max_price_usd",
                "max_latency_exceeded": "max_latency_ms",
            }
            _finish(
                self.session,
                job,
                status=states.FAILED,
                error_code=decision.error_code,
                message=_no_route_message(decision, job),
                param=param.get(decision.error_code),
            )
            return self._commit_and_signal(job)
        return self._execute(job, decision, options)

    def _execute(self, job: Job, decision: Decision, options: dict[str, dict[str, Any]]) -> Outcome:
        attempts: list[dict[str, Any]] = []
        markup = Decimal(job.markup)
        for ranked in decision.ranked:
            quote = ranked.quote
            needed = quote.estimated_charge_micros - job.hold_micros
            if needed > 0:
                if wallet.hold(self.session, job.wallet_id, job.id, needed) is None:
                    attempts.append({"provider": quote.provider, "failure": "insufficient_balance"})
                    continue
                job.hold_micros += needed
            attempt = {"provider": quote.provider, "started_at": utcnow().isoformat()}
            attempts.append(attempt)
            job.status = states.EXECUTING
            job.attempts = [dict(a) for a in attempts]
            job.updated_at = utcnow()
            # Recovery point: the hold and the attempt are durable before the provider is called.
            self.session.commit()

            option = options[quote.provider]
            started = time.perf_counter()
            try:
                result = complete(
                    option["base_url"],
                    resolve_api_key(option["api_key_env"]),
                    quote.provider_model_id,
                    job.request["input"],
                    job.max_output_tokens,
                    connect_timeout_s=self.settings.provider_connect_timeout_s,
                    read_timeout_s=self.settings.provider_read_timeout_s,
                    retries=self.settings.provider_retries,
                )
            except ProviderFailure as exc:
                attempt.update(
                    failure=exc.kind,
                    status=exc.status,
                    error=str(exc),
                    latency_ms=int((time.perf_counter() - started) * 1000),
                )
                health.record_outcome(
                    self.redis, quote.provider, False, self.settings.health_window_s
                )
                log.warning("provider %s failed for job %s: %s", quote.provider, job.id, exc)
                continue
            attempt.update(
                outcome="success", latency_ms=int((time.perf_counter() - started) * 1000)
            )
            health.record_outcome(self.redis, quote.provider, True, self.settings.health_window_s)

            exact_charge = customer_charge(
                result.input_tokens,
                result.output_tokens,
                quote.input_price_micros_per_m,
                quote.output_price_micros_per_m,
                markup,
            )
            # The hold is the binding ceiling (max_price_usd and the wallet): a provider that
            # counts more input tokens than estimated is absorbed by us, not the customer.
            charge = min(exact_charge, job.hold_micros)
            state = wallet.settle(self.session, job.wallet_id, job.id, job.hold_micros, charge)
            job.attempts = attempts
            job.provider_name = quote.provider
            job.provider_model_id = quote.provider_model_id
            job.output_text = result.text
            job.finish_reason = result.finish_reason
            job.input_tokens = result.input_tokens
            job.output_tokens = result.output_tokens
            job.charge_micros = charge
            job.provider_cost_micros = ceil_micros(
                provider_cost(
                    result.input_tokens,
                    result.output_tokens,
                    quote.input_price_micros_per_m,
                    quote.output_price_micros_per_m,
                )
            )
            job.balance_after_micros = state.balance_micros
            job.settled_at = utcnow()
            _finish(self.session, job, status=states.SUCCESS)
            return self._commit_and_signal(job)

        # Nothing served the request: release the whole hold, charge nothing.
        if job.hold_micros:
            state = wallet.settle(self.session, job.wallet_id, job.id, job.hold_micros, 0)
            job.balance_after_micros = state.balance_micros
        job.settled_at = utcnow()
        job.attempts = attempts
        code = _failure_code(attempts)
        _finish(
            self.session,
            job,
            status=states.FAILED,
            error_code=code,
            message=_FAILURE_MESSAGES[code],
        )
        return self._commit_and_signal(job)

    def _commit_and_signal(self, job: Job) -> Outcome:
        self.session.commit()
        discard_quotes(self.redis, str(job.id))
        signal_done(self.redis, job.id)
        return Outcome(job.id, job.status, job.error_code)


def _no_route_message(decision: Decision, job: Job) -> str:
    if decision.error_code == "max_price_exceeded":
        return "Every quote's estimated charge exceeds max_price_usd."
    if decision.error_code == "max_latency_exceeded":
        return (
            f"No live quote's estimated latency is within max_latency_ms ({job.max_latency_ms} ms)."
        )
    return decision.reason
