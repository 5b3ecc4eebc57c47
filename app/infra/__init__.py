"""Infrastructure shared by web, worker and CLI: database, broker, Redis, metrics,
logs, failpoints, migrations, rate limits."""
