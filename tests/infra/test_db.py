"""app/infra/db.py: a transaction may commit without waiting for its fsync, and make_durable() waits
for every such commit before anything outside the database acts on it."""

from __future__ import annotations

from sqlalchemy import text

from app.infra.db import autocommit, defer_durability, make_durable, session_factory


def _synchronous_commit(session) -> str:  # type: ignore[no-untyped-def]
    return session.execute(text("SHOW synchronous_commit")).scalar_one()


def test_deferred_durability_applies_to_one_transaction_only(database):
    session = session_factory()()
    try:
        assert _synchronous_commit(session) == "on"
        defer_durability(session)
        assert _synchronous_commit(session) == "off"
        session.commit()
        # A pooled connection must not carry the setting into the next transaction.
        assert _synchronous_commit(session) == "on"
        session.rollback()
    finally:
        session.close()


def test_make_durable_flushes_the_wal_past_a_deferred_commit(database):
    session = session_factory()()
    try:
        defer_durability(session)
        first = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        session.commit()
        written = session.execute(text("SELECT pg_current_wal_insert_lsn()::text")).scalar_one()
        session.commit()
        make_durable(session)
        # The barrier took a transaction id of its own (so its commit flushed the WAL), left no
        # transaction open, and the deferred commit is now on disk.
        assert not session.in_transaction()
        after = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        assert after >= first + 2
        flushed = session.execute(
            text("SELECT pg_current_wal_flush_lsn() >= CAST(:lsn AS pg_lsn)"), {"lsn": written}
        ).scalar_one()
        assert flushed is True
        session.rollback()
    finally:
        session.close()


def test_autocommit_makes_each_statement_its_own_transaction_until_the_session_commits(database):
    session = session_factory()()
    try:
        assert autocommit(session) is True
        first = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        second = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        assert second > first  # no transaction spans the two statements
        assert autocommit(session) is True  # still its own transaction per statement
        session.commit()
        # The pooled connection is back to normal transactions.
        session.execute(text("SELECT 1"))
        assert autocommit(session) is False  # a transaction is open: nothing changes
        a = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        b = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        assert a == b
        session.rollback()
    finally:
        session.close()


def test_autocommit_leaves_a_session_bound_to_someone_elses_connection_alone(database):
    from sqlalchemy.orm import Session

    from app.infra.db import get_engine

    with get_engine().connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection)
        assert autocommit(session) is False
        a = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        b = session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one()
        assert a == b  # still the outer transaction
        session.close()
        outer.rollback()


def test_pooled_connections_detect_a_vanished_server(database):
    """Every PostgreSQL connection carries keepalives and a TCP user timeout (app.infra.db
    PG_CONNECT_ARGS), so a partitioned server fails a statement instead of hanging a thread."""
    session = session_factory()()
    try:
        dsn = session.connection().connection.dbapi_connection.get_dsn_parameters()
    finally:
        session.close()
    assert dsn["keepalives"] == "1" and dsn["keepalives_idle"] == "30"
    assert dsn["keepalives_count"] == "3" and dsn["tcp_user_timeout"] == "30000"


def test_a_pooled_connection_closed_while_idle_is_replaced_transparently(database):
    """pg_terminate_backend on a connection resting in the pool: the next checkout notices
    (without a round trip) and hands out a new connection; the statement never fails."""
    from sqlalchemy import create_engine, text

    from app.infra.db import build_engine
    from tests.conftest import PG_ADMIN_URL

    engine = build_engine(database, pool_size=1)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            # The server has ended it once it no longer lists it.
            while conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": first}
            ).scalar_one():
                pass
        with engine.connect() as conn:
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert second != first
    finally:
        engine.dispose()
        admin.dispose()
