"""`make bench` (streaming): what the exchange adds to a stream, and how many it holds.

Run by itself (``python bench/streaming.py``; ``make bench`` runs it after bench/run.py), on
the real stack as bench/run.py starts it (gunicorn with config/gunicorn.conf.py, Celery, one
sandbox provider process per provider, PostgreSQL, Redis), configured for streams: Celery with
enough threads for every open stream (a streaming job holds a worker thread while it streams).

1. **Time to first token added**: the same paced stream asked directly of the sandbox provider
   (``POST /chat/completions``, ``stream: true``) and through the exchange (``POST
   /v1/inference``, ``stream: true``), at concurrency 1 and 16; TTFT is the time from sending the
   request to the first content delta. Added = ours - the provider's, at p50 and p99.
2. **Pacing**: for every delta i of a stream, how late it arrives against the provider's pace
   (``arrival_i - arrival_0 - i / tokens_per_s``), directly and through the exchange; added per
   delta = the difference of the two distributions (a buffering relay would show deltas bunched
   and late).
3. **Capacity**: ``--streams`` (256) streams of ``--stream-seconds`` held open at once through
   the exchange while ordinary (non-streaming, one-token) requests keep coming; how many streams
   completed with every delta, the ordinary requests' latency and errors beside a baseline
   without streams, and memory (web, worker, Redis).

The machine is shared (2 cores): the load generator itself runs here too. Results:
bench/results/<timestamp>-streaming.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench.stack import (  # noqa: E402
    SANDBOX_MODEL_ID,
    Stack,
    StartupError,
    bootstrap_database,
    catalog_toml,
    configure_sandboxes,
    flush_redis,
    recreate_database,
    require_loopback,
    say,
    start_sandboxes,
)

RESULTS_DIR = ROOT / "bench" / "results"


@dataclass
class Timing:
    """One stream as the client saw it: ``ttft_ms`` from sending the request to the first
    content delta, ``arrivals_ms`` of every delta from the first."""

    ok: bool
    ttft_ms: float = 0.0
    arrivals_ms: list[float] = field(default_factory=list)
    error: str | None = None


def _lines(resp: http.client.HTTPResponse) -> Any:
    while True:
        line = resp.readline()
        if not line:
            return
        yield line.rstrip(b"\r\n")


def _read_sse(
    resp: http.client.HTTPResponse,
    sent: float,
    is_delta: Callable[[str | None, bytes], bool],
    done: Callable[[str | None, bytes], bool],
) -> Timing:
    arrivals: list[float] = []
    event: str | None = None
    for line in _lines(resp):
        if not line:
            event = None
            continue
        if line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
            now = time.perf_counter()
            if is_delta(event, data):
                arrivals.append(now)
            if done(event, data):
                break
    if not arrivals:
        return Timing(False, error="no delta")
    first = arrivals[0]
    return Timing(True, (first - sent) * 1000, [(t - first) * 1000 for t in arrivals])


def _content(data: bytes) -> str:
    """A provider chunk's content delta ('' for the role chunk, usage, [DONE])."""
    if not data.startswith(b"{"):
        return ""
    choices = json.loads(data).get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def direct_stream(base_url: str, max_tokens: int, timeout_s: float = 120) -> Timing:
    """The provider alone: its own chat-completions stream."""
    host, port = _host_port(base_url)
    path = urlsplit(base_url).path.rstrip("/") + "/chat/completions"
    body = json.dumps(
        {
            "model": SANDBOX_MODEL_ID,
            "messages": [{"role": "user", "content": "Stream me a story."}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        sent = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return Timing(False, error=f"HTTP {resp.status}")
        return _read_sse(
            resp,
            sent,
            lambda _e, d: bool(_content(d)),
            lambda _e, d: d == b"[DONE]",
        )
    except OSError as exc:
        return Timing(False, error=type(exc).__name__)
    finally:
        conn.close()


def exchange_stream(base_url: str, api_key: str, max_tokens: int, timeout_s: float = 120) -> Timing:
    """Through the exchange: POST /v1/inference with stream: true (native events)."""
    host, port = _host_port(base_url)
    body = json.dumps(
        {
            "model": "llama-3.1-8b",
            "input": "Stream me a story.",
            "max_output_tokens": max_tokens,
            "stream": True,
        }
    )
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/inference", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return Timing(False, error=f"HTTP {resp.status}")
        timing = _read_sse(
            resp,
            sent,
            lambda e, _d: e == "delta",
            lambda e, _d: e in ("completed", "failed"),
        )
        return timing
    except OSError as exc:
        return Timing(False, error=type(exc).__name__)
    finally:
        conn.close()


def timed_post(base_url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    """A whole non-streaming answer, in ms (-1 when it was not a 200)."""
    host, port = _host_port(base_url)
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        started = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        resp.read()
        return (time.perf_counter() - started) * 1000 if resp.status == 200 else -1.0
    finally:
        conn.close()


def non_streaming_added(stack: Stack, api_key: str, total: int, tokens: int) -> dict[str, Any]:
    """For comparison: what the exchange adds to the same completion, not streamed (c1)."""
    say(f"bench-streaming: the same completion not streamed, c1, {total} each way")
    provider = stack.sandboxes[0].base_url
    json_headers = {"Content-Type": "application/json"}
    direct_body = {
        "model": SANDBOX_MODEL_ID,
        "messages": [{"role": "user", "content": "Stream me a story."}],
        "max_tokens": tokens,
    }
    ours_body = {
        "model": "llama-3.1-8b",
        "input": "Stream me a story.",
        "max_output_tokens": tokens,
    }
    auth = {**json_headers, "Authorization": f"Bearer {api_key}"}
    path = urlsplit(provider).path.rstrip("/") + "/chat/completions"
    direct = [timed_post(provider, path, direct_body, json_headers) for _ in range(total)]
    ours = [timed_post(stack.base_url, "/v1/inference", ours_body, auth) for _ in range(total)]
    d, o = [v for v in direct if v >= 0], [v for v in ours if v >= 0]
    p50d, p50o, p99d, p99o = pct(d, 50), pct(o, 50), pct(d, 99), pct(o, 99)
    return {
        "requests": total,
        "ok": {"direct": len(d), "exchange": len(o)},
        "provider_p50_ms": p50d,
        "exchange_p50_ms": p50o,
        "added_p50_ms": None if p50d is None or p50o is None else round(p50o - p50d, 2),
        "added_p99_ms": None if p99d is None or p99o is None else round(p99o - p99d, 2),
    }


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return round(ordered[index], 2)


def many(fn: Callable[[], Timing], total: int, concurrency: int) -> list[Timing]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda _i: fn(), range(total)))


def lateness(timings: list[Timing], per_token_ms: float) -> list[float]:
    return [
        t - i * per_token_ms
        for timing in timings
        if timing.ok
        for i, t in enumerate(timing.arrivals_ms)
        if i > 0
    ]


def ttft_and_pacing(
    stack: Stack, api_key: str, concurrency: int, total: int, tokens: int, tokens_per_s: float
) -> dict[str, Any]:
    say(f"bench-streaming: TTFT and pacing at c{concurrency}, {total} streams each way")
    provider = stack.sandboxes[0].base_url  # lowest_cost routes llama-3.1-8b to p01
    direct = many(lambda: direct_stream(provider, tokens), total, concurrency)
    ours = many(lambda: exchange_stream(stack.base_url, api_key, tokens), total, concurrency)
    per_token_ms = 1000 / tokens_per_s
    d_ttft = [t.ttft_ms for t in direct if t.ok]
    o_ttft = [t.ttft_ms for t in ours if t.ok]
    d_late, o_late = lateness(direct, per_token_ms), lateness(ours, per_token_ms)

    def added(p: float, a: list[float], b: list[float]) -> float | None:
        pa, pb = pct(a, p), pct(b, p)
        return None if pa is None or pb is None else round(pa - pb, 2)

    return {
        "concurrency": concurrency,
        "streams": total,
        "ok": {"direct": len(d_ttft), "exchange": len(o_ttft)},
        "deltas_per_stream": {
            "direct": pct([len(t.arrivals_ms) for t in direct if t.ok], 50),
            "exchange": pct([len(t.arrivals_ms) for t in ours if t.ok], 50),
        },
        "ttft_ms": {
            "provider_p50": pct(d_ttft, 50),
            "provider_p99": pct(d_ttft, 99),
            "exchange_p50": pct(o_ttft, 50),
            "exchange_p99": pct(o_ttft, 99),
            "added_p50": added(50, o_ttft, d_ttft),
            "added_p99": added(99, o_ttft, d_ttft),
        },
        "lateness_per_delta_ms": {
            "provider_p50": pct(d_late, 50),
            "provider_p99": pct(d_late, 99),
            "exchange_p50": pct(o_late, 50),
            "exchange_p99": pct(o_late, 99),
            "added_p50": added(50, o_late, d_late),
            "added_p99": added(99, o_late, d_late),
        },
    }


def ordinary(
    base_url: str, api_key: str, stop: threading.Event, out: list[tuple[int, float]]
) -> None:
    """Closed loop of one-token non-streaming requests until ``stop``."""
    host, port = _host_port(base_url)
    body = json.dumps({"model": "llama-3.1-8b", "input": "One word.", "max_output_tokens": 1})
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    while not stop.is_set():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        started = time.perf_counter()
        try:
            conn.request("POST", "/v1/inference", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            out.append((resp.status, (time.perf_counter() - started) * 1000))
        except OSError:
            out.append((0, (time.perf_counter() - started) * 1000))
        finally:
            conn.close()


def ordinary_summary(samples: list[tuple[int, float]]) -> dict[str, Any]:
    ok = [ms for status, ms in samples if status == 200]
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
    }


def redis_memory_mb(stack: Stack) -> float:
    return round(int(stack.redis.info("memory")["used_memory"]) / 1e6, 1)


def capacity(
    stack: Stack, api_key: str, streams: int, seconds: float, tokens_per_s: float, clients: int
) -> dict[str, Any]:
    tokens = max(1, int(seconds * tokens_per_s))
    say(f"bench-streaming: baseline of ordinary requests ({clients} clients, 5 s)")
    stop = threading.Event()
    base: list[tuple[int, float]] = []
    loops = [
        threading.Thread(target=ordinary, args=(stack.base_url, api_key, stop, base), daemon=True)
        for _ in range(clients)
    ]
    for t in loops:
        t.start()
    time.sleep(5)
    stop.set()
    for t in loops:
        t.join()
    memory_before = {**stack.memory(), "redis_mb": redis_memory_mb(stack)}

    say(f"bench-streaming: {streams} streams of {tokens} tokens at {tokens_per_s}/s held open")
    results: list[Timing] = []
    lock = threading.Lock()

    def one() -> None:
        timing = exchange_stream(stack.base_url, api_key, tokens, timeout_s=seconds * 6 + 60)
        with lock:
            results.append(timing)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    opened = time.perf_counter()
    for t in threads:
        t.start()
        time.sleep(0.005)  # opened over ~1.3 s, as a burst of real clients would be
    stop = threading.Event()
    during: list[tuple[int, float]] = []
    loops = [
        threading.Thread(target=ordinary, args=(stack.base_url, api_key, stop, during), daemon=True)
        for _ in range(clients)
    ]
    for t in loops:
        t.start()
    time.sleep(min(seconds * 0.6, max(2.0, seconds - 2)))
    memory_during = {**stack.memory(), "redis_mb": redis_memory_mb(stack)}
    deadline = time.monotonic() + seconds * 6 + 90
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in loops:
        t.join()
    elapsed = time.perf_counter() - opened
    complete = [r for r in results if r.ok and len(r.arrivals_ms) == tokens]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    per_token_ms = 1000 / tokens_per_s
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "tokens_per_s": tokens_per_s,
        "completed_with_every_delta": len(complete),
        "failed": errors,
        "elapsed_s": round(elapsed, 1),
        "ttft_ms_p50": pct([r.ttft_ms for r in results if r.ok], 50),
        "ttft_ms_p99": pct([r.ttft_ms for r in results if r.ok], 99),
        "lateness_per_delta_ms_p50": pct(lateness(results, per_token_ms), 50),
        "lateness_per_delta_ms_p99": pct(lateness(results, per_token_ms), 99),
        "ordinary_baseline": ordinary_summary(base),
        "ordinary_during_streams": ordinary_summary(during),
        "memory_before": memory_before,
        "memory_during": memory_during,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/streaming.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer streams, shorter capacity run")
    p.add_argument("--streams", type=int, default=256, help="concurrent streams held open (256)")
    p.add_argument("--stream-seconds", type=float, default=10.0, help="length of each (10 s)")
    p.add_argument("--capacity-tokens-per-s", type=float, default=5.0)
    p.add_argument("--ordinary-clients", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="tokens per TTFT/pacing stream (32)")
    p.add_argument("--tokens-per-s", type=float, default=100.0, help="provider pace (100/s)")
    p.add_argument("--ttft-ms", type=int, default=50, help="provider time to first token")
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--worker-procs", type=int, default=2)
    p.add_argument("--worker-concurrency", type=int, default=160, help="Celery threads (160)")
    p.add_argument("--db-name", default="flopex_bench_stream")
    p.add_argument("--pg-admin-url", default=bench_run.PG_ADMIN_URL)
    p.add_argument("--redis-url", default=bench_run.REDIS_URL)
    p.add_argument("--output", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, bench_run._on_signal)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="flopex-bench-stream-"))
    stack = Stack(
        tmp=tmp, admin_url=args.pg_admin_url, db_name=args.db_name, redis_url=args.redis_url
    )
    results: dict[str, Any] = {
        "started_at": stamp,
        "machine": report.machine_info(),
        "git": report.git_info(),
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    code = 0
    try:
        require_loopback(args.pg_admin_url)
        require_loopback(args.redis_url)
        results["machine_busy_before_pct"] = bench_run.wait_for_quiet_machine(30)
        db_url = recreate_database(args.pg_admin_url, args.db_name)
        stack.db_created = True
        run_args = bench_run.parse_args(
            ["--web-workers", str(args.web_workers), "--redis-url", args.redis_url]
        )
        bench_run.configure_environment(run_args, db_url, tmp)
        # PostgreSQL's connections are shared with everything else on this machine (100 in
        # all): 4 (+4 overflow) per process is plenty, since a stream holds none.
        os.environ["FLOPEX_DB_POOL_SIZE"] = "4"
        flush_redis(args.redis_url)
        stack.sandboxes = start_sandboxes(3, tmp, latency_ms=0)
        catalog = tmp / "catalog.toml"
        catalog.write_text(catalog_toml(stack.sandboxes, 3, []))
        key = bootstrap_database(catalog, bench_run.LOAD_BALANCE_USD, "bench stream")[0].api_key
        say(
            f"bench-streaming: gunicorn (config/gunicorn.conf.py, {args.web_workers} workers), "
            f"celery {args.worker_procs}x{args.worker_concurrency} threads"
        )
        stack.start_services(args.worker_procs, args.worker_concurrency, "warning")
        configure_sandboxes(
            stack.sandboxes,
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s,
            output_tokens=args.tokens,
        )
        many(lambda: exchange_stream(stack.base_url, key, args.tokens), 8, 4)  # warm-up
        total1, total16 = (10, 48) if args.quick else (40, 160)
        results["non_streaming_c1"] = non_streaming_added(stack, key, total1, args.tokens)
        results["ttft_pacing"] = [
            ttft_and_pacing(stack, key, 1, total1, args.tokens, args.tokens_per_s),
            ttft_and_pacing(stack, key, 16, total16, args.tokens, args.tokens_per_s),
        ]
        seconds = 5.0 if args.quick else args.stream_seconds
        streams = min(args.streams, 64) if args.quick else args.streams
        configure_sandboxes(
            stack.sandboxes,
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.capacity_tokens_per_s,
            output_tokens=int(seconds * args.capacity_tokens_per_s),
        )
        results["capacity"] = capacity(
            stack, key, streams, seconds, args.capacity_tokens_per_s, args.ordinary_clients
        )
    except StartupError as exc:
        say(f"bench-streaming: FAILED: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        stack.shutdown()
    results["exit_code"] = code
    out = args.output / f"{stamp}-streaming.json"
    with contextlib.suppress(OSError):
        report.write_json(out, results)
    shown = ("non_streaming_c1", "ttft_pacing", "capacity")
    print(json.dumps({k: results.get(k) for k in shown}, indent=1, default=str))
    say(f"bench-streaming: results in {out}")
    if code == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    threading.current_thread().name = "bench-streaming"
    sys.exit(main())
