"""The sweep's gate on the trials that train at once (fer_ray.tuning runs it as an actor).

A module of its own, importing nothing: defined in fer_ray.tuning, the actor's process
imported torch, timm, scikit-learn and the rest first (~5 s of CPU at every sweep's start
on a 2-core VM, beside the first trial's start).
"""

from __future__ import annotations


class TrialGate:
    """The trials that may train at once: each trial takes a place before it starts its
    TorchTrainer (run_trial) and gives it back when it ends (itself, and the driver's
    TrialLine for a trial stopped or lost without a word). Tune's searcher limits only the
    trials it creates: a resumed sweep's failed trials all went back to pending and started
    together with the ones left, and where the cluster held fewer, their Train workers took
    every CPU and Ray Data none. Run as an actor of the sweep's driver (num_cpus=0)."""

    def __init__(self, places: int) -> None:
        self.places, self.holders = places, set()

    def enter(self, trial_id: str) -> bool:
        if trial_id in self.holders or len(self.holders) < self.places:
            self.holders.add(trial_id)
            return True
        return False

    def leave(self, trial_id: str) -> None:
        self.holders.discard(trial_id)
