"""Issue 32, item 6: the paper preset once, end to end, at toy length; what it costs per image, and
what the paper's 19-dataset protocol would take.

Runs ``pipelines/vtab.py --preset paper`` (ViT-B/16 at 224 px; random init where no weights are
cached) on a handful of real images (the bundled digits, lists cut to ``--images`` per split) for
one epoch and one generation: every stage (train, search, test, merge, export), in a subprocess
whose Ray processes are sampled for resident memory (RSS) while it runs.  From the run's own
records: training seconds per image (the supernet's history), evaluation seconds per image (the
population's ``eval_seconds``).  Then the protocol (docs/method.md §2-§4): per dataset 500 epochs
of 800 images, a search of population 50 over 20 generations on 200 images, one test; projected
from this machine's figures and from the GPU throughputs given (``--gpu-*``: measured elsewhere,
e.g. bench/README.md's H200 section), on 1 and on 8 GPUs (datasets run concurrently).

    python -m bench.paper_toy [--images 16] [--gpu-train-ips 376 --gpu-eval-ips 1161] [--json-out PATH]
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MIB, REPO_ROOT, BenchError, machine_info, main_of, parser_for, say

DATASETS, EPOCHS, TRAIN_IMAGES, VAL_IMAGES = 19, 500, 800, 200  # the paper's protocol
TEST_IMAGES = 20_000  # a VTAB-1k test list's typical length (between 711 and 73,728)
ROLES = {"RayTrainWorker": "training worker", "EvaluatorActor": "evaluator actor", "run_unit": "unit driver",
         "split_accuracies": "test task"}

parser = parser_for("paper_toy", __doc__, device=False, repeats=False)
parser.add_argument("--images", type=int, default=16, help="images per split (default 16)")
parser.add_argument("--gpu-train-ips", type=float, default=376.0,
                    help="supernet training images/s on one GPU (default: the H200's fp32 figure)")
parser.add_argument("--gpu-eval-ips", type=float, default=1161.0,
                    help="merged-candidate evaluation images/s on one GPU (default: the H200's fp32 figure)")


def toy_dataset(root: Path, images: int) -> None:
    """The digits in VTAB-1k layout as dataset "toy", each list cut to its first ``images`` lines."""
    from glora_ray.data import write_digits_dataset

    folder = write_digits_dataset(root / "staging")
    folder.rename(root / "toy")
    for name in ("train800", "val200", "train800val200", "test"):
        path = root / "toy" / f"{name}.txt"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:images]))


class MemorySampler(threading.Thread):
    """The peak RSS of each Ray role (``ROLES``, told by the process title) until stopped."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s, self.peak_mib, self._stop_event = period_s, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.wait(self.period_s):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(proc.info["cmdline"] or ())
                for marker, role in ROLES.items():
                    if title.startswith("ray::") and marker in title and proc.info["memory_info"]:
                        rss = proc.info["memory_info"].rss / MIB
                        self.peak_mib[role] = max(self.peak_mib.get(role, 0.0), rss)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        return self.peak_mib


def project(train_s_per_image: float, eval_s_per_image: float, population: int, generations: int,
            per_generation: int) -> dict[str, float]:
    """Hours of the protocol's work per dataset from seconds per image: training, search, test."""
    evaluations = population + (generations - 1) * per_generation
    return {"train_h": EPOCHS * TRAIN_IMAGES * train_s_per_image / 3600,
            "search_h": evaluations * VAL_IMAGES * eval_s_per_image / 3600,
            "test_h": TEST_IMAGES * eval_s_per_image / 3600}


def measure(args) -> dict:
    try:
        import psutil  # noqa: F401
    except ImportError as err:
        raise BenchError("psutil is needed to sample memory: pip install -e '.[bench]'") from err
    import pandas as pd

    from glora_ray import storage
    from glora_ray.search.config import SearchConfig

    work = Path(tempfile.mkdtemp(prefix="paper-toy-"))
    toy_dataset(work / "data", args.images)
    command = [sys.executable, str(REPO_ROOT / "pipelines" / "vtab.py"), "--preset", "paper", "--no-pretrained",
               "--datasets", "toy", "--num-classes", "10", "--data-root", str(work / "data"), "--out", str(work / "out"),
               "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--population", "4", "--parents", "2",
               "--mutants", "1", "--crossovers", "1", "--generations", "1", "--actors", "1",
               "--eval-batch-size", "8", "--seed", str(args.seed)]
    say(f"[paper_toy] {' '.join(command[1:])}")
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    peak_mib = sampler.stop()
    if run.returncode != 0:
        raise BenchError(f"the toy paper run failed (exit {run.returncode}): {run.stderr[-2000:]}")
    say(run.stdout)
    out = str(work / "out" / "toy")
    history = storage.read_json(f"{out}/train/supernet/supernet/history.json")
    population = pd.read_parquet(f"{out}/search/population")
    train_s = sum(h["seconds"] for h in history) / sum(h["images"] for h in history)
    eval_s = float(population["eval_seconds"].mean()) / args.images
    paper = SearchConfig()
    shape = (paper.population, paper.generations, paper.mutants + paper.crossovers)
    cpu = project(train_s, eval_s, *shape)
    gpu = project(1 / args.gpu_train_ips, 1 / args.gpu_eval_ips, *shape)
    per_dataset = {"cpu (2 cores, this machine)": cpu, "one GPU (--gpu-* figures)": gpu}
    rows = [f"| {where} | {p['train_h']:.2f} | {p['search_h']:.2f} | {p['test_h']:.2f} | "
            f"{DATASETS * sum(p.values()):.1f} | {-(-DATASETS // 8) * sum(p.values()):.1f} |"
            for where, p in per_dataset.items()]
    text = "\n".join([
        f"Toy paper run: every stage, {wall_s:.0f} s wall; training {train_s:.3f} s/image, evaluation "
        f"{eval_s:.3f} s/image; peak RSS " + ", ".join(f"{role} {mib:.0f} MiB" for role, mib in sorted(peak_mib.items())),
        "", "| per dataset, hours | train | search | test | 19 datasets, 1 device | 19 datasets, 8 devices |",
        "|---|---:|---:|---:|---:|---:|", *rows, ""])
    result = {"wall_s": wall_s, "train_s_per_image": train_s, "eval_s_per_image": eval_s, "peak_rss_mib": peak_mib,
              "projection_hours_per_dataset": per_dataset, "protocol": {"datasets": DATASETS, "epochs": EPOCHS,
              "search": shape, "test_images": TEST_IMAGES}, "machine": machine_info()}
    say(text)
    return result


main = main_of("paper_toy", parser, measure)

if __name__ == "__main__":
    sys.exit(main())
