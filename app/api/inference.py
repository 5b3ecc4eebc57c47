"""The inference resource: submit (sync or async), retrieve with long-poll, list, cancel."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.accounts import Principal
from app.api import sse
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
    StreamEventSchema,
)
from app.api.session import db
from app.exceptions import FlopexError, InvalidRequest
from app.jobs import events, states
from app.jobs.cancel import announce_cancelled, cancel
from app.jobs.command import Answer, RunInference, validate_idempotency_key
from app.jobs.notify import wait_done
from app.jobs.queries import JobFilter, list_jobs, own_job
from app.jobs.render import render_failure, render_job, render_success
from app.jobs.submit import InferenceRequest
from app.models import Job
from app.redis_client import get_redis
from config.settings import get_settings

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
    "schema": {"type": "string", "maxLength": 255},
    "description": "Same key + same body returns the first outcome (header `Idempotent-Replayed: true`) "
    "without executing or charging again. Scoped to your account; kept 24 hours.",
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


def document_streaming(spec: Any) -> None:
    """`stream: true` answers the same 200 as Server-Sent Events: the submit's 200 gets the
    `text/event-stream` form beside its JSON one (flask-smorest declares one content type per
    status). Called once the blueprint is registered."""
    response = spec._paths["/v1/inference"]["post"]["responses"]["200"]
    response["content"]["text/event-stream"] = {
        "schema": {"$ref": "#/components/schemas/StreamEvent"}
    }
    response["description"] = response["description"].rstrip(".") + (
        ". With `stream: true`: Server-Sent Events (`routing`, `delta`, then `completed` or "
        "`failed`; docs/api.md, Streaming) and the `X-Flopex-Job-Id` header."
    )


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
        stream=args.get("stream", False),
    )


# The schemas the OpenAPI document is generated from write the answers too.
_SUCCESS = InferenceResponseSchema()
_JOB = JobObjectSchema()
_ERROR = ApiErrorSchema()
_JOB_LIST = JobListSchema()


def _dumps(body: Any) -> str:
    return str(current_app.json.dumps(body))


class NativeRenderer:
    """The native API's job shapes (app.jobs.command.Renderer)."""

    def final(self, job: Job) -> tuple[int, str]:
        if job.status == states.SUCCESS:
            return 200, _dumps(_SUCCESS.dump(render_success(job)))
        body, status = render_failure(job)
        return status, _dumps(_ERROR.dump(body))

    def job(self, job: Job) -> str:
        return job_text(job)


def job_text(job: Job) -> str:
    return _dumps(_JOB.dump(render_job(job)))


def _json_response(body: str, status: int) -> Any:
    return current_app.response_class(body, status=status, mimetype="application/json")


def answer_response(answer: Answer, prefer: Preferences) -> Any:
    """The HTTP form of a submit command's Answer (both front doors)."""
    response = _json_response(answer.body, answer.status)
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if answer.job_id is not None and (answer.status == 202 or answer.key_in_use):
        response.headers["Location"] = f"/v1/inference/{answer.job_id}"
    if answer.key_in_use:
        response.headers["Retry-After"] = "1"
    if answer.respond_async:
        response.headers["Preference-Applied"] = "respond-async"
    elif answer.waited:
        # RFC 7240 §3: a honoured preference is named in Preference-Applied. ``wait`` bounded
        # this synchronous call (with the value actually used, the cap when more was asked).
        token = prefer.applied_wait()
        if token is not None and not prefer.respond_async:
            response.headers["Preference-Applied"] = token
    if answer.after_response is not None:
        response.call_on_close(answer.after_response)
    return response


def submit(
    principal: Principal,
    request_: InferenceRequest,
    *,
    endpoint: str,
    renderer: Any,
    profile: str,
) -> tuple[Answer, Preferences]:
    """Runs the submit command for a front door, with what the HTTP request says about it."""
    settings = get_settings()
    g.profile = profile  # a validated enum: the metrics' profile label
    prefer = parse_prefer(request.headers, settings.max_wait_s)
    key = validate_idempotency_key(request.headers.get("Idempotency-Key"))
    answer = RunInference(
        db(),
        principal,
        request_,
        settings,
        endpoint=endpoint,
        renderer=renderer,
        celery=current_app.extensions["celery"],
        idempotency_key=key,
        body=current_app.json.loads(request.get_data(cache=True)) if key is not None else None,
        respond_async=prefer.respond_async,
        wait_s=prefer.wait_s,
        request_id=g.get("request_id"),
        models=current_app.extensions["flopex_models"],
    ).run()
    return answer, prefer


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
        answer, prefer = submit(
            require_principal(),
            _to_request(args),
            endpoint=ENDPOINT,
            renderer=NativeRenderer(),
            profile=args["performance_profile"],
        )
        if answer.stream:
            assert answer.job_id is not None
            # Only the request that submitted the job stops it by leaving, not a replay.
            return _stream(
                answer.job_id, replayed=answer.replayed, stop_on_disconnect=not answer.replayed
            )
        return answer_response(answer, prefer)

    @blp.arguments(JobListQuerySchema(), location="query")
    @blp.response(200, JobListSchema, headers=REQUEST_ID)
    @blp.alt_response(
        404, schema=ApiErrorSchema, description="job_not_found (param starting_after)"
    )
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self, query: dict[str, Any]) -> Any:
        """Your jobs, newest first; filter by status, customer_ref and creation time."""
        principal = require_principal()
        page = list_jobs(
            db(),
            principal.account_id,
            JobFilter(
                status=query.get("status"),
                customer_ref=query.get("customer_ref"),
                created_after=query.get("created_after"),
                created_before=query.get("created_before"),
                starting_after=query.get("starting_after"),
            ),
            query["limit"],
        )
        body = {
            "object": "list",
            "data": [render_job(j) for j in page.jobs],
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
        }
        return _json_response(_dumps(_JOB_LIST.dump(body)), 200)


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
        job = own_job(db(), principal.account_id, job_id)
        wait_s = min(float(query["wait"]), settings.max_wait_s)
        if wait_s > 0 and job.status not in states.FINAL:
            session = db()
            session.rollback()  # hold no connection while waiting
            wait_done(get_redis(), job.id, wait_s)
            session.expire_all()
            job = own_job(session, principal.account_id, job_id)
        return _json_response(job_text(job), 200)


def _stream(job_id: uuid.UUID, *, replayed: bool = False, stop_on_disconnect: bool = False) -> Any:
    """A synchronous `stream: true` answer: the job's events as they come (app/api/sse.py)."""
    headers = {"X-Flopex-Job-Id": str(job_id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    db().rollback()  # hold no connection while streaming
    return sse.relay(
        job_id,
        sse.native_frames,
        stop_on_disconnect=stop_on_disconnect,
        early_error=True,
        celery=current_app.extensions["celery"],
        headers=headers,
    )


_LAST_EVENT_ID_DOC = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
    "description": "The `id` of the last event received: the stream resumes after it, nothing "
    "missing or repeated. Absent: from the first event.",
}


@blp.route("/inference/<job_id>/events")
class InferenceEvents(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(
        200,
        schema=StreamEventSchema,
        description="`text/event-stream`: `routing`, `delta`..., then `completed` or `failed` "
        "(docs/api.md, Streaming), a keep-alive comment line every FLOPEX_STREAM_KEEPALIVE_S "
        "without an event. Each event's `id` resumes the stream in Last-Event-ID.",
        content_type="text/event-stream",
        headers=REQUEST_ID,
    )
    @blp.alt_response(400, schema=ApiErrorSchema, description="invalid_request (Last-Event-ID)")
    @blp.alt_response(404, schema=ApiErrorSchema, description="job_not_found (param job_id)")
    @blp.doc(security=[{"bearerAuth": []}], parameters=[_LAST_EVENT_ID_DOC])
    def get(self, job_id: str) -> Any:
        """A job's events, from the start or after Last-Event-ID, for as long as they are kept
        (FLOPEX_STREAM_EVENTS_TTL_S after the last one); after that, the finished job as one
        `completed` (or `failed`) event. Reading never stops the job."""
        principal = require_principal()
        job = own_job(db(), principal.account_id, job_id)
        after = request.headers.get("Last-Event-ID")
        if after is not None and not events.EVENT_ID.fullmatch(after.strip()):
            raise InvalidRequest(
                "Last-Event-ID must be an event id (digits-digits).", "Last-Event-ID"
            )
        found = job.id
        db().rollback()  # hold no connection while streaming
        return sse.relay(
            found,
            sse.native_frames,
            after=after.strip() if after else None,
            headers={"X-Flopex-Job-Id": str(found)},
        )


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
        found = own_job(session, principal.account_id, job_id)
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
        return _json_response(job_text(job), 200)
