"""The paper's tables and figures from finished runs (``pipelines/report.py``).

* Table 1 (``table1.parquet``, ``table1.md``): VTAB-1k runs, one per budget (the paper trains one
  supernet per rank set, docs/method.md §3), side by side: test accuracy per dataset (the mean over
  a run's seeds), the group means and their average, the mean adapter parameters the same way,
  and the paper's own numbers for the same rank set where ``paper.PAPER_TABLE1`` has them.
* Figure 3 (``figure3.png``): the winners' adapter parameters per layer type, averaged over the
  datasets of each VTAB group (the first run given).
* Figure 4 (``figure4.png``): the forms each support tensor takes, layer by layer, counted over
  the winners of every dataset (the first run given).
* Figure 2 and Table 2 (``figure2.png``, ``table2.md``, ``table2.parquet``): from few-shot and
  domain-generalisation runs, with every baseline that ran beside GLoRA.

Every run is read through the storage layer, so a run on object storage reports like a local one.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from .. import storage
from ..data import VTAB_DATASETS
from ..errors import GLoRARayError
from ..search.results import gene_column
from ..space import TENSORS, SearchSpace
from . import layout
from .analysis import choice_distribution, params_by_layer_type
from .export import SUBNET_FILE
from .paper import PAPER_TABLE1
from .summary import GROUP_ORDER

log = logging.getLogger(__name__)
TABLE1_FILE, TABLE1_MARKDOWN, FIGURE3_FILE, FIGURE4_FILE = "table1.parquet", "table1.md", "figure3.png", "figure4.png"
FEWSHOT_RESULTS, FEWSHOT_FIGURE = layout.FEWSHOT_RESULTS_FILE, layout.FEWSHOT_FIGURE_FILE
DOMAIN_RESULTS, DOMAIN_MARKDOWN = layout.DOMAIN_TABLE_FILE, "table2.md"
OTHER_GROUP = "other"  # a dataset outside VTAB-1k's three groups


class ReportError(GLoRARayError):
    """A folder that holds no finished run of the kind asked for."""


@dataclass(frozen=True)
class FinishedRun:
    """One finished run as the report reads it."""

    uri: str
    config: dict[str, Any]  # config.json's "config"
    summary: pd.DataFrame | None  # summary.parquet (VTAB runs)
    has_fewshot: bool = False  # fewshot.parquet present (a few-shot run)
    has_domain: bool = False  # table2.parquet present (a domain-generalisation run)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.config["ranks"], reverse=True))

    def label(self) -> str:
        params = self.summary["params"].mean() / 1e6 if self.summary is not None and len(self.summary) else float("nan")
        return f"GLoRA {params:.3f}M (ranks {' '.join(map(str, self.ranks))})"

    def export_uris(self, dataset: str) -> list[str]:
        """The export folder of ``dataset`` under every seed this run holds."""
        seeds = self.config.get("seeds") or []
        outs = [storage.join(self.uri, f"seed={s}") for s in seeds] if seeds else [self.uri]
        return [layout.export_uri(out, dataset) for out in outs]


def read_run(uri: str) -> FinishedRun:
    config_uri = storage.join(uri, layout.CONFIG_FILE)
    if not storage.exists(config_uri):
        raise ReportError(f"{uri}: no glora-ray run here ({layout.CONFIG_FILE} is missing); give the --out of a "
                          f"finished run")
    record = storage.read_json(config_uri, dict)
    summary_uri = storage.join(uri, layout.SUMMARY_FILE)
    summary = storage.read_parquet(summary_uri) if storage.exists(summary_uri) else None
    return FinishedRun(uri, record.get("config", {}), summary, storage.exists(storage.join(uri, FEWSHOT_RESULTS)),
                       storage.exists(storage.join(uri, DOMAIN_RESULTS)))


def _group(dataset: str) -> str:
    info = VTAB_DATASETS.get(dataset)
    return info.group if info is not None and info.group else OTHER_GROUP


def table1(runs: Sequence[FinishedRun]) -> pd.DataFrame:
    """One row per (run, dataset): mean test accuracy and parameters over the run's seeds, with the
    paper's accuracy for the run's rank set (NaN where it has none)."""
    rows = []
    for run in runs:
        if run.summary is None:
            raise ReportError(f"{run.uri}: no {layout.SUMMARY_FILE}: Table 1 takes finished VTAB-1k runs "
                              f"(pipelines/vtab.py)")
        paper = PAPER_TABLE1.get(run.ranks, {})
        for dataset, seeds in run.summary.groupby("dataset", sort=False):
            rows.append({"run": run.uri, "label": run.label(), "ranks": " ".join(map(str, run.ranks)),
                         "dataset": dataset, "group": _group(dataset), "seeds": len(seeds),
                         "params": float(seeds["params"].mean()), "test_acc": float(seeds["test_acc"].mean()),
                         "paper_test_acc": paper.get("accuracy", {}).get(dataset, float("nan")) / 100})
    return pd.DataFrame(rows)


def group_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run: the mean of each group present and, with all three, their average (the paper's
    Table 1 averages the group means, for accuracy and parameters alike)."""
    rows = []
    for (run, label), part in frame.groupby(["run", "label"], sort=False):
        means = {g: part[part["group"] == g][["params", "test_acc", "paper_test_acc"]].mean()
                 for g in GROUP_ORDER if (part["group"] == g).any()}
        if len(means) == len(GROUP_ORDER):
            means["average"] = pd.concat(means.values(), axis=1).mean(axis=1)
        rows += [{"run": run, "label": label, "row": f"mean {name}", **values.to_dict()} for name, values in means.items()]
    return pd.DataFrame(rows)


def _pct(value: float) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.2f}"


def table1_markdown(frame: pd.DataFrame) -> str:
    """Datasets down, runs across: "test accuracy % (the paper's)" and, per run, its mean params."""
    labels = list(dict.fromkeys(frame["label"]))
    means = group_rows(frame)
    lines = ["| dataset | group | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for dataset, part in frame.groupby("dataset", sort=False):
        by_label = part.set_index("label")
        cells = [f"{_pct(by_label.loc[l, 'test_acc'])} ({_pct(by_label.loc[l, 'paper_test_acc'])})"
                 if l in by_label.index else "" for l in labels]
        lines.append(f"| {dataset} | {part['group'].iloc[0]} | " + " | ".join(cells) + " |")
    for row_name, part in means.groupby("row", sort=False):
        by_label = part.set_index("label")
        cells = [f"**{_pct(by_label.loc[l, 'test_acc'])}** ({_pct(by_label.loc[l, 'paper_test_acc'])}), "
                 f"{by_label.loc[l, 'params'] / 1e6:.3f}M" if l in by_label.index else "" for l in labels]
        lines.append(f"| {row_name} | | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy %, the mean over each run's seeds; the paper's Table 1 figure for the same rank set "
                  "in parentheses (\"-\": none). Mean rows: accuracy and adapter parameters averaged over the "
                  "datasets of a group; \"average\" is the mean of the three group means, as the paper's."]
    return "\n".join(lines) + "\n"


def _winners(run: FinishedRun, dataset: str) -> list[dict[str, Any]]:
    """The exported winners' records (``subnet.json``) of ``dataset``, one per seed."""
    records = [storage.join(uri, SUBNET_FILE) for uri in run.export_uris(dataset)]
    return [storage.read_json(record, dict) for record in records if storage.exists(record)]


def figure3_png(run: FinishedRun) -> bytes:
    """Adapter parameters per layer type, mean over the datasets of each group (paper Figure 3)."""
    per_group: dict[str, list[pd.Series]] = {}
    for dataset in run.summary["dataset"].unique():
        for winner in _winners(run, dataset):
            per_group.setdefault(_group(dataset), []).append(params_by_layer_type(winner["layer_params"]))
    if not per_group:
        raise ReportError(f"{run.uri}: no exported winner (export/subnet.json) to draw Figure 3 from")
    table = pd.DataFrame({group: pd.concat(series, axis=1).fillna(0).mean(axis=1) for group, series in per_group.items()})
    figure, axes = _figure((7, 4))
    table.plot.bar(ax=axes, rot=0)
    axes.set_ylabel("adapter parameters (mean over datasets)")
    axes.set_xlabel("layer type")
    axes.set_title(f"{run.label()}: parameters per layer type and group")
    return _png(figure)


def figure4_png(run: FinishedRun) -> bytes:
    """The form of each support tensor, layer by layer, counted over every dataset's winner (paper Figure 4)."""
    winners = [w for dataset in run.summary["dataset"].unique() for w in _winners(run, dataset)]
    if not winners:
        raise ReportError(f"{run.uri}: no exported winner (export/subnet.json) to draw Figure 4 from")
    layer_names = list(winners[0]["layers"])
    frame = pd.DataFrame([{gene_column(layer, t): choice[t] for layer, choice in w["layers"].items() for t in TENSORS}
                          for w in winners])
    counts = choice_distribution(frame, layer_names, gene_column)
    space = SearchSpace(run.ranks)
    figure, panels = _figure((max(6, 0.25 * len(layer_names)), 2.2 * len(TENSORS)), rows=len(TENSORS))
    for axes, tensor in zip(panels, TENSORS):
        order = list(space.choices(tensor))
        (counts[counts["tensor"] == tensor]
         .pivot_table(index="layer_index", columns="choice", values="count", fill_value=0)
         .reindex(index=range(len(layer_names)), columns=order, fill_value=0)
         .plot.bar(stacked=True, ax=axes, width=0.85, legend=tensor == TENSORS[0]))
        axes.set_ylabel(tensor)
    panels[-1].set_xlabel("adapted layer (index)")
    panels[0].set_title(f"{run.label()}: forms per layer over {len(winners)} winners")
    return _png(figure)


def _figure(size: tuple[float, float], rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return figure, axes if rows > 1 else axes[0]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _check_one_of_each(runs: Sequence[FinishedRun]) -> None:
    """Table 1 has one column per VTAB-1k run (by its label), Figure 2 and Table 2 one run each:
    a second would overwrite the first's file or column."""
    kinds = {"VTAB-1k run of this budget and rank set": [run.label() for run in runs if run.summary is not None],
             "few-shot run (Figure 2 draws one)": ["few-shot" for run in runs if run.has_fewshot],
             "domain-generalisation run (Table 2 shows one)": ["domain" for run in runs if run.has_domain]}
    for kind, names in kinds.items():
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ReportError(f"{', '.join(run.uri for run in runs)}: more than one {kind} ({', '.join(repeated)}); "
                              f"give each once, and report the others separately")


def write_report(run_uris: Sequence[str], out: str) -> list[str]:
    """Every table and figure the runs support, written under ``out``; returns the files written."""
    from .domain import format_table
    from .fewshot import figure_png

    runs = [read_run(uri) for uri in run_uris]
    _check_one_of_each(runs)
    written: list[str] = []

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(out, name), data)
        written.append(name)

    vtab = [run for run in runs if run.summary is not None]
    if vtab:
        frame = table1(vtab)
        storage.write_parquet(storage.join(out, TABLE1_FILE), frame)
        written.append(TABLE1_FILE)
        put(TABLE1_MARKDOWN, table1_markdown(frame).encode())
        put(FIGURE3_FILE, figure3_png(vtab[0]))
        put(FIGURE4_FILE, figure4_png(vtab[0]))
    for run in runs:
        if run.has_fewshot:
            put(FEWSHOT_FIGURE, figure_png(storage.read_parquet(storage.join(run.uri, FEWSHOT_RESULTS))))
        if run.has_domain:
            data = storage.read_bytes(storage.join(run.uri, DOMAIN_RESULTS))
            table = pd.read_parquet(io.BytesIO(data))
            targets = [c for c in table.columns if c not in ("method", "seed", "params", "val_acc", "key")]
            put(DOMAIN_RESULTS, data)
            put(DOMAIN_MARKDOWN, format_table(table, targets, {}).encode())
    if not written:
        raise ReportError(f"{', '.join(run_uris)}: no finished VTAB-1k, few-shot or domain run to report")
    return written
