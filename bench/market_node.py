"""Several sandbox providers in one process, for the simulated market of `make bench-routing`.

    python bench/market_node.py --configs /tmp/market-0.json     # what the benchmark runs
    python bench/market_node.py --market bench/market.toml --base-port 19101 --duration 600

``--configs`` takes a JSON list of ``SandboxConfig`` fields (drift included), each provider on a
free port. ``--market`` serves the whole market table (drifting from now, its schedules spread
over ``--duration`` seconds), provider i on ``--base-port + i`` if given: the defaults of
config/catalog.market.toml. Each provider prints ``sandbox <name> listening on <base_url>``, as
``python -m sandbox`` does. A sandbox mostly waits (latency, ttft, pacing), so a dozen share a
process and its GIL well. SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.market import load_market  # noqa: E402
from sandbox.server import SandboxConfig, SandboxProvider  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/market_node.py", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--configs", type=Path, help="JSON list of SandboxConfig fields")
    source.add_argument("--market", type=Path, help="a market table such as bench/market.toml")
    parser.add_argument("--duration", type=float, default=600.0, help="run length for --market")
    parser.add_argument("--base-port", type=int, default=0, help="provider i on this port + i")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.configs is not None:
        configs = [SandboxConfig(**fields) for fields in json.loads(args.configs.read_text())]
    else:
        configs = load_market(args.duration, time.time(), args.market).configs
    stop = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    providers: list[SandboxProvider] = []
    try:
        for i, config in enumerate(configs):
            port = args.base_port + i if args.base_port else 0
            providers.append(SandboxProvider(config, port=port).start())
            print(f"sandbox {config.name} listening on {providers[-1].base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for provider in providers:
            provider.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
