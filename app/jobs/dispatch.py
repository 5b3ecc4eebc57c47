"""Enqueueing, only ever after the job's row is committed."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.jobs.quoting import quotes_from_probes, store_quotes
from app.jobs.submit import Accepted
from app.logs import task_headers
from app.providers.breaker import Breaker
from app.redis_client import get_redis
from config.settings import Settings


def quote_options(job: Any) -> list[dict[str, Any]]:
    """The providers to quote, as stored on the job (each carries its endpoint)."""
    return [o for o in job.quotes or [] if "base_url" in o]


def send_quotes(celery: Celery, job: Any, deadline_at: float, queue: str) -> None:
    """One quote task per option on the job, all sent in one Redis round trip (kombu's publish
    batch: a pipeline of LPUSHes, flushed when the block exits). The last quote to arrive routes
    the job in its own task; a quote lost with a crashed worker is covered by the sweeper
    (app/jobs/recovery.py), not by a per-job timer: a timer task would cost every job a message
    and a task execution to cover a rare crash.

    ``argsrepr`` is given so that Celery does not build a ``saferepr`` of the arguments for every
    message (~0.1 ms each); it is what monitoring tools show for the task. ``declare=[]``: the
    messages go to the queue's list through the default exchange, which needs no declaration
    (workers declare their queues when they start); kombu would otherwise re-check its
    declaration cache with a freshly bound copy of the queue for every message (~5 % of the web's
    CPU)."""
    job_id = str(job.id)
    headers = task_headers(job_id, getattr(job, "request_id", None))
    options = quote_options(job)
    with celery.producer_or_acquire() as producer, producer.batch():
        for option in options:
            celery.send_task(
                "flopex.quote",
                args=[job_id, _option_message(option), deadline_at, len(options)],
                argsrepr=f"[{job_id!r}, {option['provider']!r}]",
                kwargsrepr="{}",
                declare=[],
                queue=queue,
                producer=producer,
                headers=headers,
            )


_OPTION_FIELDS = (
    "offering_id",
    "provider",
    "base_url",
    "api_key_env",
    "provider_model_id",
    "input_price_micros_per_m",
    "output_price_micros_per_m",
    "estimated_charge_micros",
)


def _option_message(option: dict[str, Any]) -> dict[str, Any]:
    return {k: option[k] for k in _OPTION_FIELDS}


def dispatch_quotes(celery: Celery, accepted: Accepted, settings: Settings) -> None:
    policy = settings.profiles[accepted.job.performance_profile]
    if settings.quote_source == "probe" and _route_on_probes(
        celery, accepted.job, settings, policy.queue
    ):
        return
    send_quotes(celery, accepted.job, accepted.quote_deadline_at, policy.queue)


def _route_on_probes(celery: Celery, job: Any, settings: Settings, queue: str) -> bool:
    """Quote from the health probe's fresh results and send one route task; False when the
    probes are missing or stale (the job is then quoted live)."""
    client = get_redis()
    options = quote_options(job)
    quotes = quotes_from_probes(
        client,
        options,
        Breaker(client, settings.breaker),
        max_age_s=settings.probe_interval_s * 3,
    )
    if quotes is None:
        return False
    job_id = str(job.id)
    store_quotes(client, job_id, quotes)
    celery.send_task("flopex.route", args=[job_id], queue=queue, headers=task_headers(job_id))
    return True
