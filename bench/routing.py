"""`make bench-routing`: how well the exchange routes in a simulated market (bench/market.toml).

What one run does (docs/performance.md, "Routing in a simulated market", explains the numbers):

1. A fresh PostgreSQL database (``flopex_bench_routing``) and a flushed Redis database (13).
2. The market's twelve sandbox providers in a few processes (``bench/market_node.py``), the
   market's catalog (``bench/market.py::catalog_toml``), one account with a large balance.
3. gunicorn and a Celery worker (with beat), as in production.
4. A warm-up at the market's base parameters, then the measured run: closed-loop clients send
   ``POST /v1/inference`` round-robin over the nine scenarios (fast, balanced, economy; each
   without a limit, with ``max_latency_ms``, with ``max_price_usd``) while the market drifts.
   The catalog is reloaded when a provider's price changes.
5. For each request, the hindsight-best provider at its submission time from the market's own
   parameters (``bench/market.py::hindsight``), and the report: regret, errors, fallbacks,
   share per provider, decisions on quotes staler than the profile's bound.

Everything started is stopped on exit; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.market import (  # noqa: E402
    MARKET_FILE,
    MODEL_ALIAS,
    PROFILES,
    Market,
    Request,
    catalog_toml,
    eligible,
    expected_latency_ms,
    hindsight,
    load_market,
    worst_case_charge_micros,
)
from bench.stack import (  # noqa: E402
    SandboxNode,
    Stack,
    bootstrap_database,
    flush_redis,
    recreate_database,
    require_loopback,
    say,
    spawn,
    start_web,
    start_worker,
    tail,
    wait_for,
)
from scripts.dev import StartupError, ensure_alive, stop_children  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/13"
BALANCE_USD = "100000.00"
LIMITS = ("none", "max_latency_ms", "max_price_usd")
OUTPUT_TOKENS = (16, 64, 128, 256)
# The freshness bound of each profile when the trace does not state one (issue 18's defaults).
DEFAULT_FRESHNESS_MS = {"fast": 2000, "balanced": 5000, "economy": 15000}
_WORDS = ("route", "the", "request", "to", "a", "provider", "that", "answers", "best", "now")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/routing.py", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=150.0, help="measured seconds (150)")
    p.add_argument("--warmup", type=float, default=20.0, help="warm-up seconds (20)")
    p.add_argument("--concurrency", type=int, default=6, help="closed-loop clients (6)")
    p.add_argument("--seed", type=int, default=None, help="market and request seed (market's)")
    p.add_argument("--market", type=Path, default=MARKET_FILE, help="the market table")
    p.add_argument("--market-procs", type=int, default=2, help="processes hosting sandboxes (2)")
    p.add_argument(
        "--priors",
        action="store_true",
        help="the catalog advertises each provider's base ttft and tokens/s (speed priors)",
    )
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--web-threads", type=int, default=16)
    p.add_argument("--worker-procs", type=int, default=1)
    p.add_argument("--worker-concurrency", type=int, default=16)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--sync-timeout", type=float, default=60.0, help="FLOPEX_SYNC_TIMEOUT_S")
    p.add_argument("--db-name", default="flopex_bench_routing")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument(
        "--pg-admin-url", default=os.environ.get("FLOPEX_BENCH_PG_ADMIN_URL", PG_ADMIN_URL)
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("FLOPEX_BENCH_ROUTING_REDIS_URL", REDIS_URL)
    )
    p.add_argument("--output", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the stack ---------------------------------------------------------------------------------


def configure_environment(args: argparse.Namespace, db_url: str, tmp: Path) -> None:
    os.environ.pop("WEB_ACCESS_LOG", None)
    os.environ.update(
        DATABASE_URL=db_url,
        REDIS_URL=args.redis_url,
        CELERY_BROKER_URL=args.redis_url,
        FLOPEX_CATALOG=str(tmp / "catalog.toml"),
        FLOPEX_SYNC_TIMEOUT_S=str(args.sync_timeout),
        FLOPEX_RATE_LIMIT_PER_MIN="100000000",
        FLOPEX_RATE_LIMIT_BURST="1000000",
        WEB_CONCURRENCY=str(args.web_workers),
        WEB_THREADS=str(args.web_threads),
        WEB_MAX_REQUESTS="0",
        LOG_LEVEL=args.log_level.upper(),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    from config.settings import get_settings

    get_settings.cache_clear()


def start_market(market: Market, procs: int, tmp: Path) -> list[SandboxNode]:
    """The market's providers spread over `procs` processes; one SandboxNode per provider (the
    nodes of a process share its Child)."""
    groups = [market.configs[i::procs] for i in range(max(1, procs))]
    nodes: list[SandboxNode] = []
    children = []
    try:
        for i, group in enumerate(g for g in groups if g):
            spec, log = tmp / f"market-{i}.json", tmp / f"market-{i}.log"
            spec.write_text(json.dumps([dataclasses.asdict(c) for c in group]))
            argv = [sys.executable, str(ROOT / "bench" / "market_node.py"), "--configs", str(spec)]
            child = spawn(f"market {i}", argv, log)
            children.append(child)
            nodes += [SandboxNode(c.name, child, log, tmp / f"{c.name}.rec") for c in group]

        def listening() -> bool:
            ensure_alive(children)
            for node in nodes:
                for line in node.log.read_text(errors="replace").splitlines():
                    if line.startswith(f"sandbox {node.name} listening on "):
                        node.base_url = line.rsplit(" ", 1)[1]
            return all(node.base_url for node in nodes)

        if not wait_for(listening, 20.0):
            raise StartupError("the market did not start:\n" + tail(nodes[0].log))
    except BaseException:
        stop_children(children, timeout_s=5)
        raise
    return nodes


def start_stack(args: argparse.Namespace, stack: Stack, market: Market) -> str:
    """Everything up; returns the load account's API key."""
    require_loopback(args.pg_admin_url)
    require_loopback(args.redis_url)
    db_url = recreate_database(args.pg_admin_url, args.db_name)
    stack.db_created = True
    configure_environment(args, db_url, stack.tmp)
    flush_redis(args.redis_url)
    say(f"bench-routing: {len(market.configs)} providers in {args.market_procs} processes")
    stack.sandboxes = start_market(market, args.market_procs, stack.tmp)
    write_catalog(stack, market, None, args.priors)
    [account] = bootstrap_database(stack.tmp / "catalog.toml", BALANCE_USD, "routing bench")
    # Beat runs in the first worker: the board's refresh clock, the sweeper, the probe.
    for i in range(args.worker_procs):
        node = f"routing{i + 1}-{os.getpid()}"
        stack.workers.append(
            start_worker(node, args.worker_concurrency, args.log_level, stack.tmp, beat=i == 0)
        )
    from scripts.dev import free_port

    port = free_port()
    stack.web = start_web(port, stack.tmp)
    stack.base_url = f"http://127.0.0.1:{port}"
    stack.wait_ready()
    return account.api_key


def write_catalog(stack: Stack, market: Market, at: float | None, priors: bool) -> None:
    urls = {n.name: n.base_url for n in stack.sandboxes}
    (stack.tmp / "catalog.toml").write_text(catalog_toml(market, at, urls, priors))


def reload_catalog(stack: Stack, market: Market, at: float, priors: bool) -> None:
    from app.catalog import load_catalog
    from app.db import session_scope

    write_catalog(stack, market, at, priors)
    with session_scope() as session:
        load_catalog(session, stack.tmp / "catalog.toml")


def control(node: SandboxNode, action: str, body: dict[str, Any] | None = None) -> None:
    requests.post(f"{node.control_url}/{action}", json=body or {}, timeout=5).raise_for_status()


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Sent:
    index: int
    profile: str
    limit: str
    at: float
    prompt: str
    max_output_tokens: int
    max_price_micros: int | None
    max_latency_ms: int | None
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    wall_ms: float = 0.0
    error: str | None = None


def build_request(index: int, seed: int, market: Market, markup: Decimal) -> Sent:
    """Request `index` of the run: its scenario (round-robin), size and limits. A limit is set
    from the market at that instant so that it binds: max_latency_ms 1.3-2.5x the quickest
    provider's latency for the request's tokens, max_price_usd the median provider's worst case."""
    from app.pricing import estimate_input_tokens

    rng = random.Random(seed * 1_000_003 + index)
    profile = PROFILES[index % 3]
    limit = LIMITS[(index // 3) % 3]
    tokens = rng.choice(OUTPUT_TOKENS)
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40)))
    prompt = f"[bench:r{index}] {words}"
    now = time.time()
    configs = market.at(now)
    price = latency = None
    if limit == "max_latency_ms":
        quickest = min(expected_latency_ms(c, tokens) for c in configs.values())
        latency = math.ceil(quickest * rng.uniform(1.3, 2.5))
    elif limit == "max_price_usd":
        est = estimate_input_tokens(prompt)
        charges = sorted(worst_case_charge_micros(c, est, tokens, markup) for c in configs.values())
        price = charges[len(charges) // 2]
    return Sent(index, profile, limit, now, prompt, tokens, price, latency)


def send(session: requests.Session, base_url: str, key: str, sent: Sent, timeout: float) -> None:
    body: dict[str, Any] = {
        "model": MODEL_ALIAS,
        "input": sent.prompt,
        "max_output_tokens": sent.max_output_tokens,
        "performance_profile": sent.profile,
    }
    if sent.max_latency_ms is not None:
        body["max_latency_ms"] = sent.max_latency_ms
    if sent.max_price_micros is not None:
        # An exact decimal string of whole micro-USD, not a float.
        body["max_price_usd"] = str(Decimal(sent.max_price_micros) / 1_000_000)
    started = time.perf_counter()
    try:
        response = session.post(
            f"{base_url}/v1/inference",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
        sent.status = response.status_code
        with contextlib.suppress(ValueError):
            sent.body = response.json()
    except requests.RequestException as exc:
        sent.error = type(exc).__name__
    sent.wall_ms = (time.perf_counter() - started) * 1000


def run_load(
    base_url: str,
    key: str,
    market: Market,
    markup: Decimal,
    *,
    seed: int,
    concurrency: int,
    duration_s: float,
    first_index: int,
    timeout: float,
) -> list[Sent]:
    lock = threading.Lock()
    counter = [first_index]
    deadline = time.monotonic() + duration_s
    done: list[Sent] = []

    def loop() -> None:
        with requests.Session() as session:
            session.trust_env = False
            while time.monotonic() < deadline:
                with lock:
                    index = counter[0]
                    counter[0] += 1
                sent = build_request(index, seed, market, markup)
                send(session, base_url, key, sent, timeout)
                with lock:
                    done.append(sent)

    threads = [threading.Thread(target=loop, name=f"client-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(done, key=lambda s: s.index)


def catalog_follower(
    stack: Stack, market: Market, stop: threading.Event, priors: bool
) -> threading.Thread:
    """Reloads the catalog at each price change of the market, as an operator would."""

    def follow() -> None:
        for at in market.price_change_times():
            if stop.wait(max(0.0, at - time.time())):
                return
            try:
                reload_catalog(stack, market, at + 0.001, priors)
                say(
                    f"bench-routing: catalog reloaded at a price change ({time.time() - at:.2f} s late)"
                )
            except Exception as exc:  # reported, the run goes on
                say(f"bench-routing: catalog reload failed: {exc}")

    thread = threading.Thread(target=follow, name="catalog-follower", daemon=True)
    thread.start()
    return thread


# -- analysis ----------------------------------------------------------------------------------


def _served(sent: Sent) -> str | None:
    if sent.status != 200 or sent.body.get("status") != "success":
        return None
    provider = sent.body.get("provider")
    return provider if isinstance(provider, str) else None


def _error_code(sent: Sent) -> str:
    if sent.error:
        return sent.error
    error = sent.body.get("error")
    if isinstance(error, dict) and error.get("code"):
        return str(error["code"])
    return f"http_{sent.status}"


def quote_age_ms(quote: dict[str, Any]) -> float | None:
    """A quote's age as the trace states it (the board's trace), None if it does not."""
    for key in ("age_ms", "quote_age_ms", "measured_age_ms"):
        value = quote.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def freshness_bound_ms(profile: str) -> float:
    """The profile's freshness bound: FLOPEX_FRESHNESS_S_<PROFILE> (the stack's environment is
    this process's), else the default that docs/routing.md gives."""
    configured = os.environ.get(f"FLOPEX_FRESHNESS_S_{profile.upper()}")
    with contextlib.suppress(ValueError):
        if configured:
            return float(configured) * 1000
    return float(DEFAULT_FRESHNESS_MS[profile])


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation of two equally long lists (average ranks for ties)."""
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else None


def analyse_one(
    sent: Sent, market: Market, markup: Decimal, weights: tuple[Decimal, Decimal, Decimal]
) -> dict[str, Any]:
    from app.pricing import estimate_input_tokens

    request = Request(
        sent.profile,
        sent.at,
        estimate_input_tokens(sent.prompt),
        sent.max_output_tokens,
        sent.max_price_micros,
        sent.max_latency_ms,
    )
    routing = sent.body.get("routing") or {}
    attempts = routing.get("attempts") or []
    quotes = routing.get("quotes") or []
    served = _served(sent)
    row: dict[str, Any] = {
        "index": sent.index,
        "profile": sent.profile,
        "limit": sent.limit,
        "served": served,
        "attempts": len(attempts),
        "fallback": len(attempts) > 1,
        "error": None if served else _error_code(sent),
        "wall_ms": round(sent.wall_ms, 1),
    }
    configs = market.at(sent.at)
    row["could_be_served"] = bool(eligible(request, configs, markup))
    # Quoted against true latency across the request's quotes (the 0.13).
    pairs = [
        (
            float(q["estimated_latency_ms"]),
            expected_latency_ms(configs[q["provider"]], sent.max_output_tokens),
        )
        for q in quotes
        if q.get("estimated_latency_ms") is not None and q.get("provider") in configs
    ]
    row["quote_rank_corr"] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    # Routed on a stale quote: the first ranked (the decision) was quoted older than the bound.
    bound = freshness_bound_ms(sent.profile)
    first = next((q for q in quotes if q.get("provider") == routing.get("ranked_first")), None)
    age = quote_age_ms(first) if first else None
    row["quote_age_ms"] = age
    row["stale"] = None if age is None else age > bound
    ages = [a for q in quotes if (a := quote_age_ms(q)) is not None]
    row["stale_any"] = any(a > bound for a in ages) if ages else None
    if served is None:
        return row
    usage = sent.body.get("usage") or {}
    look = hindsight(
        request,
        market,
        markup,
        weights,
        int(usage.get("input_tokens") or 0),
        int(usage.get("output_tokens") or sent.max_output_tokens),
    )
    row["best"] = look.best
    # What the exchange quoted for the served and the best, against their true latencies.
    quoted = {q.get("provider"): q.get("estimated_latency_ms") for q in quotes}
    row["quoted_ms"] = {n: quoted.get(n) for n in {served, look.best} if n}
    row["true_ms"] = {
        n: round(expected_latency_ms(configs[n], sent.max_output_tokens), 1)
        for n in {served, look.best}
        if n in configs
    }
    row["regret"] = look.regret(served)
    row["best_picked"] = served == look.best
    row["outside_limits"] = look.best is not None and served not in look.allowed
    if sent.profile == "fast" and look.best_value:
        # What the customer waited on providers, failed attempts included, against the best.
        provider_ms = sum(float(a.get("latency_ms") or 0) for a in attempts)
        row["observed_regret"] = provider_ms / look.best_value - 1
    if sent.max_latency_ms is not None:
        provider_ms = sum(float(a.get("latency_ms") or 0) for a in attempts)
        row["over_latency_limit"] = provider_ms > sent.max_latency_ms
    return row


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(statistics.fmean(finite), 4) if finite else None


def _quantile(values: list[float], q: float) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    return round(finite[min(len(finite) - 1, int(q * len(finite)))], 4)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["served"]]
    regrets = [r["regret"] for r in ok if r.get("regret") is not None]
    observed = [r["observed_regret"] for r in ok if r.get("observed_regret") is not None]
    shares = Counter(r["served"] for r in ok)
    ages_known = [r for r in rows if r["stale"] is not None]
    corr = [r["quote_rank_corr"] for r in rows if r["quote_rank_corr"] is not None]
    limited = [r for r in rows if r["limit"] == "max_latency_ms"]
    return {
        "requests": len(rows),
        "ok": len(ok),
        "error_pct": _pct(len(rows) - len(ok), len(rows)),
        "errors": dict(Counter(r["error"] for r in rows if r["error"])),
        "errors_when_servable": sum(1 for r in rows if r["error"] and r["could_be_served"]),
        "fallback_pct": _pct(sum(1 for r in ok if r["fallback"]), len(ok)),
        "regret_mean": _mean(regrets),
        "regret_p50": _quantile(regrets, 0.5),
        "regret_p90": _quantile(regrets, 0.9),
        "observed_regret_mean": _mean(observed),
        "best_picked_pct": _pct(sum(1 for r in ok if r.get("best_picked")), len(ok)),
        "outside_limits": sum(1 for r in ok if r.get("outside_limits")),
        "share_pct": {n: _pct(c, len(ok)) for n, c in shares.most_common()},
        "stale": sum(1 for r in ages_known if r["stale"]) if ages_known else None,
        "quote_ages_known": len(ages_known),
        "stale_any": sum(1 for r in ages_known if r.get("stale_any")) if ages_known else None,
        "quote_rank_corr_mean": _mean(corr),
        "over_latency_limit": sum(1 for r in limited if r.get("over_latency_limit")),
        "latency_limited_ok": sum(1 for r in limited if r["served"]),
    }


def analyse(
    sent: list[Sent], market: Market, markup: Decimal, weights: tuple[Decimal, Decimal, Decimal]
) -> dict[str, Any]:
    rows = [analyse_one(s, market, markup, weights) for s in sent]
    by_scenario = {
        f"{p}/{lim}": summarise([r for r in rows if r["profile"] == p and r["limit"] == lim])
        for p in PROFILES
        for lim in LIMITS
    }
    by_profile = {p: summarise([r for r in rows if r["profile"] == p]) for p in PROFILES}
    return {"rows": rows, "scenarios": by_scenario, "profiles": by_profile}


# -- report ------------------------------------------------------------------------------------


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value}{suffix}"


def _regret_text(profile: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if profile == "balanced":
        return f"{value:+.3f} pt"
    return f"{value * 100:.1f} %"


def print_report(results: dict[str, Any]) -> None:
    analysis = results["analysis"]
    say("")
    say("Routing in the simulated market (regret against the hindsight-best provider)")
    header = (
        "| scenario | requests | errors | fallbacks | mean regret | p50 | p90 | best picked "
        "| outside limits | stale | quote/true rank corr | top shares |"
    )
    say(header)
    say("|" + "---|" * 12)
    for name, s in [*analysis["scenarios"].items(), *analysis["profiles"].items()]:
        profile = name.split("/")[0]
        top = ", ".join(f"{n} {v}%" for n, v in list(s["share_pct"].items())[:3])
        stale = "n/a" if s["stale"] is None else f"{s['stale']}/{s['quote_ages_known']}"
        say(
            f"| {name if '/' in name else '**' + name + '**'} | {s['requests']} "
            f"| {_fmt(s['error_pct'], ' %')} | {_fmt(s['fallback_pct'], ' %')} "
            f"| {_regret_text(profile, s['regret_mean'])} | {_regret_text(profile, s['regret_p50'])} "
            f"| {_regret_text(profile, s['regret_p90'])} | {_fmt(s['best_picked_pct'], ' %')} "
            f"| {s['outside_limits']} | {stale} | {_fmt(s['quote_rank_corr_mean'])} | {top} |"
        )
    say("")
    for name, s in analysis["profiles"].items():
        extra = ""
        if s["observed_regret_mean"] is not None:
            extra = f"; observed provider time vs best: {s['observed_regret_mean'] * 100:.1f} %"
        say(
            f"{name}: errors {s['errors']} ({s['errors_when_servable']} when a provider could "
            f"serve); with max_latency_ms, {s['over_latency_limit']} of {s['latency_limited_ok']} "
            f"answered slower than the limit{extra}; decisions with any quote older than the "
            f"bound: {_fmt(s['stale_any'])}"
        )
        say(f"  share: {', '.join(f'{n} {v}%' for n, v in s['share_pct'].items())}")
    t = results["targets"]
    say("")
    say(
        f"Targets: fast mean latency regret {_fmt(t['fast'])} (<= 10 %), economy mean cost regret "
        f"{_fmt(t['economy'])} (<= 2 %), balanced {_fmt(t['balanced'])} (reported), stale "
        f"decisions {_fmt(t['stale'])} (0)"
    )


def targets(analysis: dict[str, Any]) -> dict[str, Any]:
    profiles = analysis["profiles"]

    def pct(profile: str) -> str | None:
        value = profiles[profile]["regret_mean"]
        return None if value is None else _regret_text(profile, value)

    stale_counts = [p["stale"] for p in profiles.values() if p["stale"] is not None]
    return {
        "fast": pct("fast"),
        "economy": pct("economy"),
        "balanced": pct("balanced"),
        "stale": sum(stale_counts) if stale_counts else None,
    }


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: Stack, results: dict[str, Any]) -> None:
    market = load_market(args.duration, time.time() + 10 * 365 * 86400, args.market, args.seed)
    seed = market.seed
    key = start_stack(args, stack, market)
    from config.settings import get_settings

    settings = get_settings()
    markup, weights = settings.markup, settings.balanced_weights
    say(f"bench-routing: stack ready on {stack.base_url}; warming up {args.warmup:.0f} s")
    warm = run_load(
        stack.base_url, key, market, markup, seed=seed + 1, concurrency=args.concurrency,
        duration_s=args.warmup, first_index=0, timeout=args.sync_timeout + 15,
    )  # fmt: skip
    results["warmup_requests"] = len(warm)
    # The measured run: the market starts drifting now, with fresh failure draws.
    epoch = time.time()
    market = dataclasses.replace(
        market, configs=[dataclasses.replace(c, drift_epoch=epoch) for c in market.configs]
    )
    for node in stack.sandboxes:
        control(node, "reset")
        control(node, "config", {"drift_epoch": epoch})
    stop = threading.Event()
    follower = catalog_follower(stack, market, stop, args.priors)
    say(f"bench-routing: measured run, {args.duration:.0f} s, {args.concurrency} clients")
    try:
        sent = run_load(
            stack.base_url, key, market, markup, seed=seed, concurrency=args.concurrency,
            duration_s=args.duration, first_index=0, timeout=args.sync_timeout + 15,
        )  # fmt: skip
    finally:
        stop.set()
        follower.join(timeout=5)
    stack.check_alive()
    results["measured_s"] = round(time.time() - epoch, 1)
    # Completions each provider was asked for: more than it served means same-provider retries.
    results["provider_chat_calls"] = {
        node.name: requests.get(f"{node.control_url}/state", timeout=5).json()["counters"][
            "chat_calls"
        ]
        for node in stack.sandboxes
    }
    analysis = analyse(sent, market, markup, weights)
    results["analysis"] = analysis
    results["targets"] = targets(analysis)
    results["market"] = [dataclasses.asdict(c) for c in market.configs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="flopex-routing-"))
    stack = Stack(
        tmp=tmp,
        admin_url=args.pg_admin_url,
        db_name=args.db_name,
        redis_url=args.redis_url,
        keep_db=args.keep_db,
    )
    results: dict[str, Any] = {
        "started_at": stamp,
        "machine": report.machine_info(),
        "git": report.git_info(),
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    code = 0
    try:
        run(args, stack, results)
    except StartupError as exc:
        say(f"bench-routing: FAILED: {exc}")
        code = 1
    except KeyboardInterrupt:
        say("bench-routing: interrupted; stopping everything")
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        say(f"bench-routing: FAILED; logs in {tmp}")
        code = 1
    finally:
        say("bench-routing: stopping the stack")
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        stack.shutdown()
    out = args.output / f"routing-{stamp}.json"
    with contextlib.suppress(OSError):
        report.write_json(out, results)
    if code == 0:
        print_report(results)
        say(f"\nbench-routing: results in {out}")
        shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    threading.current_thread().name = "bench-routing"
    sys.exit(main())
