"""The Alembic migrations build exactly the schema the models describe, on PostgreSQL and on
SQLite (the zero-setup dev database)."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, inspect, text

from app.infra.db import get_engine
from app.infra.migrate import upgrade
from app.models import Base
from config.settings import ROOT

# The tables every version of the schema has; the models may add more.
CORE_TABLES = {
    "accounts",
    "api_keys",
    "wallets",
    "ledger_entries",
    "providers",
    "model_aliases",
    "offerings",
    "jobs",
}


def head_revision() -> str:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    return ScriptDirectory.from_config(cfg).get_current_head()


def schema_diffs(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, Base.metadata)


def test_postgres_at_head_matches_the_models(database):
    with get_engine().connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head_revision()
        assert schema_diffs(conn) == []


def test_postgres_has_the_partial_unique_indexes_and_checks(database):
    insp = inspect(get_engine())
    indexes = {ix["name"]: ix for ix in insp.get_indexes("ledger_entries")}
    for name, kind in [
        ("uq_ledger_capture_per_job", "capture"),
        ("uq_ledger_release_per_job", "release"),
    ]:
        assert indexes[name]["unique"]
        assert indexes[name]["column_names"] == ["job_id"]
        where = indexes[name]["dialect_options"]["postgresql_where"]
        assert f"'{kind}'" in str(where)
    checks = {c["name"] for c in insp.get_check_constraints("wallets")}
    assert checks == {
        "ck_wallet_balance_nonneg",
        "ck_wallet_held_nonneg",
        "ck_wallet_held_le_balance",
    }


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'flopex.sqlite3'}"


def test_fresh_sqlite_upgrades_to_head_and_matches_the_models(sqlite_url):
    upgrade(sqlite_url)
    upgrade(sqlite_url)  # a second run is a no-op

    engine = create_engine(sqlite_url)
    try:
        insp = inspect(engine)
        tables = set(insp.get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert tables >= CORE_TABLES
        ledger_indexes = {ix["name"]: ix for ix in insp.get_indexes("ledger_entries")}
        assert ledger_indexes["uq_ledger_capture_per_job"]["unique"]
        assert ledger_indexes["uq_ledger_release_per_job"]["unique"]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == (
                head_revision()
            )
            assert schema_diffs(conn) == []
    finally:
        engine.dispose()


def test_sqlite_enforces_the_wallet_checks(sqlite_url):
    upgrade(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO accounts (id, name, created_at) VALUES ('a', 'x', 0)"))
        with pytest.raises(Exception, match="CHECK constraint failed"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO wallets (id, account_id, currency, balance_micros, held_micros, "
                    "updated_at) VALUES ('w', 'a', 'USD', 5, 6, 0)"
                )
            )
    finally:
        engine.dispose()


@pytest.fixture
def scratch_postgres(database: str) -> Any:
    """An empty PostgreSQL database of its own and an Alembic config pointing at it."""
    import uuid

    from tests.conftest import PG_ADMIN_URL

    name = f"flopex_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = url
    cfg.attributes["configure_logging"] = False
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        yield engine, cfg
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgres_downgrades_to_base_and_upgrades_again(scratch_postgres):
    """Every migration's downgrade works too (0004 builds and drops its index CONCURRENTLY,
    outside the migration's transaction), on a scratch database."""
    from alembic import command

    engine, cfg = scratch_postgres
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert not schema_diffs(conn)
        assert "ix_jobs_webhook_owed" in {i["name"] for i in inspect(conn).get_indexes("jobs")}


def test_0004_runs_again_after_failing_half_way_on_postgres(scratch_postgres):
    """A release that failed while 0004 built its index (CONCURRENTLY, after the columns had
    committed) leaves the columns and an INVALID index at revision 0003; running the upgrade
    again completes it instead of failing on "column already exists"."""
    from alembic import command

    engine, cfg = scratch_postgres
    command.upgrade(cfg, "0003")
    with engine.connect() as conn:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN webhook_status VARCHAR(16)"))
        conn.execute(
            text("ALTER TABLE jobs ADD COLUMN webhook_attempted_at TIMESTAMP WITH TIME ZONE")
        )
        # What an interrupted CREATE INDEX CONCURRENTLY leaves (a lock timeout, a cancelled
        # release): the index exists, marked invalid (superuser-only catalog edit).
        conn.execute(text("CREATE UNIQUE INDEX ix_jobs_webhook_owed ON jobs (id)"))
        conn.execute(
            text(
                "UPDATE pg_index SET indisvalid = false "
                "WHERE indexrelid = 'ix_jobs_webhook_owed'::regclass"
            )
        )
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert not schema_diffs(conn)
        assert conn.scalar(
            text(
                "SELECT i.indisvalid AND NOT i.indisunique FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'ix_jobs_webhook_owed'"
            )
        )
