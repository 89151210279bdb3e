"""The end-of-job summary: one row per dataset, group means as in the paper's Table 1."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd

# VTAB-1k groups in the paper's column order.
GROUP_ORDER: tuple[str, ...] = ("natural", "specialized", "structured")
SUMMARY_COLUMNS = ["dataset", "group", "seed", "lr", "params", "head_params", "val_acc", "test_acc", "wall_seconds", "key"]


def summary_frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=SUMMARY_COLUMNS)
    return frame.astype({"seed": "int64", "params": "int64", "head_params": "int64"}) if len(frame) else frame


def group_means(frame: pd.DataFrame, column: str = "test_acc") -> dict[str, float]:
    """Mean per group present, plus "average": the mean of the three group means (paper Table 1),
    given only when all three groups are present."""
    means: dict[str, float] = {}
    for group in GROUP_ORDER:
        values = frame.loc[frame["group"] == group, column].dropna()
        if len(values):
            means[group] = float(values.mean())
    if all(g in means for g in GROUP_ORDER):
        means["average"] = sum(means[g] for g in GROUP_ORDER) / len(GROUP_ORDER)
    return means


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_summary(frame: pd.DataFrame) -> str:
    """A fixed-width text table: per-dataset rows, then group means of val and test accuracy."""
    header = f"{'dataset':<22}{'group':<13}{'seed':>5}{'params':>11}{'val acc':>9}{'test acc':>10}{'wall s':>9}"
    lines = [header, "-" * len(header)]
    for row in frame.itertuples(index=False):
        lines.append(
            f"{row.dataset:<22}{(row.group if isinstance(row.group, str) else '-'):<13}{row.seed:>5}{row.params / 1e6:>10.3f}M"
            f"{_fmt(row.val_acc * 100, '.2f'):>9}{_fmt(row.test_acc * 100, '.2f'):>10}{_fmt(row.wall_seconds, '.0f'):>9}"
        )
    val_means, test_means = group_means(frame, "val_acc"), group_means(frame, "test_acc")
    if test_means:
        lines.append("-" * len(header))
        for name in (*GROUP_ORDER, "average"):
            if name in test_means:
                lines.append(
                    f"{'mean ' + name:<40}{'':>11}{_fmt(val_means.get(name, float('nan')) * 100, '.2f'):>9}"
                    f"{test_means[name] * 100:>10.2f}"
                )
    return "\n".join(lines)
