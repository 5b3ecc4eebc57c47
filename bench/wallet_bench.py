"""The hot-wallet benchmark, at the domain level: many jobs settling on one wallet at once.

It drives ``app.wallet`` as the exchange does, from `procs` processes x `threads` threads, each
thread with its own session (and PostgreSQL connection):

1. setup (not timed): an account whose wallet gets a large top-up, and `jobs` job rows;
2. holds: each job's hold as one statement that is its own transaction
   (``wallet.hold_largest(..., commit=Commit.ALONE_DEFERRED)``, as the web does on a submit without an
   Idempotency-Key);
3. settles: each job's capture and release plus the job's final UPDATE in one statement that is
   its own transaction (``wallet.settle_hold(..., commit=Commit.ALONE_DEFERRED)``, as the
   worker's ``RouteAndExecute._settle_answered`` does), committed without waiting for the fsync, then made durable
   by ``app.db.make_durable`` as the worker does before it signals the outcome.

Several processes, not just threads: the exchange settles from several processes too (web and
worker), and one process's GIL would otherwise stretch how long each transaction holds the wallet
row's lock, measuring the client rather than the database. ``--wallet-procs 1`` shows that effect.

Both timed phases are bounded by `time_cap_s`; whatever a capped phase left is completed
afterwards, untimed, so the invariants can always be checked at the end:
balance == sum(ledger amount), held == sum(held deltas), held == 0, balance >= 0, the balance
moved by exactly the sum of the charges, and one capture per job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.load import summary

_PHASES = ("hold", "settle")


@dataclass(frozen=True)
class Plan:
    database_url: str
    wallet_id: uuid.UUID
    job_ids: list[uuid.UUID]
    holds: list[int]
    charges: list[int]


def _hold_one(session: Any, plan: Plan, i: int) -> None:
    from app import wallet
    from app.db import Commit

    # As a synchronous submit without an Idempotency-Key: one statement that is its own
    # transaction (solo) and does not wait for its fsync (the worker's settlement makes it
    # durable before the customer hears anything). The job rows exist already, so the hold
    # inserts none (the web's inserts the job in the same statement). The amount is chosen as
    # the web's admission chooses it (SubmitInference._place_hold, wallet.hold_largest): the
    # largest worst case the wallet covers, here among the plan's hold and two smaller ones, as
    # for a model with three providers.
    placed = wallet.hold_largest(
        session,
        plan.wallet_id,
        plan.job_ids[i],
        [plan.holds[i], plan.holds[i] // 2, plan.holds[i] // 3],
        commit=Commit.ALONE_DEFERRED,
    )
    if placed is None:
        raise RuntimeError("hold refused: the wallet should cover every job")
    session.commit()


def _settle_one(session: Any, plan: Plan, i: int) -> None:
    from app import wallet
    from app.db import Commit, make_durable

    # As RouteAndExecute._settle_answered: capture, release and the job's final write in one statement
    # that is its own transaction (solo: the wallet row is locked only while the server runs
    # it, and its commit does not wait for the fsync), then made durable by a barrier, as the
    # worker does before it signals the outcome.
    stamp = datetime.now(UTC)
    wallet.settle_hold(
        session,
        plan.wallet_id,
        plan.job_ids[i],
        plan.holds[i],
        plan.charges[i],
        finish=wallet.FinalJobWrite(
            1,
            {
                "status": "success",
                "charge_micros": plan.charges[i],
                "settled_at": stamp,
                "finished_at": stamp,
                "updated_at": stamp,
            },
        ),
        commit=Commit.ALONE_DEFERRED,
    )
    session.commit()
    make_durable(session)


_OPS = {"hold": _hold_one, "settle": _settle_one}


def _child(
    plan: Plan,
    threads: int,
    time_cap_s: float,
    counters: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    """One process: for each phase, wait for everyone, run `threads` threads taking job indices
    from the shared counter until none is left or the time cap passes, report."""
    from sqlalchemy.orm import sessionmaker

    from app.db import build_engine

    engine = build_engine(plan.database_url, pool_size=threads)
    factory = sessionmaker(engine, expire_on_commit=False)
    jobs = len(plan.job_ids)
    try:
        for phase in _PHASES:
            counter = counters[phase]
            op = _OPS[phase]
            done: list[int] = []
            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            barrier.wait()
            deadline = time.monotonic() + time_cap_s

            def take(counter: Any = counter, deadline: float = deadline) -> int | None:
                if time.monotonic() >= deadline:
                    return None
                with counter.get_lock():
                    if counter.value >= jobs:
                        return None
                    counter.value += 1
                    return int(counter.value - 1)

            def work(
                op: Any = op,
                take: Any = take,
                done: list[int] = done,
                latencies: list[float] = latencies,
                errors: list[str] = errors,
                lock: threading.Lock = lock,
            ) -> None:
                while (i := take()) is not None:
                    started = time.perf_counter()
                    session = factory()
                    try:
                        op(session, plan, i)
                        session.commit()
                    except Exception as exc:
                        session.rollback()
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        continue
                    finally:
                        session.close()
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        done.append(i)
                        latencies.append(elapsed)

            pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
            for th in pool:
                th.start()
            for th in pool:
                th.join()
            results.put(
                {"pid": os.getpid(), "phase": phase, "done": done, "lat": latencies, "err": errors}
            )
            # The parent completes a capped phase's leftovers before the next phase starts.
            barrier.wait()
    finally:
        engine.dispose()


def _setup(
    factory: Any, database_url: str, jobs: int, rng: random.Random
) -> tuple[uuid.UUID, Plan, int]:
    from sqlalchemy import insert, select

    from app import accounts, wallet
    from app.models import Job, Wallet

    holds = [rng.randint(2_000, 20_000) for _ in range(jobs)]
    charges = [rng.randint(1, h) for h in holds]
    initial = sum(holds) * 2
    with factory() as session:
        account = accounts.create_account(session, "bench hot wallet")
        wallet_id = session.scalar(select(Wallet.id).where(Wallet.account_id == account.id))
        assert wallet_id is not None
        wallet.top_up(session, wallet_id, initial, "bench hot wallet credit")
        job_ids = [uuid.uuid4() for _ in range(jobs)]
        now = datetime.now(UTC)
        session.execute(
            insert(Job),
            [
                {
                    "id": job_ids[i],
                    "account_id": account.id,
                    "wallet_id": wallet_id,
                    "status": "quoting",
                    "model": "llama-3.1-8b",
                    "request": {"bench": "hot wallet"},
                    "performance_profile": "balanced",
                    "routing_strategy": "lowest_cost",
                    "max_output_tokens": 16,
                    "markup": "0.15",
                    "estimated_input_tokens": 10,
                    "expected_quotes": 1,
                    "hold_micros": holds[i],
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(jobs)
            ],
        )
        session.commit()
    return wallet_id, Plan(database_url, wallet_id, job_ids, holds, charges), initial


def run_hot_wallet(
    database_url: str,
    *,
    procs: int,
    threads: int,
    jobs: int,
    time_cap_s: float,
    seed: int = 7,
) -> dict[str, Any]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import sessionmaker

    from app import wallet
    from app.db import build_engine
    from app.models import LedgerEntry

    engine = build_engine(database_url, pool_size=2)
    factory = sessionmaker(engine, expire_on_commit=False)
    ctx = mp.get_context("spawn")
    children: list[Any] = []
    try:
        wallet_id, plan, initial = _setup(factory, database_url, jobs, random.Random(seed))
        counters = {phase: ctx.Value("q", 0) for phase in _PHASES}
        barrier = ctx.Barrier(procs + 1)
        results = ctx.Queue()
        children = [
            ctx.Process(
                target=_child,
                args=(plan, threads, time_cap_s, counters, barrier, results),
                daemon=True,
            )
            for _ in range(procs)
        ]
        for child in children:
            child.start()
        phases: dict[str, dict[str, Any]] = {}
        for phase in _PHASES:
            # Children import and connect first (untimed); then all start together.
            barrier.wait(timeout=120)
            started = time.perf_counter()
            reports = [results.get(timeout=time_cap_s + 120) for _ in range(procs)]
            elapsed = time.perf_counter() - started
            done = {i for r in reports for i in r["done"]}
            latencies = [v for r in reports for v in r["lat"]]
            rest = [i for i in range(jobs) if i not in done]
            if rest:  # a capped phase: finish it untimed, in one transaction
                with factory() as session:
                    for i in rest:
                        _OPS[phase](session, plan, i)
                    session.commit()
            phases[phase] = {
                "count": len(done),
                "rate": round(len(done) / elapsed, 1) if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 3),
                "latency_ms": summary(latencies),
                "errors": [e for r in reports for e in r["err"]][:20],
                "completed_untimed": len(rest),
            }
            barrier.wait(timeout=60)
        for child in children:
            child.join(timeout=30)

        with factory() as session:
            state = wallet.get_state(session, wallet_id)
            sums = wallet.ledger_sums(session, wallet_id)
            captures = session.scalar(
                select(func.count())
                .select_from(LedgerEntry)
                .where(LedgerEntry.wallet_id == wallet_id, LedgerEntry.kind == "capture")
            )
        invariants = {
            "balance_equals_ledger_sum": state.balance_micros == sums.balance_micros,
            "held_equals_ledger_held_sum": state.held_micros == sums.held_micros,
            "held_is_zero": state.held_micros == 0,
            "balance_non_negative": state.balance_micros >= 0,
            "balance_moved_by_charges": state.balance_micros == initial - sum(plan.charges),
            "one_capture_per_job": captures == jobs,
        }
        return {
            "procs": procs,
            "threads": threads,
            "jobs": jobs,
            "holds_per_s": phases["hold"]["rate"],
            "captures_per_s": phases["settle"]["rate"],
            "hold_latency_ms": phases["hold"]["latency_ms"],
            "settle_latency_ms": phases["settle"]["latency_ms"],
            "phases": phases,
            "final": {
                "balance_micros": state.balance_micros,
                "held_micros": state.held_micros,
                "ledger_balance_micros": sums.balance_micros,
                "ledger_held_micros": sums.held_micros,
            },
            "invariants": invariants,
            "invariants_ok": all(invariants.values()),
        }
    except (threading.BrokenBarrierError, queue.Empty) as exc:
        raise RuntimeError(f"hot wallet benchmark: a child process stalled ({exc!r})") from exc
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(timeout=5)
        engine.dispose()
