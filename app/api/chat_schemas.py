"""Marshmallow schemas of the OpenAI-compatible endpoints: they validate POST
/v1/chat/completions and write its answer, and generate its part of the OpenAPI document."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from app.api.schemas import (
    MAX_OUTPUT_TOKENS_LIMIT,
    BillingSchema,
    InferenceRequestSchema,
    PerformanceSchema,
    StrictInteger,
    check_controls,
)
from app.jobs.chat import REFUSED_UNLESS_DEFAULT


class PlainNumber(fields.Field[Any]):
    """A JSON number (not a boolean, not a string), kept exactly as sent: it goes to the
    provider unchanged."""

    def __init__(self, minimum: float, maximum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minimum, self.maximum = minimum, maximum
        self.metadata = {"type": "number", "minimum": minimum, "maximum": maximum, **self.metadata}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError("Must be a number.")
        if not self.minimum <= value <= self.maximum:
            raise ValidationError(f"Must be between {self.minimum} and {self.maximum}.")
        return value


class Stop(fields.Field[Any]):
    """A string, or an array of up to 4 strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if (
            isinstance(value, list)
            and 1 <= len(value) <= 4
            and all(isinstance(v, str) for v in value)
        ):
            return value
        raise ValidationError("Must be a string or an array of 1 to 4 strings.")


class ToolChoice(fields.Field[Any]):
    """none, auto, required, or {"type": "function", "function": {"name": ...}}."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str | dict):
            return value
        raise ValidationError("Must be a string or an object.")


def _passed(description: str) -> dict[str, Any]:
    return {"description": f"{description} Sent to the provider unchanged."}


_controls = InferenceRequestSchema._declared_fields


class ChatCompletionRequestSchema(Schema):
    class Meta:
        unknown = RAISE
        ordered = True

    model = _controls["model"]
    messages = fields.List(
        fields.Dict(),
        required=True,
        validate=validate.Length(min=1),
        metadata={
            # Stated for the OpenAPI document; the command refuses an empty list (issue 19).
            "minItems": 1,
            "description": "system, developer (sent as system), user, assistant (with "
            "tool_calls) and tool messages; content a string or an array of text parts. "
            "Images, audio and files are refused (400 naming the part).",
        },
    )
    max_tokens = StrictInteger(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=1, max=MAX_OUTPUT_TOKENS_LIMIT),
        metadata={
            "description": "Tokens to generate at most (capped by the model). Absent: the "
            "model's default_max_tokens (GET /v1/models/{id}), which the hold covers."
        },
    )
    max_completion_tokens = StrictInteger(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=1, max=MAX_OUTPUT_TOKENS_LIMIT),
        metadata={"description": "OpenAI's newer name for max_tokens; send one of the two."},
    )
    temperature = PlainNumber(0, 2, allow_none=True, metadata=_passed("Sampling temperature."))
    top_p = PlainNumber(0, 1, allow_none=True, metadata=_passed("Nucleus sampling."))
    presence_penalty = PlainNumber(-2, 2, allow_none=True, metadata=_passed("-2 to 2."))
    frequency_penalty = PlainNumber(-2, 2, allow_none=True, metadata=_passed("-2 to 2."))
    seed = StrictInteger(allow_none=True, metadata=_passed("Best-effort determinism."))
    stop = Stop(allow_none=True, metadata=_passed("Up to 4 stop sequences."))
    logit_bias = fields.Dict(
        keys=fields.String(), values=PlainNumber(-100, 100), allow_none=True, metadata=_passed("")
    )
    response_format = fields.Dict(
        allow_none=True, metadata=_passed("text, json_object or json_schema.")
    )
    tools = fields.List(fields.Dict(), allow_none=True, metadata=_passed("Function tools."))
    tool_choice = ToolChoice(
        allow_none=True, metadata=_passed("none, auto, required or a function.")
    )
    parallel_tool_calls = fields.Boolean(allow_none=True, metadata=_passed(""))
    user = fields.String(
        allow_none=True,
        validate=validate.Length(max=256),
        metadata={"description": "Your end user's id: kept with the job, not sent on."},
    )
    n = StrictInteger(allow_none=True, metadata={"description": "Only 1: more choices are a 400."})
    stream = fields.Boolean(
        allow_none=True,
        metadata={
            "description": "true: Server-Sent Events of chat.completion.chunk, then "
            "`data: [DONE]` (docs/api.md, Chat Completions streaming)."
        },
    )
    stream_options = fields.Dict(
        allow_none=True,
        metadata={
            "description": "With stream: true only. `include_usage: true`: a last chunk with "
            "empty choices and `usage`."
        },
    )
    # The exchange's controls, as the OpenAI SDKs send them with extra_body.
    performance_profile = _controls["performance_profile"]
    routing_strategy = _controls["routing_strategy"]
    max_price_usd = _controls["max_price_usd"]
    max_latency_ms = _controls["max_latency_ms"]
    customer_ref = _controls["customer_ref"]
    metadata = _controls["metadata"]
    callback_url = _controls["callback_url"]

    @validates_schema
    def _bounds(self, data: dict[str, Any], **_: Any) -> None:
        check_controls(data)


# OpenAI parameters we refuse unless they ask for nothing: declared, so that the error says
# why rather than "unrecognized", and so that the OpenAPI document lists them.
for _name in REFUSED_UNLESS_DEFAULT:
    ChatCompletionRequestSchema._declared_fields[_name] = fields.Raw(
        allow_none=True,
        metadata={"description": "Not supported: only its default (absent, null) is accepted."},
    )


class ChatMessageSchema(Schema):
    role = fields.String(metadata={"example": "assistant"})
    content = fields.String(allow_none=True)
    refusal = fields.String(allow_none=True)
    tool_calls = fields.List(
        fields.Dict(), metadata={"description": "When the provider answered with tool calls."}
    )


class ChatChoiceSchema(Schema):
    index = fields.Integer()
    message = fields.Nested(ChatMessageSchema)
    finish_reason = fields.String(metadata={"description": "stop, length or tool_calls"})
    logprobs = fields.Raw(allow_none=True)


class ChatUsageSchema(Schema):
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    total_tokens = fields.Integer()


class FlopexExtensionSchema(Schema):
    job_id = fields.UUID(metadata={"description": "The job: GET /v1/inference/{job_id}"})
    status = fields.String()
    provider = fields.String(metadata={"description": "The provider that served it."})
    performance = fields.Nested(PerformanceSchema)
    billing = fields.Nested(BillingSchema)
    routing = fields.Dict(metadata={"description": "As in the native answer (docs/routing.md)."})
    customer_ref = fields.String(allow_none=True)
    metadata = fields.Dict(allow_none=True)


class ChatCompletionSchema(Schema):
    id = fields.String(metadata={"example": "chatcmpl-..."})
    object = fields.String(metadata={"example": "chat.completion"})
    created = fields.Integer()
    model = fields.String()
    choices = fields.List(fields.Nested(ChatChoiceSchema))
    usage = fields.Nested(ChatUsageSchema)
    system_fingerprint = fields.String(allow_none=True)
    flopex = fields.Nested(
        FlopexExtensionSchema,
        metadata={"description": "The exchange's part: job, provider, billing and routing."},
    )
