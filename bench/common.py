"""Shared pieces of the benchmarks: size presets, model and data builders, timing, reporting.

Free of Ray: ``eval_cost``, ``train_step`` and ``gpu_check`` must run where Ray is not installed.
The Ray helpers are in ``bench/raytools.py``.

Timing: every comparison is measured *interleaved* in one process: each round times every
variant once, in a rotated order, so slow drift of a shared machine (another job starting, CPU
frequency, thermal state) hits all variants alike; a ratio is the median of the per-round
ratios.  On CUDA the device is synchronised before and after each timed call.  On the CPU with
one torch thread the clock is the process's CPU time (``--clock auto``): time the scheduler gives
to other jobs on a shared machine does not count, which wall time cannot exclude.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small", "base")
FAMILIES = ("vit", "cnn")  # GLoRA on a ViT's linear layers, or on a CNN's convolutions (docs/method.md §7)
EXIT_CHECK_FAILED = 1  # it measured, but a correctness check failed
EXIT_CANNOT_MEASURE = 2  # missing dependency or device, or a setting that cannot work

_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # Ray >= 2.59 turns token auth on for local clusters
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "HF_HUB_OFFLINE": "1",  # every benchmark model is randomly initialised
}


def prepare_environment() -> None:
    """Environment the scripts and their Ray workers need; call before importing Ray."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Ray workers (and the nodes of a simulated cluster) import ``bench`` from the repository.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])


class BenchError(RuntimeError):
    """The benchmark cannot measure: a missing dependency or device, or a setting that cannot work."""


# -- presets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelPreset:
    """A timm model, randomly initialised (no weights can be downloaded here, and timing does not
    depend on the values), and the module types GLoRA adapts in it."""

    name: str
    img_size: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    ranks: tuple[int, ...] = (8, 4)
    layer_types: tuple[str, ...] = ("linear",)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return (f"{self.name} @ {self.img_size}px" + (f" ({extra})" if extra else "") + f", ranks {self.ranks}"
                + f", adapting {'+'.join(self.layer_types)}")


@dataclass(frozen=True)
class SearchPreset:
    population: int
    parents: int
    mutants: int
    crossovers: int
    generations: int


@dataclass(frozen=True)
class SizePreset:
    name: str
    model: ModelPreset
    val_images: int
    eval_batch: int
    eval_repeats: int
    train_batch: int
    train_steps: int  # steps in one timed epoch
    train_repeats: int
    search: SearchPreset
    search_repeats: int
    memory_model: ModelPreset  # big enough that the weights dominate an actor's memory
    memory_val_images: int
    memory_actors: tuple[int, ...]
    cluster_workers: int
    cnn: ModelPreset  # the CNN of eval_cost and train_step's --family cnn

    def model_for(self, family: str) -> ModelPreset:
        if family not in FAMILIES:
            raise BenchError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")
        return self.cnn if family == "cnn" else self.model


TINY_VIT = ModelPreset("vit_tiny_patch16_224", 16, dict(patch_size=8, depth=2, embed_dim=32, num_heads=2),
                       num_classes=5, ranks=(4, 2))


def efficientnet_lite0(img_size: int, num_classes: int = 10) -> ModelPreset:
    """The embedded default's CNN: EfficientNet-Lite0, GLoRA on all 49 convolutions, ranks (4, 2)."""
    return ModelPreset("tf_efficientnet_lite0", img_size, num_classes=num_classes, ranks=(4, 2),
                       layer_types=("conv2d",))


PRESETS: dict[str, SizePreset] = {
    # Seconds, for the smoke test.
    "tiny": SizePreset(
        "tiny", TINY_VIT, val_images=32, eval_batch=16, eval_repeats=3, train_batch=8, train_steps=2,
        train_repeats=2, search=SearchPreset(6, 2, 2, 2, 2), search_repeats=1,
        memory_model=TINY_VIT, memory_val_images=8, memory_actors=(1, 2), cluster_workers=2,
        cnn=efficientnet_lite0(16, num_classes=5),
    ),
    # The CPU default: the whole 12-block ViT-Ti at 64 px (17 tokens), a 200-image val set.
    "small": SizePreset(
        "small", ModelPreset("vit_tiny_patch16_224", 64), val_images=200, eval_batch=64, eval_repeats=30,
        train_batch=64, train_steps=3, train_repeats=5, search=SearchPreset(12, 4, 4, 4, 3), search_repeats=3,
        memory_model=ModelPreset("vit_base_patch16_224", 32), memory_val_images=16, memory_actors=(1, 2, 4),
        cluster_workers=3, cnn=efficientnet_lite0(64),  # the default run's input size
    ),
    # The paper's setting, for GPUs: ViT-B/16 at 224 px.
    "base": SizePreset(
        "base", ModelPreset("vit_base_patch16_224", 224, num_classes=100), val_images=200, eval_batch=100,
        eval_repeats=15, train_batch=64, train_steps=4, train_repeats=5, search=SearchPreset(50, 10, 25, 25, 3),
        search_repeats=1, memory_model=ModelPreset("vit_base_patch16_224", 224, num_classes=100),
        memory_val_images=32, memory_actors=(1, 2, 4), cluster_workers=3, cnn=efficientnet_lite0(224, num_classes=100),
    ),
}


def preset(size: str) -> SizePreset:
    try:
        return PRESETS[size]
    except KeyError:
        raise BenchError(f"unknown size {size!r}; choose one of {list(PRESETS)}") from None


# -- models and data ---------------------------------------------------------------------------
def make_spec(model: ModelPreset, drop_path_rate: float = 0.0, seed: int = 0):
    """The supernet spec of a preset: random backbone from ``seed``, adapters seeded too."""
    from glora_ray.backbone import BackboneConfig
    from glora_ray.checkpoint import SupernetSpec

    backbone = BackboneConfig(model.name, pretrained=False, img_size=model.img_size,
                              drop_path_rate=drop_path_rate, model_kwargs=dict(model.kwargs), init_seed=seed)
    return SupernetSpec(backbone, num_classes=model.num_classes, ranks=tuple(model.ranks),
                        layer_types=tuple(model.layer_types), dataset="synthetic", adapter_seed=seed)


@torch.no_grad()
def randomize_adapters(supernet, seed: int, scale: float = 0.02) -> None:
    """Non-zero values for the support tensors that start at zero (down factors, D, E), so
    merging changes the weights and different subnets compute different functions.  At 0.02 a
    subnet still changes the logits by about their own size, and fp32 stays well conditioned."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in supernet.named_parameters():
        if ".glora." in name and (name.endswith("_down") or name.endswith(".D") or name.endswith(".E")):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def build_supernet(spec, seed: int = 0):
    """``spec.build()`` (the engine's builder) with non-zero adapters."""
    supernet = spec.build()
    randomize_adapters(supernet, seed)
    return supernet


def synthetic_images(count: int, img_size: int, seed: int) -> np.ndarray:
    """Normalised-image-like float32 data, (N, 3, H, W); timing does not depend on content."""
    return np.random.default_rng(seed).standard_normal((count, 3, img_size, img_size), dtype=np.float32)


def random_labels(count: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=count).astype(np.int64)


def teacher_labels(supernet, images: np.ndarray, seed: int, batch_size: int = 64) -> np.ndarray:
    """Labels from the supernet under one random subnet: subnets closer to it score higher, so
    a search has a signal and its results can be compared between runs."""
    supernet.set_subnet(supernet.sample_genes(np.random.default_rng(seed)))
    supernet.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(supernet(torch.from_numpy(images[start:start + batch_size])).argmax(-1))
    return torch.cat(out).numpy().astype(np.int64)


def state_bytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in state.values()))


@dataclass
class SearchProblem:
    """What a search needs: the spec, the supernet's numpy state, validation data with labels
    from a random teacher subnet (so subnets differ in accuracy)."""

    spec: Any
    state: dict[str, np.ndarray]
    images: np.ndarray
    labels: np.ndarray

    @property
    def weight_bytes(self) -> int:
        return state_bytes(self.state)


def make_search_problem(size: "SizePreset", seed: int) -> SearchProblem:
    from glora_ray.checkpoint import numpy_state

    spec = make_spec(size.model, seed=seed)
    supernet = build_supernet(spec, seed=seed)
    images = synthetic_images(size.val_images, size.model.img_size, seed)
    labels = teacher_labels(supernet, images, seed + 1)
    return SearchProblem(spec, numpy_state(supernet), images, labels)


def search_config(size: "SizePreset", actors: int | None, seed: int, population: int | None = None,
                  generations: int | None = None, **overrides: Any):
    """The preset's search (scaled to ``population``), one CPU and one torch thread per actor."""
    from glora_ray.search.config import SearchConfig

    s = size.search
    population = population or s.population
    scale = population / s.population
    return SearchConfig(
        population=population, parents=max(2, round(s.parents * scale)), mutants=round(s.mutants * scale),
        crossovers=round(s.crossovers * scale), generations=generations or s.generations, seed=seed,
        eval_batch_size=size.eval_batch, num_actors=actors, cpus_per_actor=1.0, threads_per_actor=1, **overrides,
    )


def require_ray():
    """Import Ray, or explain that this benchmark cannot run without it."""
    try:
        import ray
    except ImportError as err:
        raise BenchError(f"this benchmark needs Ray, which is not importable here ({err}); "
                         f"install it with: pip install 'ray[default]'") from None
    return ray


# -- devices -----------------------------------------------------------------------------------
@dataclass
class TimingSetup:
    """Where and how a benchmark times its rounds (from --device, --threads, --clock, --tf32)."""

    device: torch.device
    threads: int
    clock: str
    sync: Callable[[], None]
    tf32: bool

    def describe(self) -> str:
        return f"{self.device}, {self.threads} thread(s), {self.clock} clock{', TF32' if self.tf32 else ''}"


def timing_setup(args: argparse.Namespace) -> TimingSetup:
    device = resolve_device(args.device)
    if device.type == "cuda":
        set_tf32(args.tf32)
    threads = configure_threads(device, args.threads)
    return TimingSetup(device, threads, choose_clock(args.clock, device, threads), synchronizer(device),
                       bool(args.tf32 and device.type == "cuda"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device cuda: CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    if name not in ("cpu", "cuda"):
        raise BenchError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (the engine's own switch)."""
    from glora_ray.precision import set_tf32 as engine_set_tf32

    engine_set_tf32(enabled)


def configure_threads(device: torch.device, threads: int | None) -> int:
    """Torch CPU threads: 1 on the CPU unless told (like one evaluator actor with one CPU)."""
    if threads is None and device.type == "cpu":
        threads = 1
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# -- timing ------------------------------------------------------------------------------------
@dataclass
class RatioStat:
    """A ratio of two interleaved variants.  ``median``: of the per-round ratios (the headline);
    ``of_minimums``: fastest over fastest, which interference from other jobs (it only ever adds
    time) disturbs least."""

    median: float
    low: float  # smallest per-round ratio
    high: float  # largest per-round ratio
    of_minimums: float
    rounds: int

    def text(self) -> str:
        return (f"{self.median:.3f}x (rounds {self.low:.3f}..{self.high:.3f}, n={self.rounds}; "
                f"fastest/fastest {self.of_minimums:.3f}x)")


@dataclass
class Timing:
    """Seconds of each variant, one entry per round, in round order."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, numerator: str, denominator: str) -> RatioStat:
        a, b = self.seconds[numerator], self.seconds[denominator]
        per_round = [x / y for x, y in zip(a, b)]
        return RatioStat(statistics.median(per_round), min(per_round), max(per_round), min(a) / min(b), len(per_round))


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def choose_clock(name: str, device: torch.device, threads: int) -> str:
    """``auto``: CPU time for one thread on the CPU (all work is on this process's one thread),
    else wall time (CUDA, or several threads that may wait on each other)."""
    if name == "auto":
        return "cpu" if device.type == "cpu" and threads == 1 else "wall"
    if name not in CLOCKS:
        raise BenchError(f"--clock must be auto, wall or cpu, got {name!r}")
    return name


def time_call(fn: Callable[[], Any], sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def measure_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> Timing:
    """Time every variant once per round, in an order rotated each round, after ``warmup``
    untimed calls of each."""
    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        this_round = {}
        for name in names[shift:] + names[:shift]:
            this_round[name] = time_call(variants[name], sync, clock)
            seconds[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return Timing(seconds)


# -- reporting ---------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where the numbers come from.  ``ray`` is the installed version (not imported here)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "ray": _version("ray"),
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        matmul = torch.backends.cuda.matmul
        info.update({
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "tf32_matmul": getattr(matmul, "fp32_precision", None) or bool(matmul.allow_tf32),
        })
    return info


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated option, stripped, empty ones dropped, in order."""
    return [item.strip() for item in text.split(",") if item.strip()]


def add_common_args(parser: argparse.ArgumentParser, *, device: bool = True, repeats: bool = True) -> None:
    parser.add_argument("--size", choices=SIZES, default="small",
                        help="tiny: seconds (smoke test); small: the CPU default; base: ViT-B/16 at 224 px (GPUs)")
    if device:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        parser.add_argument("--threads", type=int, default=None,
                            help="torch CPU threads (default: 1 on the CPU, like one evaluator actor; "
                                 "torch's own on CUDA)")
        parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls on CUDA (default: off)")
        parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                            help="auto: process CPU time with one thread on the CPU, else wall time")
    if repeats:
        parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: per --size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (numpy / torch generators)")
    parser.add_argument("--json-out", default=None, help="also write the result JSON to this file")


def add_family_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=FAMILIES, default="vit",
                        help="vit: a ViT's linear layers (default); cnn: every convolution of EfficientNet-Lite0 "
                             "(the embedded default's model)")


def say(line: str) -> None:
    print(line, flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (RatioStat,)):
        return _jsonable(asdict(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def finish(result: dict[str, Any], json_out: str | None) -> int:
    """Print the result as one JSON line (the last line of stdout), write ``json_out``; the exit
    status is 1 when a check failed."""
    result = _jsonable(result)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    failed = [name for name, c in result.get("checks", {}).items() if not c["ok"]]
    if failed:
        print(f"{result.get('bench', 'bench')}: check(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return EXIT_CHECK_FAILED
    return 0


def run_bench(name: str, body: Callable[[], dict[str, Any]], json_out: str | None) -> int:
    """Run ``body`` and report; a ``BenchError`` ends with a clear message and exit status 2."""
    try:
        result = body()
    except BenchError as err:
        print(f"{name}: cannot measure: {err}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_MEASURE
    return finish({"bench": name, **result}, json_out)


def last_json_line(text: str) -> dict[str, Any]:
    """The result object a script printed (its last stdout line that is a JSON object)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError("no JSON result line in the output")
