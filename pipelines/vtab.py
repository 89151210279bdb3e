"""GLoRA on VTAB-1k, the whole job: train, search, test once, merge, export.

    python pipelines/vtab.py                     # embedded default: bundled digits, small ViT, local Ray
    python pipelines/vtab.py --help
    python pipelines/vtab.py --baselines lora ssf bitfit head --test-pareto --seeds 0 1 2   # vs fixed adapters
    ray job submit --working-dir . -- python pipelines/vtab.py --preset paper --datasets cifar dtd \
        --data-root /mnt/vtab-1k --out s3://bucket/glora/run1 --train-gpus 1 --actor-gpus 0.25
"""
from __future__ import annotations

import os
import sys

# Runnable from a checkout (and from `ray job submit --working-dir .`) without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glora_ray.limits import loading_under_limits  # noqa: E402

with loading_under_limits():  # torch and Ray under `ulimit -v`: one line naming the limit
    from glora_ray.pipeline import layout
    from glora_ray.pipeline.cli import parse_config, run_main
    from glora_ray.pipeline.comparison import format_comparison
    from glora_ray.pipeline.config import PipelineConfig
    from glora_ray.pipeline.run import comparison_table, run_pipeline
    from glora_ray.pipeline.summary import format_summary
    from glora_ray.pipeline.inference import describe as describe_inference, read_inference


def run_and_report(config: PipelineConfig) -> None:
    """The whole job, then its summary (and GLoRA against fixed adapters, when asked for)."""
    frame = run_pipeline(config)
    print(format_summary(frame))
    for dataset, seed, run in ((d, s, r) for d in config.datasets for s, r in config.seed_runs()):
        print(f"{dataset} seed {seed}: inference, {describe_inference(read_inference(run.out, dataset))}")
    if config.baselines or config.test_pareto or config.seeds:  # GLoRA against fixed adapters
        print(format_comparison(comparison_table(config)))
    print(f"results: {config.out} (summary: {layout.SUMMARY_FILE}; per dataset: "
          f"<dataset>/export/merged.safetensors, subnet.json, adapters.safetensors)")


def main(argv: list[str] | None = None) -> int:
    # Bad input (data, budget, model, checkpoint, output path): one `error:` line, exit 2; SIGTERM or
    # Ctrl-C: one line naming the stage stopped, exit 143 / 130; anything else keeps its traceback.
    return run_main(parse_config, run_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
