"""Compare this working tree with another commit, runs interleaved: A, B, B, A, A, B, ...

The machine this is developed on drifts: one commit measured 36-49 req/s at c1 within an hour,
so two `make bench` runs taken at different times cannot tell apart changes of less than ~20 %.
Running the two versions back to back, several times, puts them under the same conditions.

    .venv/bin/python bench/compare.py 8e06884              # 3 pairs, sync scenarios at c1/16/64
    .venv/bin/python bench/compare.py HEAD~3 --pairs 5 --wallet

The other commit is checked out in a temporary git worktree (removed at the end) and run with
this tree's virtualenv, so it must not need dependencies this tree lacks. Each run is a plain
``bench/run.py`` (sandbox 0 ms, ``--duration`` seconds per scenario; ``--wallet`` adds the
hot-wallet benchmark); its JSON lands in ``bench/results/compare-<stamp>/``. The table lists
every run's numbers side by side, not an average: the spread is part of the answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def _run(
    tree: Path, out: Path, duration: float, wallet: bool, extra: list[str] | None = None
) -> dict[str, Any]:
    skip = "fanout,async,census" + ("" if wallet else ",wallet")
    before = set(out.glob("*.json"))
    argv = [
        sys.executable,
        "bench/run.py",
        "--duration", str(duration),
        "--concurrency", "1,16,64",
        "--latencies", "0",
        "--skip", skip,
        "--output", str(out),
        *(extra or []),
    ]  # fmt: skip
    subprocess.run(argv, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    (new,) = set(out.glob("*.json")) - before
    return dict(json.loads(new.read_text()))


def _row(result: dict[str, Any]) -> dict[str, str]:
    cells = {}
    for scenario in result.get("sync", []):
        conc = scenario["concurrency"]
        overhead = (scenario.get("analysis") or {}).get("overhead_ms") or {}
        cpu = (scenario.get("cpu_ms_per_request") or {}).get("total")
        cells[f"c{conc} req/s"] = f"{scenario['rps']}"
        cells[f"c{conc} ovh p50"] = f"{overhead.get('p50')}"
        cells[f"c{conc} cpu ms"] = f"{cpu}"
    hot = result.get("hot_wallet")
    if hot:
        cells["captures/s"] = f"{hot.get('captures_per_s')}"
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ref", help="the commit to compare this working tree with")
    p.add_argument("--pairs", type=int, default=3, help="how many A/B pairs (3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per scenario (6)")
    p.add_argument("--wallet", action="store_true", help="also run the hot-wallet benchmark")
    p.add_argument("--db-name", default=None, help="bench/run.py's --db-name (a machine shared")
    p.add_argument("--redis-url", default=None, help="with other benchmarks needs its own)")
    p.add_argument(
        "--wait-idle",
        default=None,
        help="bench/run.py's --wait-idle (60: how long to wait for quiet)",
    )
    args = p.parse_args(argv)

    commit = _git("rev-parse", "--short", args.ref)
    out = ROOT / "bench" / "results" / f"compare-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    out.mkdir(parents=True)
    rows: list[tuple[str, dict[str, str]]] = []
    with tempfile.TemporaryDirectory(prefix="flopex-compare-") as tmp:
        other = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(other), commit)
        try:
            for i in range(args.pairs):
                # A B, then B A: a run that follows another (a checkpoint of its WAL, a warm
                # cache) is not always the same version's.
                order = ((commit, other), ("this tree", ROOT))
                for name, tree in order if i % 2 == 0 else order[::-1]:
                    print(f"compare: pair {i + 1}/{args.pairs}, {name}", flush=True)
                    extra = [
                        *(["--db-name", args.db_name] if args.db_name else []),
                        *(["--redis-url", args.redis_url] if args.redis_url else []),
                        *(["--wait-idle", args.wait_idle] if args.wait_idle else []),
                    ]
                    result = _run(tree, out, args.duration, args.wallet, extra)
                    rows.append((name, _row(result)))
        finally:
            _git("worktree", "remove", "--force", str(other))

    columns = list(rows[0][1])
    widths = [max(len("run"), *(len(n) for n, _ in rows))] + [
        max(len(c), *(len(r.get(c, "")) for _, r in rows)) for c in columns
    ]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(["run", *columns], widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for name, cells in rows:
        values = [name, *(cells.get(c, "") for c in columns)]
        print("  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)))
    print(f"\nJSON of every run in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
