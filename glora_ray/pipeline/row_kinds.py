"""The kinds of row in a comparison table (docs/method.md §3): the searched winner, a tested
Pareto-front subnet, a fixed-adapter baseline.  Shared by the table and its plot."""
WINNER, PARETO, BASELINE = "glora", "pareto", "baseline"
# Which weights a row was scored with: the search ranks every subnet on the supernet's weights, a
# winner may be retrained alone before its test (docs/method.md §3.2), a baseline trains alone.
SUPERNET_WEIGHTS, ALONE_WEIGHTS = "supernet", "trained alone"


def retrained_weights(epochs: int) -> str:
    return f"retrained {epochs} epochs"
