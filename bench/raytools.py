"""Ray helpers of the benchmarks: a local instance, where an actor runs, and a recording pool.

Import only after ``common.require_ray()``; the Ray-free scripts never import this module.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray

from glora_ray.search import runner
from glora_ray.search.pool import EvaluatorPool

from .common import BenchError, prepare_environment

MIB = 2**20


def init_kwargs() -> dict[str, Any]:
    """Quiet drivers: no dashboard, no worker logs on the console (they would mix with ours)."""
    return dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


@contextmanager
def local_ray(num_cpus: float, object_store_bytes: int) -> Iterator[None]:
    """A private local Ray instance (``address="local"``: never a stray cluster), shut down after."""
    prepare_environment()
    if ray.is_initialized():
        raise BenchError("Ray is already initialised in this process; run the benchmark in its own process")
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=max(int(object_store_bytes), 256 * MIB),
             **init_kwargs())
    try:
        yield
    finally:
        ray.shutdown()


def whereabouts(handle: ray.actor.ActorHandle, timeout: float = 120.0) -> dict[str, Any]:
    """The process id and node id of an actor, asked from inside it (``__ray_call__``); the
    function is nested, so Ray ships it by value."""

    def where(_actor) -> dict[str, Any]:
        import os

        import ray as _ray

        return {"pid": os.getpid(), "node_id": _ray.get_runtime_context().get_node_id()}

    return ray.get(handle.__ray_call__.remote(where), timeout=timeout)


@dataclass
class PoolCall:
    start: float
    end: float
    candidates: int


@dataclass
class PoolRecord:
    """What the pool that ``run_search`` built did: when its actors were ready, where they run,
    and each generation's ``evaluate`` call."""

    created: float = 0.0
    ready: float = 0.0
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)  # "actor-<i>" -> pid, node_id
    calls: list[PoolCall] = field(default_factory=list)

    @property
    def evaluate_seconds(self) -> float:
        return sum(c.end - c.start for c in self.calls)


@contextmanager
def recording_pools() -> Iterator[list[PoolRecord]]:
    """While active, ``run_search`` builds a ``RecordingPool``: the real ``EvaluatorPool`` plus
    timestamps and the actors' whereabouts.  Yields the records, one per pool built."""
    records: list[PoolRecord] = []

    class RecordingPool(EvaluatorPool):
        def __init__(self, *args: Any, **kwargs: Any):
            self.record = PoolRecord(created=time.perf_counter())
            super().__init__(*args, **kwargs)
            self.record.ready = time.perf_counter()
            self.record.actors = {f"actor-{slot.index}": whereabouts(slot.handle) for slot in self.live}
            records.append(self.record)

        def evaluate(self, keys, batch_size):
            start = time.perf_counter()
            out = super().evaluate(keys, batch_size)
            self.record.calls.append(PoolCall(start, time.perf_counter(), len(keys)))
            # Replacements that joined during the call (none unless an actor died).
            for slot in self.live:
                self.record.actors.setdefault(f"actor-{slot.index}", whereabouts(slot.handle))
            return out

    saved = runner.EvaluatorPool
    runner.EvaluatorPool = RecordingPool
    try:
        yield records
    finally:
        runner.EvaluatorPool = saved
