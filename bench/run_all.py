"""Run the issue-6 benchmarks, each in its own process, and write a markdown table of their ratios.

    python -m bench.run_all --size small --out bench/out      # the CPU table of bench/README.md

Each script's JSON goes to ``<out>/<name>.json``, the table (every ratio, goal and check of each
result) to ``<out>/results.md``; with ``--only``, earlier results of the same size in ``<out>``
fill the other rows.  A script that cannot run is reported in the table; the exit status is the
first non-zero one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, SIZES, comma_list, prepare_environment, say

BENCHES = ("eval_cost", "search_throughput", "actor_memory", "train_step")


def rows_for(name: str, result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(script, measurement, value) rows: every ratio (median, range over rounds), goal and check."""

    def flat(prefix: str, value: Any):
        if isinstance(value, dict) and "median" not in value:
            for key, inner in value.items():
                yield from flat(f"{prefix} {key}".strip(), inner)
        elif isinstance(value, dict):
            yield prefix, f"{value['median']:.3f}x ({value['low']:.2f}-{value['high']:.2f}, n={value['rounds']})"
        else:
            yield prefix, f"{value:.3f}"

    rows = [(name, key.replace("_over_", " / "), text) for key, text in flat("", result.get("ratios", {}))]
    rows += [(name, f"goal {key}", "met" if met else "MISSED") for key, met in result.get("goals", {}).items()]
    rows += [(name, f"check {key}", ("ok: " if c["ok"] else "FAILED: ") + c["detail"])
             for key, c in result.get("checks", {}).items()]
    return rows


def markdown(results: dict[str, dict[str, Any]], failures: dict[str, int], size: str) -> str:
    machine = next(iter(results.values()), {}).get("machine", {})
    lines = [f"Size `{size}`; {machine.get('cpu', '?')}, {machine.get('cpus_usable', '?')} usable CPU(s); torch "
             f"{machine.get('torch')}, timm {machine.get('timm')}, Ray {machine.get('ray')}; {machine.get('date_utc')} UTC.",
             "", "| script | measurement | result |", "|---|---|---|"]
    for name in BENCHES:
        if name in results:
            lines += [f"| {item} | {what} | {value} |" for item, what, value in rows_for(name, results[name])]
        elif name in failures:
            lines.append(f"| {name} | - | did not run (exit status {failures[name]}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    prepare_environment()
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--out", default="bench/out", help="folder for the JSON files and results.md")
    args = parser.parse_args(argv)
    out, chosen = Path(args.out).resolve(), comma_list(args.only)
    if set(chosen) - set(BENCHES):
        parser.error(f"unknown benchmark(s) {sorted(set(chosen) - set(BENCHES))}; choose from {list(BENCHES)}")
    out.mkdir(parents=True, exist_ok=True)
    results, failures = {}, {}
    for name in BENCHES:
        path = out / f"{name}.json"
        if name in chosen:
            path.unlink(missing_ok=True)
            say(f"=== {name} --size {args.size}")
            code = subprocess.call([sys.executable, "-m", f"bench.{name}", "--size", args.size, "--json-out", str(path)],
                                   cwd=REPO_ROOT)
            say(f"=== {name}: exit status {code}")
            if code:
                failures[name] = code
        if path.is_file():  # this run's, or an earlier run's of the same size
            result = json.loads(path.read_text())
            if result.get("size") == args.size:
                results[name] = result
    table = markdown(results, failures, args.size)
    (out / "results.md").write_text(table)
    print(table)
    return next(iter(failures.values()), 0)


if __name__ == "__main__":
    raise SystemExit(main())
