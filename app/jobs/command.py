"""The submit command that every front door calls (POST /v1/inference, POST /v1/chat/completions):
the Idempotency-Key's claim, the job and its hold, the commit, the dispatch and the wait for the
outcome. The views parse and render; this decides what the answer is.

A fault that is not the customer's (PostgreSQL or Redis failing at any step) is a 503
``service_unavailable`` with Retry-After, never a 500, and it names the job whenever a job row
exists (or may: see ``_unavailable``), so a client is never charged behind an answer that hides
its job (docs/api.md, "When we fail").
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import simplejson
from celery import Celery
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import idempotency
from app.accounts import Principal
from app.broker import PUBLISH_ERRORS
from app.catalog import ModelCache
from app.db import autocommit, make_durable, session_factory
from app.exceptions import FlopexError, InvalidRequest, error_body
from app.jobs import states
from app.jobs.dispatch import dispatch_quotes
from app.jobs.notify import wait_done
from app.jobs.submit import Accepted, InferenceRequest, SubmitInference
from app.logs import job_id_var, request_id_var
from app.models import Job
from app.redis_client import get_redis
from config.settings import Settings

log = logging.getLogger(__name__)

# Faults of our infrastructure, not of the request: the database or Redis unreachable, a
# connection that died, a statement cancelled by an operator, a publish the broker refused.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    redis.RedisError,
    *PUBLISH_ERRORS,
)
RETRY_AFTER_S = 1


class Renderer(Protocol):
    """How a front door writes a job: JSON text, through its own schemas."""

    def final(self, job: Job) -> tuple[int, str]:
        """A finished job's answer: its status and body."""
        ...

    def job(self, job: Job) -> str:
        """The job object to poll (the body of every 202)."""
        ...


@dataclass(frozen=True)
class Answer:
    """What to send. ``respond_async``: the 202 of `Prefer: respond-async` (Preference-Applied
    names it); ``waited``: the call's wait preference bounded this answer; ``key_in_use``: the
    409 of a key whose first request still runs (Location and Retry-After name its job);
    ``after_response``: to run once the answer is sent (the async publish)."""

    status: int
    body: str
    job_id: uuid.UUID | None = None
    replayed: bool = False
    respond_async: bool = False
    waited: bool = False
    key_in_use: bool = False
    after_response: Callable[[], None] | None = None
    # `stream: true`, synchronous: relay the job's events (app/jobs/events.py), not ``body``.
    stream: bool = False


class ServiceUnavailable(FlopexError):
    """503 service_unavailable with Retry-After; ``job_id`` (body and X-Flopex-Job-Id) when a
    job was accepted before the fault."""

    def __init__(self, job_id: uuid.UUID | None, keyed: bool = False) -> None:
        if job_id is None:
            message = "The service is briefly unavailable; nothing was charged. Retry shortly."
        else:
            message = (
                f"The service is briefly unavailable. Job {job_id} was accepted and may run and "
                f"be charged: poll GET /v1/inference/{job_id} (404: it was never created), or "
                "retry with the same Idempotency-Key."
            )
        super().__init__("service_unavailable", message, job_id=job_id)
        self.retry_after_s = RETRY_AFTER_S
        self.headers = {}
        if job_id is not None:
            self.headers["X-Flopex-Job-Id"] = str(job_id)
            if not keyed:
                # The job may run and be charged: a blind resubmission without a key would run
                # a second one. The OpenAI SDKs retry every 5xx unless told not to.
                self.headers["X-Should-Retry"] = "false"


def validate_idempotency_key(key: str | None) -> str | None:
    if key is not None and (
        not 1 <= len(key) <= idempotency.MAX_KEY_LENGTH or not (key.isascii() and key.isprintable())
    ):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII characters.",
            "Idempotency-Key",
        )
    return key


class RunInference:
    """validate() refuses what the request alone decides (the key's form, then every check of
    SubmitInference); run() returns the Answer, or raises a FlopexError that changed nothing
    (or, a ServiceUnavailable, that names the job it could not finish answering for)."""

    def __init__(
        self,
        session: Session,
        principal: Principal,
        request: InferenceRequest,
        settings: Settings,
        *,
        endpoint: str,
        renderer: Renderer,
        celery: Celery,
        idempotency_key: str | None = None,
        body: Any = None,
        respond_async: bool = False,
        wait_s: float | None = None,
        request_id: str | None = None,
        models: ModelCache | None = None,
    ) -> None:
        self.session = session
        self.principal = principal
        self.request = request
        self.settings = settings
        self.endpoint = endpoint
        self.renderer = renderer
        self.celery = celery
        self.key = idempotency_key
        # The parsed request body, fingerprinted with the key (only needed with one).
        self.body = body
        self.respond_async = respond_async
        self.wait_s = settings.sync_timeout_s if wait_s is None else wait_s
        self.request_id = request_id
        self.models = models
        # The fault handling's view of the job: its id once chosen, and whether its row is
        # known to be committed.
        self._job_id: uuid.UUID | None = None
        self._committed = False

    def validate(self) -> None:
        validate_idempotency_key(self.key)

    def run(self) -> Answer:
        self.validate()
        try:
            return self._run()
        except FlopexError:
            raise
        except INFRASTRUCTURE_ERRORS as exc:
            log.warning("infrastructure fault while submitting: %r", exc)
            raise ServiceUnavailable(self._known_job(), keyed=self.key is not None) from exc

    def _known_job(self) -> uuid.UUID | None:
        """The job to name in a 503: none before its row was written; the job once its commit
        returned; in between (the write or its commit failed, so whether it committed is not
        known here) the job if a fresh connection finds it, or cannot tell."""
        if self._job_id is None or self._committed:
            return self._job_id
        try:
            probe = session_factory()()
            try:
                found = probe.scalar(select(Job.id).where(Job.id == self._job_id))
            finally:
                probe.close()
        except INFRASTRUCTURE_ERRORS:
            return self._job_id  # unknown: naming it lets the client look (a 404 if not there)
        return self._job_id if found is not None else None

    def _run(self) -> Answer:
        session = self.session
        record_id = None
        if self.key is not None:
            claim = idempotency.claim(
                session,
                self.principal.account_id,
                self.key,
                self.endpoint,
                idempotency.fingerprint(self.endpoint, self.body),
                self.settings.idempotency_ttl_s,
            )
            if claim.state != "new":
                self._job_id, self._committed = claim.job_id, claim.job_id is not None
                session.commit()
                return self._duplicate(claim)
            record_id = claim.record_id

        # The claim, the job and its hold commit together; a rejection rolls all three back.
        # Without a key, the job and its hold are one statement and its own transaction. A
        # synchronous call's commit does not wait for its fsync (the wallet row is unlocked
        # sooner): the worker makes it durable before it signals the outcome, and this request
        # does before any 202. An async call answers at once, so its commit simply waits.
        self._job_id = uuid.uuid4()
        accepted = SubmitInference(
            session,
            self.principal,
            self.request,
            self.settings,
            request_id=self.request_id,
            models=self.models,
            defer=not self.respond_async,
            job_id=self._job_id,
        ).run()
        job = accepted.job
        job_id_var.set(str(job.id))  # this request's log lines name its job from here on
        accepted_body = None
        if record_id is not None:
            idempotency.attach_job(session, record_id, job.id)
            if self.respond_async:
                # An async submission's outcome is its acceptance: a replay returns the same job.
                accepted_body = self.renderer.job(job)
                idempotency.record_response(session, record_id, 202, accepted_body, commit=False)
        session.commit()
        self._committed = True
        if self.respond_async:
            # The job committed durably: its quotes are published once the 202 has been sent
            # (the WSGI server calls close() after the last byte), so the quote tasks do not
            # compete with this answer for the CPU. Nothing is lost if the publish fails then:
            # the sweeper quotes every job PostgreSQL says is still quoting.
            return Answer(
                202,
                accepted_body or self.renderer.job(job),
                job.id,
                respond_async=True,
                after_response=functools.partial(
                    _publish_after_response, self.celery, accepted, self.settings, self.request_id
                ),
            )
        try:
            dispatch(self.celery, accepted, self.settings)
        except PUBLISH_ERRORS:
            # The job is durable once make_durable returns: the sweeper quotes it once the
            # broker is back; the caller gets the job to poll.
            log.exception("broker unreachable; job %s left for the sweeper", job.id)
            make_durable(session)
            return Answer(202, self.renderer.job(job), job.id)
        if self.request.stream:
            return Answer(200, "", job.id, stream=True)
        return self._await_outcome(job.id, record_id)

    def _duplicate(self, claim: idempotency.Claim) -> Answer:
        if claim.state == "mismatch":
            raise FlopexError(
                "idempotency_key_reused_with_different_request",
                "This Idempotency-Key was used with a different request; use a new key.",
                "Idempotency-Key",
            )
        if self.request.stream and not self.respond_async and claim.job_id is not None:
            # Never a second execution: the first request's stream, from its first event.
            return Answer(200, "", claim.job_id, replayed=True, stream=True)
        if claim.state == "replay":
            assert claim.status is not None and claim.body is not None
            # Only an async submission's acceptance is stored as a 202. A stored outcome is
            # replayed as it was.
            return Answer(
                claim.status,
                claim.body,
                claim.job_id,
                replayed=True,
                respond_async=claim.status == 202,
            )
        # in_progress: never a second execution; the first one's outcome, or its job to poll.
        assert claim.job_id is not None
        return self._await_outcome(claim.job_id, claim.record_id, replayed=True)

    def _await_outcome(
        self, job_id: uuid.UUID, record_id: int | None, replayed: bool = False
    ) -> Answer:
        session = self.session
        # A retry of a key finds its job at any age: finished long ago (its completion signal
        # has expired) or still running. Look before waiting, so a finished job answers at once
        # and a retry that asked not to wait gets the job to poll.
        finished = replayed and session.scalar(select(Job.status).where(Job.id == job_id)) in (
            states.FINAL
        )
        if not finished and not self.respond_async:
            session.rollback()  # hold no connection while waiting
            wait_done(get_redis(), job_id, self.wait_s)
            session.expire_all()
        if record_id is None:
            # Nothing to write afterwards: the read is one statement, without BEGIN and ROLLBACK.
            autocommit(session)
        job = session.get(Job, job_id)
        assert job is not None
        if job.status not in states.FINAL:
            if self.respond_async:
                # Not a new execution but the first request's job: marked as a replay, like
                # every answer to a key already used except its errors (docs/idempotency.md).
                return Answer(
                    202,
                    self.renderer.job(job),
                    job.id,
                    replayed=replayed,
                    respond_async=True,
                    waited=True,
                )
            if replayed:
                return _key_in_use(job.id)
            # Degrade to async: the job carries on and is settled when it completes.
            make_durable(session)
            return Answer(202, self.renderer.job(job), job.id, waited=True)
        status, text = self.renderer.final(job)
        if record_id is not None:
            status, text = idempotency.record_response(session, record_id, status, text)
        return Answer(status, text, job.id, replayed=replayed, waited=True)


def dispatch(celery: Celery, accepted: Accepted, settings: Settings) -> None:
    """The one call from the front door to the job path: enqueue the committed job."""
    dispatch_quotes(celery, accepted, settings)


def _publish_after_response(
    celery: Celery, accepted: Accepted, settings: Settings, request_id: str | None
) -> None:
    token = request_id_var.set(request_id)  # the request's context is gone by now
    try:
        dispatch(celery, accepted, settings)
    except Exception:
        # The 202 is sent and the job is durable; the sweeper quotes it (docs/operations.md).
        log.exception("publishing job %s failed; left for the sweeper", accepted.job.id)
    finally:
        request_id_var.reset(token)


def _key_in_use(job_id: uuid.UUID) -> Answer:
    """409: the key's first request is still running. Its job is named (body and Location), so
    a client that lost the first answer can poll it instead of retrying blind."""
    body = error_body(
        "idempotency_key_in_use",
        "A request with this Idempotency-Key is still running; poll its job or retry later.",
    )
    body["job_id"] = str(job_id)
    text = simplejson.dumps({"error": body}, separators=(",", ":"))
    return Answer(409, text, job_id, waited=True, key_in_use=True)
