"""Webhook delivery: one task per finished job with a callback_url, retried with backoff. The
job row is the outbox: ``webhook_status`` stays ``pending`` until the delivery ends, and the
sweeper queues again any delivery whose task was lost (app/jobs/recovery.py)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import urllib3
from celery import shared_task
from sqlalchemy import or_, update

from app import task_names, webhooks
from app.db import session_scope
from app.jobs import states
from app.jobs.render import render_job
from app.json import dumps_exact
from app.models import Job
from config.settings import get_settings

log = logging.getLogger(__name__)

MAX_RETRIES = webhooks.MAX_RETRIES


@shared_task(name=task_names.WEBHOOK, bind=True, max_retries=MAX_RETRIES)
def deliver_webhook(self, job_id: str, delivery_id: str | None = None) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    delivery_id = delivery_id or webhooks.delivery_id(job_id)
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        if job is None or not (job.request or {}).get("callback_url"):
            return "no_callback"
        if job.webhook_status not in (None, "pending") or job.status not in states.FINAL:
            # Already delivered (or given up) by another task: the sweeper queued it again.
            return "done"
        url = job.request["callback_url"]
        body = dumps_exact(render_job(job, webhook=False)).encode()
        secret = webhooks.webhook_secret(settings.webhook_secret, job.account_id)
        event = f"inference.{'completed' if job.status == 'success' else job.status}"
        # The sweeper leaves a chain that attempted recently alone. Not a versioned write: the
        # job is final, and its version fences routing and settlement only.
        session.execute(
            update(Job).where(Job.id == job.id).values(webhook_attempted_at=datetime.now(UTC))
        )
    problem, addresses = (
        (None, None) if settings.webhook_allow_private else webhooks.destination(url)
    )
    if problem == "private":
        log.warning("webhook for job %s refused: %s is not a public address", job_id, url)
        return _end(job_id, "refused")
    if problem is not None:
        ok, reason = False, "DNS lookup failed"
    else:
        try:
            status = webhooks.post(
                url,
                body,
                webhooks.headers_for(secret, body, event, delivery_id),
                addresses=addresses,  # the addresses just checked, not a second lookup
                timeout=(3, 10),
            )
            ok = 200 <= status < 300
            reason = f"HTTP {status}"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            ok, reason = False, type(exc).__name__
    if ok:
        log.info("webhook for job %s delivered", job_id)
        return _end(job_id, "delivered")
    if self.request.retries >= MAX_RETRIES:
        log.error("webhook for job %s given up after %s tries: %s", job_id, MAX_RETRIES + 1, reason)
        return _end(job_id, "failed")
    # Exponential backoff: 1, 2, 4 … 512 seconds, then 600 (times FLOPEX_WEBHOOK_BACKOFF_S,
    # at most MAX_COUNTDOWN_S): ~37 minutes over 12 attempts, the same delivery id throughout.
    countdown = min(
        settings.webhook_backoff_s * (2**self.request.retries), webhooks.MAX_COUNTDOWN_S
    )
    raise self.retry(args=[job_id, delivery_id], countdown=countdown)


def _end(job_id: str, status: str) -> str:
    """Records how the delivery ended, unless another chain recorded it first: a late `failed`
    never overwrites `delivered`."""
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(
                Job.id == uuid.UUID(job_id),
                or_(Job.webhook_status == "pending", Job.webhook_status.is_(None)),
            )
            .values(webhook_status=status)
        )
    return status
