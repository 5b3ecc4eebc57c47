"""Optional sampling profiles of the web and worker processes under load, with py-spy.

py-spy is not a dependency of the project: ``--profile`` uses it when it is installed
(``.venv/bin/pip install py-spy``) and says so when it is not. Each process is sampled with
``--gil`` (only the thread holding the GIL, i.e. where Python spends CPU) and ``--nonblocking``
(the process is never paused), into py-spy's collapsed-stack "raw" format, which is summarised
here into the functions with the most samples.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def start_recording(
    py_spy: str, pids: dict[str, int], duration_s: float, out_dir: Path, rate: int = 200
) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for name, pid in pids.items():
        out = out_dir / f"{name}.txt"
        log = (out_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [
                py_spy, "record", "--pid", str(pid),
                "--duration", str(max(1, int(duration_s))),
                "--rate", str(rate), "--format", "raw", "--output", str(out),
                "--gil", "--nonblocking",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        running.append((name, out, proc))
    return running


def finish_recording(
    running: list[tuple[str, Path, subprocess.Popen[bytes]]], timeout_s: float
) -> dict[str, Path]:
    done = {}
    for name, out, proc in running:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if out.exists() and out.stat().st_size > 0:
            done[name] = out
    return done


def _short(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (pkg/file.py)' without the line or the venv prefix."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("lib/"):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    else:
        path = path.replace(str(ROOT) + "/", "")
    return f"{name} ({path})"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample counts per function, and inclusive per project function."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    project: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        for frame in {f for f in frames if _is_project(f)}:
            project[frame] += count

    def pct(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": fn, "samples": n, "pct": round(100.0 * n / max(1, total), 1)}
            for fn, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": pct(self_counts),
        "inclusive": pct(inclusive),
        "project_inclusive": pct(project),
    }


def _is_project(frame: str) -> bool:
    path = frame.rpartition(" (")[2]
    return path.startswith(("app/", "tasks/", "workers/", "config/"))
