"""Run every benchmark of issue 6 (each in its own process) and write a markdown table of ratios.

    python -m bench.run_all --size small --out bench/out      # the CPU table of bench/README.md

Each script's JSON goes to ``<out>/<name>.json``, the table to ``<out>/results.md``; with
``--only``, earlier results of the same size in ``<out>`` fill the other rows.  A script that
cannot run (e.g. Ray missing) is reported in the table, and the exit status is the first
non-zero one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, SIZES, comma_list, prepare_environment, say

BENCHES = ("eval_cost", "search_throughput", "actor_memory", "train_step", "multinode")


def _x(stat: Any) -> str:
    """A ratio (a RatioStat dict or a float) as text."""
    if isinstance(stat, dict):
        return f"{stat['median']:.3f}x ({stat['low']:.2f}-{stat['high']:.2f}, n={stat['rounds']})"
    return f"{stat:.3f}x"


def rows_for(name: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(item, measurement, value) rows of one script's result."""
    q = r["ratios"]
    if name == "eval_cost":
        goal = "met" if r["goals"]["merged_over_backbone_le_1_05"] else "missed"
        return [
            ("1 eval", "merged candidate / plain backbone (goal <= 1.05x)",
             f"{_x(q['merged_over_backbone'])}, goal {goal}"),
            ("1 eval", "unmerged supernet / plain backbone", _x(q["unmerged_over_backbone"])),
            ("1 eval", "merge alone / merged candidate", _x(q["merge_share_of_merged"])),
            ("1 eval", "merged / backbone implied by the merge's share, 1 / (1 - share)",
             f"{q['implied_merged_over_backbone']:.3f}x"),
            ("1 eval", "merged vs unmerged logits, relative error",
             f"{r['correctness']['max_logits_relative_error']:.1e}"),
        ]
    if name == "search_throughput":
        out = []
        for key, value in q.items():
            if key.startswith("speedup_"):
                n = key.split("_")[1]
                out.append(("2 search", f"candidates/s, {n} actors / 1 actor", _x(value)))
                out.append(("2 search", f"scaling efficiency, {n} actors", f"{q[f'efficiency_{n}']:.0%}"))
        for n, run in r["runs"].items():
            out.append(("2 search", f"overhead per candidate / evaluation, {n} actor(s)",
                        f"{q['overhead_over_eval'][n]:.3f} ({run['overhead_actor_s_per_candidate'] * 1e3:.0f} ms: "
                        f"pool {run['pool_overhead_actor_s_per_candidate'] * 1e3:.0f}, driver "
                        f"{run['driver_actor_s_per_candidate'] * 1e3:.0f}; "
                        f"eval {run['eval_s_per_candidate'] * 1e3:.0f} ms)"))
        return out
    if name == "actor_memory":
        mib, weights, base = 2**20, r["weight_bytes"], r["baseline_uss"]
        out = [("3 memory", "weights in the object store; USS of a bare worker (torch, timm, engine imported)",
                f"{weights / mib:.0f} MiB; {base / mib:.0f} MiB = {base / weights:.2f}x the weights")]
        modes: dict[str, list[dict[str, Any]]] = {}
        for row in r["actors"]:
            modes.setdefault(row["mode"], []).append(row)
        for mode, rows in modes.items():
            counts = "/".join(str(row["actors"]) for row in rows)
            values = " / ".join(f"{(row['uss_median'] - base) / weights:.2f}x" for row in rows)
            out.append(("3 memory", f"extra USS per actor / weights, {mode} mode, {counts} actors", values))
        for control in r.get("controls", {}).values():
            out.append(("3 memory", f"extra USS / weights, control: {control['what']}",
                        f"{(control['uss_median'] - base) / weights:.2f}x"))
        out.append(("3 memory", "merged layers' bytes / weights (what merged mode must hold)",
                    f"{q['merged_layers_over_weights']:.2f}x"))
        return out
    if name == "train_step":
        ips = r["images_per_s"]
        return [
            ("4 train", "step time, supernet / plain LoRA-B", _x(q["supernet_over_lora"])),
            ("4 train", "step time, supernet / head only", _x(q["supernet_over_head"])),
            ("4 train", "step time, plain LoRA-B / head only", _x(q["lora_over_head"])),
            ("4 train", "images/s supernet : LoRA-B : head",
             f"{ips['supernet']:.0f} : {ips['lora']:.0f} : {ips['head']:.0f}"),
        ]
    if name == "multinode":
        return [
            ("5 multi-node", "actors -> nodes", ", ".join(f"{a}: {n}" for a, n in sorted(r["placement"].items()))),
            ("5 multi-node", "population and result equal to one node's",
             "yes" if r["checks"]["same_results"]["ok"] else "NO"),
        ]
    return []


def markdown(results: dict[str, dict[str, Any]], failures: dict[str, int], size: str) -> str:
    first = next(iter(results.values()), {})
    machine = first.get("machine", {})
    lines = [
        f"Size `{size}`; {machine.get('cpu', '?')}, {machine.get('cpus_usable', '?')} usable CPU(s); "
        f"torch {machine.get('torch')}, timm {machine.get('timm')}, Ray {machine.get('ray')}; "
        f"{machine.get('date_utc')} UTC.",
        "",
        "| item | measurement | result |",
        "|---|---|---|",
    ]
    for name in BENCHES:
        if name in results:
            lines += [f"| {item} | {what} | {value} |" for item, what, value in rows_for(name, results[name])]
        elif name in failures:
            lines.append(f"| {name} | - | did not run (exit status {failures[name]}) |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--out", default="bench/out", help="folder for the JSON files and results.md")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = comma_list(args.only)
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, int] = {}
    status = 0
    for name in chosen:
        json_out = out / f"{name}.json"
        json_out.unlink(missing_ok=True)
        start = time.perf_counter()
        say(f"=== {name} --size {args.size}")
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", "--size", args.size, "--json-out", str(json_out)],
                               cwd=REPO_ROOT)
        say(f"=== {name}: exit status {code} after {time.perf_counter() - start:.0f} s")
        if json_out.is_file():
            results[name] = json.loads(json_out.read_text())
        if code:
            failures[name] = code
            status = status or code
    for name in BENCHES:  # results of earlier runs into the same folder complete the table
        earlier = out / f"{name}.json"
        if name not in chosen and earlier.is_file():
            result = json.loads(earlier.read_text())
            if result.get("size") == args.size:
                results[name] = result
    results = {name: results[name] for name in BENCHES if name in results}
    table = markdown(results, failures, args.size)
    (out / "results.md").write_text(table)
    print(table)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
