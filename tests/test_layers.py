"""Layers point one way (docs/architecture.md): read every module's imports (top level and
inside functions) with ``ast`` and check that none runs back up.

config <- app (domain and infrastructure) <- app/api (HTTP), tasks (Celery) <- workers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The HTTP layer (the API and the console) and the application factory are the only places that
# know Flask.
FLASK_ALLOWED = {"app/__init__.py", "app/extensions.py", "app/json.py"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# config/gunicorn.conf.py and config/gunicorn_worker.py are the web server's bootstrap (fork
# hooks, its worker class), the web's counterpart of workers/: above the app, not below it.
_SERVER_BOOTSTRAP = {"gunicorn.conf.py", "gunicorn_worker.py"}


@pytest.mark.parametrize(
    "path", [p for p in _modules("config") if p.name not in _SERVER_BOOTSTRAP], ids=_rel
)
def test_config_imports_nothing_of_ours(path: Path) -> None:
    assert not {n for n in _imports(path) if _under(n, "app") or _under(n, "tasks")}


@pytest.mark.parametrize("path", _modules("app"), ids=_rel)
def test_the_app_never_imports_tasks_or_workers(path: Path) -> None:
    bad = {n for n in _imports(path) if _under(n, "tasks") or _under(n, "workers")}
    assert not bad


@pytest.mark.parametrize("path", _modules("app"), ids=_rel)
def test_only_the_http_layer_knows_flask(path: Path) -> None:
    rel = _rel(path)
    if rel.startswith(("app/api/", "app/console/")) or rel in FLASK_ALLOWED:
        return
    assert not {n for n in _imports(path) if _under(n, "flask") or _under(n, "app.api")}


@pytest.mark.parametrize(
    "path",
    [ROOT / "app" / n for n in ("wallet.py", "money.py", "pricing.py", "fencing.py", "db.py")],
    ids=_rel,
)
def test_money_and_infrastructure_never_reach_into_the_job_package(path: Path) -> None:
    assert not {n for n in _imports(path) if _under(n, "app.jobs")}


def test_cancelling_does_not_depend_on_execution() -> None:
    assert not {n for n in _imports(ROOT / "app/jobs/cancel.py") if _under(n, "app.jobs.execution")}


@pytest.mark.parametrize("path", _modules("app", "tasks"), ids=_rel)
def test_the_celery_app_is_passed_in_never_taken_from_current_app(path: Path) -> None:
    assert "celery.current_app" not in _imports(path)
