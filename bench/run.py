"""`make bench`: the Flopex exchange under load, on this machine, against real PostgreSQL and Redis.

What one run does (docs/performance.md explains the method and the numbers):

1. Creates a fresh PostgreSQL database (``flopex_bench``: dropped first, and at the end unless
   ``--keep-db``), migrated with ``app.migrate.upgrade``, and flushes Redis database 12.
2. Starts one sandbox provider process per catalog provider (``bench/sandbox_node.py``), writes
   a benchmark catalog to a temp file (``llama-3.1-8b`` on 3 providers, ``bench-fanout-<n>`` on
   n), loads it and creates the account that carries the load (a large balance, one hot wallet).
3. Starts gunicorn (``config/gunicorn.conf.py``) and one Celery worker (thread pool), waits for
   ``/readyz`` and a control ping, and warms up.
4. Synchronous scenarios: sandbox latency 0 and 60 ms x closed-loop concurrency 1, 16, 64.
5. Quote fan-out with 1, 3 and 10 providers; async (``Prefer: respond-async``) submit latency;
   a census of PostgreSQL transactions per request.
6. Optionally (``--profile``, needs py-spy) samples the web and worker processes at c64.
7. The hot-wallet benchmark (app.wallet from several processes on one wallet), with the ledger
   invariants; the same invariants on the load account's wallet, end to end.
8. Prints the tables and the verdict against the targets; writes bench/results/<timestamp>.json.

Everything started is stopped on exit, Ctrl-C and errors included. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import profiling, report  # noqa: E402
from bench.load import (  # noqa: E402
    LoadResult,
    closed_loop,
    count_errors,
    parse_json,
    summary,
    throughput,
)
from bench.stack import (  # noqa: E402
    Stack,
    StartupError,
    bootstrap_database,
    catalog_toml,
    configure_sandboxes,
    cpu_delta,
    flush_redis,
    read_service_times,
    recreate_database,
    require_loopback,
    reset_sandboxes,
    say,
    start_sandboxes,
    wait_for_quiet_machine,
)
from bench.timeline import analyse_sync, job_rows, slowest_quote_ms  # noqa: E402
from bench.wallet_bench import run_hot_wallet  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/12"
LOAD_BALANCE_USD = "1000000.00"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=None, help="seconds per scenario (10)")
    p.add_argument("--quick", action="store_true", help="3 s scenarios, smaller side benchmarks")
    p.add_argument("--concurrency", default="1,16,64", help="closed-loop concurrencies")
    p.add_argument("--latencies", default="0,60", help="sandbox provider latencies, ms")
    p.add_argument("--providers", type=int, default=3, help="providers of llama-3.1-8b (3)")
    p.add_argument("--fanout", default="1,3,10", help="provider counts of the fan-out test")
    p.add_argument("--web-workers", type=int, default=2, help="WEB_CONCURRENCY (2)")
    p.add_argument("--web-threads", type=int, default=32, help="WEB_THREADS (32)")
    p.add_argument(
        "--worker-concurrency", type=int, default=16, help="Celery threads per process (16)"
    )
    p.add_argument(
        "--worker-procs",
        type=int,
        default=2,
        help="Celery worker processes (2: one per core, as docs/operations.md recommends)",
    )
    p.add_argument(
        "--accounts", type=int, default=1, help="spread the load over this many accounts (1)"
    )
    p.add_argument("--log-level", default="warning", help="LOG_LEVEL of web and worker")
    p.add_argument("--sync-timeout", type=float, default=30.0, help="FLOPEX_SYNC_TIMEOUT_S")
    p.add_argument("--wallet-procs", type=int, default=4, help="hot wallet processes (4)")
    p.add_argument("--wallet-threads", type=int, default=8, help="threads per process (8)")
    p.add_argument("--wallet-jobs", type=int, default=None, help="jobs settled (3000; quick 1000)")
    p.add_argument("--profile", action="store_true", help="py-spy the web and worker at c64")
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        help="also run a soak of this many seconds at c16 (600 for the 10-minute target; 0 = no)",
    )
    p.add_argument("--skip", default="", help="comma list of: sync,fanout,async,census,wallet")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="wait up to this many seconds for other load on the machine to stop (60)",
    )
    p.add_argument("--db-name", default="flopex_bench")
    p.add_argument("--keep-db", action="store_true", help="keep the database for inspection")
    p.add_argument(
        "--pg-admin-url", default=os.environ.get("FLOPEX_BENCH_PG_ADMIN_URL", PG_ADMIN_URL)
    )
    p.add_argument("--redis-url", default=os.environ.get("FLOPEX_BENCH_REDIS_URL", REDIS_URL))
    p.add_argument("--output", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c]
    args.latency_list = [int(v) for v in args.latencies.split(",") if v]
    args.fanout_list = [int(n) for n in args.fanout.split(",") if n]
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.wallet_jobs is None:
        args.wallet_jobs = 1000 if args.quick else 3000
    args.warmup = 1.0 if args.quick else 2.0
    return args


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def configure_environment(args: argparse.Namespace, db_url: str, tmp: Path) -> None:
    """The environment of this process and of every child, set before settings are read."""
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    os.environ.pop("WEB_ACCESS_LOG", None)
    os.environ.update(
        DATABASE_URL=db_url,
        REDIS_URL=args.redis_url,
        CELERY_BROKER_URL=args.redis_url,
        FLOPEX_CATALOG=str(tmp / "catalog.toml"),
        FLOPEX_SYNC_TIMEOUT_S=str(args.sync_timeout),
        # The benchmark measures the exchange, not the per-account throttle.
        FLOPEX_RATE_LIMIT_PER_MIN="100000000",
        FLOPEX_RATE_LIMIT_BURST="1000000",
        WEB_CONCURRENCY=str(args.web_workers),
        WEB_THREADS=str(args.web_threads),
        WEB_MAX_REQUESTS="0",
        LOG_LEVEL=args.log_level.upper(),
        # Beat runs (the quote board's refresh, as in production) but not its sweeper: the
        # hot-wallet benchmark's job rows sit in `quoting` on purpose, and a sweep would take
        # them over (and the sweep's queries are not the request path being measured).
        FLOPEX_SWEEP_INTERVAL_S="86400",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    from config.settings import get_settings

    get_settings.cache_clear()


# -- scenarios ---------------------------------------------------------------------------------


def settle_between(stack: Stack) -> None:
    if not stack.drain(timeout_s=30):
        say("bench: warning: jobs or messages still pending after 30 s; going on")
    reset_sandboxes(stack.sandboxes)


def measured_load(stack: Stack, **kwargs: Any) -> tuple[LoadResult, dict[str, Any]]:
    before = stack.cpu_snapshot()
    result = closed_loop(stack.base_url, **kwargs)
    after = stack.cpu_snapshot()
    stack.check_alive()
    return result, cpu_delta(before, after)


def cpu_per_request(cpu: dict[str, Any], requests_ok: int) -> dict[str, float | None]:
    if not requests_ok:
        return {}
    per = {k: round(v * 1000 / requests_ok, 2) for k, v in cpu["cpu_s"].items()}
    per["total"] = round(sum(cpu["cpu_s"].values()) * 1000 / requests_ok, 2)
    return per


def sync_scenario(
    stack: Stack, api_key: list[str], args: argparse.Namespace, latency_ms: int, concurrency: int
) -> dict[str, Any]:
    label = f"s{latency_ms}c{concurrency}"
    say(f"bench: sync, sandbox {latency_ms} ms, concurrency {concurrency}, {args.duration:.0f} s")
    settle_between(stack)
    load = {
        "model": "llama-3.1-8b",
        "concurrency": concurrency,
        "timeout_s": args.sync_timeout + 15,
    }
    closed_loop(stack.base_url, api_key, duration_s=args.warmup, tag_prefix=f"w{label}", **load)
    result, cpu = measured_load(
        stack, api_key=api_key, duration_s=args.duration, tag_prefix=label, **load
    )
    ok = sum(1 for s in result.samples if s.status == 200)
    errors = count_errors(result.samples, 200)
    analysis = analyse_sync(result.samples, read_service_times(stack.sandboxes))
    return {
        "sandbox_latency_ms": latency_ms,
        "concurrency": concurrency,
        "duration_s": args.duration,
        "requests": len(result.samples),
        "ok": ok,
        "error_count": sum(errors.values()),
        "errors": errors,
        "rps": round(throughput(result, 200), 1),
        "analysis": analysis,
        "cpu": cpu,
        "cpu_ms_per_request": cpu_per_request(cpu, ok),
        # VmHWM is a high-water mark: the peak since the process started, up to this scenario.
        "peak_rss_mb": stack.peak_rss_mb(),
    }


def fanout_scenario(stack: Stack, api_key: str, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Sequential synchronous requests to `bench-fanout-<n>`; per job: fan-out time =
    started_at - created_at (job accepted -> route starts), and what it adds over the slowest
    quote (the largest live quote latency the worker measured for that job)."""
    duration = max(2.0, args.duration / 2)
    say(f"bench: fan-out, {n} provider(s), {duration:.0f} s")
    settle_between(stack)
    load = {"model": f"bench-fanout-{n}", "concurrency": 1, "timeout_s": args.sync_timeout + 15}
    closed_loop(stack.base_url, api_key, duration_s=args.warmup, tag_prefix=f"wf{n}", **load)
    result, _ = measured_load(
        stack, api_key=api_key, duration_s=duration, tag_prefix=f"f{n}", **load
    )
    ids = []
    for s in result.samples:
        job = parse_json(s.body) if s.status == 200 else None
        if job and job.get("id"):
            ids.append(uuid.UUID(job["id"]))
    rows = job_rows(ids)
    fanout, slowest, added = [], [], []
    for row in rows.values():
        if row["created_at"] is None or row["started_at"] is None:
            continue
        f_ms = (row["started_at"] - row["created_at"]).total_seconds() * 1000
        fanout.append(f_ms)
        q = slowest_quote_ms(row, f_ms)
        if q is not None:
            slowest.append(q)
            added.append(f_ms - q)
    return {
        "providers": n,
        "requests": len(result.samples),
        "errors": count_errors(result.samples, 200),
        "e2e_ms": summary([s.e2e_ms for s in result.samples if s.status == 200]),
        "fanout_ms": summary(fanout),
        "slowest_quote_ms": summary(slowest),
        "added_over_slowest_ms": summary(added),
    }


def async_scenario(stack: Stack, api_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """POST with `Prefer: respond-async`, one at a time with a 100 ms pause after each answer
    (about 9/s), so that the background work of earlier jobs (~40 ms of CPU each today) stays a
    small part of the two cores; latency of the 202. Every job must then finish."""
    count = 40 if args.quick else 100
    say(f"bench: async submit, {count} requests, 100 ms apart")
    settle_between(stack)
    load = {
        "model": "llama-3.1-8b",
        "concurrency": 1,
        "headers": {"Prefer": "respond-async"},
        "timeout_s": 30.0,
        "pace_s": 0.1,
    }
    closed_loop(stack.base_url, api_key, duration_s=args.warmup, tag_prefix="wa", **load)
    result, cpu = measured_load(
        stack, api_key=api_key, duration_s=60.0, max_requests=count, tag_prefix="a", **load
    )
    drained = stack.drain(timeout_s=60)
    ids = []
    for s in result.samples:
        job = parse_json(s.body) if s.status == 202 else None
        if job and job.get("id"):
            ids.append(uuid.UUID(job["id"]))
    statuses: dict[str, int] = {}
    for row in job_rows(ids).values():
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return {
        "requests": len(result.samples),
        "errors": count_errors(result.samples, 202),
        "submit_ms": summary([s.e2e_ms for s in result.samples if s.status == 202]),
        "jobs_final_status": statuses,
        "drained": drained,
        "cpu": cpu,
    }


def census_scenario(stack: Stack, api_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Exactly how many PostgreSQL transactions and rows one synchronous request costs.

    pg_stat_database is only updated when a backend has been idle for a while, so: no
    connection of ours to the benchmark database, wait for every backend to flush (idle > 10 s),
    read, send `count` sequential requests, wait again, read. Work a job causes after its
    answer (none today) is included."""
    from app.db import dispose_engine

    count = 50 if args.quick else 100
    say(f"bench: census, {count} sequential requests between two ~11 s pauses")
    settle_between(stack)
    dispose_engine()
    time.sleep(11.0)
    before = stack.pg_counters()
    result = closed_loop(
        stack.base_url,
        api_key,
        model="llama-3.1-8b",
        concurrency=1,
        duration_s=60.0,
        max_requests=count,
        tag_prefix="census",
        timeout_s=args.sync_timeout + 15,
    )
    time.sleep(11.0)
    after = stack.pg_counters()
    ok = sum(1 for s in result.samples if s.status == 200)
    return {
        "requests": count,
        "ok": ok,
        "per_request": {k: round((after[k] - before[k]) / max(ok, 1), 2) for k in after},
    }


def profile_scenario(
    stack: Stack, api_key: list[str], args: argparse.Namespace, out_dir: Path
) -> dict[str, Any] | None:
    py_spy = profiling.find_py_spy()
    if py_spy is None:
        say("bench: --profile needs py-spy (.venv/bin/pip install py-spy); skipping the profile")
        return None
    duration = min(args.duration, 10.0)
    say(f"bench: profiling web and worker with py-spy at c64, sandbox 0 ms, {duration:.0f} s")
    configure_sandboxes(stack.sandboxes, latency_ms=0)
    settle_between(stack)
    load = {"model": "llama-3.1-8b", "concurrency": 64, "timeout_s": args.sync_timeout + 15}
    closed_loop(stack.base_url, api_key, duration_s=args.warmup, tag_prefix="wp", **load)
    groups = stack.process_groups()
    pids = {f"web-{pid}": pid for pid in groups["web"][1:]}
    pids.update({f"worker-{pid}": pid for pid in groups["worker"]})
    running = profiling.start_recording(py_spy, pids, duration, out_dir)
    try:
        result = closed_loop(stack.base_url, api_key, duration_s=duration, tag_prefix="p", **load)
    finally:
        raw = profiling.finish_recording(running, timeout_s=duration + 20)
    summaries = {name: profiling.summarise(path) for name, path in raw.items()}
    for name, path in raw.items():
        summaries[name]["raw"] = str(path)
    return {
        "duration_s": duration,
        "rps_while_profiled": round(throughput(result, 200), 1),
        "processes": summaries,
    }


def soak_scenario(stack: Stack, api_key: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """A long closed loop at c16 (sandbox 0 ms) while the resident memory (VmRSS) of every web
    and worker process is sampled every 30 s. Growth is the last sample minus the sample taken
    after the first minute (start-up, caches and pools filling up are not growth)."""
    say(f"bench: soak, sandbox 0 ms, concurrency 16, {args.soak:.0f} s")
    settle_between(stack)
    box: dict[str, Any] = {}

    def drive() -> None:
        box["result"] = closed_loop(
            stack.base_url,
            api_key,
            model="llama-3.1-8b",
            concurrency=16,
            duration_s=args.soak,
            tag_prefix="soak",
            timeout_s=args.sync_timeout + 15,
        )

    loop = threading.Thread(target=drive, daemon=True)
    started = time.monotonic()
    loop.start()
    samples: list[dict[str, Any]] = []
    while loop.is_alive():
        mem = stack.memory()
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "web": [m["rss_mb"] for m in mem.get("web_workers", [])],
                "worker": [m["rss_mb"] for m in mem.get("worker_processes", [])],
            }
        )
        loop.join(timeout=30.0)
    stack.check_alive()
    result = box["result"]
    baseline = next((x for x in samples if x["t_s"] >= 60), samples[0])
    last = samples[-1]

    def growth(kind: str) -> float | None:
        pairs = list(zip(baseline[kind], last[kind], strict=False))
        if not pairs or any(a is None or b is None for a, b in pairs):
            return None
        return round(max(b - a for a, b in pairs), 1)

    return {
        "duration_s": args.soak,
        "requests": len(result.samples),
        "ok": sum(1 for x in result.samples if x.status == 200),
        "errors": count_errors(result.samples, 200),
        "rps": round(throughput(result, 200), 1),
        "rss_samples": samples,
        "baseline_t_s": baseline["t_s"],
        "growth_mb": {"web": growth("web"), "worker": growth("worker")},
        "max_rss_mb": {
            "web": max((v for x in samples for v in x["web"] if v is not None), default=None),
            "worker": max((v for x in samples for v in x["worker"] if v is not None), default=None),
        },
    }


def load_wallet_invariants(wallet_ids: list[uuid.UUID]) -> dict[str, Any]:
    """End to end: the load accounts' wallets (one, by default: a hot wallet) took every capture
    of every scenario; the ledger must still add up."""
    from sqlalchemy import func, select

    from app import wallet
    from app.db import session_scope
    from app.models import LedgerEntry

    checks = {
        "balance_equals_ledger_sum": True,
        "held_equals_ledger_held_sum": True,
        "held_is_zero": True,
        "balance_non_negative": True,
    }
    captures = 0
    with session_scope() as session:
        for wallet_id in wallet_ids:
            state = wallet.get_state(session, wallet_id)
            sums = wallet.ledger_sums(session, wallet_id)
            captures += int(
                session.scalar(
                    select(func.count())
                    .select_from(LedgerEntry)
                    .where(LedgerEntry.wallet_id == wallet_id, LedgerEntry.kind == "capture")
                )
                or 0
            )
            checks["balance_equals_ledger_sum"] &= state.balance_micros == sums.balance_micros
            checks["held_equals_ledger_held_sum"] &= state.held_micros == sums.held_micros
            checks["held_is_zero"] &= state.held_micros == 0
            checks["balance_non_negative"] &= state.balance_micros >= 0
    return {
        "wallets": len(wallet_ids),
        "captures": captures,
        "invariants": checks,
        "invariants_ok": all(checks.values()),
    }


# -- main --------------------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    say("")
    if results.get("sync"):
        say("Synchronous POST /v1/inference (closed loop; latencies in ms; ovh = added overhead)")
        say(report.sync_table(results["sync"]))
        say("")
        say("Where the time goes (p50 ms per stage) and CPU ms per successful request")
        say(report.stage_table(results["sync"]))
        say("")
    if results.get("fanout"):
        rows = [
            [
                f["providers"],
                f["e2e_ms"]["p50"],
                f["fanout_ms"]["p50"],
                f["fanout_ms"]["p90"],
                f["slowest_quote_ms"]["p50"],
                f["added_over_slowest_ms"]["p50"],
                f["added_over_slowest_ms"]["p90"],
                sum(f["errors"].values()),
            ]
            for f in results["fanout"]
        ]
        say("Quote fan-out (sandbox 0 ms, sequential; fan-out = job created_at -> started_at)")
        say(
            report.table(
                ["providers", "e2e p50", "fan-out p50", "fan-out p90", "slowest quote p50",
                 "added p50", "added p90", "errors"],
                rows,
            )
        )  # fmt: skip
        say("")
    if results.get("async"):
        a = results["async"]
        say(
            "Async submit (202, Prefer: respond-async): "
            f"p50 {a['submit_ms']['p50']} ms, p90 {a['submit_ms']['p90']} ms, "
            f"p99 {a['submit_ms']['p99']} ms, errors {sum(a['errors'].values())}, "
            f"jobs {a['jobs_final_status']}"
        )
    if results.get("census"):
        per = results["census"]["per_request"]
        say(
            "PostgreSQL per synchronous request (pg_stat_database): "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in per.items())
        )
    if results.get("hot_wallet"):
        w = results["hot_wallet"]
        say(
            f"Hot wallet ({w['procs']}x{w['threads']} threads, {w['jobs']} jobs, one wallet): "
            f"{w['holds_per_s']} holds/s, {w['captures_per_s']} captures/s, "
            f"settle p50 {w['settle_latency_ms']['p50']} ms / p99 {w['settle_latency_ms']['p99']} ms, "
            f"invariants {'OK' if w['invariants_ok'] else 'BROKEN ' + str(w['invariants'])}"
        )
    if results.get("soak"):
        k = results["soak"]
        say(
            f"Soak ({k['duration_s']:.0f} s at c16): {k['rps']} req/s, {k['ok']} ok, errors "
            f"{sum(k['errors'].values())}; RSS growth after the first minute (MB, largest "
            f"process): web {k['growth_mb']['web']}, worker {k['growth_mb']['worker']}; "
            f"max RSS web {k['max_rss_mb']['web']}, worker {k['max_rss_mb']['worker']}"
        )
    if results.get("load_wallet"):
        lw = results["load_wallet"]
        say(
            f"Load account wallet (end to end, {lw['captures']} captures): invariants "
            f"{'OK' if lw['invariants_ok'] else 'BROKEN ' + str(lw['invariants'])}"
        )
    if results.get("idle_cores"):
        idle = ", ".join(f"{k} {v}" for k, v in results["idle_cores"].items())
        say(f"Idle stack CPU (cores): {idle}")
    mem = results.get("memory") or {}
    if mem:
        web = ", ".join(
            f"{m['peak_mb']}" for m in mem.get("web_workers", []) if m.get("peak_mb") is not None
        )
        say(
            f"Peak RSS (VmHWM, MB): web master {(mem.get('web_master') or {}).get('peak_mb')}, "
            f"web workers [{web}], celery worker {(mem.get('worker') or {}).get('peak_mb')}, "
            f"sandbox max {max((m['peak_mb'] or 0) for m in mem.get('sandboxes', [{'peak_mb': 0}]))}"
        )
    if results.get("profile"):
        for name, prof in results["profile"]["processes"].items():
            top = ", ".join(f"{r['function']} {r['pct']}%" for r in prof["project_inclusive"][:6])
            say(f"Profile {name} ({prof['samples']} GIL samples): {top}")
    say("")
    say("Targets (2 cores, sandbox 0 ms, sync)")
    say(report.verdict_table(results["verdicts"]))


def run(args: argparse.Namespace, stack: Stack, results: dict[str, Any], stamp: str) -> None:
    require_loopback(args.pg_admin_url)
    require_loopback(args.redis_url)
    results["machine_busy_before_pct"] = wait_for_quiet_machine(args.wait_idle)
    if results["machine_busy_before_pct"] > 15:
        say(
            f"bench: warning: the machine is {results['machine_busy_before_pct']}% busy with "
            "other work; the numbers will be low (see the 'other' column)"
        )
    say(f"bench: database {args.db_name} (recreated), redis {args.redis_url} (flushed)")
    db_url = recreate_database(args.pg_admin_url, args.db_name)
    stack.db_created = True
    configure_environment(args, db_url, stack.tmp)
    flush_redis(args.redis_url)

    n_sandboxes = max([args.providers, *args.fanout_list])
    say(f"bench: starting {n_sandboxes} sandbox provider processes")
    stack.sandboxes = start_sandboxes(n_sandboxes, stack.tmp, latency_ms=0)
    catalog = stack.tmp / "catalog.toml"
    catalog.write_text(catalog_toml(stack.sandboxes, args.providers, args.fanout_list))
    load_accounts = bootstrap_database(catalog, LOAD_BALANCE_USD, "bench load", args.accounts)
    keys = [a.api_key for a in load_accounts]
    say(
        f"bench: starting gunicorn ({args.web_workers}x{args.web_threads} threads) and celery "
        f"({args.worker_procs}x{args.worker_concurrency} threads)"
    )
    stack.start_services(args.worker_procs, args.worker_concurrency, args.log_level)
    say(f"bench: stack ready on {stack.base_url}; warming up")
    closed_loop(
        stack.base_url, keys, model="llama-3.1-8b", concurrency=4,
        duration_s=args.warmup * 2, tag_prefix="warm", timeout_s=args.sync_timeout + 15,
    )  # fmt: skip

    settle_between(stack)
    before = stack.cpu_snapshot()
    time.sleep(3.0)
    idle = cpu_delta(before, stack.cpu_snapshot())
    # What the stack costs doing nothing (Celery polling the broker...), in cores.
    results["idle_cores"] = {k: round(v / idle["wall_s"], 3) for k, v in idle["cpu_s"].items()}
    results["idle_cores"]["other"] = idle["other_cores"]

    if "sync" not in args.skip_set:
        for latency in args.latency_list:
            configure_sandboxes(stack.sandboxes, latency_ms=latency)
            for concurrency in args.concurrency_list:
                results["sync"].append(sync_scenario(stack, keys, args, latency, concurrency))
    configure_sandboxes(stack.sandboxes, latency_ms=0)
    if "fanout" not in args.skip_set:
        for n in args.fanout_list:
            results["fanout"].append(fanout_scenario(stack, keys[0], args, n))
    if "async" not in args.skip_set:
        results["async"] = async_scenario(stack, keys[0], args)
    if "census" not in args.skip_set:
        results["census"] = census_scenario(stack, keys[0], args)
    if args.soak > 0:
        results["soak"] = soak_scenario(stack, keys, args)
    if args.profile:
        results["profile"] = profile_scenario(stack, keys, args, args.output / f"{stamp}-profile")
    settle_between(stack)
    results["memory"] = stack.memory()
    results["load_wallet"] = load_wallet_invariants([a.wallet_id for a in load_accounts])
    if "wallet" not in args.skip_set:
        say(
            f"bench: hot wallet, {args.wallet_procs} processes x {args.wallet_threads} threads, "
            f"{args.wallet_jobs} jobs on one wallet"
        )
        results["hot_wallet"] = run_hot_wallet(
            os.environ["DATABASE_URL"],
            procs=args.wallet_procs,
            threads=args.wallet_threads,
            jobs=args.wallet_jobs,
            time_cap_s=8.0 if args.quick else 15.0,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicit, so that Ctrl-C works even when started with SIGINT ignored (a background job).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="flopex-bench-"))
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
        "config": {k: v for k, v in vars(args).items() if k not in ("output",) and not callable(v)},
        "sync": [],
        "fanout": [],
    }
    results["config"]["output"] = str(args.output)
    results["config"]["skip_set"] = sorted(args.skip_set)
    started = time.monotonic()
    code = 0
    try:
        run(args, stack, results, stamp)
    except StartupError as exc:
        say(f"bench: FAILED: {exc}")
        code = 1
    except KeyboardInterrupt:
        say("bench: interrupted; stopping everything")
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        say(f"bench: FAILED; logs in {tmp}")
        code = 1
    finally:
        say("bench: stopping the stack")
        # A second Ctrl-C (or SIGTERM) during shutdown must not leave children behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        stack.shutdown()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["exit_code"] = code
    results["verdicts"] = report.verdicts(results)
    out = args.output / f"{stamp}.json"
    with contextlib.suppress(OSError):
        report.write_json(out, results)
    if code == 0:
        print_report(results)
        say(f"\nbench: done in {results['elapsed_s']} s; results in {out}")
    elif code == 1 and any(tmp.glob("*.log")):
        say(f"bench: partial results in {out}; logs kept in {tmp}")
        return code
    shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
