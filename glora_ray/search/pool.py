"""A fault-tolerant pool of evaluator actors over one shared supernet (docs/method.md §9).

Our own ``ray.wait`` loop rather than ``ray.util.ActorPool``: in Ray 2.60 the latter evicts an
actor only on ``ActorDiedError`` (not ``ActorUnavailableError``) and silently drops queued work
when every actor has died.  Here:

* every batch of candidates is tracked until its results arrive; a batch whose actor dies
  (any ``RayActorError``) goes back to the queue, and a replacement actor joins while the
  run's replacement allowance lasts.  A replacement starts in the background: its readiness is
  awaited in the same ``ray.wait`` as the running calls, so the live actors keep working; one
  that fails to start (or is not ready within ``start_timeout_s``) is logged and dropped, and
  the pool carries on with the actors it has;
* a candidate whose batch has killed an actor more than ``max_candidate_retries`` times is an
  error (a "poison" candidate must not crash actors forever);
* an exception raised inside ``evaluate`` is a bug, not a fault, and is raised at once;
* when no actor is left (nor starting) and work remains, the pool raises ``AllActorsDiedError``:
  a generation is never silently short.  At the first start, actors that fail are dropped the
  same way; ``ActorStartError`` only when none starts.

``EvaluatorPool.stats`` records where the time went (actor starts, time inside ``evaluate``) and
where each actor runs (process id, Ray node id), for ``SearchResult.pool`` and the benchmarks.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from .. import faults
from ..checkpoint import SupernetSpec
from .config import EvalMode, SearchConfig
from .evaluator import EvalResult, Evaluator

log = logging.getLogger(__name__)


class EvaluationPoolError(RuntimeError):
    """The pool could not evaluate a generation completely."""


class AllActorsDiedError(EvaluationPoolError):
    pass


class CandidateCrashError(EvaluationPoolError):
    pass


class ActorStartError(EvaluationPoolError):
    pass


@dataclass(frozen=True)
class ActorSettings:
    batch_size: int
    mode: EvalMode
    threads: int
    cpus: float
    gpus: float
    placement: str = "SPREAD"  # Ray's scheduling_strategy for the actors: "SPREAD" or "DEFAULT"
    precision: str = "fp32"  # of the forward passes: fp32, tf32 (CUDA), bf16
    merge: str = "auto"  # merge strategy of merged mode (merge.py)


class EvaluatorActor:
    """The Ray actor around ``Evaluator``: picks its device from the GPUs Ray assigned it."""

    def __init__(self, spec: SupernetSpec, state: Mapping[str, np.ndarray], images: np.ndarray,
                 labels: np.ndarray, settings: ActorSettings, index: int):
        faults.at_actor_start(index)  # test-only; nothing by default
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s); none assigned means the CPU.
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.index = index
        self.evaluator = Evaluator(
            spec, state, images, labels, batch_size=settings.batch_size, mode=settings.mode,
            device=device, threads=settings.threads, actor_id=f"actor-{index}",
            precision=settings.precision, merge=settings.merge,
        )

    def ready(self) -> dict[str, Any]:
        """Where this actor runs: process id, Ray node id, device, evaluation batch."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.evaluator.device), "eval_batch": self.evaluator.eval_batch}

    def evaluate(self, keys: Sequence[str]) -> list[EvalResult]:
        faults.at_evaluate_call(self.index, self.evaluator.calls + 1)  # test-only; nothing by default
        results = self.evaluator.evaluate(keys)
        _release_freed_memory()
        return results


def _load_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Hand freed heap blocks back to the OS.  glibc keeps the blocks of the merge's layer-sized
    temporaries after they are freed; an actor idle between calls should not hold them."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_RemoteEvaluator = ray.remote(EvaluatorActor)


def plan_actor_count(config: SearchConfig, resources: Mapping[str, float]) -> int:
    """How many actors the cluster holds at the configured size; clamps with a warning."""
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    eps = 1e-9  # fractional requests, e.g. 4 x 0.25 GPU on one GPU
    fits = math.floor(cpus / config.cpus_per_actor + eps)
    if config.gpus_per_actor > 0:
        fits = min(fits, math.floor(gpus / config.gpus_per_actor + eps))
    if fits < 1:
        raise ActorStartError(
            f"one evaluator actor needs cpus_per_actor={config.cpus_per_actor} and "
            f"gpus_per_actor={config.gpus_per_actor}, but the cluster has {cpus:g} CPUs and {gpus:g} GPUs"
        )
    if config.num_actors is None:
        return min(fits, config.population)  # more actors than candidates would only idle
    if config.num_actors > fits:
        warnings.warn(
            f"num_actors={config.num_actors} x (cpus_per_actor={config.cpus_per_actor}, "
            f"gpus_per_actor={config.gpus_per_actor}) exceeds the cluster ({cpus:g} CPUs, {gpus:g} GPUs); "
            f"using {fits} actors",
            stacklevel=2,
        )
        return fits
    return config.num_actors


@dataclass
class _Slot:
    index: int
    handle: ray.actor.ActorHandle
    started: float = 0.0  # time.monotonic() when it was created

    @property
    def name(self) -> str:
        return f"actor-{self.index}"


@dataclass
class PoolStats:
    """What a pool did, for progress lines and benchmarks (wall-clock seconds, ``time.perf_counter``).

    ``start_s``: from creating the first actors until each had answered ``ready`` or failed;
    ``evaluate_s``: inside ``evaluate``, summed over calls (``calls``); ``replacement_start_s``: the
    replacements' start times, summed (spent in the background of ``evaluate``); ``actors``:
    ``"actor-<i>"`` -> pid, node_id, device and eval_batch of every actor that started;
    ``start_failures``: actors that did not start, with the reason; ``deaths``: actors that died
    (or hung) while evaluating; ``replacements_started``: replacement actors started for them.
    """

    start_s: float = 0.0
    evaluate_s: float = 0.0
    calls: int = 0
    replacement_start_s: float = 0.0
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    start_failures: list[str] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)
    replacements_started: int = 0


class EvaluatorPool:
    """N evaluator actors sharing one supernet state and one validation set in the object store."""

    def __init__(
        self,
        spec: SupernetSpec,
        state_ref: ray.ObjectRef,
        images_ref: ray.ObjectRef,
        labels_ref: ray.ObjectRef,
        num_actors: int,
        settings: ActorSettings,
        *,
        max_replacements: int,
        max_candidate_retries: int,
        call_timeout_s: float | None = None,
        start_timeout_s: float = 600.0,
    ):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.spec = spec
        # The driver keeps these refs for the pool's life: objects put with ray.put die with
        # their last reference, and a replacement actor needs them (ray-project/ray#53727).
        self._refs = (state_ref, images_ref, labels_ref)
        self.settings = settings
        self.replacements_left = max_replacements
        self.max_candidate_retries = max_candidate_retries
        self.call_timeout_s = call_timeout_s
        self.stats = PoolStats()
        self.deaths = self.stats.deaths  # one list: the pool's record is the stats'
        self._next_index = 0
        self._initial = num_actors
        self.start_timeout_s = start_timeout_s
        self.live: list[_Slot] = []
        # Actors started but not yet ready: their ready() ref -> slot, awaited by evaluate's ray.wait.
        self._starting: dict[ray.ObjectRef, _Slot] = {}
        begin = time.perf_counter()
        for _ in range(num_actors):
            self._start_actor()
        self._wait_first_start()
        self.stats.start_s = time.perf_counter() - begin

    # -- actors -------------------------------------------------------------------------
    def _start_actor(self) -> None:
        index = self._next_index
        self._next_index += 1
        # Ray resolves the top-level refs in the actor: the numpy arrays arrive as zero-copy
        # read-only views of the object store, one copy per node.
        handle = _RemoteEvaluator.options(
            # No Ray-level restarts: the pool replaces dead actors itself and resubmits
            # their work, so no evaluation is silently retried or lost.
            num_cpus=self.settings.cpus, num_gpus=self.settings.gpus, max_restarts=0,
            scheduling_strategy=self.settings.placement,
        ).remote(self.spec, *self._refs, self.settings, index)
        slot = _Slot(index, handle, time.monotonic())
        self._starting[handle.ready.remote()] = slot

    def _wait_first_start(self) -> None:
        """Wait for the first actors; drop those that fail, fail only when none started."""
        deadline = time.monotonic() + self.start_timeout_s
        while self._starting:
            ready, _ = ray.wait(list(self._starting), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for slot in list(self._starting.values()):
                    self._start_failed(slot, f"not ready within start_timeout_s={self.start_timeout_s:g} s")
                self._starting.clear()
                break
            self._started(ready[0])
        self.live.sort(key=lambda slot: slot.index)
        if not self.live:
            failures = "; ".join(self.stats.start_failures[-5:])
            self.shutdown()
            raise ActorStartError(
                f"no evaluator actor (cpus={self.settings.cpus}, gpus={self.settings.gpus} each) started: {failures}; "
                f"free resources now: {ray.available_resources()}")

    def _started(self, ref: ray.ObjectRef) -> _Slot | None:
        """A starting actor's ready() answered: the slot joins the pool, or is dropped if it failed."""
        slot = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError as err:
            self._start_failed(slot, f"{type(err).__name__}: {err}")
            return None
        self.stats.actors[slot.name] = info
        if slot.index >= self._initial:
            self.stats.replacement_start_s += time.monotonic() - slot.started
        self.live.append(slot)
        return slot

    def _start_failed(self, slot: _Slot, reason: str) -> None:
        message = f"{slot.name}: failed to start ({reason})"
        self.stats.start_failures.append(message)
        log.warning("evaluator %s; carrying on with %d live actor(s)", message, len(self.live))
        ray.kill(slot.handle, no_restart=True)

    def _retire(self, slot: _Slot, reason: str) -> None:
        """Drop a dead (or hung) actor from the pool and note why."""
        self.live = [s for s in self.live if s is not slot]
        self.deaths.append(f"{slot.name}: {reason}")
        ray.kill(slot.handle, no_restart=True)

    def _replace(self) -> None:
        """Start a replacement actor in the background while the allowance lasts."""
        if self.replacements_left <= 0:
            return
        self.replacements_left -= 1
        self.stats.replacements_started += 1
        self._start_actor()

    def shutdown(self) -> None:
        for slot in [*self.live, *self._starting.values()]:
            ray.kill(slot.handle, no_restart=True)
        self.live = []
        self._starting = {}

    @property
    def num_actors(self) -> int:
        return len(self.live)

    def actor_nodes(self) -> dict[str, str]:
        """The Ray node id of every actor that started (live or since retired), by actor name."""
        return {name: info["node_id"] for name, info in self.stats.actors.items()}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, keys: Sequence[str], batch_size: int) -> dict[str, EvalResult]:
        """Results for every key, whatever the actors' finishing order or faults."""
        if len(set(keys)) != len(keys):
            raise ValueError("keys to evaluate must be distinct")
        begin = time.perf_counter()
        try:
            return self._evaluate(keys, batch_size)
        finally:
            self.stats.evaluate_s += time.perf_counter() - begin
            self.stats.calls += 1

    def _evaluate(self, keys: Sequence[str], batch_size: int) -> dict[str, EvalResult]:
        queue = collections.deque(list(keys[i:i + batch_size]) for i in range(0, len(keys), batch_size))
        idle = collections.deque(self.live)
        in_flight: dict[ray.ObjectRef, _Call] = {}
        crashes: collections.Counter[str] = collections.Counter()
        results: dict[str, EvalResult] = {}
        while queue or in_flight:
            while queue and idle:
                slot = idle.popleft()
                batch = queue.popleft()
                in_flight[slot.handle.evaluate.remote(batch)] = _Call(slot, batch, time.monotonic())
            if not in_flight and not self._starting:
                raise AllActorsDiedError(
                    f"all evaluator actors died and the replacement allowance is spent; "
                    f"{len(keys) - len(results)} of {len(keys)} candidates of this generation are not evaluated. "
                    f"Deaths: {'; '.join((self.deaths + self.stats.start_failures)[-5:])}"
                )
            ready, _ = ray.wait([*in_flight, *self._starting], num_returns=1, timeout=self._wait_timeout(in_flight))
            if not ready:
                self._kill_overdue(in_flight)
                self._drop_overdue_starts()
                continue
            ref = ready[0]
            if ref in self._starting:  # a replacement answered ready (or failed to start)
                slot = self._started(ref)
                if slot is not None:
                    idle.append(slot)
                elif not self.live:
                    self._replace()  # nothing left to run the work: try again while the allowance lasts
                continue
            call = in_flight.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as err:
                reason = f"killed after call_timeout_s={self.call_timeout_s}" if call.overdue else type(err).__name__
                self._retire(call.slot, reason)
                for key in call.batch:
                    crashes[key] += 1
                    if crashes[key] > self.max_candidate_retries:
                        raise CandidateCrashError(
                            f"candidate {key!r} was in a batch whose actor died {crashes[key]} times "
                            f"(max_candidate_retries={self.max_candidate_retries}); last: {err}"
                        ) from err
                queue.appendleft(call.batch)  # lost work goes first, so a generation ends promptly
                self._replace()
                continue
            if [r.key for r in out] != call.batch:
                raise EvaluationPoolError(
                    f"{call.slot.name} answered for {[r.key for r in out]}, asked for {call.batch}")
            results.update((r.key, r) for r in out)
            if call.overdue:
                # Killed for running past call_timeout_s, it answered before the kill took effect: its
                # results count, but the actor is going away and must not be handed more work.
                self._retire(call.slot, f"killed after call_timeout_s={self.call_timeout_s} (its last call "
                                        f"still answered)")
                self._replace()
            else:
                idle.append(call.slot)
        return results

    def _wait_timeout(self, in_flight: dict[ray.ObjectRef, "_Call"]) -> float | None:
        deadlines = [c.started + self.call_timeout_s for c in in_flight.values()
                     if self.call_timeout_s is not None and not c.overdue]
        # call_timeout_s counts a call's time, not an actor's start: starts have their own limit.
        deadlines += [s.started + self.start_timeout_s for s in self._starting.values()]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _kill_overdue(self, in_flight: dict[ray.ObjectRef, "_Call"]) -> None:
        """End actors whose call ran past call_timeout_s; their refs then fail as actor deaths."""
        if self.call_timeout_s is None:
            return
        now = time.monotonic()
        for call in in_flight.values():
            if not call.overdue and now - call.started >= self.call_timeout_s:
                call.overdue = True
                ray.kill(call.slot.handle, no_restart=True)

    def _drop_overdue_starts(self) -> None:
        """Give up on replacements not ready within start_timeout_s; the pool goes on without them."""
        now = time.monotonic()
        for ref, slot in list(self._starting.items()):
            if now - slot.started >= self.start_timeout_s:
                del self._starting[ref]
                self._start_failed(slot, f"not ready within start_timeout_s={self.start_timeout_s:g} s")


@dataclass
class _Call:
    slot: _Slot
    batch: list[str]
    started: float
    overdue: bool = False
