"""GLoRA domain generalization (the paper's Table 2): ImageNet 16-shot, tested on four shifted sets.

    python pipelines/domain.py                  # embedded default: a 10-class digits stand-in, local Ray
    python pipelines/domain.py --help
    ray job submit --working-dir . -- python pipelines/domain.py --preset paper --data-root /mnt/noah-data \
        --out s3://bucket/glora/domain --seeds 0 --train-gpus 1 --actor-gpus 0.25
"""
from __future__ import annotations

import os
import sys

# Runnable from a checkout (and from `ray job submit --working-dir .`) without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glora_ray.limits import loading_under_limits  # noqa: E402

with loading_under_limits():  # torch and Ray under `ulimit -v`: one line naming the limit
    from glora_ray.pipeline.cli import run_main
    from glora_ray.pipeline.domain import parse_domain_config, run_domain


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_domain_config, run_domain, argv)


if __name__ == "__main__":
    sys.exit(main())
