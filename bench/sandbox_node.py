"""One sandbox provider in its own process, for the benchmark: ``python -m sandbox`` plus a record
of every chat completion's own service time.

The sandbox sends ``X-Sandbox-Service-Ms`` (the time it spent on the request, injected latency
included) to its caller, the Flopex worker, which does not pass it on. So that the benchmark can
subtract it per request, this wrapper also appends ``<tag> <service_ms>`` to ``--record`` for each
chat completion whose prompt carries a ``[bench:<tag>]`` marker (the load generator puts a unique
one in every request).

Running the sandboxes in processes of their own keeps them from competing with the load
generator for the GIL.

    python bench/sandbox_node.py --record /tmp/p01.rec --name p01 --latency-ms 0
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sandbox import server as sandbox_server  # noqa: E402
from sandbox.__main__ import main as sandbox_main  # noqa: E402

TAG = re.compile(rb"\[bench:([A-Za-z0-9_.-]{1,64})\]")
SERVICE_HEADER = "X-Sandbox-Service-Ms"


def install_recorder(out: IO[str]) -> bool:
    """Wrap the sandbox's request handler so that chat completions are recorded; False (and the
    benchmark falls back to the worker's own timing) if the sandbox internals have changed."""
    handler: Any = getattr(sandbox_server, "_Handler", None)
    needed = ("_dispatch", "_chat", "send_header")
    if handler is None or not all(hasattr(handler, name) for name in needed):
        return False
    lock = threading.Lock()
    original_dispatch = handler._dispatch
    original_chat = handler._chat
    original_send_header = handler.send_header

    def _dispatch(self: Any, method: str) -> None:
        # One handler instance serves every request of a keep-alive connection.
        self._bench_body = None
        original_dispatch(self, method)

    def _chat(self: Any, body: bytes) -> None:
        self._bench_body = body
        original_chat(self, body)

    def send_header(self: Any, keyword: str, value: str) -> None:
        if keyword == SERVICE_HEADER:
            body = getattr(self, "_bench_body", None)
            match = TAG.search(body) if body else None
            if match is not None:
                with lock:
                    out.write(f"{match.group(1).decode()} {value}\n")
        original_send_header(self, keyword, value)

    handler._dispatch = _dispatch
    handler._chat = _chat
    handler.send_header = send_header
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--record", required=True, help="file to append '<tag> <ms>' lines to")
    args, rest = parser.parse_known_args(argv)
    with open(args.record, "a", buffering=1) as out:
        if not install_recorder(out):
            print("sandbox_node: cannot hook the sandbox handler; not recording", flush=True)
        return sandbox_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
