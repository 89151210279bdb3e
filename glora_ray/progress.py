"""Progress of a stage in steps (epochs, generations): elapsed time and an estimate of the rest."""
from __future__ import annotations

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
