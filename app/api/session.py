"""One database session per request, closed at teardown."""

from __future__ import annotations

from flask import Flask, g
from sqlalchemy.orm import Session

from app.db import session_factory


def db() -> Session:
    session: Session | None = g.get("db")
    if session is None:
        session = g.db = session_factory()()
    return session


def init_session(app: Flask) -> None:
    @app.teardown_appcontext
    def _close(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()
