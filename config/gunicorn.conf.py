"""gunicorn settings for the web process (``gunicorn -c config/gunicorn.conf.py 'app:create_app()'``).

Synchronous requests block while their job runs, so each process serves many threads: a thread
waiting on a job costs a little memory and one Redis connection, never a CPU.
"""

import os

from config.settings import get_settings

# Parsed and checked by the settings (a bad value stops gunicorn with the variable's name), not
# read again here with a parser of our own.
_settings = get_settings()
bind = f"{os.environ.get('BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "32"))
# A sync request may legitimately wait up to FLOPEX_SYNC_TIMEOUT_S for its provider.
timeout = int(_settings.sync_timeout_s) + 30
graceful_timeout = 30
keepalive = 5
# Each worker accepts on its own socket: the kernel spreads connections evenly between them.
reuse_port = True
max_requests = int(os.environ.get("WEB_MAX_REQUESTS", "0"))
max_requests_jitter = 100
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
errorlog = "-"
loglevel = _settings.log_level.lower()
# Import the app once in the master; workers fork with it loaded.
preload_app = True


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    # Sockets opened in the master (database pool, Redis pool) must not be shared by children.
    from app.db import dispose_engine
    from app.redis_client import reset_redis

    dispose_engine()
    reset_redis()


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    from app.metrics import mark_process_dead

    mark_process_dead(worker.pid)
