"""The kinds of row in a comparison table (docs/method.md §3): the searched winner, a tested
Pareto-front subnet, a fixed-adapter baseline.  Shared by the table and its plot."""
WINNER, PARETO, BASELINE = "glora", "pareto", "baseline"
