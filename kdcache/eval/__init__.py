"""Teacher vs students: `metrics` (pure functions), `models` (what --model accepts), `latency` (side-by-side
timing), `run` (`kdcache eval`: report.json + report.md) and `compare` (`kdcache compare`: one table, plots)."""
