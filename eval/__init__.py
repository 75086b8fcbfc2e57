"""eval/: the promotion gate (benchmarks, greedy A/B diffs, held-out preferences).

Not built yet (issue 5). Promotion will append to the `promotions` table, which is
what `ratchet.registry.production()` already reads.
"""
