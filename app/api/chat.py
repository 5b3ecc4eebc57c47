"""POST /v1/chat/completions: the OpenAI Chat Completions API as a front door onto the same
submit command as POST /v1/inference (same jobs, wallet, routing, idempotency and Prefer)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api import sse
from app.api.auth import authenticate_and_limit, require_principal
from app.api.chat_schemas import ChatCompletionRequestSchema, ChatCompletionSchema
from app.api.inference import (
    APPLIED,
    IDEMPOTENCY_DOC,
    PREFER_DOC,
    REPLAYED,
    REQUEST_ID,
    NativeRenderer,
    answer_response,
    dumps,
    header_doc,
    submit,
    submit_responses,
)
from app.api.parser import FlopexParser
from app.api.schemas import NO_QUERY
from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.chat import chat_request, include_usage, render_chat_completion
from app.models import Job
from config.settings import get_settings

ENDPOINT = "POST /v1/chat/completions"

blp = Blueprint(
    "chat", __name__, url_prefix="/v1", description="OpenAI-compatible chat completions"
)
blp.ARGUMENTS_PARSER = FlopexParser()
blp.before_request(authenticate_and_limit)

_COMPLETION = ChatCompletionSchema()
JOB_ID = {"X-Flopex-Job-Id": header_doc("The job behind this answer (GET /v1/inference/{id})")}


class ChatRenderer(NativeRenderer):
    """A finished job as a chat.completion; failures keep the one error shape, and every 202
    is the job object, as on /v1/inference."""

    def final(self, job: Job) -> tuple[int, str]:
        if job.status != states.SUCCESS:
            return super().final(job)
        return 200, dumps(_COMPLETION.dump(render_chat_completion(job)))


@blp.route("/chat/completions")
class ChatCompletions(MethodView):
    @blp.arguments(ChatCompletionRequestSchema())
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(
        200, ChatCompletionSchema, headers={**REQUEST_ID, **REPLAYED, **APPLIED, **JOB_ID}
    )
    @submit_responses(
        blp,
        bad_request="invalid_request (a part that cannot be carried, stream, n > 1, a "
        "refused parameter), model cap, context length",
        extra_headers=JOB_ID,
        timeout="timeout (every provider timed out); job_still_running (the wait ran out "
        "without a Prefer header: error.job_id names the job, which carries on)",
    )
    @blp.doc(security=[{"bearerAuth": []}], parameters=[PREFER_DOC, IDEMPOTENCY_DOC])
    def post(self, args: dict[str, Any]) -> Any:
        """Create a chat completion (OpenAI's wire format) through the exchange.

        The exchange's controls (performance_profile, routing_strategy, max_price_usd, ...)
        ride along as extra body fields; the answer's `flopex` object names the job, provider,
        billing and routing. docs/api.md lists the parameters accepted, passed through and
        refused."""
        request_ = chat_request(args, get_settings().max_input_chars)
        answer, prefer = submit(
            require_principal(),
            request_,
            endpoint=ENDPOINT,
            renderer=ChatRenderer(),
            profile=args["performance_profile"],
        )
        if answer.stream:
            assert answer.job_id is not None
            frames = sse.ChatFrames(
                answer.job_id, request_.model, int(time.time()), include_usage(args)
            )
            return sse.relay(
                answer.job_id,
                frames,
                # Only the request that submitted the job stops it by leaving, not a replay.
                stop_on_disconnect=not answer.replayed,
                early_error=True,
                celery=current_app.extensions["celery"],
                headers={
                    "X-Flopex-Job-Id": str(answer.job_id),
                    **({"Idempotent-Replayed": "true"} if answer.replayed else {}),
                },
            )
        if answer.status == 202 and not answer.respond_async and prefer.wait_s is None:
            # The wait ran out (or the broker was away) and the client did not ask for the
            # exchange's 202: an OpenAI client would read the job object as an empty completion.
            assert answer.job_id is not None
            raise JobStillRunning(answer.job_id, keyed="Idempotency-Key" in request.headers)
        response = answer_response(answer, prefer)
        if answer.job_id is not None:
            response.headers["X-Flopex-Job-Id"] = str(answer.job_id)
        return response


class JobStillRunning(FlopexError):
    """504 job_still_running: the chat door's answer when its wait ran out and the client did
    not ask for the exchange's 202 (docs/api.md)."""

    def __init__(self, job_id: uuid.UUID, keyed: bool) -> None:
        super().__init__(
            "job_still_running",
            f"The job {job_id} is still running: poll GET /v1/inference/{job_id} for its "
            "outcome (it is charged if it succeeds), or send Prefer: respond-async.",
            job_id=job_id,
        )
        self.headers = {"X-Flopex-Job-Id": str(job_id), "Location": f"/v1/inference/{job_id}"}
        if not keyed:
            self.headers["X-Should-Retry"] = "false"  # a resubmission without a key is a new job
