"""Engine and session factory, independent of Flask so that Celery tasks and the CLI share it.

One engine per process, created lazily; ``dispose_engine()`` is called after a fork so that
children never share the parent's sockets.
"""

from __future__ import annotations

import _socket
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, Update, create_engine, event, exc, func, literal, text
from sqlalchemy.orm import Session, sessionmaker

from config.settings import get_settings

_U = TypeVar("_U", bound=Update)

_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    # WAL lets the web and worker processes read while one writes; busy_timeout makes writers
    # queue instead of failing with "database is locked".
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# libpq settings for every PostgreSQL connection. connect_timeout: a server that accepts TCP and
# never answers fails a new connection within seconds. Keepalives and tcp_user_timeout: a
# server that vanished (host down, network partition) fails a pooled connection's next
# statement within about 30 s, and an idle one within about a minute, instead of holding the
# thread for the kernel's retransmission timeout (~15 minutes). Neither cuts a long query
# short: a live server acknowledges the query and answers keepalives while it runs.
PG_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def build_engine(url: str, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pool_pre_ping: it costs a `SELECT 1` round trip on every checkout (5 of 9 transactions
    # per request in the benchmark). Instead, a connection whose server closed it while it sat
    # in the pool (a restart, pg_terminate_backend, an idle timeout) is found without a round
    # trip and replaced before anything is sent on it (_reject_closed). One that dies while in
    # use fails its statement: the request answers 503 with Retry-After (app/api/errors.py) and
    # the task is retried (every task is idempotent).
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args=PG_CONNECT_ARGS if url.startswith("postgresql") else {},
    )
    event.listen(engine, "checkin", _end_autocommit)
    if url.startswith("postgresql"):
        event.listen(engine, "checkin", _mark_idle)
        event.listen(engine, "checkout", _reject_closed)
    return engine


def _mark_idle(_dbapi_conn, record) -> None:  # type: ignore[no-untyped-def]
    record.info["flopex_idle"] = True


def _reject_closed(dbapi_conn, record, _proxy) -> None:  # type: ignore[no-untyped-def]
    """Raises DisconnectionError (the pool then discards the connection and checks out another,
    transparently, once) for a pooled connection its server has closed while it was idle. A
    connection just opened is not checked: it has just answered.

    A connection at rest in the pool has nothing to read: the server speaks only when asked. If
    its socket has something (the server's FATAL "terminating connection" message, or the end
    of the stream), the server is gone from it. One non-blocking peek, no round trip: pre-ping's
    `SELECT 1` costs a round trip per checkout (measured in docs/performance.md). The peek is
    made on the descriptor through the C-level socket module, which gevent does not patch (its
    socket would wait instead of answering at once)."""
    if not record.info.pop("flopex_idle", False):
        return
    if getattr(dbapi_conn, "closed", 0):
        raise exc.DisconnectionError("connection closed")
    sock = _socket.socket(fileno=dbapi_conn.fileno())
    try:
        sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    except BlockingIOError:
        return  # nothing to read: alive
    except OSError as err:
        raise exc.DisconnectionError(f"connection unusable: {err}") from err
    finally:
        sock.detach()  # the descriptor stays psycopg2's
    raise exc.DisconnectionError("the server closed the connection while it was idle")


def _end_autocommit(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # autocommit() switches the DBAPI connection itself; the pool takes it back as it lent it.
    if getattr(dbapi_conn, "autocommit", False):
        dbapi_conn.autocommit = False


def probe_database(url: str, timeout_s: float) -> None:
    """Raises unless the database at ``url`` answers ``SELECT 1`` within ``timeout_s``: a bound
    on the whole check, whatever the server does (refuses, accepts and hangs, stops mid-query).

    PostgreSQL: a new connection of its own, driven asynchronously so that every wait is a
    ``select`` with the remaining time; a pooled connection could block on a hung server for as
    long as the kernel keeps the socket (readiness probes are frequent: each would hold a web
    thread). Other databases: the pooled engine."""
    if not url.startswith("postgresql"):
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return
    import selectors
    import time

    import psycopg2
    import psycopg2.extensions
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    params = {
        k: v
        for k, v in parsed.translate_connect_args(database="dbname", username="user").items()
        if v is not None
    }
    params.update({k: v for k, v in parsed.query.items() if isinstance(v, str)})
    deadline = time.monotonic() + timeout_s
    # (The host name, if it is one, is resolved before the first poll: a resolver that hangs is
    # not covered by the deadline. Deployments name PostgreSQL by address or a local resolver.)
    conn = psycopg2.connect(**params, connect_timeout=max(1, int(timeout_s)), async_=True)

    def wait() -> None:
        # selectors, not select.select: a busy web process's descriptors pass 1024.
        with selectors.DefaultSelector() as selector:
            while True:
                state = conn.poll()
                if state == psycopg2.extensions.POLL_OK:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer from the database within {timeout_s} s")
                events = (
                    selectors.EVENT_READ
                    if state == psycopg2.extensions.POLL_READ
                    else selectors.EVENT_WRITE
                )
                selector.register(conn.fileno(), events)
                selector.select(remaining)
                selector.unregister(conn.fileno())

    try:
        wait()
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        wait()
        if cursor.fetchone() != (1,):
            raise RuntimeError("SELECT 1 did not answer 1")
    finally:
        conn.close()


def get_engine() -> Engine:
    global _engine, _factory
    if _engine is None:
        settings = get_settings()
        _engine = build_engine(settings.database_url, settings.db_pool_size)
        _factory = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def session_factory() -> sessionmaker[Session]:
    get_engine()
    assert _factory is not None
    return _factory


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def defer_durability(session: Session) -> None:
    """This transaction's COMMIT returns without waiting for its WAL flush (PostgreSQL's
    ``synchronous_commit = off``, for this transaction only), so a hot wallet row is unlocked
    after the COMMIT round trip rather than after an fsync: the one wallet row every request of
    an account touches is then held for well under a millisecond (docs/performance.md).

    Atomicity and isolation are unchanged. Durability is not given up, only moved: the caller
    must call :func:`make_durable` before anything outside the database acts on the commit (a
    response, a signal, a provider call). A later durable commit on any connection makes this
    one durable too, because PostgreSQL flushes its WAL in order. A no-op on SQLite.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_DEFER)


def autocommit(session: Session) -> bool:
    """Runs the session's next transaction in autocommit (PostgreSQL): each statement is then
    its own transaction, committed by the server as the statement ends. For a unit of work of
    one statement this saves psycopg2's separate BEGIN and COMMIT round trips, and no lock the
    statement takes is held across a round trip to this process. The setting ends with the
    session's transaction (the pool resets the connection on checkin).

    Returns True when the session's next statement will be its own transaction: it had no
    transaction open (switched now) or is already in autocommit. False, changing nothing, when
    a transaction is open, on a connection the session does not own, and on SQLite."""
    bind = session.get_bind()
    # A session bound to a Connection (a test's outer transaction) does not own it.
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
        return False
    opened = session.in_transaction()
    dbapi_connection = session.connection().connection.dbapi_connection
    if opened:
        return bool(getattr(dbapi_connection, "autocommit", False))
    # The DBAPI connection's own switch (psycopg2 then sends no BEGIN), not SQLAlchemy's
    # AUTOCOMMIT isolation level: resetting that level when the connection goes back to the
    # pool costs psycopg2 an extra `SET default_transaction_isolation` round trip later on.
    # The pool switches it back on checkin (_end_autocommit).
    dbapi_connection.autocommit = True  # type: ignore[union-attr]
    return True


class Commit(enum.Enum):
    """How a write commits: one explicit choice instead of flags (PostgreSQL; on other
    databases every choice is JOINED).

    JOINED: in the session's transaction, durable when the caller commits it.
    JOINED_DEFERRED: in the session's transaction, whose commit will not wait for its WAL flush
    (``defer_durability``).
    ALONE: its own transaction (the session in autocommit), committed by the server as the
    statement ends, so no lock it takes is held across a round trip to this process; JOINED
    when the session already has a transaction open.
    ALONE_DEFERRED: ALONE, and its commit does not wait for the WAL flush (the setting travels
    in the statement, ``without_flush_wait``); JOINED_DEFERRED when a transaction is open.

    After either deferred choice the caller owes a ``make_durable`` before anything outside the
    database (a response, a signal, a provider call) acts on the write."""

    JOINED = "joined"
    JOINED_DEFERRED = "joined_deferred"
    ALONE = "alone"
    ALONE_DEFERRED = "alone_deferred"


def begin(session: Session, commit: Commit) -> bool:
    """Prepares the session for a write committed as ``commit``; True when the statement itself
    must carry ``without_flush_wait`` (it is its own, deferred, transaction)."""
    if commit is Commit.JOINED:
        return False
    if commit is Commit.JOINED_DEFERRED:
        defer_durability(session)
        return False
    alone = autocommit(session)
    if commit is Commit.ALONE_DEFERRED:
        if alone:
            return True
        defer_durability(session)
    return False


def without_flush_wait(stmt: _U) -> _U:
    """``stmt``, run as its own (autocommit) transaction, commits without waiting for its WAL
    flush: the setting is made inside the statement (``set_config(..., is_local => true)``),
    lasts until that transaction has committed, and is evaluated only for a row the WHERE
    found. As with :func:`defer_durability`, the caller owes a :func:`make_durable` before
    anything outside the database acts on the write."""
    return stmt.where(func.set_config(literal("synchronous_commit"), literal("off"), True) == "off")


def make_durable(session: Session) -> None:
    """Returns once every commit made so far on this server is on disk: a transaction that
    writes WAL commits durably, and its flush covers all WAL written before it. The write is a
    transactional logical-decoding message (no table, no row lock, nothing to vacuum); a
    transaction that only took an id would not be flushed. Costs one small transaction;
    concurrent flushes share one fsync (group commit): one round trip when the session has no
    transaction open (autocommit). A no-op on SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        autocommit(session)
        session.execute(_BARRIER)
        session.commit()


_DEFER = text("SET LOCAL synchronous_commit TO off")
_BARRIER = text("SELECT pg_logical_emit_message(true, 'flopex', 'durable')")


def dispose_engine() -> None:
    global _engine, _factory
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _factory = None
