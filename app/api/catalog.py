"""GET /v1/models and GET /v1/providers: what can be routed, and how the providers are doing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from app.api.auth import authenticate_and_limit
from app.api.parser import FlopexParser
from app.api.schemas import NO_QUERY, ModelListSchema, ProviderListSchema
from app.api.session import db
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


@blp.route("/models")
class Models(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, ModelListSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self) -> Any:
        """Every model alias with its caps and the price range across the providers serving it."""
        rows = (
            db()
            .execute(
                # An offering counts only while its provider is enabled too; a model whose
                # providers are all disabled is still listed, with none, like one never offered.
                select(ModelAlias, Offering)
                .outerjoin(
                    Offering,
                    (Offering.alias_id == ModelAlias.id)
                    & Offering.enabled
                    & Offering.provider_id.in_(select(Provider.id).where(Provider.enabled)),
                )
                .where(ModelAlias.enabled)
                .order_by(ModelAlias.alias)
            )
            .all()
        )
        models: dict[str, dict[str, Any]] = {}
        for alias, offering in rows:
            entry = models.setdefault(
                alias.alias,
                {
                    "id": alias.alias,
                    "object": "model",
                    "max_output_tokens": alias.max_output_tokens,
                    "context_length": alias.context_length,
                    "providers": 0,
                    "_in": [],
                    "_out": [],
                },
            )
            if offering is not None:
                entry["providers"] += 1
                entry["_in"].append(offering.input_price_micros_per_m)
                entry["_out"].append(offering.output_price_micros_per_m)
        data = []
        for entry in models.values():
            prices_in, prices_out = entry.pop("_in"), entry.pop("_out")
            entry["pricing"] = (
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
            )
            data.append(entry)
        return {"object": "list", "data": data}


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
