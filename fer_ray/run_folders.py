"""What a training run's or a sweep's folder holds, read with storage alone (no torch, no
Ray): the job scripts ask it when stopped, whatever they had imported by then."""

from __future__ import annotations

from fer_ray import storage
from fer_ray.constants import CHECKPOINT_SNAPSHOT, RAY_RUN_NAME, RUN_SUMMARY_FILE, TRIALS_DIR


def has_checkpoint(run_dir: str) -> bool:
    """Whether the run in `run_dir` (a training run's folder, or a sweep's trial) reported a
    checkpoint: Ray Train's record of them is there once one was."""
    return storage.exists(storage.join(run_dir, RAY_RUN_NAME, CHECKPOINT_SNAPSHOT))


def saved_nothing(tune_dir: str) -> bool:
    """Whether no trial of the sweep in `tune_dir` saved an epoch (every trial failed in its
    first epoch, or the sweep was stopped before one ended): nothing holds it to its
    settings."""
    trials = storage.join(tune_dir, TRIALS_DIR)
    if not storage.exists(trials):
        return True
    folders = [storage.join(trials, e.base_name) for e in storage.list_dir(trials) if e.type.name == "Directory"]
    return not any(has_checkpoint(f) or storage.exists(storage.join(f, RUN_SUMMARY_FILE)) for f in folders)
