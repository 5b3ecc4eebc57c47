"""Enqueueing, only ever after the job's row is committed."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.jobs.submit import Accepted
from app.logs import task_headers
from config.settings import Settings


def send_quotes(celery: Celery, job: Any, deadline_at: float, queue: str) -> None:
    """One quote task per option on the job, in one producer connection. The last quote to
    arrive sends the route task; a quote lost with a crashed worker is covered by the sweeper
    (app/jobs/recovery.py), not by a per-job timer: a timer task would cost every job a message
    and a task execution to cover a rare crash."""
    job_id = str(job.id)
    headers = task_headers(job_id)
    options = [o for o in job.quotes or [] if "base_url" in o]
    with celery.producer_or_acquire() as producer:
        for option in options:
            celery.send_task(
                "flopex.quote",
                args=[job_id, _option_message(option), deadline_at, len(options), queue],
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
    send_quotes(celery, accepted.job, accepted.quote_deadline_at, policy.queue)
