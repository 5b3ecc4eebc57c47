"""POST /v1/inference: validate, authenticate, accept, dispatch, wait, render."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint
from kombu.exceptions import OperationalError
from sqlalchemy import update

from app.api.auth import require_principal
from app.api.parser import FlopexParser
from app.api.schemas import ApiErrorSchema, InferenceRequestSchema, InferenceResponseSchema
from app.api.session import db
from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.dispatch import dispatch_quotes
from app.jobs.notify import wait_done
from app.jobs.render import render_final
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, utcnow
from app.redis_client import get_redis
from config.settings import get_settings

log = logging.getLogger(__name__)

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


@blp.route("/inference")
class Inference(MethodView):
    @blp.arguments(InferenceRequestSchema)
    @blp.response(200, InferenceResponseSchema)
    @blp.alt_response(400, schema=ApiErrorSchema, description="invalid_request, model cap")
    @blp.alt_response(401, schema=ApiErrorSchema, description="invalid_api_key")
    @blp.alt_response(402, schema=ApiErrorSchema, description="insufficient_balance")
    @blp.alt_response(404, schema=ApiErrorSchema, description="model_not_found")
    @blp.alt_response(422, schema=ApiErrorSchema, description="max_price/max_latency exceeded")
    @blp.alt_response(502, schema=ApiErrorSchema, description="provider_error")
    @blp.alt_response(503, schema=ApiErrorSchema, description="no_provider_available")
    @blp.alt_response(504, schema=ApiErrorSchema, description="timeout")
    @blp.doc(security=[{"bearerAuth": []}])
    def post(self, args: dict[str, Any]) -> Any:
        """Run one inference on the provider that wins the quotes for your profile."""
        settings = get_settings()
        session = db()
        principal = require_principal()
        accepted = SubmitInference(
            session,
            principal,
            _to_request(args),
            settings,
            request_id=request.headers.get("X-Request-ID"),
        ).run()
        session.commit()
        job_id = accepted.job.id
        try:
            dispatch_quotes(current_app.extensions["celery"], accepted, settings)
        except OperationalError:
            log.exception("broker unreachable; job %s not dispatched", job_id)
            _fail_undispatched(job_id)
            raise FlopexError(
                "service_unavailable", "The exchange cannot queue work right now; retry."
            ) from None

        wait_done(get_redis(), job_id, settings.sync_timeout_s)
        session.expire_all()
        job = session.get(Job, job_id)
        assert job is not None
        if job.status in states.FINAL:
            body, status = render_final(job)
            return _raw(body, status)
        body = {
            "error": {
                "type": "timeout_error",
                "code": "timeout",
                "message": (
                    f"The job did not finish within {settings.sync_timeout_s:g} s; it is still "
                    f"{job.status} and will be settled when it completes."
                ),
                "param": None,
                "job_id": str(job.id),
            }
        }
        return _raw(body, 504)


def _raw(body: dict[str, Any], status: int) -> Any:
    # The body is already rendered with exact Decimals; bypass the response schema.
    response = current_app.response_class(
        current_app.json.dumps(body), status=status, mimetype="application/json"
    )
    return response


def _fail_undispatched(job_id: uuid.UUID) -> None:
    session = db()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == states.QUOTING)
        .values(
            status=states.FAILED,
            error_code="service_unavailable",
            error_message="The job could not be queued.",
            finished_at=utcnow(),
            updated_at=utcnow(),
        )
    )
    session.commit()
