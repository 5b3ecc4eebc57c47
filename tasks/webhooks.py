"""Webhook delivery: one task per finished job with a callback_url, retried with backoff."""

from __future__ import annotations

import logging
import uuid

import requests
from celery import shared_task

from app import webhooks
from app.db import session_scope
from app.jobs.render import render_job
from app.json import dumps_exact
from app.models import Job
from config.settings import get_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 6


@shared_task(name="flopex.webhook", bind=True, max_retries=MAX_RETRIES)
def deliver_webhook(self, job_id: str, delivery_id: str | None = None) -> str:  # type: ignore[no-untyped-def]
    settings = get_settings()
    delivery_id = delivery_id or uuid.uuid4().hex
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        if job is None or not (job.request or {}).get("callback_url"):
            return "no_callback"
        url = job.request["callback_url"]
        body = dumps_exact(render_job(job)).encode()
        secret = webhooks.webhook_secret(settings.webhook_secret, job.account_id)
        event = f"inference.{'completed' if job.status == 'success' else job.status}"
    if not settings.webhook_allow_private and not webhooks.public_destination(url):
        log.warning("webhook for job %s refused: %s is not a public address", job_id, url)
        return "refused"
    try:
        resp = requests.post(
            url,
            data=body,
            headers=webhooks.headers_for(secret, body, event, delivery_id),
            timeout=(3, 10),
        )
        ok = 200 <= resp.status_code < 300
        reason = f"HTTP {resp.status_code}"
    except requests.RequestException as exc:
        ok, reason = False, type(exc).__name__
    if ok:
        log.info("webhook for job %s delivered", job_id)
        return "delivered"
    if self.request.retries >= MAX_RETRIES:
        log.error("webhook for job %s given up after %s tries: %s", job_id, MAX_RETRIES + 1, reason)
        return "failed"
    # Exponential backoff: 2, 4, 8 … seconds (times FLOPEX_WEBHOOK_BACKOFF_S), same delivery id.
    countdown = settings.webhook_backoff_s * (2**self.request.retries)
    raise self.retry(args=[job_id, delivery_id], countdown=countdown)
