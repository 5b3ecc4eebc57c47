"""A closed-loop HTTP load generator and the statistics of what it measured.

Closed loop: each of `concurrency` threads sends one request on its own keep-alive
``http.client`` connection, waits for the whole answer, and sends the next, until the duration
is over. Responses are kept as bytes and parsed only after the run, so the client spends as
little of the machine's two cores as possible while measuring.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PROMPT = "Summarize inference routing in two sentences."


@dataclass
class Sample:
    tag: str
    sent_at: float  # wall clock (time.time()), comparable with the job row's timestamps
    e2e_ms: float
    status: int  # 0: no HTTP answer (see error)
    body: bytes = b""
    error: str | None = None
    done_at: float = 0.0  # perf_counter() at completion


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    started: float  # perf_counter()
    samples: list[Sample] = field(default_factory=list)

    @property
    def window_end(self) -> float:
        return self.started + self.duration_s


class Connection:
    """One keep-alive connection; reopened after any transport error."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Any:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def inference_body(model: str, tag: str, max_output_tokens: int = 16) -> bytes:
    return json.dumps(
        {
            "model": model,
            "input": f"{DEFAULT_PROMPT} [bench:{tag}]",
            "max_output_tokens": max_output_tokens,
            "performance_profile": "balanced",
            "routing_strategy": "lowest_cost",
        }
    ).encode()


def closed_loop(
    base_url: str,
    api_key: str | list[str],
    *,
    model: str,
    concurrency: int,
    duration_s: float,
    tag_prefix: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    pace_s: float = 0.0,
    max_requests: int | None = None,
    abort: threading.Event | None = None,
) -> LoadResult:
    """Runs `concurrency` closed loops of POST /v1/inference for `duration_s` (or until
    `max_requests` were sent); `pace_s` is a pause after each answer (0 = none). With several
    API keys, loop i uses key i modulo their number (one account, or spread over accounts)."""
    host, port = _host_port(base_url)
    keys = [api_key] if isinstance(api_key, str) else list(api_key)
    per_key_headers = [
        {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers or {}),
        }
        for key in keys
    ]
    abort = abort or threading.Event()
    lock = threading.Lock()
    budget = [max_requests if max_requests is not None else math.inf]
    per_thread: list[list[Sample]] = [[] for _ in range(concurrency)]
    start_barrier = threading.Barrier(concurrency + 1)
    result = LoadResult(concurrency, duration_s, 0.0)

    def take() -> bool:
        with lock:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

    def loop(index: int) -> None:
        conn = Connection(host, port, timeout_s)
        all_headers = per_key_headers[index % len(per_key_headers)]
        out = per_thread[index]
        seq = 0
        start_barrier.wait()
        stop_at = result.window_end
        try:
            while time.perf_counter() < stop_at and not abort.is_set() and take():
                tag = f"{tag_prefix}.{index}.{seq}"
                seq += 1
                body = inference_body(model, tag)
                sent_at = time.time()
                t0 = time.perf_counter()
                try:
                    status, data = conn.request("POST", "/v1/inference", body, all_headers)
                    error = None
                except Exception as exc:  # every failure is a data point, not a crash
                    status, data, error = 0, b"", type(exc).__name__
                t1 = time.perf_counter()
                out.append(Sample(tag, sent_at, (t1 - t0) * 1000, status, data, error, t1))
                if pace_s:
                    time.sleep(pace_s)
        finally:
            conn.close()

    threads = [
        threading.Thread(target=loop, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    result.started = time.perf_counter()
    start_barrier.wait()
    try:
        for t in threads:
            # Bounded: the last request may run at most timeout_s past the window.
            t.join(timeout=duration_s + timeout_s + 5)
    except BaseException:
        abort.set()
        raise
    for samples in per_thread:
        result.samples.extend(samples)
    return result


def _host_port(base_url: str) -> tuple[str, int]:
    hostport = base_url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host, int(port)


# -- statistics --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float], digits: int = 2) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values) if values else None),
        "mean": r(sum(values) / len(values) if values else None),
    }


def parse_json(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def error_label(sample: Sample, expected_status: int) -> str | None:
    """None for a success; else what went wrong, e.g. 'http 502 provider_error'."""
    if sample.status == expected_status:
        return None
    if sample.status == 0:
        return f"transport {sample.error}"
    parsed = parse_json(sample.body) or {}
    error = parsed.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if sample.status == 202 and expected_status == 200:
        code = "sync wait timed out (202)"
    return f"http {sample.status} {code or ''}".strip()


def count_errors(samples: list[Sample], expected_status: int) -> dict[str, int]:
    errors: dict[str, int] = {}
    for s in samples:
        label = error_label(s, expected_status)
        if label is not None:
            errors[label] = errors.get(label, 0) + 1
    return errors


def throughput(result: LoadResult, expected_status: int) -> float:
    """Successful answers completed inside the window, per second of window."""
    ok = sum(
        1 for s in result.samples if s.status == expected_status and s.done_at <= result.window_end
    )
    return ok / result.duration_s


def winning_attempt(job: dict[str, Any]) -> dict[str, Any] | None:
    routing = job.get("routing") or {}
    for attempt in routing.get("attempts") or []:
        if attempt.get("outcome") == "success":
            return attempt
    return None
