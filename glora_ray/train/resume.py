"""Which checkpoint a rerun resumes from, when the newest one is damaged (docs/method.md §6).

A run killed while writing, a full disk or a hand-deleted folder can leave the newest checkpoint
cut short or gone.  Resuming from it fails (Ray Train even refuses to start when its snapshot
names a folder that is not there), yet an older checkpoint is usually intact.  Before training,
``repair_run`` looks at the run's folder: when the newest checkpoint cannot be read, or Ray
Train's snapshot is unreadable or names a missing folder, the damaged checkpoints are removed,
the snapshot with them (Ray Train then starts a fresh record in the same folder), and the newest
intact checkpoint is handed to the workers instead, with a warning; with none intact, training
starts afresh.  Local mode's own checkpoints are read newest first the same way (``newest_intact``).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from .. import storage
from ..checkpoint import SupernetSpec
from ..errors import GLoRARayError
from .loop import load_training_state

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
RAY_CHECKPOINT_PREFIX = "checkpoint_"


def _problem(folder: str, spec: SupernetSpec) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or None."""
    try:
        payload = load_training_state(folder)
        SupernetSpec.from_dict(payload["meta"]["spec"]).check_matches(spec, folder)
    except (GLoRARayError, KeyError, TypeError) as err:
        return str(err)
    return None


def newest_intact(folders: Sequence[str], spec: SupernetSpec, warn: Callable[[str], None]) -> str | None:
    """The newest of ``folders`` (oldest first) that can be resumed from; each damaged one newer
    than it is removed, with a warning naming it."""
    for folder in reversed(folders):
        problem = _problem(folder, spec)
        if problem is None:
            return folder
        warn(f"checkpoint {folder} cannot be resumed from ({problem}); it is removed and an older one is tried")
        storage.delete_dir(folder)
    return None


def _snapshot_names(snapshot: Any) -> set[str]:
    """Every checkpoint folder name a Ray Train snapshot mentions, wherever its format keeps them."""
    if isinstance(snapshot, (dict, list)):
        return set().union(*map(_snapshot_names, snapshot.values() if isinstance(snapshot, dict) else snapshot))
    return {snapshot} if isinstance(snapshot, str) and snapshot.startswith(RAY_CHECKPOINT_PREFIX) else set()


def repair_run(run_dir: str, spec: SupernetSpec, warn: Callable[[str], None]) -> str | None:
    """Make the Ray Train run in ``run_dir`` resumable; return the checkpoint the workers must
    resume from when Ray Train's own record had to go (None: Ray Train resumes, or starts afresh)."""
    names = [name for name, is_dir in storage.list_dir(run_dir) if is_dir and name.startswith(RAY_CHECKPOINT_PREFIX)]
    folders = [storage.join(run_dir, name) for name in names]  # oldest first: Ray names them by time
    snapshot_uri = storage.join(run_dir, RAY_SNAPSHOT_FILE)
    problem = _record_problem(snapshot_uri, set(names)) if storage.exists(snapshot_uri) else (
        f"Ray Train's record {snapshot_uri} is missing" if folders else None)
    if problem is None and folders:
        damaged = _problem(folders[-1], spec)
        problem = None if damaged is None else f"its newest checkpoint cannot be read ({damaged})"
    if problem is None:
        return None
    storage.delete_file(snapshot_uri)  # Ray Train starts a fresh record in the same folder
    intact = newest_intact(folders, spec, warn)
    warn(f"training run {run_dir}: {problem}; " + (f"resuming from the newest intact checkpoint, {intact}" if intact
                                                  else "no intact checkpoint is left, so it starts afresh"))
    return intact


def _record_problem(snapshot_uri: str, present: set[str]) -> str | None:
    """What is wrong with Ray Train's record of a run, or None."""
    try:
        named = _snapshot_names(json.loads(storage.read_bytes(snapshot_uri)))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"Ray Train's record {snapshot_uri} is damaged ({err})"
    gone = sorted(named - present)
    return f"Ray Train's record names checkpoint(s) {gone} that are gone" if gone else None
