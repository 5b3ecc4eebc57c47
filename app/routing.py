"""Selection rules: which quote wins for a profile and a strategy. Pure functions over the stored
quotes, so any job's decision can be replayed from ``jobs.quotes`` (docs/routing.md states the
same rules in prose; keep the two in step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from app.money import provider_cost

PROFILES = ("economy", "balanced", "fast")
STRATEGIES = ("lowest_cost", "prefer_live")
_INF = 10**12


@dataclass(frozen=True)
class Quote:
    provider: str
    offering_id: int
    provider_model_id: str
    input_price_micros_per_m: int
    output_price_micros_per_m: int
    estimated_charge_micros: int
    # Checked live within the profile's freshness bound (the board, app/providers/board.py).
    live: bool
    # This job's predicted latency on the provider: rtt_ms + ttft_ms + output_tokens /
    # tokens_per_s (docs/routing.md); None when the provider is not live (rtt unknown).
    estimated_latency_ms: int | None
    # Share of recent execution attempts that succeeded, as a decimal string; None without
    # history.
    success_rate: str | None = None
    error: str | None = None
    # The provider's circuit breaker is open: it is skipped whatever its price.
    circuit_open: bool = False
    # The estimate's components (None on rows routed before the board, 2026-12-04).
    rtt_ms: int | None = None
    ttft_ms: int | None = None
    tokens_per_s: float | None = None
    # The output tokens the estimate is for: the job's max_output_tokens.
    output_tokens: int | None = None
    # learned (from our executions), prior (the catalog's) or default (conservative)
    speed_source: str | None = None
    # Executions the learned speed is based on.
    samples: int | None = None
    # When the board entry was measured (Unix time) and its age when the job was routed.
    checked_at: float | None = None
    age_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quote:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Ranked:
    quote: Quote
    score: str | None = None  # balanced only, as a decimal string


@dataclass
class Decision:
    ranked: list[Ranked] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    # Set when nothing is eligible: the public error code.
    error_code: str | None = None
    # The provider ranked first to measure it (exploration), if any.
    explored: str | None = None

    @property
    def winner(self) -> Quote | None:
        return self.ranked[0].quote if self.ranked else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": [
                {"provider": r.quote.provider, **({"score": r.score} if r.score else {})}
                for r in self.ranked
            ],
            "dropped": self.dropped,
            # The first ranked, decided before any provider is called; the API's
            # routing.winner is the provider that served (app/jobs/render.py).
            "winner": self.winner.provider if self.winner else None,
            "reason": self.reason,
            **({"explored": self.explored} if self.explored else {}),
        }


def _latency(q: Quote) -> int:
    return _INF if q.estimated_latency_ms is None else q.estimated_latency_ms


def _exact_cost(
    q: Quote, estimated_input_tokens: int | None, max_output_tokens: int | None
) -> Fraction:
    """The quote's worst case before the one rounding rule: what ``estimated_charge_micros``
    rounds up. Rounded estimates of small requests tie (0.4 and 0.9 micro-USD both become 1)
    although one provider is truly cheaper, so costs are compared on this. It is the
    provider's cost, without the markup: the markup is the job's, the same for every quote, so
    it changes neither the order of two costs nor their ratio. Derived from stored fields only
    (the quote's prices, the job's token counts), so a decision replays from the row. Without
    the token counts (a caller that has none), the rounded estimate stands in."""
    if estimated_input_tokens is None or max_output_tokens is None:
        return Fraction(q.estimated_charge_micros)
    return provider_cost(
        estimated_input_tokens,
        max_output_tokens,
        q.input_price_micros_per_m,
        q.output_price_micros_per_m,
    )


def _balanced_scores(
    quotes: list[Quote], weights: tuple[Decimal, ...], costs: dict[str, Fraction]
) -> dict[str, Decimal]:
    w_cost, w_latency, w_reliability = weights
    # Exact costs, not the rounded estimates: on small requests rounding to whole micro-USD
    # distorts the ratio (0.4 and 0.9 micro-USD would both score as the most expensive).
    max_cost = max(costs[q.provider] for q in quotes) or Fraction(1)
    known = [q.estimated_latency_ms for q in quotes if q.estimated_latency_ms is not None]
    max_latency = max(known) if known else 0
    scores = {}
    for q in quotes:
        ratio = costs[q.provider] / max_cost
        cost = Decimal(ratio.numerator) / Decimal(ratio.denominator)
        if q.estimated_latency_ms is None:
            latency = Decimal(1)
        else:
            latency = (
                Decimal(q.estimated_latency_ms) / Decimal(max_latency)
                if max_latency
                else Decimal(0)
            )
        success = Decimal(q.success_rate) if q.success_rate is not None else Decimal(1)
        score = w_cost * cost + w_latency * latency + w_reliability * (1 - success)
        scores[q.provider] = score.quantize(Decimal("0.000001"))
    return scores


def select(
    quotes: list[Quote],
    *,
    profile: str,
    strategy: str,
    max_price_micros: int | None,
    max_latency_ms: int | None,
    weights: tuple[Decimal, Decimal, Decimal],
    hold_micros: int | None = None,
    estimated_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    explore: bool = False,
    explore_below: int = 0,
) -> Decision:
    """``estimated_input_tokens`` and ``max_output_tokens`` (the job's) make cost comparisons
    exact (``_exact_cost``); every filter still uses the stored, rounded estimates.

    ``explore`` (decided per job from its id, and stored in its routing as ``explored``): for
    ``fast`` and ``balanced``, the live eligible quote whose speed has the fewest measurements,
    when it has fewer than ``explore_below`` (app/providers/speed.py's MIN_SAMPLES), is ranked
    first, so that every offering gets
    measured (docs/routing.md, "Exploration")."""
    decision = Decision()
    if not quotes:
        decision.error_code = "no_provider_available"
        decision.reason = "no enabled provider offers this model"
        return decision

    def keep(candidates: list[Quote], reason_to_drop: Callable[[Quote], str | None]) -> list[Quote]:
        kept = []
        for q in candidates:
            reason = reason_to_drop(q)
            if reason is None:
                kept.append(q)
            else:
                decision.dropped.append({"provider": q.provider, "reason": reason})
        return kept

    available = keep(quotes, lambda q: "circuit_open" if q.circuit_open else None)
    if not available:
        decision.error_code = "no_provider_available"
        decision.reason = "every provider's circuit breaker is open"
        return decision

    def price_reason(q: Quote) -> str | None:
        over = max_price_micros is not None and q.estimated_charge_micros > max_price_micros
        return "over_max_price" if over else None

    def latency_reason(q: Quote) -> str | None:
        if max_latency_ms is None:
            return None
        if q.estimated_latency_ms is None:
            return "latency_unknown"
        return "over_max_latency" if q.estimated_latency_ms > max_latency_ms else None

    def hold_reason(q: Quote) -> str | None:
        over = hold_micros is not None and q.estimated_charge_micros > hold_micros
        return "insufficient_balance" if over else None

    priced = keep(available, price_reason)
    timely = keep(priced, latency_reason)
    # The job's hold is what the wallet could cover at admission: a quote whose worst case is
    # above it could not be paid for, so it is not a candidate (and cannot be the winner).
    eligible = keep(timely, hold_reason)
    if not eligible:
        if not priced:
            decision.error_code = "max_price_exceeded"
        elif not timely:
            decision.error_code = "max_latency_exceeded"
        else:
            decision.error_code = "insufficient_balance"
        decision.reason = f"all {len(available)} quotes dropped"
        return decision

    # The rounded estimate first (what the filters and the hold use), then the exact cost: it
    # can never disagree with the rounded order (rounding up keeps the order), so it only
    # breaks the ties rounding made.
    costs = {
        q.provider: _exact_cost(q, estimated_input_tokens, max_output_tokens) for q in eligible
    }
    scores: dict[str, Decimal] = {}
    if profile == "economy":

        def key(q: Quote) -> tuple[Any, ...]:
            return (q.estimated_charge_micros, costs[q.provider], _latency(q), q.provider)

        rule = "lowest estimated charge"
    elif profile == "fast":

        def key(q: Quote) -> tuple[Any, ...]:
            return (_latency(q), q.estimated_charge_micros, costs[q.provider], q.provider)

        # Unknown latencies sort last; when none is known the order is the charge's alone,
        # and the reason must not claim a latency comparison that never happened.
        if all(q.estimated_latency_ms is None for q in eligible):
            rule = "no latency known, so lowest estimated charge"
        else:
            rule = "lowest estimated latency"
    elif profile == "balanced":
        scores = _balanced_scores(eligible, weights, costs)

        def key(q: Quote) -> tuple[Any, ...]:
            return (
                scores[q.provider],
                q.estimated_charge_micros,
                costs[q.provider],
                _latency(q),
                q.provider,
            )

        rule = "lowest balanced score"
    else:
        raise ValueError(f"unknown profile {profile!r}")

    if strategy == "prefer_live":
        base_key = key

        def key(q: Quote) -> tuple[Any, ...]:
            return (0 if q.live else 1, *base_key(q))

        rule = f"live providers first, then {rule}"
    elif strategy != "lowest_cost":
        raise ValueError(f"unknown strategy {strategy!r}")

    ordered = sorted(eligible, key=key)
    if explore and profile in ("fast", "balanced"):
        unmeasured = [
            q for q in ordered if q.live and q.samples is not None and q.samples < explore_below
        ]
        chosen = min(unmeasured, key=lambda q: q.samples or 0) if unmeasured else None
        if chosen is not None and chosen is not ordered[0]:
            ordered.remove(chosen)
            ordered.insert(0, chosen)
            decision.explored = chosen.provider
            rule = (
                f"exploring {chosen.provider} ({chosen.samples} executions measured), then {rule}"
            )
    decision.ranked = [Ranked(q, str(scores[q.provider]) if scores else None) for q in ordered]
    first = ordered[0]
    # "ranked first", not "won": execution may fall back to the next candidate, and the
    # response appends what happened (app/jobs/render.py). Plain words, no Python reprs.
    latency = (
        "unknown" if first.estimated_latency_ms is None else f"{first.estimated_latency_ms} ms"
    )
    decision.reason = (
        f"{profile}/{strategy}: {rule}; {first.provider} ranked first among {len(eligible)} "
        f"eligible of {len(quotes)} quotes (estimated charge {first.estimated_charge_micros} "
        f"micro-USD, estimated latency {latency}, {'live' if first.live else 'not live'})"
    )
    return decision
