"""Failpoints: named places where a test can make the worker die as if the machine lost power.

Inactive unless ``FLOPEX_FAILPOINTS`` names them (comma-separated); used only by the crash tests
to SIGKILL a real worker at an exact step. A marker directory makes each failpoint fire once, so
the restarted worker gets through.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    active = os.environ.get("FLOPEX_FAILPOINTS")
    if not active or name not in active.split(","):
        return
    marker_dir = os.environ.get("FLOPEX_FAILPOINT_DIR")
    if marker_dir:
        try:
            fd = os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def failpoint_raise(name: str) -> None:
    """Like ``failpoint``, but the process survives: the step fails as if the database
    connection had died under it (an ``OperationalError``), every time it is reached."""
    active = os.environ.get("FLOPEX_FAILPOINTS")
    if not active or name not in active.split(","):
        return
    from sqlalchemy.exc import OperationalError

    raise OperationalError(f"failpoint {name}", None, ConnectionError("failpoint"))
