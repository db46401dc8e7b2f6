"""Teacher vs students (`kdcache eval`, `kdcache compare`).

`tasks` (zeroshot, retrieval: each task's checks, metrics, agreement reference and report sections), `metrics` (pure
functions), `models` (what --model accepts), `data` (the pass over the shards), `latency` (side-by-side timing),
`report` (report.md rendering, short model names), `plots` (the PNGs, Agg), `run` (orchestration: report.json +
report.md) and `compare` (one table, plots).
"""
