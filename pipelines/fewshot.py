"""GLoRA few-shot learning (the paper's Figure 2): per dataset, shots and seed, train, search, test once.

    python pipelines/fewshot.py                  # embedded default: bundled digits in NOAH's layout, local Ray
    python pipelines/fewshot.py --help
    ray job submit --working-dir . -- python pipelines/fewshot.py --preset paper --data-root /mnt/noah-data \
        --out s3://bucket/glora/fewshot --shots 1 2 4 8 16 --seeds 0 1 2 --train-gpus 1 --actor-gpus 0.25
"""
from __future__ import annotations

import os
import sys

# Runnable from a checkout (and from `ray job submit --working-dir .`) without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glora_ray.limits import loading_under_limits  # noqa: E402

with loading_under_limits():  # torch and Ray under `ulimit -v`: one line naming the limit
    from glora_ray.pipeline.cli import run_main
    from glora_ray.pipeline.fewshot import parse_fewshot_config, run_fewshot


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_fewshot_config, run_fewshot, argv)


if __name__ == "__main__":
    sys.exit(main())
