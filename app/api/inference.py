"""POST /v1/inference: authenticate, validate, claim the Idempotency-Key, accept, dispatch,
wait, render."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint
from kombu.exceptions import OperationalError

from app import idempotency
from app.api.auth import require_principal
from app.api.parser import FlopexParser
from app.api.schemas import ApiErrorSchema, InferenceRequestSchema, InferenceResponseSchema
from app.api.session import db
from app.exceptions import FlopexError, InvalidRequest
from app.jobs import states
from app.jobs.dispatch import dispatch_quotes
from app.jobs.execution import close_failed
from app.jobs.notify import wait_done
from app.jobs.render import render_final
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job
from app.redis_client import get_redis
from config.settings import get_settings

log = logging.getLogger(__name__)

ENDPOINT = "POST /v1/inference"

blp = Blueprint(
    "inference", __name__, url_prefix="/v1", description="Run inference through the exchange"
)
blp.ARGUMENTS_PARSER = FlopexParser()


@blp.before_request
def _authenticate() -> None:
    # Authentication comes before validation, as with Stripe: an unauthenticated caller learns
    # nothing about the request format.
    require_principal()


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
    )


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= idempotency.MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LENGTH} printable characters.",
            "Idempotency-Key",
        )
    return key


def _json_response(body: str, status: int, replayed: bool = False) -> Any:
    response = current_app.response_class(body, status=status, mimetype="application/json")
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@blp.route("/inference")
class Inference(MethodView):
    @blp.arguments(InferenceRequestSchema)
    @blp.response(200, InferenceResponseSchema)
    @blp.alt_response(400, schema=ApiErrorSchema, description="invalid_request, model cap")
    @blp.alt_response(401, schema=ApiErrorSchema, description="invalid_api_key")
    @blp.alt_response(402, schema=ApiErrorSchema, description="insufficient_balance")
    @blp.alt_response(404, schema=ApiErrorSchema, description="model_not_found")
    @blp.alt_response(409, schema=ApiErrorSchema, description="idempotency_key_in_use")
    @blp.alt_response(
        422,
        schema=ApiErrorSchema,
        description="max_price_exceeded, max_latency_exceeded, idempotency_key_reused_with_different_request",
    )
    @blp.alt_response(502, schema=ApiErrorSchema, description="provider_error")
    @blp.alt_response(503, schema=ApiErrorSchema, description="no_provider_available")
    @blp.alt_response(504, schema=ApiErrorSchema, description="timeout")
    @blp.doc(security=[{"bearerAuth": []}])
    def post(self, args: dict[str, Any]) -> Any:
        """Run one inference on the provider that wins the quotes for your profile.

        Send `Idempotency-Key` to make retries safe: the same key with the same body returns the
        first outcome (header `Idempotent-Replayed: true`) without running or charging again.
        """
        settings = get_settings()
        session = db()
        principal = require_principal()
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
            )
            if claim.state != "new":
                session.commit()
                return _answer_duplicate(claim, settings.sync_timeout_s)
            record_id = claim.record_id

        # The claim, the job and its hold commit together; a rejection rolls all three back.
        accepted = SubmitInference(
            session,
            principal,
            _to_request(args),
            settings,
            request_id=request.headers.get("X-Request-ID"),
        ).run()
        if record_id is not None:
            idempotency.attach_job(session, record_id, accepted.job.id)
        session.commit()
        job_id = accepted.job.id
        try:
            dispatch_quotes(current_app.extensions["celery"], accepted, settings)
        except OperationalError:
            log.exception("broker unreachable; job %s not dispatched", job_id)
            _abandon_undispatched(job_id, record_id)
            raise FlopexError(
                "service_unavailable", "The exchange cannot queue work right now; retry."
            ) from None
        return _await_outcome(job_id, record_id, settings.sync_timeout_s)


def _await_outcome(
    job_id: uuid.UUID, record_id: int | None, wait_s: float, replayed: bool = False
) -> Any:
    wait_done(get_redis(), job_id, wait_s)
    session = db()
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    if job.status not in states.FINAL:
        if replayed:
            raise FlopexError(
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still running; retry later.",
            )
        return _json_response(current_app.json.dumps(_still_running(job)), 504)
    body, status = render_final(job)
    text = current_app.json.dumps(body)
    if record_id is not None:
        status, text = idempotency.record_response(session, record_id, status, text)
    return _json_response(text, status, replayed)


def _answer_duplicate(claim: idempotency.Claim, wait_s: float) -> Any:
    if claim.state == "mismatch":
        raise FlopexError(
            "idempotency_key_reused_with_different_request",
            "This Idempotency-Key was used with a different request; use a new key.",
            "Idempotency-Key",
        )
    if claim.state == "replay":
        assert claim.status is not None and claim.body is not None
        return _json_response(claim.body, claim.status, replayed=True)
    # in_progress: never a second execution; wait for the first one's outcome.
    assert claim.job_id is not None
    return _await_outcome(claim.job_id, claim.record_id, wait_s, replayed=True)


def _still_running(job: Job) -> dict[str, Any]:
    return {
        "error": {
            "type": "timeout_error",
            "code": "timeout",
            "message": (
                f"The job did not finish within the wait; it is still {job.status} and will be "
                "settled when it completes."
            ),
            "param": None,
            "job_id": str(job.id),
        }
    }


def _abandon_undispatched(job_id: uuid.UUID, record_id: int | None) -> None:
    """Nothing ran: release the hold, fail the job, and free the key so a retry runs normally."""
    session = db()
    job = session.get(Job, job_id)
    if job is not None and job.status == states.QUOTING:
        close_failed(session, job, "service_unavailable", "The job could not be queued.")
    if record_id is not None:
        idempotency.forget(session, record_id)
    session.commit()
