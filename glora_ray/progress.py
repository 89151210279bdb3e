"""Progress of a stage in steps (epochs, generations): elapsed time and an estimate of the rest;
and which stage a job is in (``StageWatch``)."""
from __future__ import annotations

import logging
import re
import time


def duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; ``3725`` -> ``"1h02m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StageClock:
    """Counts the steps this process runs of ``remaining`` and estimates the time left from them."""

    def __init__(self, remaining: int):
        self.remaining = remaining
        self.done = 0
        self.started = time.perf_counter()

    def step(self) -> str:
        """Mark one step done; ``"elapsed 1m15s, ETA 2m30s"``."""
        self.done += 1
        elapsed = time.perf_counter() - self.started
        left = max(self.remaining - self.done, 0)
        return f"elapsed {duration(elapsed)}, ETA {duration(elapsed / self.done * left)}"


# -- the stage a job is in, for the line a stopped job ends with --------------------------------
# run.py's progress lines read "[<unit>] stage <N>: ..." and "[<unit>] baseline <name>: ...".
_UNIT_LINE = re.compile(r"\[(?P<unit>[^\]]+)\] (?:stage (?P<stage>[123])\b|(?P<baseline>baseline) )")
STAGES = {"1": "stage 1 (supernet training)", "2": "stage 2 (search)", "3": "stage 3 (test and export)",
          "baseline": "the baselines"}
START_UP = "start-up (checks before compute, Ray)"


class StageWatch(logging.Handler):
    """Reads the stage of every unit from the progress lines the driver logs (docs/method.md §9:
    the units run as Ray tasks; their lines are the driver's only view of them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.units: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _UNIT_LINE.match(record.getMessage())
        if match is not None:
            self.units[match["unit"]] = STAGES[match["stage"] or "baseline"]

    def describe(self) -> str:
        """``"stage 2 (search) of digits"``; ``START_UP`` before any unit reported."""
        if not self.units:
            return START_UP
        by_stage: dict[str, list[str]] = {}
        for unit, stage in self.units.items():
            by_stage.setdefault(stage, []).append(unit)
        return "; ".join(f"{stage} of {', '.join(units)}" for stage, units in by_stage.items())
