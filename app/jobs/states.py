"""Job states. A job only moves forward, and every write checks and bumps the job's ``version``
(a fencing token), so a worker that lost its claim can never write again.

    quoting --(decision and attempt recorded)--> executing
    (routing: the claim of workers older than the quote board; still handled, no longer written)
    executing --(provider answered, result recorded)--> settling --(wallet settled)--> success
    any live state --(no route; every attempt failed)--> failed   (the hold is released)
    quoting | routing --(POST /v1/inference/{id}/cancel)--> cancelled (the hold is released)

The hold is placed when the job is accepted, in the same transaction that creates it.
"""

QUOTING = "quoting"
ROUTING = "routing"
EXECUTING = "executing"
SETTLING = "settling"
SUCCESS = "success"
FAILED = "failed"
CANCELLED = "cancelled"

FINAL = frozenset({SUCCESS, FAILED, CANCELLED})
LIVE = frozenset({QUOTING, ROUTING, EXECUTING, SETTLING})
CANCELLABLE = frozenset({QUOTING, ROUTING})

# What the API shows: a client sees queued / running / success / failed / cancelled.
PUBLIC = {
    QUOTING: "queued",
    ROUTING: "running",
    EXECUTING: "running",
    SETTLING: "running",
    SUCCESS: "success",
    FAILED: "failed",
    CANCELLED: "cancelled",
}
INTERNAL = {
    "queued": (QUOTING,),
    "running": (ROUTING, EXECUTING, SETTLING),
    "success": (SUCCESS,),
    "failed": (FAILED,),
    "cancelled": (CANCELLED,),
}
