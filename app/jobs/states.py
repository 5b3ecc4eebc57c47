"""Job states. A job only moves forward, and every move is a conditional UPDATE on the status it
leaves, so two workers can never both make the same move.

    quoting --(route claims)--> routing --(hold placed, attempt recorded)--> executing
    executing --(provider answered, wallet settled)--> success
    quoting | routing | executing --(no route, every attempt failed)--> failed
"""

QUOTING = "quoting"
ROUTING = "routing"
EXECUTING = "executing"
SUCCESS = "success"
FAILED = "failed"

FINAL = frozenset({SUCCESS, FAILED})
