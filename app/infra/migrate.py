"""Run Alembic migrations from code (CLI, dev launcher, tests)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from config.settings import ROOT


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    if database_url:
        cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logging"] = False
    command.upgrade(cfg, revision)
