"""Shared pieces of the benchmarks: size presets, the interleaved timing loop, reporting.

Timing uses ``torch.utils.benchmark.Timer`` (it synchronises CUDA and sets the torch threads);
every comparison is measured *interleaved*: each round times every variant once, in a rotated
order, so slow drift of a shared machine hits all variants alike, and a ratio is the median of
the per-round ratios.  On the CPU with one thread the clock is the process's CPU time
(``--clock auto``), which excludes the time the scheduler gives to other jobs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.benchmark import Timer

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small", "base")
FAMILIES = ("vit", "cnn")  # GLoRA on a ViT's linear layers, or on a CNN's convolutions (docs/method.md §7)
EXIT_CHECK_FAILED, EXIT_CANNOT_MEASURE = 1, 2
MIB = 2**20


def prepare_environment() -> None:
    """Environment the scripts and their Ray workers need; call before importing Ray."""
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:  # Ray workers import ``glora_ray`` from this checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])


class BenchError(RuntimeError):
    """The benchmark cannot measure: a missing dependency or device, or a setting that cannot work."""


# -- presets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPreset:
    """A randomly initialised timm model (timing does not depend on the values) and what GLoRA adapts."""

    name: str
    img_size: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    ranks: tuple[int, ...] = (8, 4)
    layer_types: tuple[str, ...] = ("linear",)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return (f"{self.name} @ {self.img_size}px" + (f" ({extra})" if extra else "")
                + f", ranks {self.ranks}, adapting {'+'.join(self.layer_types)}")

    def spec(self, seed: int = 0, drop_path_rate: float = 0.0):
        from glora_ray.backbone import BackboneConfig
        from glora_ray.checkpoint import SupernetSpec

        backbone = BackboneConfig(self.name, pretrained=False, img_size=self.img_size, drop_path_rate=drop_path_rate,
                                  model_kwargs=dict(self.kwargs), init_seed=seed)
        return SupernetSpec(backbone, num_classes=self.num_classes, ranks=self.ranks, layer_types=self.layer_types,
                            dataset="synthetic", adapter_seed=seed)

    def problem(self, count: int, seed: int = 0):
        """The search problem of glora_ray.search.synthetic (random adapters, teacher labels)."""
        from glora_ray.search.synthetic import synthetic_problem

        return synthetic_problem(self.spec(seed), count, seed)


@dataclass(frozen=True)
class SizePreset:
    name: str
    model: ModelPreset
    cnn: ModelPreset  # eval_cost's and train_step's --family cnn
    val_images: int
    eval_batch: int
    eval_repeats: int
    train_batch: int
    train_steps: int  # steps in one timed epoch
    train_repeats: int
    search: tuple[int, int, int, int, int]  # population, parents, mutants, crossovers, generations
    search_repeats: int
    memory_model: ModelPreset  # big enough that the weights dominate an actor's memory
    memory_val_images: int
    memory_actors: tuple[int, ...]

    def model_for(self, family: str) -> ModelPreset:  # --family
        return self.cnn if family == "cnn" else self.model


TINY_VIT = ModelPreset("vit_tiny_patch16_224", 16, dict(patch_size=8, depth=2, embed_dim=32, num_heads=2),
                       num_classes=5, ranks=(4, 2))


def lite0(img_size: int, num_classes: int = 10) -> ModelPreset:
    """The embedded default's CNN: EfficientNet-Lite0, GLoRA on all 49 convolutions, ranks (4, 2)."""
    return ModelPreset("tf_efficientnet_lite0", img_size, num_classes=num_classes, ranks=(4, 2), layer_types=("conv2d",))


PRESETS = {  # tiny: seconds (smoke test); small: the CPU default; base: the paper's ViT-B/16 at 224 px (GPUs)
    "tiny": SizePreset("tiny", TINY_VIT, lite0(16, 5), 32, 16, 3, 8, 2, 2, (6, 2, 2, 2, 2), 1, TINY_VIT, 8, (1, 2)),
    "small": SizePreset("small", ModelPreset("vit_tiny_patch16_224", 64), lite0(64), 200, 64, 30, 64, 3, 5,
                        (12, 4, 4, 4, 3), 3, ModelPreset("vit_base_patch16_224", 32), 16, (1, 2, 4)),
    "base": SizePreset("base", ModelPreset("vit_base_patch16_224", 224, num_classes=100), lite0(224, 100), 200, 100,
                       15, 64, 4, 5, (50, 10, 25, 25, 3), 1, ModelPreset("vit_base_patch16_224", 224, num_classes=100),
                       32, (1, 2, 4)),
}


def search_config(size: SizePreset, actors: int | None, seed: int, **overrides: Any):
    """The preset's search, one CPU and one torch thread per actor."""
    from glora_ray.search.config import SearchConfig

    population, parents, mutants, crossovers, generations = size.search
    return SearchConfig(**{**dict(population=population, parents=parents, mutants=mutants, crossovers=crossovers,
                                  generations=generations, seed=seed, eval_batch_size=size.eval_batch,
                                  num_actors=actors, cpus_per_actor=1.0, threads_per_actor=1), **overrides})


def require_ray():
    try:
        import ray
    except ImportError as err:
        raise BenchError(f"this benchmark needs Ray ({err}); install it with: pip install 'ray[default]'") from None
    return ray


@__import__("contextlib").contextmanager
def local_ray(num_cpus: float, object_store_bytes: int):
    """A private local Ray instance (never a stray cluster), shut down after; yields ``ray``."""
    ray = require_ray()
    if ray.is_initialized():
        raise BenchError("Ray is already initialised in this process; run the benchmark in its own process")
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=max(int(object_store_bytes), 256 * MIB),
             include_dashboard=False, logging_level=30, log_to_driver=False)  # 30: logging.WARNING
    try:
        yield ray
    finally:
        ray.shutdown()


# -- devices and timing ------------------------------------------------------------------------
@dataclass
class Setup:
    """Where and how a benchmark times (from --device, --threads, --clock, --tf32)."""

    device: torch.device
    threads: int
    clock: str
    tf32: bool

    def describe(self) -> str:
        return f"{self.device}, {self.threads} thread(s), {self.clock} clock{', TF32' if self.tf32 else ''}"


def timing_setup(args: argparse.Namespace) -> Setup:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device cuda: CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        from glora_ray.precision import set_tf32

        set_tf32(args.tf32)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    if threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" and threads == 1 else "wall")
    return Setup(device, threads, clock, bool(args.tf32 and device.type == "cuda"))


@dataclass
class RatioStat:
    """A ratio of two interleaved variants: median of the per-round ratios (the headline), their
    range, and fastest over fastest (which interference, only ever adding time, disturbs least)."""

    median: float
    low: float
    high: float
    of_minimums: float
    rounds: int

    def text(self) -> str:
        return (f"{self.median:.3f}x (rounds {self.low:.3f}..{self.high:.3f}, n={self.rounds}; "
                f"fastest/fastest {self.of_minimums:.3f}x)")


@dataclass
class Timing:
    """Seconds of each variant, one entry per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, numerator: str, denominator: str) -> RatioStat:
        a, b = self.seconds[numerator], self.seconds[denominator]
        per_round = [x / y for x, y in zip(a, b)]
        return RatioStat(statistics.median(per_round), min(per_round), max(per_round), min(a) / min(b), len(a))


def measure_interleaved(variants: Mapping[str, Callable[[], Any]], setup: Setup, *, repeats: int, warmup: int = 1,
                        on_round: Callable[[int, dict[str, float]], None] | None = None) -> Timing:
    """Time every variant once per round (``Timer.timeit(1)``), in an order rotated each round,
    after ``warmup`` untimed calls of each."""
    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    clock = {"cpu": time.process_time, "wall": time.perf_counter}[setup.clock]
    if setup.device.type == "cuda":
        clock = (lambda base: lambda: (torch.cuda.synchronize(), base())[1])(clock)
    timers = {name: Timer("fn()", globals={"fn": fn}, timer=clock, num_threads=setup.threads, sub_label=name)
              for name, fn in variants.items()}
    names = list(variants)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        this_round = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            this_round[name] = timers[name].timeit(1).median
            seconds[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return Timing(seconds)


# -- reporting ---------------------------------------------------------------------------------
def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where the numbers come from.  ``ray`` is the installed version (not imported here)."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.lower().startswith("model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "timm": version("timm"), "ray": version("ray"), "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    if device is not None and device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped, in order."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parser_for(name: str, doc: str, *, device: bool = True, repeats: bool = True,
               family: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small",
                        help="tiny: seconds (smoke test); small: the CPU default; base: ViT-B/16 at 224 px (GPUs)")
    if device:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        parser.add_argument("--threads", type=int, default=None,
                            help="torch CPU threads (default: 1 on the CPU, like one evaluator actor)")
        parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls on CUDA (default: off)")
        parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                            help="auto: process CPU time with one thread on the CPU, else wall time")
    if repeats:
        parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per --size)")
    if family:
        parser.add_argument("--family", choices=FAMILIES, default="vit",
                            help="vit: a ViT's linear layers; cnn: every convolution of EfficientNet-Lite0")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    parser.add_argument("--json-out", default=None, help="also write the result JSON to this file")
    return parser


def say(line: str) -> None:
    print(line, flush=True)


def publish(results_dir: str | Path, stem: str, result: Mapping[str, Any], text: str) -> None:
    """Write ``<stem>.json`` and the Markdown ``text`` as ``<stem>.md`` under ``results_dir``
    (each under a temporary name, then renamed), show the Markdown and print the JSON line that
    the tests read."""
    from glora_ray import storage

    results = Path(results_dir)
    storage.write_json(str(results / f"{stem}.json"), result)
    storage.write_bytes(str(results / f"{stem}.md"), text.encode())
    say(text)
    print(json.dumps(result, default=str), flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, RatioStat):
        return _jsonable(asdict(value))
    if isinstance(value, np.generic):
        return value.item()
    return float(f"{value:.6g}") if isinstance(value, float) else value


def check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def main_of(name: str, parser: argparse.ArgumentParser, measure: Callable[[argparse.Namespace], dict[str, Any]]):
    """A script's ``main(argv)``: the result as one JSON line (the last of stdout), also written to
    --json-out; exit status 1 when a check failed, 2 (with the reason) when it cannot measure."""

    def main(argv=None) -> int:
        prepare_environment()
        args = parser.parse_args(argv)
        try:
            result = _jsonable({"bench": name, **measure(args)})
        except BenchError as err:
            print(f"{name}: cannot measure: {err}", file=sys.stderr, flush=True)
            return EXIT_CANNOT_MEASURE
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
        failed = [check_name for check_name, c in result.get("checks", {}).items() if not c["ok"]]
        if failed:
            print(f"{name}: check(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return EXIT_CHECK_FAILED if failed else 0

    return main


def last_json_line(text: str) -> dict[str, Any]:
    """The result object a script printed (its last stdout line that is a JSON object)."""
    for line in reversed(text.splitlines()):
        if line.strip().startswith("{") and line.strip().endswith("}"):
            return json.loads(line)
    raise ValueError("no JSON result line in the output")

