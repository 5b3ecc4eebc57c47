"""The simulated market of `make bench-routing` and the benchmark's hindsight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from app.catalog import _check_shape, _expand, _speed_priors
from bench.market import (
    MARKET_FILE,
    Market,
    Request,
    catalog_toml,
    expected_latency_ms,
    hindsight,
    load_market,
)
from bench.routing import LIMITS, Sent, analyse, analyse_one, print_report, spearman, targets
from sandbox import SandboxConfig, SandboxProvider

ROOT = Path(__file__).resolve().parents[2]
MARKUP = Decimal("0.05")
WEIGHTS = (Decimal("0.4"), Decimal("0.4"), Decimal("0.2"))


def _provider(name: str, **values: Any) -> SandboxConfig:
    return SandboxConfig(name=name, models={"m": name}, **values)


def _two() -> Market:
    # quick: fast but dear; cheap: slow but cheap.
    quick = _provider(
        "quick", latency_ms=5, ttft_ms=50, tokens_per_s=500.0,
        price_input_per_million_usd="0.30", price_output_per_million_usd="0.40",
    )  # fmt: skip
    cheap = _provider(
        "cheap", latency_ms=2, ttft_ms=400, tokens_per_s=50.0, failure_rate=0.5,
        price_input_per_million_usd="0.05", price_output_per_million_usd="0.08",
    )  # fmt: skip
    return Market([quick, cheap], seed=1)


def test_the_shipped_market_is_valid_and_varied() -> None:
    market = load_market(150.0, 1_000.0)
    assert len(market.configs) >= 10
    for config in market.configs:
        SandboxProvider(config)  # validates every field, drift included
    for field in ("latency_ms", "ttft_ms", "tokens_per_s", "failure_rate"):
        assert len({getattr(c, field) for c in market.configs}) >= 6, field
    assert len({c.price_output_per_million_usd for c in market.configs}) >= 10
    # Everything drifts: the walk moves every provider, and the schedules fire within the run.
    early, late = market.at(1_000.0), market.at(1_000.0 + 149.0)
    assert all(early[n].ttft_ms != late[n].ttft_ms for n in market.names)
    assert early["m08"].tokens_per_s > 4 * late["m08"].tokens_per_s
    assert [t - 1_000.0 for t in market.price_change_times()] == [45.0, 75.0]


def test_the_checked_in_catalog_is_the_generated_one() -> None:
    shipped = (ROOT / "config" / "catalog.market.toml").read_text()
    market = load_market(150.0, 0.0, MARKET_FILE)
    assert shipped == catalog_toml(market)
    _check_shape(_expand(tomllib.loads(shipped)))
    with_priors = tomllib.loads(catalog_toml(market, priors=True))
    _check_shape(_expand(with_priors))
    first = with_priors["offerings"][0]
    assert _speed_priors(first, "m01") == (300, Decimal("40.00"))


def test_catalog_follows_scheduled_prices() -> None:
    market = load_market(100.0, 0.0)
    before = tomllib.loads(catalog_toml(market, 29.0, {n: "http://x/v1" for n in market.names}))
    after = tomllib.loads(catalog_toml(market, 31.0, {n: "http://x/v1" for n in market.names}))

    def price(catalog: dict[str, Any], name: str) -> str:
        [offering] = [o for o in catalog["offerings"] if o["provider"] == name]
        return str(offering["output_price_usd_per_million"])

    assert (price(before, "m10"), price(after, "m10")) == ("0.20", "0.045")
    assert {p["base_url"] for p in after["providers"]} == {"http://x/v1"}


def test_hindsight_per_profile() -> None:
    market = _two()
    fast = hindsight(Request("fast", 0.0, 20, 100), market, MARKUP, WEIGHTS, 20, 100)
    assert fast.best == "quick"
    assert fast.values["cheap"] == expected_latency_ms(market.configs[1], 100) == 2402.0
    assert fast.regret("quick") == 0.0
    assert fast.regret("cheap") == pytest.approx(2402.0 / 255.0 - 1)
    economy = hindsight(Request("economy", 0.0, 20, 100), market, MARKUP, WEIGHTS, 20, 100)
    assert economy.best == "cheap"
    # 20 x 0.30 + 100 x 0.40 = 46 micro-USD against 20 x 0.05 + 100 x 0.08 = 9.
    assert economy.regret("quick") == pytest.approx(46 / 9 - 1)
    balanced = hindsight(Request("balanced", 0.0, 20, 100), market, MARKUP, WEIGHTS, 20, 100)
    # quick: 0.4 x 1 + 0.4 x 255 / 2402 + 0; cheap: 0.4 x 9 / 46 + 0.4 x 1 + 0.2 x 0.5.
    assert balanced.values["quick"] == pytest.approx(0.4 + 0.4 * 255 / 2402)
    assert balanced.values["cheap"] == pytest.approx(0.4 * 9 / 46 + 0.4 + 0.1)
    assert balanced.best == "quick"
    assert balanced.regret("cheap") == pytest.approx(
        balanced.values["cheap"] - balanced.values["quick"]
    )


def test_hindsight_respects_the_request_limits() -> None:
    market = _two()
    limited = Request("economy", 0.0, 20, 100, max_latency_ms=1000)
    look = hindsight(limited, market, MARKUP, WEIGHTS, 20, 100)
    assert look.best == "quick" and look.allowed == {"quick"}
    # Served outside the limit, cheaper than the best within it: no negative regret.
    assert look.regret("cheap") == 0.0
    priced = Request("fast", 0.0, 20, 100, max_price_micros=20)
    assert hindsight(priced, market, MARKUP, WEIGHTS, 20, 100).best == "cheap"
    nothing = Request("fast", 0.0, 20, 100, max_price_micros=20, max_latency_ms=1000)
    assert hindsight(nothing, market, MARKUP, WEIGHTS, 20, 100).best is None


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_analysis_of_one_request() -> None:
    market = _two()
    body = {
        "status": "success",
        "provider": "cheap",
        "usage": {"input_tokens": 20, "output_tokens": 100},
        "routing": {
            "ranked_first": "quick",
            "attempts": [
                {"provider": "quick", "outcome": "failed", "latency_ms": 10},
                {"provider": "cheap", "outcome": "success", "latency_ms": 2500},
            ],
            "quotes": [
                {"provider": "quick", "estimated_latency_ms": 5, "age_ms": 2500},
                {"provider": "cheap", "estimated_latency_ms": 2, "age_ms": 100},
            ],
        },
    }
    sent = Sent(0, "fast", "none", 0.0, "hello", 100, None, None, 200, body)
    row = analyse_one(sent, market, MARKUP, WEIGHTS)
    assert row["served"] == "cheap" and row["fallback"] is True and row["error"] is None
    assert row["best"] == "quick" and row["best_picked"] is False
    assert row["regret"] == pytest.approx(2402.0 / 255.0 - 1)
    assert row["observed_regret"] == pytest.approx(2510 / 255.0 - 1)
    # The first ranked was quoted 2.5 s old: over fast's 2 s bound.
    assert row["quote_age_ms"] == 2500 and row["stale"] is True
    failed = Sent(1, "economy", "none", 0.0, "hi", 16, None, None, 502, {"error": {"code": "x"}})
    row = analyse_one(failed, market, MARKUP, WEIGHTS)
    assert (row["served"], row["error"], row["stale"]) == (None, "x", None)


def test_market_node_serves_several_providers(tmp_path: Path) -> None:
    market = _two()
    spec = tmp_path / "configs.json"
    spec.write_text(json.dumps([c.__dict__ for c in market.configs]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "market_node.py"), "--configs", str(spec)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        urls = {}
        for _ in market.names:
            name, url = process.stdout.readline().split()[1::3]
            urls[name] = url
        assert set(urls) == {"quick", "cheap"}
        with requests.Session() as session:
            session.trust_env = False
            for name, url in urls.items():
                state = session.get(f"{url.removesuffix('/v1')}/_sandbox/state", timeout=5)
                assert state.json()["config"]["name"] == name
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_report_of_a_small_run(capsys: pytest.CaptureFixture[str]) -> None:
    market = _two()
    ok = {
        "status": "success",
        "provider": "quick",
        "usage": {"input_tokens": 20, "output_tokens": 100},
        "routing": {
            "ranked_first": "quick",
            "attempts": [{"provider": "quick", "outcome": "success", "latency_ms": 260}],
            "quotes": [{"provider": "quick", "estimated_latency_ms": 255, "age_ms": 10}],
        },
    }
    refused = {"error": {"code": "max_latency_exceeded"}}
    sent = [
        Sent(i, profile, limit, 0.0, "hi", 100, None, 1000 if limit == "max_latency_ms" else None)
        for i, (profile, limit) in enumerate(
            (p, lim) for p in ("fast", "balanced", "economy") for lim in LIMITS
        )
    ]
    for s in sent:
        s.status, s.body = (422, refused) if s.limit == "max_price_usd" else (200, ok)
    analysis = analyse(sent, market, MARKUP, WEIGHTS)
    assert analysis["profiles"]["fast"]["requests"] == 3
    assert analysis["profiles"]["fast"]["errors"] == {"max_latency_exceeded": 1}
    # Served by quick: 46 / 9 - 1 without a limit; within 1000 ms only quick is allowed: 0.
    economy = analysis["profiles"]["economy"]["regret_mean"]
    assert economy == pytest.approx((46 / 9 - 1) / 2, abs=1e-4)
    assert analysis["profiles"]["fast"]["stale"] == 0
    print_report({"analysis": analysis, "targets": targets(analysis)})
    out = capsys.readouterr().out
    assert "| **fast** | 3 | 33.3 % |" in out
    assert "stale decisions 0 (0)" in out
