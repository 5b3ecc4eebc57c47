"""The sweeper: finds jobs whose worker or message was lost and moves them on.

Run by celery beat (``flopex.sweep``). A job is stuck when it has not changed for longer than
its current step can take:

| status | stuck after | action |
|---|---|---|
| quoting | quote deadline + 3 s, doubled per re-quote (at most 5 min) | quote again (messages lost) |
| routing | grace | back to quoting, quote again (no provider was called yet) |
| executing | (connect + read timeout) * (retries + 1) + grace | resume: see below |
| settling | grace | resume: settle from the recorded answer |
| finished, webhook `pending` | 60 s, no attempt yet; or none for 30 min | queue the webhook again |

(Webhooks only for jobs finished within a day; 10 min is the longest pause between attempts.)

Resuming an executing job abandons its in-flight attempt (the provider may have run it, so it is
never re-sent) and goes on with the candidates not yet tried.

A routing, executing or settling job whose worker's heartbeat has stopped is stuck at once,
whatever its age (app/jobs/liveness.py); the thresholds above are for when that is not known.

Each action bumps the job's version first, so a worker that was merely slow finds its claim gone
at its next write and stops: one job ends once, charged once.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis
from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app import task_names, webhooks
from app.jobs import liveness, states
from app.jobs.dispatch import send_route
from app.logs import task_headers
from app.models import Job
from config.settings import Settings

log = logging.getLogger(__name__)

RESUME_VERSION_HEADER = "flopex_job_version"


@dataclass
class SweepReport:
    requoted: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)


# A finished job's webhook is queued right after the job's final commit; if that never happened
# (the worker died in between, the broker refused the message) or its retry chain was lost, the
# job row still says `pending`. Quiet = well past the longest pause between two attempts (10 min,
# plus the request and a wait in a busy queue), so a live chain is not doubled.
_WEBHOOK_START_GRACE = timedelta(seconds=60)
_WEBHOOK_CHAIN_QUIET = timedelta(seconds=webhooks.MAX_COUNTDOWN_S * 3)
_WEBHOOK_HORIZON = timedelta(days=1)


def owed_webhooks(
    session: Session, now: datetime, limit: int = 100
) -> list[tuple[uuid.UUID, str | None]]:
    """(id, request id) of the finished jobs whose webhook is owed and whose delivery is not in
    progress; each marked as attempted now, so that the next sweep leaves the delivery it
    queues alone."""
    owed = list(
        session.execute(
            select(Job.id, Job.request_id)
            .where(
                Job.webhook_status == "pending",
                Job.finished_at < now - _WEBHOOK_START_GRACE,
                Job.finished_at > now - _WEBHOOK_HORIZON,
                or_(
                    Job.webhook_attempted_at.is_(None),
                    Job.webhook_attempted_at < now - _WEBHOOK_CHAIN_QUIET,
                ),
            )
            .order_by(Job.finished_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if owed:
        ids = [job_id for job_id, _ in owed]
        session.execute(update(Job).where(Job.id.in_(ids)).values(webhook_attempted_at=now))
    return [(job_id, request_id) for job_id, request_id in owed]


def _executing_budget_s(settings: Settings) -> float:
    per_try = settings.provider_connect_timeout_s + settings.provider_read_timeout_s
    return per_try * (settings.provider_retries + 1) + 2.0


# A job that is quoting for longer than its deadline has lost its messages, or they wait in a
# busy queue. Each re-quote adds a message per provider, so a backlog must not be answered with
# more messages every sweep: the wait doubles with every re-quote (the job's version counts its
# writes: one per re-quote while it is quoting), up to this.
_MAX_REQUOTE_WAIT_S = 300.0


def _requote_due(job: Job, now: datetime, deadline_s: float, grace_s: float) -> bool:
    wait_s = deadline_s + min(grace_s * 2 ** max(job.version - 1, 0), _MAX_REQUOTE_WAIT_S)
    updated = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=UTC)
    return updated < now - timedelta(seconds=wait_s)


def stuck_jobs(
    session: Session,
    settings: Settings,
    now: datetime,
    grace_s: float,
    limit: int = 100,
    client: redis.Redis | None = None,
) -> list[Job]:
    longest_deadline_s = max(p.quote_deadline_ms for p in settings.profiles.values()) / 1000
    cutoff = {
        states.QUOTING: now
        - timedelta(seconds=longest_deadline_s + min(grace_s, settings.sweep_quoting_grace_s)),
        states.ROUTING: now - timedelta(seconds=grace_s),
        states.EXECUTING: now - timedelta(seconds=_executing_budget_s(settings) + grace_s),
        states.SETTLING: now - timedelta(seconds=grace_s),
    }

    def stuck(statuses: list[str]) -> list[Job]:
        conditions = [(Job.status == s) & (Job.updated_at < cutoff[s]) for s in statuses]
        return list(
            session.scalars(
                select(Job)
                .where(or_(*conditions))
                .order_by(Job.updated_at)
                .limit(limit)
                # Two sweepers never take the same job.
                .with_for_update(skip_locked=True)
            )
        )

    # Quoting jobs are read apart, because their re-quote backoff is applied here: a backlog of
    # quoting jobs not due yet must not fill the page and starve the crashed ones.
    quoting_grace_s = min(grace_s, settings.sweep_quoting_grace_s)
    due = [
        job
        for job in stuck([states.QUOTING])
        if _requote_due(job, now, longest_deadline_s, quoting_grace_s)
    ]
    held = stuck(_HELD)
    if client is not None:
        held += _held_by_the_dead(session, client, {job.id for job in held}, limit)
    return held + due


_HELD = [states.ROUTING, states.EXECUTING, states.SETTLING]


def _held_by_the_dead(
    session: Session, client: redis.Redis, seen: set[uuid.UUID], limit: int
) -> list[Job]:
    """Jobs in a worker's hands whose worker has no heartbeat (app/jobs/liveness.py): stuck
    now, whatever their age. A Redis fault here leaves them to the age thresholds."""
    candidates = [
        job_id
        for job_id in session.scalars(
            select(Job.id).where(Job.status.in_(_HELD)).order_by(Job.updated_at).limit(limit * 5)
        )
        if job_id not in seen
    ]
    try:
        dead = liveness.held_by_the_dead(client, candidates)
    except redis.RedisError as exc:
        log.warning("sweeper: worker liveness unreadable: %s", exc)
        return []
    if not dead:
        return []
    return list(
        session.scalars(
            select(Job)
            .where(Job.id.in_(dead[:limit]), Job.status.in_(_HELD))
            .with_for_update(skip_locked=True)
        )
    )


def sweep(
    session: Session,
    celery: Celery,
    client: redis.Redis,
    settings: Settings,
    *,
    grace_s: float | None = None,
    now: datetime | None = None,
) -> SweepReport:
    report = SweepReport()
    now = now or datetime.now(UTC)
    grace = settings.sweep_grace_s if grace_s is None else grace_s
    jobs = stuck_jobs(session, settings, now, grace, client=client)
    hooks = owed_webhooks(session, now)
    to_quote: list[Job] = []
    to_resume: list[Job] = []
    for job in jobs:
        # Bumping the version (any UPDATE does) fences off the worker that held the job.
        job.updated_at = datetime.now(UTC)
        if job.status in (states.QUOTING, states.ROUTING):
            job.status = states.QUOTING
            to_quote.append(job)
        else:
            to_resume.append(job)
    session.flush()  # bumps each job's version: a resume carries the one it must find
    versions = {job.id: job.version for job in to_resume}
    request_ids = {job.id: job.request_id for job in jobs}
    session.commit()
    if jobs:
        # Their former holders no longer speak for them: the next worker records itself.
        try:
            liveness.forget(client, [job.id for job in jobs])
        except redis.RedisError as exc:
            log.warning("sweeper: holders not cleared: %s", exc)
    for job in to_quote:
        # Routed again from the quote board, as any job is (its one task, re-sent).
        send_route(celery, job, settings.profiles[job.performance_profile].queue)
        report.requoted.append(str(job.id))
    for job in to_resume:
        queue = settings.profiles[job.performance_profile].queue
        # The version travels as a header, not an argument: a worker still on the previous
        # code (a rolling deploy) ignores it instead of failing on an unexpected argument.
        celery.send_task(
            task_names.RESUME,
            args=[str(job.id)],
            queue=queue,
            headers={
                **task_headers(str(job.id), request_ids[job.id]),
                RESUME_VERSION_HEADER: versions[job.id],
            },
        )
        report.resumed.append(str(job.id))
    for job_id, request_id in hooks:
        webhooks.queue_delivery(celery, job_id, request_id)
        report.webhooks.append(str(job_id))
    if jobs or hooks:
        log.warning(
            "sweeper: requoted %s, resumed %s, webhooks queued again %s",
            report.requoted,
            report.resumed,
            report.webhooks,
        )
    return report
