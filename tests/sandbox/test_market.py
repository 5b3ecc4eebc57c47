"""The sandbox as a market participant: generation speed, a seeded failure rate and drift."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox import SandboxProvider
from sandbox.server import DRIFT_FIELDS, effective_config, generation_ms
from tests.sandbox.support import LLAMA, TIMEOUT, sandbox_config


def _body(content: str = "Hello, world!", **extra: Any) -> dict[str, Any]:
    return {"model": LLAMA, "messages": [{"role": "user", "content": content}], **extra}


def _post(session: requests.Session, provider: SandboxProvider, body: Any) -> requests.Response:
    return session.post(f"{provider.base_url}/chat/completions", json=body, timeout=TIMEOUT)


# -- generation time ----------------------------------------------------------------------------


def test_generation_ms_is_ttft_plus_tokens_over_speed() -> None:
    assert generation_ms(sandbox_config(), 100) == 0
    assert generation_ms(sandbox_config(ttft_ms=150), 100) == 150
    assert generation_ms(sandbox_config(ttft_ms=150, tokens_per_s=50.0), 100) == 150 + 2000
    assert generation_ms(sandbox_config(tokens_per_s=400.0), 24) == pytest.approx(60.0)


def test_completion_waits_latency_ttft_and_generation(session: requests.Session) -> None:
    config = sandbox_config(latency_ms=20, ttft_ms=30, tokens_per_s=400.0, output_tokens=24)
    with SandboxProvider(config) as provider:
        response = _post(session, provider, _body())
    assert response.status_code == 200
    tokens = response.json()["usage"]["completion_tokens"]
    assert tokens == 24
    # A lower bound only: the provider may take longer on a busy machine, never less.
    expected = 20 + 30 + tokens / 400 * 1000
    assert float(response.headers["X-Sandbox-Service-Ms"]) >= expected


def test_max_tokens_shortens_generation(session: requests.Session) -> None:
    config = sandbox_config(tokens_per_s=1000.0, output_tokens=500)
    with SandboxProvider(config) as provider:
        short = _post(session, provider, _body(max_tokens=5))
    assert short.json()["usage"]["completion_tokens"] == 5
    # 500 tokens at 1000/s would take 500 ms; five take 5 ms.
    assert float(short.headers["X-Sandbox-Service-Ms"]) < 500


# -- failure rate -------------------------------------------------------------------------------


def _outcomes(session: requests.Session, provider: SandboxProvider, n: int) -> list[int]:
    return [_post(session, provider, _body(f"request {i}")).status_code for i in range(n)]


def test_failure_rate_is_seeded_and_reproducible(session: requests.Session) -> None:
    runs = []
    for _ in range(2):
        with SandboxProvider(sandbox_config(failure_rate=0.4, seed=7)) as provider:
            runs.append(_outcomes(session, provider, 40))
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}
    # 40 draws at p = 0.4: anything from 8 to 24 failures is well inside the binomial's bulk.
    assert 8 <= runs[0].count(500) <= 24
    with SandboxProvider(sandbox_config(failure_rate=0.4, seed=8)) as provider:
        assert _outcomes(session, provider, 40) != runs[0]


def test_failure_rate_bounds_and_fault_kind(session: requests.Session) -> None:
    with SandboxProvider(sandbox_config(failure_rate=0.0)) as provider:
        assert set(_outcomes(session, provider, 10)) == {200}
    with SandboxProvider(sandbox_config(failure_rate=1.0, failure_fault="rate_limit")) as provider:
        responses = [_post(session, provider, _body()) for _ in range(3)]
        assert {r.status_code for r in responses} == {429}
        assert responses[0].headers["Retry-After"] == "1"
        # Pings are not subject to the failure rate: the provider stays "live".
        assert session.get(f"{provider.base_url}/models", timeout=TIMEOUT).status_code == 200


def test_reset_restarts_the_failure_sequence(session: requests.Session) -> None:
    with SandboxProvider(sandbox_config(failure_rate=0.5, seed=3)) as provider:
        first = _outcomes(session, provider, 12)
        provider.reset()
        assert _outcomes(session, provider, 12) == first


def test_explicit_fault_takes_precedence_over_the_failure_rate(
    session: requests.Session,
) -> None:
    with SandboxProvider(
        sandbox_config(failure_rate=1.0, fault="rate_limit", fault_count=1)
    ) as provider:
        assert _outcomes(session, provider, 2) == [429, 500]


# -- drift --------------------------------------------------------------------------------------


def test_schedule_sets_values_from_their_time_on() -> None:
    config = sandbox_config(
        latency_ms=10,
        ttft_ms=100,
        tokens_per_s=80.0,
        drift_epoch=1000.0,
        drift_schedule=[
            {"at_s": 30, "tokens_per_s": 20, "price_output_per_million_usd": "0.50"},
            {"at_s": 10, "ttft_ms": 400},
        ],
    )
    assert effective_config(config, 1005.0).ttft_ms == 100
    at_10 = effective_config(config, 1010.0)
    assert (at_10.ttft_ms, at_10.tokens_per_s) == (400, 80.0)
    at_45 = effective_config(config, 1045.0)
    assert (at_45.ttft_ms, at_45.tokens_per_s, at_45.latency_ms) == (400, 20.0, 10)
    assert at_45.price_output_per_million_usd == "0.50"
    # Before the epoch nothing has drifted.
    assert effective_config(config, 900.0).ttft_ms == 100


def test_random_walk_is_deterministic_bounded_and_moves() -> None:
    walk = {"step_s": 1, "seed": 5, "ttft_ms": 0.3, "tokens_per_s": 0.3, "price": 0.2}
    config = sandbox_config(
        ttft_ms=200, tokens_per_s=100.0, drift_walk=walk | {"max_factor": 2}, drift_epoch=0.0
    )
    path = [effective_config(config, float(t)) for t in range(300)]
    assert path[0].ttft_ms == 200 and path[0].tokens_per_s == 100.0
    ttfts = {c.ttft_ms for c in path}
    speeds = [c.tokens_per_s for c in path]
    assert len(ttfts) > 50
    assert all(100 <= t <= 400 for t in ttfts)
    assert all(50.0 - 1e-9 <= s <= 200.0 + 1e-9 for s in speeds)
    prices = {Decimal(c.price_input_per_million_usd) for c in path}
    assert len(prices) > 50 and min(prices) >= Decimal("0.05") and max(prices) <= Decimal("0.2")
    # Same inputs, same path (it is a pure function); another provider walks its own way.
    assert [effective_config(config, float(t)) for t in range(300)] == path
    other = sandbox_config(
        name="bravo", ttft_ms=200, tokens_per_s=100.0, drift_walk=walk, drift_epoch=0
    )
    assert [effective_config(other, float(t)).ttft_ms for t in range(300)] != [
        c.ttft_ms for c in path
    ]
    # Within a step the values hold.
    assert effective_config(config, 10.2) == effective_config(config, 10.9)


def test_failure_rate_walks_multiplicatively_and_stays_a_probability() -> None:
    config = sandbox_config(
        failure_rate=0.5,
        drift_walk={"step_s": 1, "failure_rate": 1.0, "max_factor": 8},
        drift_epoch=0.0,
    )
    rates = [effective_config(config, float(t)).failure_rate for t in range(200)]
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert max(rates) == 1.0 and min(rates) < 0.25


def test_drift_through_the_control_endpoint(session: requests.Session) -> None:
    with SandboxProvider(sandbox_config(latency_ms=1, ttft_ms=5)) as provider:
        before = time.time()
        response = session.post(
            f"{provider.base_url.removesuffix('/v1')}/_sandbox/config",
            json={
                "tokens_per_s": 250,
                "failure_rate": 0.25,
                "drift_schedule": [{"at_s": 0, "ttft_ms": 40, "latency_ms": 15}],
                "drift_walk": {"step_s": 60, "latency_ms": 0.1},
            },
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        state = response.json()
        assert state["config"]["tokens_per_s"] == 250.0
        # Drift configured without an epoch counts from now.
        assert state["config"]["drift_epoch"] >= before
        assert state["config"]["drift_walk"] == {
            "latency_ms": 0.1,
            "step_s": 60.0,
            "seed": 0,
            "max_factor": 4.0,
        }
        assert set(state["effective"]) == set(DRIFT_FIELDS)
        assert state["effective"]["ttft_ms"] == 40
        assert state["effective"]["latency_ms"] == 15
        assert provider.effective().ttft_ms == 40
        # The drifted values are the ones served.
        served = _post(session, provider, _body(max_tokens=1))
        assert float(served.headers["X-Sandbox-Service-Ms"]) >= 15 + 40 + 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": "0.1"}, "failure_rate"),
        ({"tokens_per_s": -1}, "tokens_per_s"),
        ({"tokens_per_s": math.inf}, "tokens_per_s"),
        ({"ttft_ms": 2.5}, "ttft_ms"),
        ({"failure_fault": "explode"}, "failure_fault"),
        ({"seed": True}, "seed"),
        ({"stream_fault": "hang"}, "stream_fault"),
        ({"stream_fault_after_tokens": -1}, "stream_fault_after_tokens"),
        ({"drift_schedule": {"at_s": 1}}, "drift_schedule"),
        ({"drift_schedule": [{"at_s": 1}]}, "drift_schedule"),
        ({"drift_schedule": [{"at_s": 1, "colour": "red"}]}, "colour"),
        ({"drift_schedule": [{"at_s": 1, "ttft_ms": -4}]}, "ttft_ms"),
        ({"drift_walk": {"ttft": 0.1}}, "ttft"),
        ({"drift_walk": {"step_s": 0}}, "step_s"),
        ({"drift_walk": {"max_factor": 0.5}}, "max_factor"),
        ({"drift_epoch": "yesterday"}, "drift_epoch"),
    ],
)
def test_invalid_market_settings_are_rejected(
    session: requests.Session, changes: dict[str, Any], message: str
) -> None:
    with SandboxProvider(sandbox_config()) as provider:
        with pytest.raises(ValueError, match=message):
            provider.configure(**changes)
        response = session.post(
            f"{provider.base_url.removesuffix('/v1')}/_sandbox/config",
            json=changes if changes.get("tokens_per_s") != math.inf else {"tokens_per_s": -1},
            timeout=TIMEOUT,
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_config"
        # Nothing changed.
        assert provider.config == SandboxProvider(sandbox_config()).config


def test_cli_takes_the_market_settings(session: requests.Session) -> None:
    root = Path(__file__).resolve().parents[2]
    epoch = int(time.time())
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    argv = [
        *(sys.executable, "-m", "sandbox", "--name", "delta", "--port", "0"),
        *("--ttft-ms", "7", "--tokens-per-s", "300", "--failure-rate", "0.2"),
        *("--failure-fault", "disconnect", "--seed", "9"),
        *("--stream-fault", "stall", "--stream-fault-after-tokens", "3"),
        *("--drift-schedule", '[{"at_s": 0, "latency_ms": 2}]'),
        *("--drift-walk", '{"step_s": 5, "ttft_ms": 0.1}', "--drift-epoch", str(epoch)),
    ]
    process = subprocess.Popen(
        argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        base_url = line.removeprefix("sandbox delta listening on ").removesuffix("/v1")
        state = session.get(f"{base_url}/_sandbox/state", timeout=TIMEOUT).json()
        config = state["config"]
        assert (config["ttft_ms"], config["tokens_per_s"], config["failure_rate"]) == (7, 300, 0.2)
        assert (config["failure_fault"], config["seed"]) == ("disconnect", 9)
        assert (config["stream_fault"], config["stream_fault_after_tokens"]) == ("stall", 3)
        assert config["drift_schedule"] == [{"at_s": 0.0, "latency_ms": 2}]
        assert config["drift_walk"]["ttft_ms"] == 0.1
        assert config["drift_epoch"] == epoch
        assert state["effective"]["latency_ms"] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)
    bad = subprocess.run(
        [sys.executable, "-m", "sandbox", "--name", "x", "--drift-walk", "{nope"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "not valid JSON" in bad.stderr
