"""Benchmarks of the glora-ray engine (issue 6); see bench/README.md.

Every script measures what it compares in one run, interleaved, and reports ratios: absolute
times on shared machines mean little.  None of them is part of the test suite; a smoke test
(tests/test_bench_smoke.py) runs each on the ``tiny`` setting.
"""
