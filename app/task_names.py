"""Every Celery task's name, in one place: the tasks (tasks/) register under these, and the
senders (the web, the sweeper, beat's schedule) send by them. A name is a contract with the
messages already in the broker: never rename one that a deployed version sends."""

from __future__ import annotations

# The one hop of a job: route it from the quote board, execute, settle, signal.
ROUTE = "flopex.route"
# A job whose worker died mid-way, continued from its last committed step (the sweeper).
RESUME = "flopex.resume"
# The per-job quote of the versions before the quote board; kept for messages in flight.
LEGACY_QUOTE = "flopex.quote"
WEBHOOK = "flopex.webhook"
SWEEP = "flopex.sweep"
PURGE_IDEMPOTENCY = "flopex.purge_idempotency"
# Beat's board refresh fans out one CHECK_PROVIDER per enabled provider.
REFRESH_BOARD = "flopex.refresh_board"
CHECK_PROVIDER = "flopex.check_provider"
# The health probe of the versions before the quote board; now the same fan-out.
LEGACY_PROBE = "flopex.probe_providers"
