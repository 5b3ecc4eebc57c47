"""What the console reads beyond the API's own queries (app/jobs/queries.py,
app/ledger_queries.py): exports, a job's ledger entries, the overview's aggregates, the keys and
the market. Plain domain queries (a session in, rows out), each scoped to one account by the
caller's principal."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs import states
from app.jobs.queries import JobFilter, filter_jobs
from app.models import ApiKey, Job, LedgerEntry, ModelAlias, Offering, Provider
from app.providers import health, history
from app.providers.breaker import Breaker
from app.providers.probe import last_probe
from config.settings import Settings

EXPORT_COLUMNS = (
    Job.id,
    Job.created_at,
    Job.finished_at,
    Job.status,
    Job.model,
    Job.provider_name,
    Job.performance_profile,
    Job.customer_ref,
    Job.input_tokens,
    Job.output_tokens,
    Job.charge_micros,
    Job.latency_ms,
    Job.error_code,
)


def export_jobs(session: Session, account_id: uuid.UUID, where: JobFilter) -> Iterator[Any]:
    """Every job the list's filters match (not its cursor), newest first, as rows (no ORM
    objects: an export of any size), streamed in batches."""
    stmt = filter_jobs(select(*EXPORT_COLUMNS), account_id, where).order_by(
        Job.created_at.desc(), Job.id.desc()
    )
    yield from session.execute(stmt.execution_options(yield_per=1000))


LEDGER_COLUMNS = (
    LedgerEntry.id,
    LedgerEntry.created_at,
    LedgerEntry.kind,
    LedgerEntry.amount_micros,
    LedgerEntry.held_delta_micros,
    LedgerEntry.balance_after_micros,
    LedgerEntry.held_after_micros,
    LedgerEntry.job_id,
    LedgerEntry.memo,
)


def export_ledger(session: Session, wallet_id: uuid.UUID) -> Iterator[Any]:
    """Every entry of the wallet, newest first, as rows (no ORM objects: an export of any
    size), streamed in batches."""
    stmt = (
        select(*LEDGER_COLUMNS)
        .where(LedgerEntry.wallet_id == wallet_id)
        .order_by(LedgerEntry.id.desc())
        .execution_options(yield_per=1000)
    )
    yield from session.execute(stmt)


def job_ledger(session: Session, wallet_id: uuid.UUID, job_id: uuid.UUID) -> list[LedgerEntry]:
    return list(
        session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.wallet_id == wallet_id, LedgerEntry.job_id == job_id)
            .order_by(LedgerEntry.id)
        )
    )


@dataclass
class Overview:
    days: list[date]
    spend_by_day: dict[date, int] = field(default_factory=dict)  # micro-USD charged
    requests_by_day: dict[date, dict[str, int]] = field(default_factory=dict)  # public status
    spend_by_model: dict[str, int] = field(default_factory=dict)
    spend_by_provider: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    spend: int = 0


def overview(
    session: Session, account_id: uuid.UUID, days: int = 30, now: datetime | None = None
) -> Overview:
    """The last ``days`` UTC days of an account's jobs, by the day each job was created: one
    grouped query over the (account_id, created_at) index. Spend is what the jobs were
    charged (their captures in the ledger)."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=UTC)
    if session.get_bind().dialect.name == "postgresql":
        day: Any = func.date(func.timezone("UTC", Job.created_at))
    else:  # SQLite (make run's embedded default) stores UTC without a zone
        day = func.date(Job.created_at)
    rows = session.execute(
        select(
            day,
            Job.status,
            Job.model,
            Job.provider_name,
            func.count(),
            func.coalesce(func.sum(Job.charge_micros), 0),
        )
        .where(Job.account_id == account_id, Job.created_at >= since)
        .group_by(day, Job.status, Job.model, Job.provider_name)
    ).all()
    result = Overview(days=[first + timedelta(days=i) for i in range(days)])
    spend_by_day: dict[date, int] = defaultdict(int)
    requests_by_day: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_model: dict[str, int] = defaultdict(int)
    by_provider: dict[str, int] = defaultdict(int)
    for raw_day, status, model, provider, count, charged in rows:
        d = raw_day if isinstance(raw_day, date) else date.fromisoformat(str(raw_day))
        charged = int(charged or 0) if status == states.SUCCESS else 0
        requests_by_day[d][states.PUBLIC[status]] += int(count)
        result.requests += int(count)
        if charged:
            spend_by_day[d] += charged
            by_model[model] += charged
            by_provider[provider or "?"] += charged
            result.spend += charged
    result.spend_by_day = dict(spend_by_day)
    result.requests_by_day = {d: dict(v) for d, v in requests_by_day.items()}
    result.spend_by_model = dict(sorted(by_model.items(), key=lambda kv: -kv[1]))
    result.spend_by_provider = dict(sorted(by_provider.items(), key=lambda kv: -kv[1]))
    return result


def list_keys(session: Session, account_id: uuid.UUID) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.created_at)
        )
    )


def own_key(session: Session, account_id: uuid.UUID, prefix: str) -> ApiKey | None:
    return session.scalar(
        select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.account_id == account_id)
    )


@dataclass(frozen=True)
class Offer:
    provider: str
    input_price_micros_per_m: int
    output_price_micros_per_m: int


@dataclass(frozen=True)
class ProviderState:
    name: str
    live: bool | None
    latency_ms: int | None
    checked_at: float | None
    success_rate: Decimal | None
    circuit: str
    history: list[history.Sample]


@dataclass
class Market:
    models: dict[str, list[Offer]]
    providers: dict[str, ProviderState]


def market(
    session: Session,
    client: redis.Redis,
    settings: Settings,
) -> Market:
    """Every enabled model with its enabled providers' prices, and each provider's state as
    GET /v1/providers shows it (the board's last check, success rate, breaker), with its last
    hour of checks."""
    rows = session.execute(
        select(
            ModelAlias.alias,
            Provider.name,
            Offering.input_price_micros_per_m,
            Offering.output_price_micros_per_m,
        )
        .join(Offering, Offering.alias_id == ModelAlias.id)
        .join(Provider, Provider.id == Offering.provider_id)
        .where(ModelAlias.enabled, Offering.enabled, Provider.enabled)
        .order_by(ModelAlias.alias, Provider.name)
    ).all()
    models: dict[str, list[Offer]] = {}
    for alias, provider, price_in, price_out in rows:
        models.setdefault(alias, []).append(Offer(provider, price_in, price_out))
    names = sorted({o.provider for offers in models.values() for o in offers})
    breaker = Breaker.from_settings(client, settings)
    pipe = client.pipeline(transaction=False)
    read_rates = health.queue_success_rates(pipe, names, settings.health_window_s)
    rates = read_rates(pipe.execute())
    histories = history.read(client, names)
    providers = {}
    for name in names:
        probe = last_probe(client, name)
        providers[name] = ProviderState(
            name=name,
            live=probe["live"] if probe else None,
            latency_ms=probe["latency_ms"] if probe else None,
            checked_at=probe["checked_at"] if probe else None,
            success_rate=rates[name],
            circuit=breaker.state(name),
            history=histories[name],
        )
    return Market(models, providers)
