"""The result file, the printed tables and the verdict against the targets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Targets (2 cores, everything on one machine, synchronous requests; sandbox provider at 0 ms
# unless named): the quote board's issue (18), which replaced the first performance card's.
TARGETS = {
    "overhead_p50_c1_ms": 8.0,
    "overhead_p99_c1_ms": 20.0,
    "overhead_p50_c1_60ms_ms": 10.0,
    "rps_c64": 150.0,
    "errors_c64": 0,
    "p99_c64_ms": 500.0,
    "async_submit_p50_ms": 3.0,
    "fanout10_added_ms": 3.0,
    "hot_wallet_captures_per_s": 1000.0,
    "web_rss_mb": 120.0,
    "worker_rss_mb": 120.0,
    # "No growth over a 10-minute soak": within 5 MB, the allocator's noise (--soak 600).
    "soak_rss_growth_mb": 5.0,
}


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gb": None if mem_kb is None else round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": len(status.splitlines()) if status else 0,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# -- printing ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def join(values: list[str]) -> str:
        # The first column is a label: left-aligned; the rest are numbers.
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    return "\n".join([join(headers), join(["-" * w for w in widths]), *map(join, cells)])


def sync_table(scenarios: list[dict[str, Any]]) -> str:
    rows = []
    for s in scenarios:
        a = s["analysis"]
        rows.append(
            [
                s["sandbox_latency_ms"],
                s["concurrency"],
                s["rps"],
                s["ok"],
                s["error_count"],
                a["e2e_ms"]["p50"],
                a["e2e_ms"]["p90"],
                a["e2e_ms"]["p99"],
                a["overhead_ms"]["p50"],
                a["overhead_ms"]["p99"],
                a["stages_ms"]["quote"]["p50"],
                s["cpu_ms_per_request"].get("total"),
                s["cpu"]["machine_busy_pct"],
                (s.get("peak_rss_mb") or {}).get("web"),
                (s.get("peak_rss_mb") or {}).get("worker"),
            ]
        )
    return table(
        [
            "sandbox ms", "conc", "req/s", "ok", "errors", "p50 ms", "p90 ms", "p99 ms",
            "ovh p50", "ovh p99", "quote p50", "cpu ms/req", "busy %", "web MB", "worker MB",
        ],
        rows,
    )  # fmt: skip


def stage_table(scenarios: list[dict[str, Any]]) -> str:
    rows = []
    for s in scenarios:
        st = s["analysis"]["stages_ms"]
        cpu = s["cpu_ms_per_request"]
        rows.append(
            [
                s["sandbox_latency_ms"],
                s["concurrency"],
                *(
                    st[k]["p50"]
                    for k in ("submit", "quote", "route", "provider", "settle", "respond")
                ),
                cpu.get("web"),
                cpu.get("worker"),
                cpu.get("postgres"),
                cpu.get("redis"),
                cpu.get("sandboxes"),
                cpu.get("loadgen"),
                s["cpu"].get("other_cores"),
            ]
        )
    return table(
        [
            "sandbox ms", "conc", "submit", "quote", "route", "provider", "settle", "respond",
            "cpu web", "worker", "pg", "redis", "sandbox", "loadgen", "other cores",
        ],
        rows,
    )  # fmt: skip


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value, pass/fail and the factor by which it is missed."""
    by_key = {(s["sandbox_latency_ms"], s["concurrency"]): s for s in results.get("sync", [])}
    c1, c64 = by_key.get((0, 1)), by_key.get((0, 64))
    c1_60 = by_key.get((60, 1))
    fan = {f["providers"]: f for f in results.get("fanout", [])}
    mem = results.get("memory", {})
    web_peaks = [m.get("peak_mb") for m in mem.get("web_workers", [])] + [
        (mem.get("web_master") or {}).get("peak_mb")
    ]
    web_peak = max((v for v in web_peaks if v is not None), default=None)
    worker_peak = (mem.get("worker") or {}).get("peak_mb")
    wallet = results.get("hot_wallet") or {}
    asyn = results.get("async") or {}
    soak = results.get("soak") or {}
    soak_growth = None
    if soak.get("growth_mb") and None not in soak["growth_mb"].values():
        soak_growth = max(soak["growth_mb"].values())

    def get(scenario: dict[str, Any] | None, *path: str) -> Any:
        value: Any = scenario
        for key in path:
            if value is None:
                return None
            value = value.get(key)
        return value

    fan10_added = get(fan.get(10), "added_over_slowest_ms", "p50")
    captures = wallet.get("captures_per_s") if wallet.get("invariants_ok") else None
    checks = [
        ("added overhead p50 @ c1 (ms)", get(c1, "analysis", "overhead_ms", "p50"), "<=", "overhead_p50_c1_ms"),
        ("added overhead p99 @ c1 (ms)", get(c1, "analysis", "overhead_ms", "p99"), "<=", "overhead_p99_c1_ms"),
        ("added overhead p50 @ c1, 60 ms (ms)", get(c1_60, "analysis", "overhead_ms", "p50"), "<=",
         "overhead_p50_c1_60ms_ms"),
        ("successful req/s @ c64", get(c64, "rps"), ">=", "rps_c64"),
        ("errors @ c64", get(c64, "error_count"), "<=", "errors_c64"),
        ("p99 latency @ c64 (ms)", get(c64, "analysis", "e2e_ms", "p99"), "<=", "p99_c64_ms"),
        ("async submit p50 (ms)", get(asyn, "submit_ms", "p50"), "<=", "async_submit_p50_ms"),
        ("fan-out 10 providers over slowest quote p50 (ms)", fan10_added, "<=", "fanout10_added_ms"),
        ("hot wallet captures/s (invariants ok)", captures, ">=", "hot_wallet_captures_per_s"),
        ("web peak RSS per process (MB)", web_peak, "<=", "web_rss_mb"),
        ("worker peak RSS (MB)", worker_peak, "<=", "worker_rss_mb"),
        ("RSS growth over the soak (MB, --soak)", soak_growth, "<=", "soak_rss_growth_mb"),
    ]  # fmt: skip
    out = []
    for label, value, op, key in checks:
        target = TARGETS[key]
        if value is None:
            ok, factor = False, None
        elif op == "<=":
            ok = value <= target
            factor = None if target == 0 else round(value / target, 2)
        else:
            ok = value >= target
            factor = round(target / value, 2) if value else None
        out.append(
            {
                "target": label,
                "goal": f"{op} {target}",
                "measured": value,
                "pass": ok,
                "miss_x": factor,
            }
        )
    return out


def verdict_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["target", "goal", "measured", "result", "x target"],
        [
            [
                r["target"],
                r["goal"],
                r["measured"],
                "PASS" if r["pass"] else ("n/a" if r["measured"] is None else "MISS"),
                r["miss_x"],
            ]
            for r in rows
        ],
    )
