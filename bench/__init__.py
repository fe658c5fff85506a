"""tailcalld's benchmark: per-syscall cost, control-plane latency and memory (issue 5).

Measurement only: nothing here is pass/fail.  Run it with ``make bench`` or
``.venv/bin/python -m bench.run``; ``--quick`` is the smoke-test size.
"""
