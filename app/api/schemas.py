"""Marshmallow schemas: they validate requests and generate the OpenAPI spec."""

from __future__ import annotations

import json
import re
from datetime import UTC
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from app.billing.money import JSON_NUMBER
from app.jobs import states
from app.jobs.webhooks import names_private_host, valid_url
from app.market.routing import PROFILES, STRATEGIES
from config.settings import get_settings

MAX_OUTPUT_TOKENS_LIMIT = 128_000


class StrictInteger(fields.Integer):
    """A JSON integer and nothing else: no 1.0, no "1", no true."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("Must be an integer.")
        return value


class StrictBoolean(fields.Boolean):
    """A JSON true or false and nothing else: no 1, no "true"."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ValidationError("Must be a boolean.")
        return value


# JSON's number grammar: what a string may hold where a number is expected.
_JSON_NUMBER = JSON_NUMBER


class ExactDecimal(fields.Decimal):
    """A JSON number, or a string holding exactly one (clients whose JSON library has no exact
    decimals send those), read as the decimal the client wrote: the parser keeps a fractional
    number's text (app/api/parser.py), so 0.0000249999999999999999 is not rounded to the float
    2.5e-05 on its way in. Not a boolean, no spaces or signs around the digits."""

    def __init__(self, *args: Any, string_pattern: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What a string may hold; the OpenAPI document states it (number_or_string_property).
        self.string_pattern = re.compile(string_pattern or _JSON_NUMBER.pattern)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if not self.string_pattern.fullmatch(value):
                raise ValidationError("Must be a number.")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError("Must be a number.")
        return super()._deserialize(getattr(value, "text", value), attr, data, **kwargs)


def number_or_string_property(
    self: Any, field: fields.Field[Any], ret: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """An apispec attribute function (registered in app/api/__init__.py): an ExactDecimal
    accepts a JSON number or a string holding one, and the OpenAPI document says both instead
    of `type: number` alone. Runs after apispec's own, so the type it set is replaced here."""
    if not isinstance(field, ExactDecimal):
        return {}
    ret.pop("type", None)
    return {
        "anyOf": [
            {"type": "number"},
            {"type": "string", "pattern": f"^({field.string_pattern.pattern})$"},
        ]
    }


# Far above any charge one request can reach, far below what a BIGINT of micro-USD can hold.
MAX_PRICE_USD = 1_000_000
MAX_METADATA_DEPTH = 32


# What valid_url (app/jobs/webhooks.py) accepts, stated in the OpenAPI document: an absolute http(s)
# URL with a host and a port in range, no spaces or control characters.
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
CALLBACK_URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://([^\x00-\x20\x7f/?#@]*@)?[^\x00-\x20\x7f/?#@:\[\]]+"
    rf"(:{_PORT}?)?([/?#][^\x00-\x20\x7f]*)?$"
)

# Empty, or holding a character that is not whitespace; no NUL.
PROMPT_PATTERN = r"^([^\x00]*[^\x00\s][^\x00]*)?$"
# No NUL (PostgreSQL text cannot hold one: _text_problem).
NO_NUL_PATTERN = r"^[^\x00]*$"


def _text_problem(value: Any, depth: int = 0) -> str | None:
    """Why a string, or any key or string inside a JSON value, cannot be stored as text: a NUL
    (PostgreSQL text cannot hold one), a lone UTF-16 surrogate (no UTF-8 encoding), or nesting
    deeper than MAX_METADATA_DEPTH."""
    if isinstance(value, str):
        if "\x00" in value:
            return "Must not contain NUL characters."
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "Must be valid Unicode text (no lone surrogates)."
        return None
    if isinstance(value, dict | list):
        if depth >= MAX_METADATA_DEPTH:
            return f"Must not be nested more than {MAX_METADATA_DEPTH} levels deep."
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            problem = _text_problem(item, depth + 1)
            if problem:
                return problem
    return None


class InferenceRequestSchema(Schema):
    class Meta:
        unknown = RAISE
        ordered = True

    model = fields.String(
        required=True,
        validate=validate.Length(min=1, max=128),
        metadata={
            "description": "Model alias, e.g. llama-3.1-8b.",
            "example": "llama-3.1-8b",
            "pattern": NO_NUL_PATTERN,
        },
    )
    # The OpenAPI document says what is enforced: at least one of the two is a string (the
    # schema's anyOf, app/api/__init__.py), and neither is only whitespace (the pattern: empty,
    # or some text).
    input = fields.String(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "Primary prompt text. Required unless legacy `prompt` is set; not "
            "only whitespace.",
            "pattern": PROMPT_PATTERN,
        },
    )
    prompt = fields.String(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "Legacy prompt, used when `input` is empty; not only whitespace.",
            "deprecated": True,
            "pattern": PROMPT_PATTERN,
        },
    )
    max_output_tokens = StrictInteger(
        required=True,
        validate=validate.Range(min=1, max=MAX_OUTPUT_TOKENS_LIMIT),
        metadata={"description": "Tokens to generate at most; also capped by the model."},
    )
    performance_profile = fields.String(load_default="balanced", validate=validate.OneOf(PROFILES))
    routing_strategy = fields.String(
        load_default="lowest_cost", validate=validate.OneOf(STRATEGIES)
    )
    customer_ref = fields.String(
        load_default=None,
        allow_none=True,
        # The length rule is checked in _bounds against FLOPEX_MAX_CUSTOMER_REF_LEN (255).
        metadata={"minLength": 1, "maxLength": 255, "pattern": NO_NUL_PATTERN},
    )
    max_price_usd = ExactDecimal(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=0, max=MAX_PRICE_USD),
        # As a string: a number within the range, as a pattern can state it (a JSON number's
        # range is stated by minimum and maximum; they do not apply to strings): no sign, at
        # most six integer digits or 1000000, an exponent only below zero (1E-400).
        string_pattern=r"(0|[1-9][0-9]{0,5})(\.[0-9]+)?([eE]-[0-9]+)?|1000000(\.0+)?",
        as_string=False,
        metadata={
            "description": "Reject if the estimated charge (markup included) exceeds this. A "
            'JSON number or a string holding one ("0.02"), read as the exact decimal written '
            "and floored to whole micro-USD."
        },
    )
    max_latency_ms = StrictInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1, max=600_000)
    )
    metadata = fields.Dict(load_default=None, allow_none=True)
    callback_url = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=2048),
        metadata={
            "description": "Flopex POSTs the finished job here, signed (Flopex-Signature; see "
            "GET /v1/webhook_secret). An extension of the API document.",
            "pattern": CALLBACK_URL_PATTERN,
        },
    )
    stream = StrictBoolean(
        load_default=False,
        metadata={
            "description": "Answer as Server-Sent Events (`text/event-stream`): `routing`, "
            "`delta`, then `completed` or `failed` (docs/api.md, Streaming). With "
            "`Prefer: respond-async`, 202 with the job; attach at GET /v1/inference/{id}/events."
        },
    )

    @validates_schema
    def _bounds(self, data: dict[str, Any], **_: Any) -> None:
        settings = get_settings()
        for name in ("model", "input", "prompt", "customer_ref", "callback_url", "metadata"):
            problem = _text_problem(data.get(name))
            if problem:
                raise ValidationError(problem, name)
        for name in ("input", "prompt"):
            value = data.get(name)
            if value and not value.strip():
                # Whitespace is not a prompt: it would be charged for an answer to nothing.
                raise ValidationError("Must contain text, not only whitespace.", name)
        text_input, prompt = data.get("input") or "", data.get("prompt") or ""
        if not text_input and not prompt:
            raise ValidationError("Provide input (or the legacy prompt).", "input")
        if text_input and prompt and text_input != prompt:
            raise ValidationError("Send either input or the legacy prompt, not both.", "prompt")
        if len(text_input or prompt) > settings.max_input_chars:
            raise ValidationError(
                f"Longer than {settings.max_input_chars} characters.",
                "input" if text_input else "prompt",
            )
        check_controls(data)


def check_controls(data: dict[str, Any]) -> None:
    """The exchange's own controls, wherever they arrive (the native body, or a chat
    completion's extra body fields): the same rules and the same errors."""
    settings = get_settings()
    for name in ("model", "customer_ref", "callback_url", "metadata"):
        problem = _text_problem(data.get(name))
        if problem:
            raise ValidationError(problem, name)
    callback = data.get("callback_url")
    if callback is not None and not valid_url(callback):
        raise ValidationError("Must be an http or https URL.", "callback_url")
    private = callback is not None and names_private_host(callback)
    if private and not settings.webhook_allow_private:
        raise ValidationError(
            "Must be reachable from the internet: private, loopback and link-local "
            "addresses never receive webhooks.",
            "callback_url",
        )
    ref = data.get("customer_ref")
    if ref is not None and not 1 <= len(ref) <= settings.max_customer_ref_len:
        raise ValidationError(
            f"Must be 1 to {settings.max_customer_ref_len} characters.", "customer_ref"
        )
    metadata = data.get("metadata")
    if metadata is not None:
        # Its size as stored: compact UTF-8, not \\u-escaped.
        size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
        if size > settings.max_metadata_bytes:
            raise ValidationError(
                f"Serialized size {size} bytes exceeds {settings.max_metadata_bytes}.",
                "metadata",
            )


class UsageSchema(Schema):
    input_tokens = fields.Integer()
    output_tokens = fields.Integer()
    total_tokens = fields.Integer()


class PerformanceSchema(Schema):
    latency_ms = fields.Integer()


class BillingSchema(Schema):
    cost_usd = fields.Decimal(as_string=False)
    cost_display = fields.String()
    input_tokens = fields.Integer()
    output_tokens = fields.Integer()
    total_tokens = fields.Integer()
    cost_per_million_tokens_usd = fields.Decimal(as_string=False, allow_none=True)
    balance_remaining_usd = fields.Decimal(as_string=False)


class InferenceResponseSchema(Schema):
    id = fields.UUID()
    object = fields.String(metadata={"example": "inference"})
    model = fields.String()
    output_text = fields.String()
    status = fields.String(metadata={"example": "success"})
    usage = fields.Nested(UsageSchema)
    performance = fields.Nested(PerformanceSchema)
    billing = fields.Nested(BillingSchema)
    customer_ref = fields.String(allow_none=True)
    metadata = fields.Dict(allow_none=True)
    created_at = fields.String()
    finished_at = fields.String(metadata={"description": "When the job ended; RFC 3339"})
    provider = fields.String(metadata={"description": "The provider that served the job."})
    tool_calls = fields.List(
        fields.Dict(),
        metadata={
            "description": "Only for a chat completion that answered with tool calls: the "
            "calls, as in its `choices[0].message.tool_calls`"
        },
    )
    routing = fields.Dict(
        metadata={
            "description": "The route: `winner` (the provider that served, as `provider`; null "
            "when none did), `ranked_first`, `order` (the ranking, each with its `score` for "
            "balanced), `reason`, `dropped`, `quotes` and `attempts` (each with `outcome` "
            "success or failed, and the `failure` kind when failed). See docs/routing.md."
        }
    )


class ApiErrorDetailSchema(Schema):
    type = fields.String()
    code = fields.String()
    message = fields.String()
    param = fields.String(allow_none=True)
    job_id = fields.UUID(metadata={"description": "Present once a job was created."})


class ApiErrorSchema(Schema):
    error = fields.Nested(ApiErrorDetailSchema)


class WalletSchema(Schema):
    object = fields.String(metadata={"example": "wallet"})
    currency = fields.String(metadata={"example": "USD"})
    balance_usd = fields.Decimal(as_string=False)
    held_usd = fields.Decimal(as_string=False)
    available_usd = fields.Decimal(as_string=False)


class LedgerCursor(fields.String):
    """A ledger entry id as the API writes it: a string of digits (entry ``id``, ``next_cursor``),
    declared so in the OpenAPI document, and loaded as the integer it is. A malformed one is a
    400; a well-formed one that is not an entry of the caller's is a 404 (app/api/wallet.py)."""

    _MAX = 2**63 - 1  # a BIGINT: beyond it no entry can exist, and PostgreSQL would refuse it

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if (
            not (text.isascii() and text.isdigit())
            or len(text) > 19
            or text != str(int(text))
            or not 1 <= int(text) <= self._MAX
        ):
            raise ValidationError("Must be a ledger entry id (the next_cursor of a page).")
        return int(text)


class NoQuerySchema(Schema):
    """For endpoints that take no query parameters: an unknown one is a 400 naming it, as on the
    endpoints that do take some (Stripe's convention), rather than silently ignored."""

    class Meta:
        unknown = RAISE


NO_QUERY = NoQuerySchema()


class LedgerQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    starting_after = LedgerCursor(
        load_default=None,
        allow_none=True,
        metadata={
            "pattern": "^[1-9][0-9]{0,18}$",
            "description": "A ledger entry id (the previous page's `next_cursor`): the page "
            "after it. An id that is not one of your entries is `404 not_found` with `param` "
            "`starting_after`.",
        },
    )


class LedgerEntrySchema(Schema):
    id = fields.String()
    object = fields.String()
    kind = fields.String(
        metadata={"description": "topup, hold, capture, release, refund, adjustment"}
    )
    amount_usd = fields.Decimal(as_string=False, metadata={"description": "change of the balance"})
    held_delta_usd = fields.Decimal(
        as_string=False, metadata={"description": "change of the amount on hold"}
    )
    balance_after_usd = fields.Decimal(as_string=False)
    held_after_usd = fields.Decimal(as_string=False)
    job_id = fields.String(allow_none=True)
    memo = fields.String()
    created_at = fields.String()


class _PageSchema(Schema):
    """The envelope of every paginated list: ``data`` plus a cursor to the next page."""

    object = fields.String(metadata={"example": "list"})
    has_more = fields.Boolean()
    next_cursor = fields.String(allow_none=True)


class LedgerPageSchema(_PageSchema):
    data = fields.List(fields.Nested(LedgerEntrySchema))


class WebhookStateSchema(Schema):
    url = fields.String(metadata={"description": "The job's callback_url"})
    status = fields.String(
        metadata={
            "description": "pending (not yet delivered; retried with backoff), delivered, "
            "failed (every retry failed) or refused (the URL resolves to a non-public address)"
        }
    )


class JobObjectSchema(InferenceResponseSchema):
    """An inference job: the synchronous body once it succeeded, else its state or error."""

    error = fields.Nested(ApiErrorDetailSchema)
    webhook = fields.Nested(
        WebhookStateSchema,
        metadata={"description": "Only for a job submitted with callback_url: its delivery"},
    )
    finished_at = fields.String(
        metadata={"description": "When the job ended (success, failed or cancelled); RFC 3339"}
    )


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 time with a zone, normalised to UTC (databases reject exotic offsets)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        parsed = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parsed.astimezone(UTC)
        except (OverflowError, ValueError):
            raise ValidationError("Out of range.") from None


class JobListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(list(states.INTERNAL)))
    model = fields.String(
        validate=[
            validate.Length(min=1, max=128),
            validate.ContainsNoneOf("\x00", error="Must not contain NUL characters."),
        ],
        metadata={"description": "Only jobs for this model alias, as requested"},
    )
    customer_ref = fields.String(
        # PostgreSQL text cannot hold NUL: without this, a NUL in the filter was a 500.
        # A pattern, not ContainsNoneOf: the OpenAPI document then states the rule.
        validate=[
            validate.Length(min=1, max=255),
            validate.Regexp(r"^[^\x00]*$", error="Must not contain NUL characters."),
        ]
    )
    created_after = UtcDateTime(
        metadata={
            "description": "Only jobs created strictly after this time (exclusive: a job "
            "created at exactly this instant is not listed). ISO 8601 with a time zone, "
            "microsecond precision, e.g. a `created_at` of the API."
        }
    )
    created_before = UtcDateTime(
        metadata={
            "description": "Only jobs created strictly before this time (exclusive). ISO 8601 "
            "with a time zone. With created_after: the open interval between the two."
        }
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    starting_after = fields.UUID(metadata={"description": "a job id: the page after it"})


class JobListSchema(_PageSchema):
    data = fields.List(fields.Nested(JobObjectSchema))


class JobGetQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    # Up to an hour is accepted (a client's generous timeout is not an error) and then capped
    # by FLOPEX_MAX_WAIT_S; the description says so, since the schema's maximum is not the cap.
    wait = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=3600),
        metadata={
            "description": "Long-poll: wait up to this many seconds for the job to finish. "
            "Values above the server's cap, FLOPEX_MAX_WAIT_S (60 s by default), are accepted "
            "and waited as the cap; above 3600 is a 400."
        },
    )


class PriceRangeSchema(Schema):
    min = fields.Decimal(as_string=False)
    max = fields.Decimal(as_string=False)


class ModelPricingSchema(Schema):
    input_usd_per_million = fields.Nested(PriceRangeSchema)
    output_usd_per_million = fields.Nested(PriceRangeSchema)


class ModelSchema(Schema):
    """A model as the OpenAI SDKs parse it (id, object, owned_by), with the exchange's fields."""

    id = fields.String(metadata={"example": "llama-3.1-8b"})
    object = fields.String(metadata={"example": "model"})
    owned_by = fields.String(metadata={"example": "flopex"})
    max_output_tokens = fields.Integer()
    default_max_tokens = fields.Integer(
        metadata={"description": "max_tokens of a chat completion that sends none"}
    )
    context_length = fields.Integer()
    providers = fields.Integer(metadata={"description": "providers serving it now"})
    pricing = fields.Nested(ModelPricingSchema, allow_none=True)


class ModelListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(ModelSchema))


class ProviderSchema(Schema):
    id = fields.String()
    object = fields.String(metadata={"example": "provider"})
    models = fields.List(fields.String())
    live = fields.Boolean(allow_none=True, metadata={"description": "last health probe answered"})
    latency_ms = fields.Integer(allow_none=True, metadata={"description": "last probe round trip"})
    checked_at = fields.String(
        allow_none=True,
        metadata={"description": "When the last probe ran: RFC 3339 in UTC with a Z"},
    )
    success_rate = fields.Decimal(
        as_string=False,
        allow_none=True,
        metadata={
            "description": "ok / (ok + failed) over the health window, a number with four "
            "decimals (0.9375); null without history. routing.quotes[].success_rate is the same."
        },
    )
    circuit = fields.String(metadata={"description": "closed, open or half_open"})


class ProviderListSchema(Schema):
    object = fields.String()
    data = fields.List(fields.Nested(ProviderSchema))


class HealthSchema(Schema):
    status = fields.String(metadata={"example": "ok"})


class ReadySchema(Schema):
    status = fields.String(metadata={"description": "ok or unavailable"})
    checks = fields.Dict(keys=fields.String(), values=fields.String())


class WebhookSecretSchema(Schema):
    object = fields.String(metadata={"example": "webhook_secret"})
    secret = fields.String(metadata={"description": "HMAC-SHA256 key of Flopex-Signature"})


class StreamEventSchema(Schema):
    """One Server-Sent Event of a job's stream (docs/api.md, Streaming), as sent on the wire:
    `id: <id>`, `event: <event>`, `data: <JSON>`, then a blank line."""

    id = fields.String(
        metadata={
            "description": "Increasing `<digits>-<digits>`; send the last one received as "
            "Last-Event-ID to resume. Absent on the single event answering a job whose events "
            "are no longer kept.",
            "example": "1733325000000-0",
        }
    )
    event = fields.String(
        validate=validate.OneOf(("routing", "delta", "completed", "failed")),
        metadata={"description": "The event's name."},
    )
    data = fields.String(
        metadata={
            "description": "A JSON object, as text (SSE data is text). "
            "routing: `id`, `provider` (about to be asked), `winner`, `order`, "
            "`dropped`, `reason`. delta: `text`, and `tool_calls` fragments when the provider "
            "sent them. completed: the job as GET /v1/inference/{id} returns it, plus "
            "`finish_reason`. failed: `error` (the one error shape, with `job_id`), `status` "
            "(failed or cancelled) and, for a stream cut after its first token, `output_text`, "
            "`usage`, `billing`, `provider`.",
        }
    )
