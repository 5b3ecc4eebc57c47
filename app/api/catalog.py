"""GET /v1/models and GET /v1/providers: what can be routed, and how the providers are doing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from app.api.auth import authenticate_and_limit
from app.api.parser import FlopexParser
from app.api.schemas import (
    NO_QUERY,
    ApiErrorSchema,
    ModelListSchema,
    ModelSchema,
    ProviderListSchema,
)
from app.api.session import db
from app.catalog import ModelListing, list_models
from app.exceptions import FlopexError
from app.models import ModelAlias, Offering, Provider, iso_utc
from app.money import micros_to_usd
from app.providers import health
from app.providers.breaker import Breaker
from app.providers.probe import last_probe
from app.redis_client import get_redis
from config.settings import get_settings


def _rfc3339(unix_s: float) -> str | None:
    return iso_utc(datetime.fromtimestamp(unix_s, UTC))


blp = Blueprint("catalog", __name__, url_prefix="/v1", description="Models and providers")
# The project's parser: strict JSON, and a query string's unknown parameter is refused (webargs'
# default parser drops unknown query parameters whatever the schema says).
blp.ARGUMENTS_PARSER = FlopexParser()
blp.before_request(authenticate_and_limit)


def _model(listing: ModelListing) -> dict[str, Any]:
    prices_in, prices_out = listing.input_prices, listing.output_prices
    return {
        "id": listing.alias,
        "object": "model",
        "owned_by": "flopex",
        "max_output_tokens": listing.max_output_tokens,
        "default_max_tokens": listing.default_max_tokens,
        "context_length": listing.context_length,
        "providers": len(prices_in),
        "pricing": (
            {
                "input_usd_per_million": {
                    "min": micros_to_usd(min(prices_in)),
                    "max": micros_to_usd(max(prices_in)),
                },
                "output_usd_per_million": {
                    "min": micros_to_usd(min(prices_out)),
                    "max": micros_to_usd(max(prices_out)),
                },
            }
            if prices_in
            else None
        ),
    }


@blp.route("/models")
class Models(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, ModelListSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self) -> Any:
        """Every model alias with its caps and the price range across the providers serving it."""
        return {"object": "list", "data": [_model(m) for m in list_models(db())]}


@blp.route("/models/<path:model_id>")
class ModelItem(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, ModelSchema)
    @blp.alt_response(404, schema=ApiErrorSchema, description="model_not_found (param model)")
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self, model_id: str) -> Any:
        """One model alias (as in the list): what `client.models.retrieve()` reads."""
        found = list_models(db(), model_id)
        if not found:
            raise FlopexError("model_not_found", f"The model '{model_id}' does not exist.", "model")
        return _model(found[0])


@blp.route("/providers")
class Providers(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, ProviderListSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self) -> Any:
        """Each enabled provider's live state from the health probe, its recent latency and
        success rate, and its circuit breaker."""
        settings = get_settings()
        client = get_redis()
        breaker = Breaker.from_settings(client, settings)
        rows = (
            db()
            .execute(
                select(Provider.name, ModelAlias.alias)
                .outerjoin(Offering, (Offering.provider_id == Provider.id) & Offering.enabled)
                # A disabled model is not served, whatever its offerings say.
                .outerjoin(ModelAlias, (ModelAlias.id == Offering.alias_id) & ModelAlias.enabled)
                .where(Provider.enabled)
                .order_by(Provider.name, ModelAlias.alias)
            )
            .all()
        )
        served: dict[str, list[str]] = {}
        for name, alias in rows:
            served.setdefault(name, [])
            if alias:
                served[name].append(alias)
        data = []
        for name, aliases in served.items():
            probe = last_probe(client, name)
            rate = health.success_rate(client, name, settings.health_window_s)
            data.append(
                {
                    "id": name,
                    "object": "provider",
                    "models": aliases,
                    "live": probe["live"] if probe else None,
                    "latency_ms": probe["latency_ms"] if probe else None,
                    # The probe keeps Unix time; the API writes every time as RFC 3339.
                    "checked_at": _rfc3339(probe["checked_at"]) if probe else None,
                    "success_rate": rate,
                    "circuit": breaker.state(name),
                }
            )
        return {"object": "list", "data": data}
