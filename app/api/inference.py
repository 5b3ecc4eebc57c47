"""The inference resource: submit (sync or async), retrieve with long-poll, list, cancel."""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any

from celery import Celery
from flask import current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select, tuple_

from app import idempotency
from app.accounts import Principal
from app.api.auth import authenticate_and_limit, require_principal
from app.api.parser import FlopexParser
from app.api.prefer import Preferences, parse_prefer
from app.api.schemas import (
    NO_QUERY,
    ApiErrorSchema,
    InferenceRequestSchema,
    InferenceResponseSchema,
    JobGetQuerySchema,
    JobListQuerySchema,
    JobListSchema,
    JobObjectSchema,
)
from app.api.session import db
from app.broker import PUBLISH_ERRORS
from app.db import autocommit, make_durable
from app.exceptions import FlopexError, InvalidRequest, error_body
from app.jobs import states
from app.jobs.cancel import announce_cancelled, cancel
from app.jobs.dispatch import dispatch_quotes
from app.jobs.notify import wait_done
from app.jobs.render import render_final, render_job
from app.jobs.submit import Accepted, InferenceRequest, SubmitInference
from app.logs import job_id_var, request_id_var
from app.models import Job
from app.redis_client import get_redis
from config.settings import Settings, get_settings

log = logging.getLogger(__name__)

ENDPOINT = "POST /v1/inference"

blp = Blueprint(
    "inference", __name__, url_prefix="/v1", description="Run inference through the exchange"
)
blp.ARGUMENTS_PARSER = FlopexParser()

_PREFER_DOC = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "RFC 7240. `respond-async`: answer 202 with the job at once. `wait=N`: a synchronous "
    "call waits at most N seconds (capped by FLOPEX_MAX_WAIT_S), then answers 202 with the job "
    "while it carries on. Honoured preferences are named in Preference-Applied; unknown or "
    "unparsable ones (`wait=soon`) are ignored, never an error.",
}
_IDEMPOTENCY_DOC = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
    "description": "Same key + same body returns the first outcome (header `Idempotent-Replayed: true`) "
    "without executing or charging again. Scoped to your account; kept 24 hours. Printable ASCII.",
}


def _header(description: str, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["example"] = example
    return {"description": description, "schema": schema}


# Response headers, declared in the OpenAPI document where they are sent.
REQUEST_ID = {"X-Request-ID": _header("This request's id (yours when you sent one); in our logs")}
LOCATION = {"Location": _header("The job to poll", "/v1/inference/{id}")}
RETRY_AFTER = {"Retry-After": _header("Seconds to wait before retrying", "1")}
REPLAYED = {
    "Idempotent-Replayed": _header(
        "`true` when this answers an Idempotency-Key already used (docs/idempotency.md)", "true"
    )
}
APPLIED = {
    "Preference-Applied": _header(
        "The Prefer preferences honoured: `respond-async`, or `wait=N` (the seconds actually "
        "allowed, capped by FLOPEX_MAX_WAIT_S)",
        "wait=10",
    )
}
CHALLENGE = {"WWW-Authenticate": _header("RFC 6750 challenge", 'Bearer realm="flopex"')}


# Authentication and the rate limit come before validation, as with Stripe: an unauthenticated
# caller learns nothing about the request format, and a throttled one costs nothing.
blp.before_request(authenticate_and_limit)


def _to_request(args: dict[str, Any]) -> InferenceRequest:
    return InferenceRequest(
        model=args["model"],
        prompt=args.get("input") or args.get("prompt") or "",
        max_output_tokens=args["max_output_tokens"],
        performance_profile=args["performance_profile"],
        routing_strategy=args["routing_strategy"],
        customer_ref=args.get("customer_ref"),
        max_price_usd=args.get("max_price_usd"),
        max_latency_ms=args.get("max_latency_ms"),
        metadata=args.get("metadata"),
        callback_url=args.get("callback_url"),
    )


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= idempotency.MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII characters.",
            "Idempotency-Key",
        )
    return key


def _json_response(body: str, status: int, *, replayed: bool = False, job_id: Any = None) -> Any:
    response = current_app.response_class(body, status=status, mimetype="application/json")
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if status == 202 and job_id is not None:
        response.headers["Location"] = f"/v1/inference/{job_id}"
    return response


def _accepted(body: str, job_id: Any, replayed: bool = False) -> Any:
    """202 with the job to poll, as answered to `Prefer: respond-async`."""
    response = _json_response(body, 202, job_id=job_id, replayed=replayed)
    response.headers["Preference-Applied"] = "respond-async"
    return response


def _own_job(principal: Principal, job_id: str, param: str = "job_id") -> Job:
    """Another account's job is indistinguishable from one that does not exist."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        parsed = None
    job = None
    if parsed is not None:
        job = db().scalar(
            select(Job).where(Job.id == parsed, Job.account_id == principal.account_id)
        )
    if job is None:
        raise FlopexError("job_not_found", f"No job {job_id}.", param)
    return job


@blp.route("/inference")
class InferenceCollection(MethodView):
    # Schema instances, not classes, in every @blp.arguments: webargs instantiates a class on
    # every request (~0.2 ms of CPU); a marshmallow 4 schema keeps no state between loads.
    @blp.arguments(InferenceRequestSchema())
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, InferenceResponseSchema, headers={**REQUEST_ID, **REPLAYED, **APPLIED})
    @blp.alt_response(
        202,
        schema=JobObjectSchema,
        description="Accepted: the job runs on (Location to poll)",
        headers={**LOCATION, **APPLIED, **REPLAYED, **REQUEST_ID},
    )
    @blp.alt_response(
        400,
        schema=ApiErrorSchema,
        description="invalid_request (a duplicate key in the body included), model cap, "
        "context length",
    )
    @blp.alt_response(401, schema=ApiErrorSchema, description="invalid_api_key", headers=CHALLENGE)
    @blp.alt_response(402, schema=ApiErrorSchema, description="insufficient_balance")
    @blp.alt_response(404, schema=ApiErrorSchema, description="model_not_found")
    @blp.alt_response(
        409,
        schema=ApiErrorSchema,
        description="idempotency_key_in_use (error.job_id names the running job)",
        headers={**LOCATION, **RETRY_AFTER},
    )
    @blp.alt_response(
        415,
        schema=ApiErrorSchema,
        description="unsupported_media_type: a Content-Encoding other than identity",
        headers={"Accept-Encoding": _header("The codings accepted", "identity")},
    )
    @blp.alt_response(
        422,
        schema=ApiErrorSchema,
        description="max_price_exceeded, max_latency_exceeded, idempotency_key_reused_with_different_request",
    )
    @blp.alt_response(429, schema=ApiErrorSchema, description="rate_limited", headers=RETRY_AFTER)
    @blp.alt_response(502, schema=ApiErrorSchema, description="provider_error")
    @blp.alt_response(503, schema=ApiErrorSchema, description="no_provider_available")
    @blp.alt_response(504, schema=ApiErrorSchema, description="timeout")
    @blp.doc(security=[{"bearerAuth": []}], parameters=[_PREFER_DOC, _IDEMPOTENCY_DOC])
    def post(self, args: dict[str, Any]) -> Any:
        """Run one inference on the provider that wins the quotes for your profile.

        Synchronous by default; `Prefer: respond-async` answers 202 with the job to poll.
        """
        settings = get_settings()
        session = db()
        principal = require_principal()
        g.profile = args["performance_profile"]  # a validated enum: the metrics' profile label
        prefer = parse_prefer(request.headers, settings.max_wait_s)
        key = _idempotency_key()
        record_id = None
        if key is not None:
            raw_body = current_app.json.loads(request.get_data(cache=True))
            claim = idempotency.claim(
                session,
                principal.account_id,
                key,
                ENDPOINT,
                idempotency.fingerprint(ENDPOINT, raw_body),
                settings.idempotency_ttl_s,
                legacy_fp=idempotency.legacy_fingerprint(ENDPOINT, raw_body),
            )
            if claim.state != "new":
                session.commit()
                response = _answer_duplicate(
                    claim,
                    settings.sync_timeout_s if prefer.wait_s is None else prefer.wait_s,
                    prefer.respond_async,
                )
                # A stored outcome is replayed as it was; only a duplicate that waited for
                # the running first request applied the wait.
                return _wait_applied(response, prefer) if claim.state == "in_progress" else response
            record_id = claim.record_id

        # The claim, the job and its hold commit together; a rejection rolls all three back.
        # Without a key, the job and its hold are one statement and its own transaction. A
        # synchronous call's commit does not wait for its fsync (the wallet row is unlocked
        # sooner): the worker makes it durable before it signals the outcome, and this request
        # does before any 202. An async call answers at once, so its commit simply waits.
        deferred = not prefer.respond_async
        accepted = SubmitInference(
            session,
            principal,
            _to_request(args),
            settings,
            request_id=g.get("request_id"),
            models=current_app.extensions["flopex_models"],
            defer=deferred,
        ).run()
        job = accepted.job
        job_id_var.set(str(job.id))  # this request's log lines name its job from here on
        accepted_body = None
        if record_id is not None:
            idempotency.attach_job(session, record_id, job.id)
            if prefer.respond_async:
                # An async submission's outcome is its acceptance: a replay returns the same job.
                accepted_body = current_app.json.dumps(render_job(job))
                idempotency.record_response(session, record_id, 202, accepted_body, commit=False)
        session.commit()
        celery = current_app.extensions["celery"]
        if prefer.respond_async:
            response = _accepted(accepted_body or current_app.json.dumps(render_job(job)), job.id)
            # The job committed durably: its quotes are published once the 202 has been sent
            # (the WSGI server calls close() after the last byte), so the quote tasks do not
            # compete with this answer for the CPU. Nothing is lost if the publish fails then:
            # the sweeper quotes every job PostgreSQL says is still quoting.
            response.call_on_close(
                functools.partial(
                    _publish_after_response, celery, accepted, settings, g.get("request_id")
                )
            )
            return response
        try:
            dispatch_quotes(celery, accepted, settings)
        except PUBLISH_ERRORS:
            # The job is durable once make_durable returns: the sweeper quotes it once the
            # broker is back; the caller gets the job to poll.
            log.exception("broker unreachable; job %s left for the sweeper", job.id)
            make_durable(session)
            return _json_response(current_app.json.dumps(render_job(job)), 202, job_id=job.id)
        wait_s = settings.sync_timeout_s if prefer.wait_s is None else prefer.wait_s
        return _wait_applied(_await_outcome(job.id, record_id, wait_s), prefer)

    @blp.arguments(JobListQuerySchema(), location="query")
    @blp.response(200, JobListSchema, headers=REQUEST_ID)
    @blp.alt_response(
        404, schema=ApiErrorSchema, description="job_not_found (param starting_after)"
    )
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self, query: dict[str, Any]) -> Any:
        """Your jobs, newest first; filter by status, customer_ref and creation time."""
        principal = require_principal()
        session = db()
        stmt = select(Job).where(Job.account_id == principal.account_id)
        if "status" in query:
            stmt = stmt.where(Job.status.in_(states.INTERNAL[query["status"]]))
        if "customer_ref" in query:
            stmt = stmt.where(Job.customer_ref == query["customer_ref"])
        if "created_after" in query:
            stmt = stmt.where(Job.created_at > query["created_after"])
        if "created_before" in query:
            stmt = stmt.where(Job.created_at < query["created_before"])
        if "starting_after" in query:
            cursor = _own_job(principal, str(query["starting_after"]), "starting_after")
            stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
        limit = query["limit"]
        rows = list(
            session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
        )
        has_more = len(rows) > limit
        rows = rows[:limit]
        body = {
            "object": "list",
            "data": [render_job(j) for j in rows],
            "has_more": has_more,
            "next_cursor": str(rows[-1].id) if has_more else None,
        }
        return _json_response(current_app.json.dumps(body), 200)


@blp.route("/inference/<job_id>")
class InferenceItem(MethodView):
    @blp.arguments(JobGetQuerySchema(), location="query")
    @blp.response(200, JobObjectSchema, headers=REQUEST_ID)
    @blp.alt_response(404, schema=ApiErrorSchema, description="job_not_found (param job_id)")
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self, query: dict[str, Any], job_id: str) -> Any:
        """A job: its state while queued or running; the full result once finished.
        `?wait=N` long-polls up to N seconds (capped) for it to finish."""
        settings = get_settings()
        principal = require_principal()
        job = _own_job(principal, job_id)
        wait_s = min(float(query["wait"]), settings.max_wait_s)
        if wait_s > 0 and job.status not in states.FINAL:
            session = db()
            session.rollback()  # hold no connection while waiting
            wait_done(get_redis(), job.id, wait_s)
            session.expire_all()
            job = _own_job(principal, job_id)
        return _json_response(current_app.json.dumps(render_job(job)), 200)


@blp.route("/inference/<job_id>/cancel")
class InferenceCancel(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, JobObjectSchema, headers=REQUEST_ID)
    @blp.alt_response(404, schema=ApiErrorSchema, description="job_not_found (param job_id)")
    @blp.alt_response(
        409,
        schema=ApiErrorSchema,
        description="job_not_cancellable (error.job_id names the job)",
    )
    @blp.doc(security=[{"bearerAuth": []}])
    def post(self, job_id: str) -> Any:
        """Cancel a job that has not started executing: its hold is released, nothing charged."""
        principal = require_principal()
        session = db()
        found = _own_job(principal, job_id)
        found_id = found.id  # read now: a failed attempt expires the object
        try:
            job = cancel(session, found)
        except FlopexError as exc:
            # The job exists (it is the caller's): its errors name it, as every error about a
            # created job does (docs/api.md).
            exc.job_id = exc.job_id or found_id
            raise
        session.commit()
        announce_cancelled(job, get_redis(), current_app.extensions["celery"])
        return _json_response(current_app.json.dumps(render_job(job)), 200)


def _wait_applied(response: Any, prefer: Preferences) -> Any:
    """RFC 7240 §3: a honoured preference is named in Preference-Applied. ``wait`` bounded this
    synchronous call (with the value actually used, the cap when more was asked); with
    respond-async the call did not wait at all, and that is what the header already says."""
    token = prefer.applied_wait()
    if token is not None and not prefer.respond_async:
        response.headers["Preference-Applied"] = token
    return response


def _publish_after_response(
    celery: Celery, accepted: Accepted, settings: Settings, request_id: str | None
) -> None:
    token = request_id_var.set(request_id)  # the request's context is gone by now
    try:
        dispatch_quotes(celery, accepted, settings)
    except Exception:
        # The 202 is sent and the job is durable; the sweeper quotes it (docs/operations.md).
        log.exception("publishing job %s failed; left for the sweeper", accepted.job.id)
    finally:
        request_id_var.reset(token)


def _await_outcome(
    job_id: uuid.UUID,
    record_id: int | None,
    wait_s: float,
    replayed: bool = False,
    respond_async: bool = False,
) -> Any:
    session = db()
    # A retry of a key finds its job at any age: finished long ago (its completion signal has
    # expired) or still running. Look before waiting, so a finished job answers at once and
    # a retry that asked not to wait gets the job to poll.
    finished = replayed and session.scalar(select(Job.status).where(Job.id == job_id)) in (
        states.FINAL
    )
    if not finished and not respond_async:
        session.rollback()  # hold no connection while waiting
        wait_done(get_redis(), job_id, wait_s)
        session.expire_all()
    if record_id is None:
        # Nothing to write afterwards: the read is one statement, without BEGIN and ROLLBACK.
        autocommit(session)
    job = session.get(Job, job_id)
    assert job is not None
    if job.status not in states.FINAL:
        if respond_async:
            # Not a new execution but the first request's job: marked as a replay, like every
            # answer to a key already used except its errors (docs/idempotency.md).
            return _accepted(current_app.json.dumps(render_job(job)), job.id, replayed=replayed)
        if replayed:
            return _key_in_use(job.id)
        # Degrade to async: the job carries on and is settled when it completes.
        make_durable(session)
        return _json_response(current_app.json.dumps(render_job(job)), 202, job_id=job.id)
    body, status = render_final(job)
    text = current_app.json.dumps(body)
    if record_id is not None:
        status, text = idempotency.record_response(session, record_id, status, text)
    return _json_response(text, status, replayed=replayed)


def _key_in_use(job_id: uuid.UUID) -> Any:
    """409: the key's first request is still running. Its job is named (body and Location), so
    a client that lost the first answer can poll it instead of retrying blind."""
    body = error_body(
        "idempotency_key_in_use",
        "A request with this Idempotency-Key is still running; poll its job or retry later.",
    )
    body["job_id"] = str(job_id)
    response = _json_response(current_app.json.dumps({"error": body}), 409)
    response.headers["Location"] = f"/v1/inference/{job_id}"
    response.headers["Retry-After"] = "1"
    return response


def _answer_duplicate(claim: idempotency.Claim, wait_s: float, respond_async: bool) -> Any:
    if claim.state == "mismatch":
        raise FlopexError(
            "idempotency_key_reused_with_different_request",
            "This Idempotency-Key was used with a different request; use a new key.",
            "Idempotency-Key",
        )
    if claim.state == "replay":
        assert claim.status is not None and claim.body is not None
        if claim.status == 202:  # only an async submission's acceptance is stored as a 202
            return _accepted(claim.body, claim.job_id, replayed=True)
        return _json_response(claim.body, claim.status, replayed=True, job_id=claim.job_id)
    # in_progress: never a second execution; the first one's outcome, or its job to poll.
    assert claim.job_id is not None
    return _await_outcome(
        claim.job_id, claim.record_id, wait_s, replayed=True, respond_async=respond_async
    )
