"""`ray job submit` against a running cluster: a head of our own, stopped by its own processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import tiny_args

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_processes(temp_dir: str):
    """Every process of the head we started: those naming its temp dir, and their children."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_cluster(temp_dir: str) -> None:
    procs = cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_working_dir_is_far_below_the_upload_limit():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    total = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    assert total < 10 * 2**20, f"{total / 2**20:.1f} MiB would be uploaded"


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(tmp_path):
    if shutil.which("ray") is None and not Path(RAY[0]).exists():
        pytest.fail("the ray CLI (ray[default]) is required for job submission")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayjob_", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, agent, agent_grpc, client, metrics, runtime_env = free_ports(7)
    start = subprocess.run(
        RAY + ["start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2", "--include-dashboard=true",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        out = tmp_path / "out"
        argv = tiny_args(tmp_path / "data", out, "--generations", "1")
        submit = subprocess.run(
            RAY + ["job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                   "--submission-id", f"glora-test-{gcs}", "--", "python", "pipelines/vtab.py", *argv],
            env=env, capture_output=True, text=True, timeout=600,
        )
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower(), log[-4000:]
        status = subprocess.run(RAY + ["job", "status", "--address", f"http://127.0.0.1:{dashboard}",
                                       f"glora-test-{gcs}"], env=env, capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower()
        summary = pd.read_parquet(out / "summary.parquet")
        assert list(summary["dataset"]) == ["digits"] and summary["test_acc"].iloc[0] > 0.2  # chance: 0.1
        export = out / "digits" / "export"
        assert (export / "merged.safetensors").is_file() and (export / "adapters.safetensors").is_file()
        assert json.loads((export / "subnet.json").read_text())["params"] <= 6_000
        assert json.loads((out / "config.json").read_text())["config"]["datasets"] == ["digits"]
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not cluster_processes(temp_dir)
