"""Issue 21: one driver per output folder, clean stops on SIGTERM / Ctrl-C, the last bad inputs.

The fast tests call the entry point in this process; the slow ones start real drivers
(``pipelines/vtab.py --preset tiny``) as subprocesses and signal them.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from glora_ray import storage
from glora_ray.budget import parse_param_count
from glora_ray.data import write_digits_dataset
from glora_ray.errors import GLoRARayError
from glora_ray.pipeline import layout
from glora_ray.pipeline.cli import parse_config
from glora_ray.pipeline.config import run_record
from glora_ray.pipeline.lock import LOCK_FILE, OutputLock, OutputLockedError
from glora_ray.pipeline.preflight import check_unit_folders
from glora_ray.progress import START_UP, StageWatch
from helpers import logged
from helpers import REPO, load_entry_point, tiny_args


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


# -- bad inputs: one `error:` line, exit 2, before compute --------------------------------------
@pytest.mark.parametrize("value, message", [("1e400", "too large"), ("-5", "negative")])
def test_max_params_overflow_and_negative_are_one_line(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_entry_point().main(["--preset", "tiny", "--max-params", value])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and value in line and "not a number" not in line


def test_parse_param_count_refuses_what_no_count_can_be():
    for value, message in (("1e400", "too large"), ("-5", "negative"), (-3, "negative"), (float("inf"), "too large"),
                           (float("nan"), "not a number")):
        with pytest.raises(GLoRARayError, match=message):
            parse_param_count(value)
    assert parse_param_count("+2k") == 2000 and parse_param_count("-0") == 0


def test_symlink_loop_data_root_is_one_line(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(SystemExit) as exit_info:
        load_entry_point().main(tiny_args(a, tmp_path / "out"))
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "symlink loop" in line and str(a) in line
    assert not (tmp_path / "out").exists()


def test_single_class_dataset_is_refused_before_compute(tmp_path, capsys):
    root = tmp_path / "data"
    digits = write_digits_dataset(root)
    mono = root / "mono"
    mono.mkdir()
    (mono / "images").symlink_to(Path(digits) / "images")
    for split in ("train800", "val200", "train800val200", "test"):
        lines = (Path(digits) / f"{split}.txt").read_text().splitlines()
        (mono / f"{split}.txt").write_text("".join(f"{line.rsplit(' ', 1)[0]} 0\n" for line in lines))
    out = tmp_path / "out"
    assert load_entry_point().main(tiny_args(root, out, "--datasets", "mono")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'mono' has a single class" in line and "train800" in line
    assert not (out / "mono").exists() and not (out / LOCK_FILE).exists()


def _recorded_run(tmp_path) -> tuple[list[str], Path]:
    """Arguments of a tiny run whose --out already holds its config.json (a run to resume)."""
    root, out = tmp_path / "data", tmp_path / "out"
    write_digits_dataset(root)
    argv = tiny_args(root, out)
    storage.write_json(str(out / layout.CONFIG_FILE), run_record(parse_config(argv)))
    return argv, out


@pytest.mark.parametrize("sub", ["search", "search/population", "export"])
def test_unwritable_output_subfolder_is_found_by_preflight(tmp_path, sub):
    argv, out = _recorded_run(tmp_path)
    blocker = out / "digits" / sub
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where a folder must be")  # works as root too, unlike chmod
    with pytest.raises(GLoRARayError, match=f"{blocker} is a file"):
        check_unit_folders(str(out), [(str(out), "digits")])


def test_unwritable_output_subfolder_is_one_line_through_the_cli(tmp_path, capsys):
    argv, out = _recorded_run(tmp_path)
    (out / "digits" / "search").mkdir(parents=True)
    (out / "digits" / "search" / "population").write_text("not a folder")
    assert load_entry_point().main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "population is a file" in line
    assert not (out / "digits" / "train").exists() and not (out / LOCK_FILE).exists()


# -- the lock, in this process ---------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
    out = str(tmp_path / "out")
    with OutputLock(out):
        record = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(OutputLockedError) as err:
            OutputLock(out).acquire()
        assert f"pid {os.getpid()}" in str(err.value) and socket.gethostname() in str(err.value) and out in str(err.value)
    assert not (tmp_path / "out").exists()  # made by the lock, left empty: removed with it


def test_stale_lock_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "then"}))
    with logged() as records, OutputLock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and str(dead) in r.getMessage() for r in records)
    assert not (out / LOCK_FILE).exists() and out.is_dir()  # not made by the lock: kept


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "elsewhere-node-7", "pid": 4242, "started": "then"}))
    with pytest.raises(OutputLockedError, match="pid 4242 on host elsewhere-node-7.*remove"):
        OutputLock(str(out)).acquire()
    assert (out / LOCK_FILE).exists()


def test_uri_outputs_are_not_locked():
    with logged() as records, OutputLock("memory://bucket/run") as lock:
        assert lock.path is None
    assert [r.getMessage() for r in records] == [
        "--out memory://bucket/run is not locked (object stores have no atomic create-if-absent): run one driver "
        "per URI at a time"]


def test_stage_watch_reads_the_progress_lines():
    watch = StageWatch()
    assert watch.describe() == START_UP
    log = logging.getLogger("glora_ray.test_stage_watch")
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        log.info("[digits] stage 1: epoch 1/2")
        log.info("[svhn] stage 2: generation 1/3")
        log.info("[digits] stage 2: evolutionary search")
    finally:
        log.removeHandler(watch)
    assert watch.describe() == "stage 2 (search) of digits, svhn"


# -- real drivers ----------------------------------------------------------------------------------
TINY_MODEL = json.dumps({"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2})
DRIVER_POLL_S = 0.2
DRIVER_PATIENCE_S = 900  # a loaded 2-core machine: a generous bound for a driver to reach a stage


def driver_argv(home: Path, out: Path, generations: int) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "vtab.py"), "--preset", "tiny", "--out", str(out),
            "--data-root", str(home / "data"), "--img-size", "16", "--model-kwargs", TINY_MODEL,
            "--epochs", "2", "--warmup-epochs", "1", "--checkpoint-every", "2", "--train-workers", "0",
            "--population", "8", "--parents", "3", "--mutants", "3", "--crossovers", "2",
            "--generations", str(generations), "--max-params", "6k", "--actors", "1", "--eval-batch-size", "100"]


def driver_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "GLORA_RAY_HOME": str(home), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never this process's
    return env


def start_driver(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A driver in its own session (as a terminal's job), SIGINT at its default (Ctrl-C works)."""
    log_file = open(log_path, "w")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, driver: subprocess.Popen, log_path: Path, what: str) -> None:
    deadline = time.monotonic() + DRIVER_PATIENCE_S
    while not condition():
        assert driver.poll() is None, f"the driver ended before {what}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what}:\n{log_path.read_text()[-3000:]}"
        time.sleep(DRIVER_POLL_S)


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (Ray's GCS, raylet, workers, actors), with its start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        started = _start_time(child)
        if started is not None:
            found[child] = started
            todo.extend(children.get(child, []))
    return found


def assert_all_gone(processes: dict[int, str]) -> None:
    """None of ``processes`` still runs (a pid reused since by another process does not count)."""
    deadline = time.monotonic() + 60
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {pid: t for pid, t in alive.items() if _start_time(pid) == t}
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in alive if Path(f"/proc/{pid}").exists()}
    assert not alive, f"processes of the stopped driver left behind: {names}"


def assert_generations_whole(out: Path) -> list[Path]:
    population = out / "digits" / "search" / "population"
    files = sorted(population.glob("gen=*.parquet")) if population.is_dir() else []
    for path in files:
        assert pq.read_table(path).num_rows > 0  # complete: a partial file would not read
    return files


def stop_driver(driver: subprocess.Popen, log_path: Path, signum: int, group: bool) -> tuple[str, dict[int, str]]:
    ours = descendants(driver.pid)
    assert ours, "a driver in its search runs Ray processes"
    (os.killpg if group else os.kill)(driver.pid, signum)
    rc = driver.wait(timeout=DRIVER_PATIENCE_S)
    text = log_path.read_text()
    assert rc == 128 + signum, text[-3000:]
    return text, ours


@pytest.mark.slow
def test_one_driver_per_output_a_stale_lock_sigterm_ctrl_c_and_the_same_command_resumes(tmp_path):
    # One output through a driver's whole life: a second driver refused, a SIGKILLed driver's stale
    # lock taken over, a SIGTERM (schedulers) stop resumed by the same command, and a Ctrl-C (the
    # terminal) stop during that resumed run leaving whole generations (a resume to the end is
    # test_pipeline's and test_cluster's).
    home, out = tmp_path / "home", tmp_path / "out"
    argv, env = driver_argv(home, out, generations=25), driver_env(home)

    first = start_driver(argv, env, tmp_path / "first.log")
    wait_for(lambda: (out / LOCK_FILE).exists(), first, tmp_path / "first.log", "lock")
    first.send_signal(signal.SIGSTOP)  # holds the lock, before Ray starts
    second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=DRIVER_PATIENCE_S)
    assert second.returncode == 2, second.stdout + second.stderr
    line = one_error_line(second.stderr)
    assert str(out) in line and f"pid {first.pid}" in line and socket.gethostname() in line

    first.kill()  # kill -9: its lock stays behind
    first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid

    log_path = tmp_path / "sigterm.log"
    rerun = start_driver(argv, env, log_path)
    wait_for(lambda: "stage 2: [" in log_path.read_text(), rerun, log_path, "search generation")
    text, ours = stop_driver(rerun, log_path, signal.SIGTERM, group=False)
    assert f"stale lock of driver pid {first.pid}" in text
    assert text.strip().splitlines()[-1] == ("stopped by SIGTERM during stage 2 (search) of digits; "
                                             "run the same command to resume"), text[-3000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    assert_all_gone(ours)
    assert assert_generations_whole(out)
    assert not (out / LOCK_FILE).exists()

    log_path = tmp_path / "sigint.log"
    driver = start_driver(argv, env, log_path)
    wait_for(lambda: "generation" in log_path.read_text().partition("resuming:")[2], driver, log_path,
             "a generation after the resume")
    text, ours = stop_driver(driver, log_path, signal.SIGINT, group=True)  # Ctrl-C: the whole process group
    assert text.strip().splitlines()[-1] == ("stopped by SIGINT during stage 2 (search) of digits; "
                                             "run the same command to resume"), text[-3000:]
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]
    assert_all_gone(ours)
    kept = assert_generations_whole(out)
    assert 0 < len(kept) < 25  # resumed after the SIGTERM (waited for above), stopped again whole
