"""The paper's tables and figures from finished runs: Table 1, Figures 3 and 4 (VTAB-1k runs, one per
budget), Figure 2 and Table 2 (few-shot and domain-generalisation runs), with the baselines that ran.

    python pipelines/report.py ~/glora-ray/results/r84 ~/glora-ray/results/r42 ~/glora-ray/results/r2 --out report
    python pipelines/report.py s3://bucket/glora/run1 --out s3://bucket/glora/report
"""
from __future__ import annotations

import argparse
import os
import sys

# Runnable from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glora_ray.limits import loading_under_limits  # noqa: E402

with loading_under_limits():
    from glora_ray.errors import GLoRARayError
    from glora_ray.pipeline.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="the --out of a finished run (a path or URI); for "
                        "Table 1 one VTAB-1k run per budget, the first also drawing Figures 3 and 4")
    parser.add_argument("--out", required=True, help="folder (or URI) for the tables and figures")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.runs, args.out)
    except GLoRARayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
