"""The provider/model catalog: loaded from a TOML file in ``config/`` into the database, and read
back for routing.

The file is the whole truth: providers and offerings missing from it are disabled, never deleted,
so old jobs keep their references. ``${VAR}`` and ``${VAR:-default}`` in strings are expanded from
the environment, so one file serves every deployment (base URLs, credential variable names).
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import ModelAlias, Offering, Provider
from app.money import usd_to_micros

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            found = os.environ.get(name)
            if found:
                return found
            if default is None:
                raise ValueError(f"catalog needs environment variable {name}")
            return default

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _price(value: Any, where: str) -> int:
    if isinstance(value, float):
        value = repr(value)  # shortest round-trip text: 0.05 stays "0.05"
    try:
        micros = usd_to_micros(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if micros < 0:
        raise ValueError(f"{where}: price cannot be negative")
    return micros


def _speed_priors(spec: dict[str, Any], where: str) -> tuple[int | None, Decimal | None]:
    """The optional speed priors (app/providers/speed.py): a whole number of milliseconds to
    the first token, and output tokens per second above 0."""
    ttft = spec.get("expected_ttft_ms")
    if ttft is not None and (isinstance(ttft, bool) or not isinstance(ttft, int) or ttft < 0):
        raise ValueError(f"{where}: expected_ttft_ms must be a whole number of ms, 0 or more")
    tps = spec.get("expected_tokens_per_s")
    if tps is not None:
        if isinstance(tps, bool) or not isinstance(tps, int | float | str):
            raise ValueError(f"{where}: expected_tokens_per_s must be a number above 0")
        try:
            tps = Decimal(repr(tps) if isinstance(tps, float) else str(tps))
        except InvalidOperation:
            raise ValueError(f"{where}: expected_tokens_per_s must be a number above 0") from None
        if not tps.is_finite() or tps <= 0 or tps >= Decimal("100000000"):
            raise ValueError(f"{where}: expected_tokens_per_s must be a number above 0")
        tps = tps.quantize(Decimal("0.01"))
    return ttft, tps


@dataclass(frozen=True)
class LoadReport:
    providers: int
    models: int
    offerings: int
    # Not errors (the load's process need not hold the providers' secrets; the workers must):
    # what would make an enabled provider answer 401 if the workers' environment is the same.
    warnings: tuple[str, ...] = ()


# The keys each table may have: the file is the whole truth, so a misspelt key (`enable =
# false`) must fail the load, not be ignored while the provider stays enabled.
_KEYS = {
    "": {"providers", "models", "offerings"},
    "providers": {"name", "base_url", "api_key_env", "enabled"},
    "models": {"alias", "max_output_tokens", "context_length", "default_max_tokens", "enabled"},
    "offerings": {
        "model",
        "provider",
        "provider_model_id",
        "input_price_usd_per_million",
        "output_price_usd_per_million",
        "expected_ttft_ms",
        "expected_tokens_per_s",
        "enabled",
    },
}


def _check_shape(data: dict[str, Any]) -> None:
    unknown = set(data) - _KEYS[""]
    if unknown:
        raise ValueError(f"catalog: unknown tables {sorted(unknown)}")
    for table in ("providers", "models", "offerings"):
        for i, entry in enumerate(data.get(table, [])):
            unknown = set(entry) - _KEYS[table]
            if unknown:
                raise ValueError(f"{table}[{i}]: unknown keys {sorted(unknown)}")
        for i, entry in enumerate(data.get(table, [])):
            # bool("false") is True: a quoted value would leave the provider serving.
            if not isinstance(entry.get("enabled", True), bool):
                raise ValueError(
                    f"{table}[{i}]: enabled must be true or false (a TOML boolean, unquoted), "
                    f"not {entry['enabled']!r}"
                )
    for table, key in (
        ("providers", ("name",)),
        ("models", ("alias",)),
        ("offerings", ("model", "provider")),
    ):
        seen: set[tuple[Any, ...]] = set()
        for entry in data.get(table, []):
            ident = tuple(entry.get(k) for k in key)
            if ident in seen:
                raise ValueError(f"{table}: {'/'.join(map(str, ident))} appears twice")
            seen.add(ident)


def load_catalog(session: Session, path: Path, allow_empty: bool = False) -> LoadReport:
    data = _expand(tomllib.loads(Path(path).read_text()))
    _check_shape(data)
    providers = {p["name"]: p for p in data.get("providers", [])}
    models = {m["alias"]: m for m in data.get("models", [])}
    offerings = data.get("offerings", [])

    provider_rows: dict[str, Provider] = {}
    for name, spec in providers.items():
        row = session.scalar(select(Provider).where(Provider.name == name)) or Provider(name=name)
        row.base_url = spec["base_url"].rstrip("/")
        row.api_key_env = spec.get("api_key_env")
        row.enabled = bool(spec.get("enabled", True))
        session.add(row)
        provider_rows[name] = row
    session.execute(
        update(Provider).where(Provider.name.not_in(list(providers) or [""])).values(enabled=False)
    )

    alias_rows: dict[str, ModelAlias] = {}
    for alias, spec in models.items():
        alias_row = session.scalar(
            select(ModelAlias).where(ModelAlias.alias == alias)
        ) or ModelAlias(alias=alias)
        alias_row.max_output_tokens = int(spec["max_output_tokens"])
        alias_row.context_length = int(spec["context_length"])
        alias_row.enabled = bool(spec.get("enabled", True))
        if alias_row.max_output_tokens < 1 or alias_row.context_length < 1:
            raise ValueError(f"model {alias}: caps must be positive")
        default = spec.get("default_max_tokens")
        if default is not None and (
            isinstance(default, bool)
            or not isinstance(default, int)
            or not 1 <= default <= alias_row.max_output_tokens
        ):
            raise ValueError(f"model {alias}: default_max_tokens must be 1 to max_output_tokens")
        alias_row.default_max_tokens = default
        session.add(alias_row)
        alias_rows[alias] = alias_row
    session.execute(
        update(ModelAlias)
        .where(ModelAlias.alias.not_in(list(models) or [""]))
        .values(enabled=False)
    )
    session.flush()

    seen: set[int] = set()
    for i, spec in enumerate(offerings):
        where = f"offerings[{i}]"
        if spec["model"] not in alias_rows or spec["provider"] not in provider_rows:
            raise ValueError(f"{where}: unknown model or provider")
        alias_id = alias_rows[spec["model"]].id
        provider_id = provider_rows[spec["provider"]].id
        offering_row = session.scalar(
            select(Offering).where(
                Offering.alias_id == alias_id, Offering.provider_id == provider_id
            )
        ) or Offering(alias_id=alias_id, provider_id=provider_id)
        offering_row.provider_model_id = spec["provider_model_id"]
        offering_row.input_price_micros_per_m = _price(spec["input_price_usd_per_million"], where)
        offering_row.output_price_micros_per_m = _price(spec["output_price_usd_per_million"], where)
        offering_row.expected_ttft_ms, offering_row.expected_tokens_per_s = _speed_priors(
            spec, where
        )
        offering_row.enabled = bool(spec.get("enabled", True))
        session.add(offering_row)
        session.flush()
        seen.add(offering_row.id)
    session.execute(update(Offering).where(Offering.id.not_in(seen or {0})).values(enabled=False))
    session.flush()
    serving = any(
        spec.get("enabled", True)
        and provider_rows[spec["provider"]].enabled
        and alias_rows[spec["model"]].enabled
        for spec in offerings
    )
    if not serving and not allow_empty:
        # Loading it would switch off every provider and model at once (a deploy's release
        # step runs this load): only on purpose. The caller's transaction rolls it all back.
        raise ValueError(
            "catalog: no enabled offering of an enabled model on an enabled provider; "
            "load it with --allow-empty if that is the intent"
        )
    warnings = tuple(
        f"provider {name}: api_key_env {spec['api_key_env']} is not set in this environment; "
        "the workers need it, or the provider is called without a key"
        for name, spec in providers.items()
        if spec.get("api_key_env")
        and provider_rows[name].enabled
        and not os.environ.get(spec["api_key_env"])
    )
    return LoadReport(len(providers), len(models), len(offerings), warnings)


@dataclass(frozen=True)
class RouteOption:
    """One provider able to serve an alias, with everything a quote task needs (primitives only,
    so it travels in a Celery message)."""

    offering_id: int
    provider: str
    base_url: str
    api_key_env: str | None
    provider_model_id: str
    input_price_micros_per_m: int
    output_price_micros_per_m: int
    # The catalog's speed priors (None: the conservative default, app/providers/speed.py).
    expected_ttft_ms: int | None = None
    expected_tokens_per_s: float | None = None

    def as_message(self) -> dict[str, Any]:
        return self.__dict__.copy()


# max_tokens of a chat request that sends none, for a model whose catalog entry names no
# default_max_tokens (docs/api.md): the hold covers it, so not the whole context.
DEFAULT_MAX_TOKENS = 4096


def default_max_tokens(configured: int | None, max_output_tokens: int) -> int:
    return configured if configured is not None else min(DEFAULT_MAX_TOKENS, max_output_tokens)


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    max_output_tokens: int
    context_length: int
    options: tuple[RouteOption, ...]
    default_max_tokens: int = DEFAULT_MAX_TOKENS


class ModelCache:
    """A few seconds of memory for find_model: the catalog changes on deploys, not per request,
    and this lookup is the heaviest query of a submission. PostgreSQL stays the truth: an entry
    lives ``ttl_s`` (FLOPEX_CATALOG_CACHE_S; 0 disables), so a catalog load is seen by every
    process within that time."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, ModelEntry | None]] = {}

    def get(self, session: Session, alias: str) -> ModelEntry | None:
        if self.ttl_s <= 0:
            return find_model(session, alias)
        now = time.monotonic()
        hit = self._entries.get(alias)
        if hit is not None and hit[0] > now:
            return hit[1]
        entry = find_model(session, alias)
        if (
            entry is not None or len(self._entries) < 1024
        ):  # unknown aliases cannot grow it unbounded
            self._entries[alias] = (now + self.ttl_s, entry)
        return entry

    def refresh(self, session: Session, alias: str) -> ModelEntry | None:
        """The alias read now, whatever this cache holds (and kept for the next ``ttl_s``)."""
        self._entries.pop(alias, None)
        return self.get(session, alias)

    def clear(self) -> None:
        self._entries.clear()


def find_model(session: Session, alias: str) -> ModelEntry | None:
    """The alias with its enabled offerings on enabled providers, in one query."""
    rows = session.execute(
        select(ModelAlias, Offering, Provider)
        .outerjoin(Offering, (Offering.alias_id == ModelAlias.id) & Offering.enabled)
        .outerjoin(Provider, (Provider.id == Offering.provider_id) & Provider.enabled)
        .where(ModelAlias.alias == alias, ModelAlias.enabled)
        .order_by(Provider.name)
    ).all()
    if not rows:
        return None
    model = rows[0][0]
    options = tuple(
        RouteOption(
            offering_id=off.id,
            provider=prov.name,
            base_url=prov.base_url,
            api_key_env=prov.api_key_env,
            provider_model_id=off.provider_model_id,
            input_price_micros_per_m=off.input_price_micros_per_m,
            output_price_micros_per_m=off.output_price_micros_per_m,
            expected_ttft_ms=off.expected_ttft_ms,
            expected_tokens_per_s=(
                None if off.expected_tokens_per_s is None else float(off.expected_tokens_per_s)
            ),
        )
        for _, off, prov in rows
        if off is not None and prov is not None
    )
    return ModelEntry(
        model.alias,
        model.max_output_tokens,
        model.context_length,
        options,
        default_max_tokens(model.default_max_tokens, model.max_output_tokens),
    )


@dataclass(frozen=True)
class ModelListing:
    """A model as GET /v1/models shows it: its caps and the prices of the offerings serving it
    now (an offering counts only while its provider is enabled too)."""

    alias: str
    max_output_tokens: int
    default_max_tokens: int
    context_length: int
    input_prices: tuple[int, ...]
    output_prices: tuple[int, ...]


def list_models(session: Session, alias: str | None = None) -> list[ModelListing]:
    """Every enabled model (or the one ``alias``), by alias; a model whose providers are all
    disabled is still listed, with none, like one never offered."""
    stmt = (
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
    if alias is not None:
        stmt = stmt.where(ModelAlias.alias == alias)
    grouped: dict[str, tuple[ModelAlias, list[Offering]]] = {}
    for model, offering in session.execute(stmt).all():
        offerings = grouped.setdefault(model.alias, (model, []))[1]
        if offering is not None:
            offerings.append(offering)
    return [
        ModelListing(
            model.alias,
            model.max_output_tokens,
            default_max_tokens(model.default_max_tokens, model.max_output_tokens),
            model.context_length,
            tuple(o.input_price_micros_per_m for o in offerings),
            tuple(o.output_price_micros_per_m for o in offerings),
        )
        for model, offerings in grouped.values()
    ]
