"""The inference resource: submit (sync or async), retrieve with long-poll, list, cancel."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from flask import current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint

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
from app.billing.accounts import Principal
from app.exceptions import FlopexError, InvalidRequest
from app.infra.redis_client import get_redis
from app.jobs import events, states
from app.jobs.cancel import announce_cancelled, cancel
from app.jobs.command import Answer, Renderer, RunInference, validate_idempotency_key
from app.jobs.notify import wait_done
from app.jobs.queries import JobFilter, list_jobs, own_job
from app.jobs.render import render_failure, render_job, render_success
from app.jobs.submit import InferenceRequest, exchange_controls
from app.models import Job
from config.settings import get_settings

log = logging.getLogger(__name__)

ENDPOINT = "POST /v1/inference"

blp = Blueprint(
    "inference", __name__, url_prefix="/v1", description="Run inference through the exchange"
)
blp.ARGUMENTS_PARSER = FlopexParser()

PREFER_DOC = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "RFC 7240. `respond-async`: answer 202 with the job at once. `wait=N`: a synchronous "
    "call waits at most N seconds (capped by FLOPEX_MAX_WAIT_S), then answers 202 with the job "
    "while it carries on. Honoured preferences are named in Preference-Applied; unknown or "
    "unparsable ones (`wait=soon`) are ignored, never an error.",
}
IDEMPOTENCY_DOC = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
    "description": "Same key + same body returns the first outcome (header `Idempotent-Replayed: true`) "
    "without executing or charging again. Scoped to your account; kept 24 hours. Printable ASCII.",
}


def header_doc(description: str, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if example is not None:
        schema["example"] = example
    return {"description": description, "schema": schema}


# Response headers, declared in the OpenAPI document where they are sent.
REQUEST_ID = {
    "X-Request-ID": header_doc("This request's id (yours when you sent one); in our logs")
}
LOCATION = {"Location": header_doc("The job to poll", "/v1/inference/{id}")}
RETRY_AFTER = {"Retry-After": header_doc("Seconds to wait before retrying", "1")}
REPLAYED = {
    "Idempotent-Replayed": header_doc(
        "`true` when this answers an Idempotency-Key already used (docs/idempotency.md)", "true"
    )
}
APPLIED = {
    "Preference-Applied": header_doc(
        "The Prefer preferences honoured: `respond-async`, or `wait=N` (the seconds actually "
        "allowed, capped by FLOPEX_MAX_WAIT_S)",
        "wait=10",
    )
}
CHALLENGE = {"WWW-Authenticate": header_doc("RFC 6750 challenge", 'Bearer realm="flopex"')}


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
    chat = spec._paths.get("/v1/chat/completions", {}).get("post", {}).get("responses", {})
    if "200" in chat:
        chat["200"].setdefault("content", {})["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "With `stream: true`: `data: {chat.completion.chunk}` lines "
                "(role, content and tool_calls deltas, finish_reason; a usage chunk with "
                "`stream_options.include_usage`), then `data: [DONE]` (docs/api.md, Chat "
                "Completions streaming).",
            }
        }


# Authentication and the rate limit come before validation, as with Stripe: an unauthenticated
# caller learns nothing about the request format, and a throttled one costs nothing.
blp.before_request(authenticate_and_limit)


def _to_request(args: dict[str, Any]) -> InferenceRequest:
    return InferenceRequest(
        model=args["model"],
        prompt=args.get("input") or args.get("prompt") or "",
        max_output_tokens=args["max_output_tokens"],
        **exchange_controls(args),
        stream=args.get("stream", False),
    )


# The schemas the OpenAPI document is generated from write the answers too.
_SUCCESS = InferenceResponseSchema()
_JOB = JobObjectSchema()
_ERROR = ApiErrorSchema()
_JOB_LIST = JobListSchema()


def dumps(body: Any) -> str:
    return str(current_app.json.dumps(body))


class NativeRenderer:
    """The native API's job shapes (app.jobs.command.Renderer)."""

    def final(self, job: Job) -> tuple[int, str]:
        if job.status == states.SUCCESS:
            return 200, dumps(_SUCCESS.dump(render_success(job)))
        body, status = render_failure(job)
        return status, dumps(_ERROR.dump(body))

    def job(self, job: Job) -> str:
        return job_text(job)


def job_text(job: Job) -> str:
    return dumps(_JOB.dump(render_job(job)))


def _json_response(body: str, status: int) -> Any:
    return current_app.response_class(body, status=status, mimetype="application/json")


def answer_response(answer: Answer, prefer: Preferences) -> Any:
    """The HTTP form of a submit command's Answer (both front doors)."""
    response = _json_response(answer.body, answer.status)
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if answer.job_id is not None and (answer.status == 202 or answer.key_in_use):
        response.headers["Location"] = f"/v1/inference/{answer.job_id}"
    if answer.key_in_use or answer.status in (429, 503):
        # A job that failed for want of a provider is worth retrying shortly, as a 429 is.
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
    renderer: Renderer,
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


def submit_responses(
    bp: Blueprint,
    *,
    bad_request: str,
    extra_headers: dict[str, Any] | None = None,
    timeout: str = "timeout",
) -> Callable[[Any], Any]:
    """The answers every submit endpoint documents beside its 200 (``extra_headers``: the
    front door's own headers on its 202 and 503)."""
    more = extra_headers or {}
    answers: list[tuple[int, str, dict[str, Any] | None]] = [
        (
            202,
            "Accepted: the job runs on (Location to poll)",
            {**LOCATION, **APPLIED, **REPLAYED, **REQUEST_ID, **more},
        ),
        (400, bad_request, None),
        (401, "invalid_api_key", CHALLENGE),
        (402, "insufficient_balance", None),
        (404, "model_not_found", None),
        (
            409,
            "idempotency_key_in_use (error.job_id names the running job)",
            {**LOCATION, **RETRY_AFTER},
        ),
        (
            415,
            "unsupported_media_type: a Content-Encoding other than identity",
            {"Accept-Encoding": header_doc("The codings accepted", "identity")},
        ),
        (
            422,
            "max_price_exceeded, max_latency_exceeded, "
            "idempotency_key_reused_with_different_request",
            None,
        ),
        (429, "rate_limited", RETRY_AFTER),
        (502, "provider_error", None),
        (
            503,
            "no_provider_available; service_unavailable, a fault of ours (error.job_id when a "
            "job was accepted)",
            {**RETRY_AFTER, **more},
        ),
        (504, timeout, None),
    ]

    def document(view: Any) -> Any:
        for status, description, headers in answers:
            schema = JobObjectSchema if status == 202 else ApiErrorSchema
            view = bp.alt_response(status, schema=schema, description=description, headers=headers)(
                view
            )
        return view

    return document


@blp.route("/inference")
class InferenceCollection(MethodView):
    # Schema instances, not classes, in every @blp.arguments: webargs instantiates a class on
    # every request (a measurable cost); a marshmallow 4 schema keeps no state between loads.
    @blp.arguments(InferenceRequestSchema())
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, InferenceResponseSchema, headers={**REQUEST_ID, **REPLAYED, **APPLIED})
    @submit_responses(
        blp,
        bad_request="invalid_request (a duplicate key in the body included), model cap, "
        "context length",
    )
    @blp.doc(security=[{"bearerAuth": []}], parameters=[PREFER_DOC, IDEMPOTENCY_DOC])
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
                model=query.get("model"),
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
        return _json_response(dumps(_JOB_LIST.dump(body)), 200)


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
            # Read before the rollback: it expires the job, and job.id would then be loaded
            # again, holding a pooled connection for the whole wait (issue 19: 300 long-polls
            # exhausted the pool and every other request waited for a connection).
            waited_id = job.id
            session.rollback()  # hold no connection while waiting
            wait_done(get_redis(), waited_id, wait_s)
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
    "schema": {"type": "string", "pattern": "^[0-9]{1,19}(-[0-9]{1,19})?$"},
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
                "Last-Event-ID must be an event id (digits-digits, or digits).", "Last-Event-ID"
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
