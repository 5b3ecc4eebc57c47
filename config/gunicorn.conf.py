"""gunicorn settings for the web process (``gunicorn -c config/gunicorn.conf.py 'app:create_app()'``).

gevent workers (docs/architecture.md, "The web server"): a synchronous request waiting on its
job, an open stream, an idle or slow client each cost a greenlet, not one of a fixed number of
threads.
"""

import os

from config.gunicorn_worker import install_json_errors
from config.settings import get_settings

# Parsed and checked by the settings (a bad value stops gunicorn with the variable's name), not
# read again here with a parser of our own.
_settings = get_settings()
bind = f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "config.gunicorn_worker.FlopexGeventWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Open connections per worker process (greenlets); past it, new ones wait in the listen backlog.
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "1000"))
# A sync request may legitimately wait up to FLOPEX_SYNC_TIMEOUT_S for its provider.
timeout = int(_settings.sync_timeout_s) + 30
graceful_timeout = 30
# Must stay above 0: gunicorn bounds header arrival only on its keep-alive path
# (config/gunicorn_worker.py, WEB_HEADER_TIMEOUT_S).
keepalive = 5
# A request line past 8 KB is answered 414, a header line past 8 KB or 100 headers 431 (JSON).
limit_request_line = 8190
limit_request_field_size = 8190
# Each worker accepts on its own socket: the kernel spreads connections evenly between them.
reuse_port = True
max_requests = int(os.environ.get("WEB_MAX_REQUESTS", "0"))
max_requests_jitter = 100
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
errorlog = "-"
loglevel = _settings.log_level.lower()
# Each worker imports the app itself, after gevent has patched the standard library in that
# process (config/gunicorn_worker.py): modules imported before the patch would keep blocking
# sockets and locks. (Patching the master instead would patch every process that reads this
# file.)
preload_app = False
# gunicorn's own error answers (414, 431, 400) as JSON in the API's error shape.
install_json_errors()


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    # Sockets opened in the master (database pool, Redis pool) must not be shared by children.
    # Only if the app was preloaded (`--preload`): importing it here would import it before
    # gevent patches the worker.
    import sys

    if "app.infra.db" in sys.modules:
        sys.modules["app.infra.db"].dispose_engine()
    if "app.infra.redis_client" in sys.modules:
        sys.modules["app.infra.redis_client"].reset_redis()


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from app.infra.metrics import mark_process_dead

    mark_process_dead(worker.pid)
