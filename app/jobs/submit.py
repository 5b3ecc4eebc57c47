"""Accepting an inference request: every check that can reject it without a provider runs here,
before anything is written, so a rejected request changes nothing."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from app import wallet
from app.accounts import Principal
from app.catalog import ModelCache, RouteOption, find_model
from app.db import Commit
from app.exceptions import FlopexError
from app.jobs import states
from app.models import Job, utcnow
from app.money import display_usd, usd_to_micros_floor
from app.pricing import estimate_input_tokens, estimated_charge
from config.settings import Settings


@dataclass(frozen=True)
class InferenceRequest:
    """The canonical request: ``input`` and legacy ``prompt`` already merged into ``prompt``.

    A chat completion also carries its ``messages`` and the ``provider_params`` that go to the
    provider unchanged (``prompt`` is then their text, for the estimates); its
    ``max_output_tokens`` may be None: the model's default_max_tokens, as far as the context
    leaves room for (docs/api.md)."""

    model: str
    prompt: str
    max_output_tokens: int | None
    performance_profile: str = "balanced"
    routing_strategy: str = "lowest_cost"
    customer_ref: str | None = None
    max_price_usd: Decimal | None = None
    max_latency_ms: int | None = None
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None
    messages: list[dict[str, Any]] | None = None
    provider_params: dict[str, Any] | None = None
    user: str | None = None
    stream: bool = False

    def canonical(self) -> dict[str, Any]:
        """JSON-safe form stored on the job (and, later, fingerprinted for idempotency)."""
        # `stream` only when set: the worker streams the provider's answer into the job's events.
        return ({"stream": True} if self.stream else {}) | {
            "model": self.model,
            "input": self.prompt,
            "max_output_tokens": self.max_output_tokens,
            "performance_profile": self.performance_profile,
            "routing_strategy": self.routing_strategy,
            "customer_ref": self.customer_ref,
            "max_price_usd": None if self.max_price_usd is None else str(self.max_price_usd),
            "max_latency_ms": self.max_latency_ms,
            "metadata": self.metadata,
            "callback_url": self.callback_url,
            **({"api": "chat.completions", "user": self.user} if self.messages else {}),
        }


# The exchange's own controls of a request, under the same names in every front door's body.
CONTROLS = (
    "performance_profile",
    "routing_strategy",
    "customer_ref",
    "max_price_usd",
    "max_latency_ms",
    "metadata",
    "callback_url",
)


def exchange_controls(args: dict[str, Any]) -> dict[str, Any]:
    """The controls of a validated body (the profile and strategy carry their defaults)."""
    return {name: args.get(name) for name in CONTROLS}


@dataclass(frozen=True)
class Accepted:
    job: Job
    options: list[RouteOption]
    quote_deadline_at: float


class SubmitInference:
    """validate() raises a FlopexError for anything a provider is not needed to decide;
    run() writes the job row and places the hold, together or not at all (the caller commits,
    then dispatches; when the session had no transaction open, the two were one statement that
    committed by itself). A FlopexError from run() means the caller must roll back: nothing is
    kept."""

    def __init__(
        self,
        session: Session,
        principal: Principal,
        request: InferenceRequest,
        settings: Settings,
        request_id: str | None = None,
        models: ModelCache | None = None,
        defer: bool = False,
        job_id: uuid.UUID | None = None,
    ) -> None:
        self.models = models
        # Chosen by the caller when it must be able to name the job after a fault.
        self.job_id = job_id or uuid.uuid4()
        # The hold's commit may skip waiting for its WAL flush (a synchronous submit: the
        # worker makes it durable before the outcome is announced; docs/billing.md).
        self.defer = defer
        self.session = session
        self.principal = principal
        self.request = request
        self.settings = settings
        self.request_id = request_id
        self._options: list[RouteOption] = []
        self._estimates: dict[int, int] = {}
        self._estimated_input = 0
        self._max_price_micros: int | None = None
        self._hold_choices: list[int] = []
        self._max_output_tokens = request.max_output_tokens or 0

    def validate(self) -> None:
        req = self.request
        model = (
            self.models.get(self.session, req.model)
            if self.models
            else find_model(self.session, req.model)
        )
        if model is None:
            raise FlopexError(
                "model_not_found", f"The model '{req.model}' does not exist.", "model"
            )
        limit_param = "max_tokens" if req.messages is not None else "max_output_tokens"
        input_param = "messages" if req.messages is not None else "input"
        if req.max_output_tokens is not None and req.max_output_tokens > model.max_output_tokens:
            raise FlopexError(
                "max_output_tokens_exceeds_model_cap",
                f"{limit_param} is {req.max_output_tokens}; {model.alias} allows at most "
                f"{model.max_output_tokens}.",
                limit_param,
            )
        self._estimated_input = estimate_input_tokens(req.prompt)
        if req.max_output_tokens is None:
            # The default shrinks to what the context leaves, as an OpenAI model's does.
            room = model.context_length - self._estimated_input
            self._max_output_tokens = min(model.default_max_tokens, max(room, 1))
        if self._estimated_input + self._max_output_tokens > model.context_length:
            raise FlopexError(
                "context_length_exceeded",
                f"The input (about {self._estimated_input} tokens) plus {limit_param} "
                f"({self._max_output_tokens}) exceeds {model.alias}'s context of "
                f"{model.context_length} tokens.",
                input_param,
            )
        if not model.options:
            raise FlopexError(
                "no_provider_available", f"No provider currently serves {model.alias}.", "model"
            )
        self._options = list(model.options)
        self._estimates = {
            o.offering_id: estimated_charge(
                self._estimated_input,
                self._max_output_tokens,
                o.input_price_micros_per_m,
                o.output_price_micros_per_m,
                self.settings.markup,
            )
            for o in self._options
        }
        if req.max_price_usd is not None:
            self._max_price_micros = usd_to_micros_floor(req.max_price_usd)
            affordable = [e for e in self._estimates.values() if e <= self._max_price_micros]
            if not affordable:
                cheapest = min(self._estimates.values())
                raise FlopexError(
                    "max_price_exceeded",
                    f"The cheapest quote's estimated charge ({display_usd(cheapest)}) "
                    # The binding limit (floored to whole micro-USD), not the digits sent:
                    # "1E-400" or "0.0000099999" would not say what was compared.
                    f"exceeds max_price_usd ({display_usd(self._max_price_micros)}).",
                    "max_price_usd",
                )
        else:
            affordable = list(self._estimates.values())
        # Every worst case within the price limit is a possible hold, largest first: the hold
        # is the largest the wallet covers, so that every provider the wallet can pay for stays
        # a candidate (routing drops the quotes above the hold). Holding only the largest or
        # the cheapest would drop a provider in between that the wallet could pay for.
        self._hold_choices = sorted(set(affordable), reverse=True)

    def _place_hold(self, job: dict[str, Any]) -> int:
        """Writes the job row with the largest hold the wallet covers, in one statement with the
        hold (PostgreSQL): the database picks the amount from the wallet row it has locked, so
        the choice is exact under concurrency and costs no extra round trip. Solo, i.e. its own
        transaction, unless the caller has one open (an Idempotency-Key's claim commits with the
        job), so that the wallet row, which every request of the account needs, is never locked
        across a round trip to this process."""
        placed = wallet.hold_largest(
            self.session,
            self.principal.wallet_id,
            job["id"],
            self._hold_choices,
            new_job=job,
            commit=Commit.ALONE_DEFERRED if self.defer else Commit.ALONE,
        )
        if placed is not None:
            return placed[0]
        # Refused: nothing was written. One more read, only to say how short the wallet is.
        available = wallet.get_state(self.session, self.principal.wallet_id).available_micros
        raise FlopexError(
            "insufficient_balance",
            f"The wallet's available balance ({display_usd(available)}) does not cover the "
            f"estimated charge ({display_usd(self._hold_choices[-1])}).",
        )

    def run(self) -> Accepted:
        self.validate()
        req = self.request
        policy = self.settings.profiles[req.performance_profile]
        now = utcnow()
        values: dict[str, Any] = {
            "id": self.job_id,
            "account_id": self.principal.account_id,
            "api_key_id": self.principal.api_key_id,
            "wallet_id": self.principal.wallet_id,
            "status": states.QUOTING,
            "version": 1,
            "model": req.model,
            "request": {**req.canonical(), "max_output_tokens": self._max_output_tokens},
            "performance_profile": req.performance_profile,
            "routing_strategy": req.routing_strategy,
            "max_output_tokens": self._max_output_tokens,
            "max_price_micros": self._max_price_micros,
            "max_latency_ms": req.max_latency_ms,
            "customer_ref": req.customer_ref,
            "metadata": req.metadata,
            "request_id": self.request_id,
            "markup": str(self.settings.markup),
            "estimated_input_tokens": self._estimated_input,
            "expected_quotes": len(self._options),
            # Until the route step replaces them with quotes, these are the options asked.
            "quotes": [
                {**o.as_message(), "estimated_charge_micros": self._estimates[o.offering_id]}
                for o in self._options
            ],
            # The largest choice until the hold says which one the wallet covers.
            "hold_micros": self._hold_choices[0],
            # Owed from the start: the sweeper delivers it if the worker that finishes the job
            # dies before queueing it (app/jobs/recovery.py).
            "webhook_status": "pending" if req.callback_url else None,
            # A chat completion's request, as its provider gets it (absent: a native job).
            **(
                {"messages": req.messages, "provider_params": req.provider_params}
                if req.messages is not None
                else {}
            ),
            "created_at": now,
            "updated_at": now,
        }
        values["hold_micros"] = self._place_hold(values)
        values["metadata_"] = values.pop("metadata")
        return Accepted(
            # Detached: the caller renders and dispatches it; the row is the source of truth.
            job=Job(**values),
            options=self._options,
            quote_deadline_at=time.time() + policy.quote_deadline_ms / 1000,
        )
