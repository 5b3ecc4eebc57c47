"""Job states. A job only moves forward, and every write checks and bumps the job's ``version``
(a fencing token), so a worker that lost its claim can never write again.

    quoting --(route claims)--> routing --(attempt recorded)--> executing
    executing --(provider answered, result recorded)--> settling --(wallet settled)--> success
    any live state --(no route; every attempt failed)--> failed   (the hold is released)

The hold is placed when the job is accepted, in the same transaction that creates it.
"""

QUOTING = "quoting"
ROUTING = "routing"
EXECUTING = "executing"
SETTLING = "settling"
SUCCESS = "success"
FAILED = "failed"

FINAL = frozenset({SUCCESS, FAILED})
LIVE = frozenset({QUOTING, ROUTING, EXECUTING, SETTLING})
