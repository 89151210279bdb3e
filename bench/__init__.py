"""Benchmarks of the glora-ray engine (issues 6, 12, 19); see bench/README.md.

Every timing script measures what it compares in one run, interleaved, and reports ratios:
absolute times on shared machines mean little.  tests/test_bench_smoke.py runs the issue-6
scripts on the ``tiny`` setting.
"""
