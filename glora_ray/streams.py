"""Every random stream of a run, tagged by what it is for (docs/method.md §2, §3).

A stream is ``numpy.random.default_rng([purpose, seed, *position])``.  The purpose is the first
word of the entropy, so two purposes never draw from one stream, whatever the seed, step or
count: a stream keyed by ``[seed, n]`` alone is training step n's for every purpose that keys
its own draws the same way (the lr sweep's scoring subnets once drew training step 8's).
"""
from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    """The purposes; each value is used by one purpose only (never reuse a retired one)."""

    TRAIN_STEP = 1  # the subnets of training step ``step``: position (step,)
    EDGE_SUBNETS = 2  # a sandwich's largest and smallest subnets, drawn once per run
    STOCHASTIC_DEPTH = 3  # torch's global RNG for one epoch of one worker: position (epoch, rank)
    SEARCH = 4  # the evolutionary planner, the whole search
    LR_SWEEP_SCORING = 5  # the subnets that score every lr-sweep trial: position (count,)


def entropy(purpose: Stream, seed: int, *position: int) -> list[int]:
    """The words ``rng`` seeds with: purpose first, then the run's seed, then the position."""
    return [int(purpose), int(seed), *(int(p) for p in position)]


def rng(purpose: Stream, seed: int, *position: int) -> np.random.Generator:
    """The generator of ``purpose`` for ``seed`` at ``position`` (e.g. a training step)."""
    return np.random.default_rng(entropy(purpose, seed, *position))
