"""Run a sandbox provider from the command line: ``python -m sandbox --name alpha ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from sandbox.server import FAULT_SCOPES, FAULTS, STREAM_FAULTS, SandboxConfig, SandboxProvider

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="Serve a fake OpenAI-compatible LLM provider with controllable faults.",
    )
    parser.add_argument("--name", required=True, help="provider name, e.g. alpha")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--output-tokens", type=int, default=24)
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL_ID",
        help=f"model id to serve (repeatable; default {DEFAULT_MODEL})",
    )
    parser.add_argument("--price-input", default="0.10", help="USD per million input tokens")
    parser.add_argument("--price-output", default="0.20", help="USD per million output tokens")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument("--fault", choices=sorted(FAULTS), default=None)
    parser.add_argument("--fault-scope", choices=sorted(FAULT_SCOPES), default="chat")
    parser.add_argument("--fault-count", type=int, default=None)
    _add_market_arguments(parser)
    return parser


def _json_argument(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _add_market_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ttft-ms", type=int, default=0, help="time to first token")
    parser.add_argument(
        "--tokens-per-s", type=float, default=0.0, help="generation speed (0: instant)"
    )
    parser.add_argument(
        "--failure-rate", type=float, default=0.0, help="probability of a fault per chat request"
    )
    parser.add_argument("--failure-fault", choices=sorted(FAULTS), default="error")
    parser.add_argument("--seed", type=int, default=0, help="seeds the failure draws")
    parser.add_argument("--stream-fault", choices=sorted(STREAM_FAULTS), default=None)
    parser.add_argument("--stream-fault-after-tokens", type=int, default=0)
    parser.add_argument("--stream-fault-count", type=int, default=None)
    parser.add_argument(
        "--drift-schedule",
        type=_json_argument,
        default=None,
        help='JSON list, e.g. \'[{"at_s": 60, "tokens_per_s": 20}]\'',
    )
    parser.add_argument(
        "--drift-walk",
        type=_json_argument,
        default=None,
        help='JSON object, e.g. \'{"step_s": 1, "seed": 7, "ttft_ms": 0.1, "tokens_per_s": 0.1}\'',
    )
    parser.add_argument(
        "--drift-epoch", type=float, default=None, help="unix time drift counts from"
    )


def _market_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ttft_ms": args.ttft_ms,
        "tokens_per_s": args.tokens_per_s,
        "failure_rate": args.failure_rate,
        "failure_fault": args.failure_fault,
        "seed": args.seed,
        "stream_fault": args.stream_fault,
        "stream_fault_after_tokens": args.stream_fault_after_tokens,
        "stream_fault_count": args.stream_fault_count,
        "drift_schedule": args.drift_schedule,
        "drift_walk": args.drift_walk,
        "drift_epoch": args.drift_epoch,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    config = SandboxConfig(
        name=args.name,
        models=dict.fromkeys(args.models or [DEFAULT_MODEL], args.name),
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        api_key=args.api_key,
        price_input_per_million_usd=args.price_input,
        price_output_per_million_usd=args.price_output,
        fault=args.fault,
        fault_scope=args.fault_scope,
        fault_count=args.fault_count,
    )
    config = dataclasses.replace(config, **_market_fields(args))
    try:
        provider = SandboxProvider(config, host=args.host, port=args.port)
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before binding so a supervisor that signals right after reading
    # the "listening" line never hits the default (traceback-printing) handler.
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)

    provider.start()
    try:
        print(f"sandbox {config.name} listening on {provider.base_url}", flush=True)
        # A bounded wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        provider.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
