"""Enqueueing, only ever after the job's row is committed."""

from __future__ import annotations

import time

from celery import Celery

from app.jobs.submit import Accepted
from config.settings import Settings

# Headroom past the quote deadline before the backstop routes with the quotes it has.
_BACKSTOP_GRACE_S = 0.25


def dispatch_quotes(celery: Celery, accepted: Accepted, settings: Settings) -> None:
    job = accepted.job
    policy = settings.profiles[job.performance_profile]
    job_id = str(job.id)
    options = {o["provider"]: o for o in job.quotes or []}
    with celery.producer_or_acquire() as producer:
        for option in options.values():
            celery.send_task(
                "flopex.quote",
                args=[
                    job_id,
                    option,
                    accepted.quote_deadline_at,
                    job.expected_quotes,
                    policy.queue,
                ],
                queue=policy.queue,
                producer=producer,
            )
        celery.send_task(
            "flopex.route",
            args=[job_id],
            queue=policy.queue,
            countdown=max(0.0, accepted.quote_deadline_at - time.time()) + _BACKSTOP_GRACE_S,
            producer=producer,
        )
