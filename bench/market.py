"""The simulated market for `make bench-routing`: sandbox providers whose ping round trip, time to
first token, generation speed, failure rate and price differ and drift, and what the best choice
was in hindsight for any request at any instant.

The market is a table (``bench/market.toml``): each provider's base parameters, a seeded random
walk (ttft, tokens/s, ping, failure rate) and a schedule of step changes (a provider that slows
down, one that starts failing, price cuts and rises), at fractions of the run. Every value in
force at a given time is ``sandbox.server.effective_config(config, t)``: the same pure function the
sandboxes serve from, so the hindsight below is exact, not sampled. Prices move only on the
schedule, and the benchmark reloads the exchange's catalog at those moments, as an operator would
(the exchange bills from its catalog, not from a provider's /models).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from sandbox.server import SandboxConfig, effective_config

MARKET_FILE = Path(__file__).resolve().parent / "market.toml"
MODEL_ALIAS = "llama-3.1-8b"
PROVIDER_MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
PROFILES = ("fast", "balanced", "economy")
# A completion is as long as the request allows (max_output_tokens), never cut by the provider.
SANDBOX_OUTPUT_TOKENS = 100_000
PRICE_FIELDS = ("price_input_per_million_usd", "price_output_per_million_usd")
MARKET_BASE_PORT = 19101


@dataclass(frozen=True)
class Market:
    configs: list[SandboxConfig]
    seed: int

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.configs]

    def at(self, t: float) -> dict[str, SandboxConfig]:
        """Every provider's parameters in force at unix time t."""
        return {c.name: effective_config(c, t) for c in self.configs}

    def price_change_times(self) -> list[float]:
        """Unix times at which some provider's price changes (the catalog is reloaded then)."""
        times: set[float] = set()
        for c in self.configs:
            for step in c.drift_schedule or ():
                if any(field in step for field in PRICE_FIELDS):
                    times.add((c.drift_epoch or 0.0) + step["at_s"])
        return sorted(times)


def load_market(
    duration_s: float, epoch: float, path: Path = MARKET_FILE, seed: int | None = None
) -> Market:
    """The market of `path` for a run of `duration_s` seconds starting at unix time `epoch`:
    schedule entries written as ``at = 0.4`` (a fraction of the run) become ``at_s``."""
    spec = tomllib.loads(path.read_text())
    market_seed = int(spec.get("seed", 0) if seed is None else seed)
    walk_defaults: dict[str, Any] = dict(spec.get("walk", {}))
    configs = []
    for i, p in enumerate(spec["providers"]):
        walk = {**walk_defaults, **p.get("walk", {}), "seed": market_seed * 1000 + i}
        schedule = [
            {"at_s": float(step["at"]) * duration_s, **{k: v for k, v in step.items() if k != "at"}}
            for step in p.get("schedule", [])
        ]
        configs.append(
            SandboxConfig(
                name=p["name"],
                models={PROVIDER_MODEL_ID: p["name"]},
                latency_ms=int(p["ping_ms"]),
                ttft_ms=int(p["ttft_ms"]),
                tokens_per_s=float(p["tokens_per_s"]),
                failure_rate=float(p["failure_rate"]),
                seed=market_seed * 1000 + i,
                output_tokens=SANDBOX_OUTPUT_TOKENS,
                price_input_per_million_usd=str(p["price_input"]),
                price_output_per_million_usd=str(p["price_output"]),
                drift_walk=walk or None,
                drift_schedule=schedule or None,
                drift_epoch=epoch,
            )
        )
    return Market(configs, market_seed)


# -- the catalog -------------------------------------------------------------------------------


def url_variable(name: str) -> str:
    return f"SANDBOX_{name.upper()}_URL"


def catalog_toml(
    market: Market,
    at: float | None = None,
    base_urls: dict[str, str] | None = None,
    priors: bool = False,
) -> str:
    """The exchange's catalog for the market: one alias on every provider, priced as the
    providers are at unix time `at` (the base prices if None). Base URLs are the sandboxes'
    (``base_urls``) or ``${SANDBOX_<NAME>_URL}`` references, as in config/catalog.market.toml.
    With `priors`, each offering advertises its provider's base speed (``expected_ttft_ms``,
    ``expected_tokens_per_s``), as a provider's data sheet would: true at the start, not after
    the drift."""
    configs = market.at(at) if at is not None else {c.name: c for c in market.configs}
    lines = [
        "# The simulated market of `make bench-routing` (bench/market.toml; written by",
        "# bench/market.py::catalog_toml, keep the two in step). Prices move during a run: the",
        "# benchmark reloads this catalog with the providers' new prices when they change.",
        "",
    ]
    for i, name in enumerate(market.names):
        # The defaults are the ports `python bench/market_node.py --base-port 19101` takes.
        default = f"http://127.0.0.1:{MARKET_BASE_PORT + i}/v1"
        url = (base_urls or {}).get(name) or f"${{{url_variable(name)}:-{default}}}"
        lines += ["[[providers]]", f'name = "{name}"', f'base_url = "{url}"', ""]
    lines += [
        "[[models]]",
        f'alias = "{MODEL_ALIAS}"',
        "max_output_tokens = 8192",
        "context_length = 131072",
        "",
    ]
    for name in market.names:
        config = configs[name]
        lines += [
            "[[offerings]]",
            f'model = "{MODEL_ALIAS}"',
            f'provider = "{name}"',
            f'provider_model_id = "{PROVIDER_MODEL_ID}"',
            f'input_price_usd_per_million = "{config.price_input_per_million_usd}"',
            f'output_price_usd_per_million = "{config.price_output_per_million_usd}"',
        ]
        if priors:
            base = market.configs[market.names.index(name)]
            lines += [
                f"expected_ttft_ms = {base.ttft_ms}",
                f'expected_tokens_per_s = "{base.tokens_per_s:g}"',
            ]
        lines.append("")
    return "\n".join(lines)


# -- hindsight ---------------------------------------------------------------------------------


def expected_latency_ms(config: SandboxConfig, output_tokens: int) -> float:
    """What the provider takes for a completion of `output_tokens`: ping round trip + time to
    first token + tokens / speed (docs/sandbox.md)."""
    speed = config.tokens_per_s
    generation = output_tokens * 1000 / speed if speed > 0 else 0.0
    return config.latency_ms + config.ttft_ms + generation


def _micros_per_million(price: str) -> int:
    return int(Decimal(price) * 1_000_000)


def provider_cost_micros(config: SandboxConfig, input_tokens: int, output_tokens: int) -> Fraction:
    """The provider's price for those tokens, exact, in micro-USD (our markup is the same on
    every provider, so it changes no comparison)."""
    return Fraction(
        input_tokens * _micros_per_million(config.price_input_per_million_usd)
        + output_tokens * _micros_per_million(config.price_output_per_million_usd),
        1_000_000,
    )


def worst_case_charge_micros(
    config: SandboxConfig, est_input_tokens: int, max_output_tokens: int, markup: Decimal
) -> int:
    """The exchange's estimated charge for a quote (app/pricing.py), at the provider's price."""
    from app.pricing import estimated_charge

    return estimated_charge(
        est_input_tokens,
        max_output_tokens,
        _micros_per_million(config.price_input_per_million_usd),
        _micros_per_million(config.price_output_per_million_usd),
        markup,
    )


@dataclass(frozen=True)
class Request:
    """What the hindsight needs to know of one request."""

    profile: str
    at: float  # unix time it was submitted
    est_input_tokens: int
    max_output_tokens: int
    max_price_micros: int | None = None
    max_latency_ms: int | None = None


def eligible(
    request: Request, configs: dict[str, SandboxConfig], markup: Decimal
) -> dict[str, SandboxConfig]:
    """Providers that the request's own limits allow, judged on their true parameters:
    the worst-case charge within max_price_usd, the latency of max_output_tokens within
    max_latency_ms."""
    kept = {}
    for name, config in configs.items():
        if request.max_price_micros is not None:
            charge = worst_case_charge_micros(
                config, request.est_input_tokens, request.max_output_tokens, markup
            )
            if charge > request.max_price_micros:
                continue
        limit = request.max_latency_ms
        if limit is not None and expected_latency_ms(config, request.max_output_tokens) > limit:
            continue
        kept[name] = config
    return kept


def balanced_scores(
    configs: dict[str, SandboxConfig],
    input_tokens: int,
    output_tokens: int,
    weights: tuple[Decimal, Decimal, Decimal],
) -> dict[str, float]:
    """docs/routing.md's balanced score on the true values: w_cost x cost / max cost +
    w_latency x latency / max latency + w_reliability x failure rate."""
    if not configs:
        return {}
    costs = {n: provider_cost_micros(c, input_tokens, output_tokens) for n, c in configs.items()}
    latencies = {n: expected_latency_ms(c, output_tokens) for n, c in configs.items()}
    max_cost = max(costs.values()) or Fraction(1)
    max_latency = max(latencies.values()) or 1.0
    w_cost, w_latency, w_rel = (float(w) for w in weights)
    return {
        n: w_cost * float(costs[n] / max_cost)
        + w_latency * latencies[n] / max_latency
        + w_rel * configs[n].failure_rate
        for n in configs
    }


@dataclass(frozen=True)
class Hindsight:
    best: str | None
    # The profile's measure (latency ms, cost micro-USD, or score) of the best and of each provider.
    best_value: float | None
    values: dict[str, float]

    # False for balanced: its scores are already relative, so regret is their difference.
    relative: bool = True
    # The providers the request's limits allowed (judged on the true parameters).
    allowed: frozenset[str] = frozenset()

    def regret(self, served: str) -> float | None:
        """(served - best) / best, the extra latency or cost as a fraction of the best; for
        balanced, served - best in score points. A provider outside the request's limits can
        be cheaper or quicker than the best within them: its regret counts as 0 (the broken
        limit is reported on its own)."""
        if self.best_value is None or served not in self.values:
            return None
        value = self.values[served]
        if value <= self.best_value or math.isclose(value, self.best_value, abs_tol=1e-12):
            return 0.0
        if not self.relative:
            return value - self.best_value
        if self.best_value <= 0:
            return math.inf
        return (value - self.best_value) / self.best_value


def hindsight(
    request: Request,
    market: Market,
    markup: Decimal,
    weights: tuple[Decimal, Decimal, Decimal],
    input_tokens: int,
    output_tokens: int,
) -> Hindsight:
    """The best provider for the request at its submission time, on the market's own
    parameters, among those its limits allow; `input_tokens` / `output_tokens` are what was
    actually processed (every provider counts tokens the same way). Every provider gets a value,
    so that one served outside the request's limits still has a regret; balanced scores are
    normalised over the whole market at that instant for the same reason."""
    configs = market.at(request.at)
    allowed = eligible(request, configs, markup)
    if request.profile == "fast":
        values = {n: expected_latency_ms(c, output_tokens) for n, c in configs.items()}
    elif request.profile == "economy":
        values = {
            n: float(provider_cost_micros(c, input_tokens, output_tokens))
            for n, c in configs.items()
        }
    else:
        values = balanced_scores(configs, input_tokens, output_tokens, weights)
    relative = request.profile != "balanced"
    if not allowed:
        return Hindsight(None, None, values, relative)
    best = min(allowed, key=lambda n: (values[n], n))
    return Hindsight(best, values[best], values, relative, frozenset(allowed))
