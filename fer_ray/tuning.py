"""Ray Tune sweeps over learning rate and label smoothing.

Each trial is a small driver function that builds and fits the same TorchTrainer as
`jobs/train.py` (through `fer_ray.trainer`), reporting to Tune with Ray Train's
`TuneReportCallback`; ASHA stops weak trials early on val accuracy. Every trial writes a
complete run folder under TUNE_DIR/trials/<trial id>/.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from typing import Any

import pandas as pd
import ray.tune

from fer_ray import storage
from fer_ray.blur import same_sigma
from fer_ray.cli import autoscaler_limits, on_cluster
from fer_ray.config import (
    FILLED_KEY,
    OPTUNA_MISSING,
    RESOLVED_KEY,
    TRIAL_KEY,
    ConfigError,
    SweepConfig,
    TrainConfig,
    defaults_filled,
    from_flat,
    to_dict,
)
from fer_ray.constants import (
    BEST_CONFIG_FILE,
    BEST_DIR,
    CHECKPOINT_SNAPSHOT,
    CONFIG_FILE,
    HISTORY_FILE,
    RAY_RUN_NAME,
    RUN_SUMMARY_FILE,
    SWEEP_CONFIG_FILE,
    TRIALS_DIR,
)
from fer_ray.gate import TrialGate
from fer_ray.model import timed_cpu_format
from fer_ray.run_folders import has_checkpoint, saved_nothing
from fer_ray.trainer import (
    TrainingDiverged,
    build_trainer,
    check_resources,
    data_record,
    finalize_run,
    load_pretrained,
    local_staging,
    resolve_settings,
    saved_result,
    write_config,
)

log = logging.getLogger(__name__)

TUNE_RUN_NAME = "ray_tune"
RESULTS_FILE = "results.parquet"
SUMMARY_PLOT = "tune_summary.png"
# What ASHA compares trials on at its rungs and what Optuna learns from: each trial's best
# val accuracy so far, the number the sweep selects on (best/ is a trial's best epoch). A
# trial's latest val accuracy cut trials that had peaked (ASHA) and fed Optuna a value below
# the trial's result, and Tune's table named as "current best" a trial other than the sweep's.
METRIC = "best_val_acc"
TRIAL_DRIVER_CPU = 0.01
# A resource cluster.yaml gives its head node (on-demand, never preempted): where a cluster
# has it, each trial's function runs there, and with it the Train controller Ray pins to that
# node, so losing a spot GPU worker fails only a Train attempt, which Ray Train restarts from
# the last checkpoint (--max-failures), not the whole trial (Tune does not retry trials).
TRIAL_SLOT = "fer_ray_trial"


def trial_resources() -> dict[str, float]:
    """What each trial's function holds: a TRIAL_SLOT where the cluster has them, else a
    sliver of a CPU (Tune wants a non-empty request), leaving whole CPUs to Train workers and
    Ray Data, which would otherwise starve each other on a small machine."""
    import ray

    return {TRIAL_SLOT: 1} if ray.cluster_resources().get(TRIAL_SLOT) else {"CPU": TRIAL_DRIVER_CPU}


GATE_POLL_S = 2.0
# The running sweep's TrialGate is a named actor of its job: the trials get its handle, and
# TrialLine finds it by name (Tune runs the callbacks, pickled with the sweep, in another
# process under Ray Client, and a resumed sweep's are the ones it began with).
GATE_NAME = "fer_ray_trial_gate"


def _named_gate() -> Any:
    try:
        return ray.get_actor(GATE_NAME)
    except ValueError:
        return None


def open_gate(places: int) -> Any:
    """Start the sweep's TrialGate, on the driver's node (the head under `ray job submit`,
    not a spot worker that may go)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    close_gate()  # (one left by a sweep stopped in this driver before)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(TrialGate).options(name=GATE_NAME, scheduling_strategy=here).remote(places)


def close_gate() -> None:
    """Stop the sweep's TrialGate, waiting (up to 10 s) for its name to be free again."""
    gate = _named_gate()
    if gate is None:
        return
    ray.kill(gate)
    deadline = time.time() + 10
    while _named_gate() is not None and time.time() < deadline:
        time.sleep(0.1)


def _leave_gate(trial_id: str) -> None:
    gate = _named_gate()
    if gate is not None:
        gate.leave.remote(trial_id)


def _pass_gate(gate: Any, trial_id: str, places: int) -> None:
    """Wait (holding no CPU) until the trial may train."""
    said = False
    while True:
        try:
            if ray.get(gate.enter.remote(trial_id)):
                return
        except ray.exceptions.RayActorError:  # (its node lost: train, as sweeps did without it)
            log.warning("Trial %s found the sweep's trial gate gone; it trains without waiting", trial_id)
            return
        if not said:
            log.info("Trial %s waits for one of the %d trials that run at once to end", trial_id, places)
            said = True
        time.sleep(GATE_POLL_S)
RESULT_COLUMNS = [
    "trial_id", "lr", "label_smoothing", "best_val_acc", "best_epoch", "epochs_run",
    "stopped_early", "status", "error", "best_dir",
]


def trial_config(base: dict[str, Any], lr: float, label_smoothing: float, output: str) -> TrainConfig:
    """The training config of one trial: the sweep's settings with its sampled values."""
    flat = {k: v for section in base.values() if isinstance(section, dict) for k, v in section.items()}
    train_keys = {k for section, v in to_dict(TrainConfig()).items() for k in v}
    flat = {k: v for k, v in flat.items() if k in train_keys}
    flat.update(lr=lr, label_smoothing=label_smoothing, output=output)
    cfg = from_flat(TrainConfig, flat)
    # (the sweep's filled defaults stay marked so: best_config.json's follow a retrain's flags)
    cfg.defaults_filled = tuple((base.get(RESOLVED_KEY) or {}).get(FILLED_KEY) or ())
    return cfg.resolve_defaults()


def adopt_driver_address(address: str | None) -> None:
    """In a trial's process, the driver's RAY_ADDRESS (cli.on_cluster: a cluster joined),
    where the process has none: Ray sets it for the driver only, and a trial took itself
    for a Ray of its own, reading no autoscaler limits (on a cold cluster.yaml cluster its
    training data was cut into the 2-4 blocks of the CPUs up, data.shuffle_parallelism)."""
    if address and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = address


def run_trial(config: dict[str, Any], base: dict[str, Any], manifest: dict[str, Any],
              tune_dir: str, pretrained: Any, cpu_format: str | None = None, gate: Any = None,
              ray_address: str | None = None) -> None:
    """One Tune trial: a complete training run, reported to Tune epoch by epoch. `gate`:
    [a TrialGate actor, its places], passed before the trial trains (None: no gate);
    `ray_address`: the driver's RAY_ADDRESS."""
    from ray.tune.integration.ray_train import TuneReportCallback

    adopt_driver_address(ray_address)
    trial_id = ray.tune.get_context().get_trial_id()
    if gate:
        _pass_gate(gate[0], trial_id, gate[1])
    try:
        trial_dir = storage.join(tune_dir, TRIALS_DIR, trial_id)
        cfg = trial_config(base, config["lr"], config["label_smoothing"], trial_dir)
        # The sweep's format, in the trial's config.json and so in best_config.json: retrained
        # from it, the best trial's settings train in the same (not timed again).
        cfg.run.cpu_format = cpu_format
        # The trial's budget counts from its workers' start, not from the minutes they may wait
        # for the nodes an autoscaler brings up.
        settings = resolve_settings(cfg, manifest, pretrained[0] if pretrained else None, budget_from_workers=True)
        write_config(cfg, settings, trial_dir, manifest)
        # Re-running a trial (sweep resumed) resumes its TorchTrainer from the trial folder.
        build_trainer(cfg, settings, callbacks=[TuneReportCallback()]).fit()
    finally:
        if gate:
            gate[0].leave.remote(trial_id)


def cluster_capacity(cfg: SweepConfig) -> int:
    """Trials that fit at once: each needs its workers plus one CPU for Ray Data (two trials
    or more leave whole CPUs free beside their TRIAL_DRIVER_CPU slivers; one trial's sliver
    is counted by check_resources), and with --use-gpu a GPU per worker. Under an
    autoscaler, counted on the most the cluster may grow to, not on the nodes up now (the
    extra trials' workers wait for the nodes their requests bring up)."""
    cpu_fit, gpu_fit, known = _fits(cfg)
    if gpu_fit is None:
        return max(1, cpu_fit)
    if _gpu_limits_unknown(gpu_fit, known):
        # No autoscaler limits known: most often a cluster started by hand (`ray start`),
        # which gains no nodes. As many trials as the GPUs and CPUs up now hold: each
        # trial is a process with torch and a Train controller (~1-1.5 GiB), and all
        # --num-samples at once filled a GPU box's memory. Where the GPUs are what holds
        # them back, --max-concurrent may ask for more (for an autoscaler whose limits Ray
        # does not report): GPU trials beyond the GPUs wait for them holding no CPU, so
        # they cannot starve the running ones; where the CPUs are, it may not.
        if gpu_fit > cpu_fit:
            return max(1, cpu_fit)
        return max(1, gpu_fit, cfg.sweep.max_concurrent or 0)
    return max(1, min(cpu_fit, gpu_fit))


def _fits(cfg: SweepConfig) -> tuple[int, int | None, bool]:
    """(trials the CPUs hold, each its workers' and one for Ray Data, and the head's trial
    slots where there are any; trials the GPUs hold, None without --use-gpu; whether the
    autoscaler's limits are known), on the most an autoscaler may grow the cluster to where
    its limits are known, else on what is up."""
    cpu_fit, gpu_fit, known, _, _ = _fits_and_why(cfg)
    return cpu_fit, gpu_fit, known


def _fits_and_why(cfg: SweepConfig) -> tuple[int, int | None, bool, str, str]:
    """_fits, and in words what holds the trials at once back (the smallest limit), and
    what holds back the trials the CPUs (or the head's trial slots) hold."""
    import ray

    res = dict(ray.cluster_resources())
    most = autoscaler_limits()
    if most:
        res = {k: max(res.get(k, 0), most.get(k, 0)) for k in {*res, *most}}
    per_trial_cpu = cfg.run.num_workers * cfg.run.cpus_per_worker + 1
    cpu_fit = int(res.get("CPU", 0) // per_trial_cpu)
    cpu_why = "each takes its workers' CPUs and one for Ray Data"
    if res.get(TRIAL_SLOT) and int(res[TRIAL_SLOT]) < cpu_fit:  # trials run on the head's slots
        cpu_fit = int(res[TRIAL_SLOT])
        cpu_why = f"each takes one of the head's {TRIAL_SLOT} slots"
    gpu_fit = int(res.get("GPU", 0) // cfg.run.num_workers) if cfg.run.use_gpu else None
    why = "each takes a GPU per Train worker" if gpu_fit is not None and gpu_fit < cpu_fit else cpu_why
    return cpu_fit, gpu_fit, bool(most), why, cpu_why


def _gpu_limits_unknown(gpu_fit: int | None, known: bool) -> bool:
    """A --use-gpu sweep (`_fits`' gpu_fit) on a joined cluster whose autoscaler limits are
    not known (`_fits`' known)."""
    return gpu_fit is not None and not known and on_cluster()


def _searcher(cfg: SweepConfig, concurrent: int) -> Any:
    """The search algorithm, seeded with --seed (the same command samples the same trials),
    holding to `concurrent` trials at once."""
    if cfg.sweep.searcher != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.run.seed)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(OPTUNA_MISSING) from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode="max", seed=cfg.run.seed), max_concurrent=concurrent)


class TrialLine(ray.tune.Callback):
    """One progress line per finished trial (Ray's table shows the running ones)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _leave_gate(trial.trial_id)  # (also for a trial stopped before its own leave ran)
        r = trial.last_result or {}
        ran, diverged = r.get("epoch", 0), math.isnan(r.get("val_acc", 0.0))
        if ran >= self.epochs:
            cut = ""
        elif r.get("last_report") and not r.get("stopped_early") and not diverged:
            # It ended itself, neither stopped early nor diverged: its time budget's plan ran out.
            cut = f" (its --time-budget fitted {ran} of {self.epochs} epochs)"
        else:  # ASHA (whose trials end without a last report), early stopping or divergence
            cut = f" (stopped after {ran} of {self.epochs} epochs)"
        if r.get("best_epoch", 0) < 1 and diverged:  # (at once)
            best = f"diverged in epoch {ran}, no epoch to keep"
        else:
            best = f"best val acc {r.get('best_val_acc', float('nan')):.4f} at epoch {r.get('best_epoch')}{cut}"
        print(
            f"trial {trial.trial_id} done: lr {trial.config['lr']:.2e}, label smoothing "
            f"{trial.config['label_smoothing']:.3f}, {best}",
            flush=True,
        )

    def __init__(self, epochs: int, tune_dir: str) -> None:
        self.epochs, self.tune_dir = epochs, tune_dir

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _leave_gate(trial.trial_id)  # (a trial whose process was lost never ran its own)
        # Under TUNE_DIR, where Tune copies it: the driver's copy (trial.error_file) is in
        # Ray's session folder, which does not outlast the cluster.
        error_file = storage.join(self.tune_dir, TUNE_RUN_NAME, trial.trial_id, "error.txt")
        print(f"trial {trial.trial_id} failed; its error is in {error_file}", flush=True)


# Set when a Ctrl-C reaches the sweep's driver while Tune runs (see InterruptWatch).
_INTERRUPTED = threading.Event()


class InterruptWatch(ray.tune.Callback):
    """Notes a stop signal during the sweep. On SIGINT (Ctrl-C) or SIGUSR1 (a batch system's
    warning) Tune's handler ends the experiment, marks the trials that were running
    TERMINATED as if they had finished, and fit() returns as usual: without this, a sweep
    whose trials were all running when stopped would crown one of them. Tune installs its
    handler before it sets its callbacks up; this wraps it then (in the module's
    _INTERRUPTED: Tune keeps its own copy of the callbacks, pickled with the sweep)."""

    def setup(self, **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            tune_handler = signal.getsignal(sig)
            if callable(tune_handler):
                signal.signal(sig, functools.partial(_noted, tune_handler))


def _noted(tune_handler: Any, sig: int, frame: Any) -> None:
    _INTERRUPTED.set()
    tune_handler(sig, frame)


# The signals Tune ends an experiment on (SIGUSR1 is not on every platform).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGUSR1") if hasattr(signal, name))


# The report after which a trial's training function returns by itself (fer_ray.train_loop:
# its plan's last epoch, whatever cut it: the time budget, early stopping, divergence).
LAST_REPORT = "last_report"


class LastReportASHA(ray.tune.schedulers.ASHAScheduler):
    """ASHA that lets a trial's last report pass: a trial stopped there would have its
    TorchTrainer killed before it releases its workers (asha), and a trial whose time
    budget ends its plan at one of ASHA's rungs reported there (grace_period x 4^k is below
    max_t whatever the budget fits). The rung is recorded all the same."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == self.STOP and result.get(LAST_REPORT):
            self._num_stopped -= 1  # (counted by ASHA as it decided)
            return self.CONTINUE
        return decision


def asha(epochs: int, grace_period: int, freeze_epochs: int = 0) -> Any:
    """ASHA on each trial's best val accuracy so far (METRIC), with rungs before the last
    epoch only; None (no early stops) when a trial has no epoch between its grace period
    and its end. The grace period counts epochs of fine-tuning: a pretrained backbone's
    `freeze_epochs` (only the head trains) come before it, so no trial is judged before
    the sampled learning rate has reached the backbone (the default 2 + 2 frozen had a
    rung at epoch 2, with the backbone still frozen).

    A trial that runs all its epochs returns by itself: stopped at its last report, its
    TorchTrainer would be killed before it releases its workers (ray-project/ray#54305).
    ASHA's rungs are grace_period x 4^k up to max_t; max_t one before the last epoch, and
    no stop for reaching it, keeps every rung off the last epoch (max_t one past it put a
    rung there whenever epochs was grace_period x 4^k, 8 for the default 2). Counted in
    epochs, which a trial resumed with its TorchTrainer goes on from (Tune's own
    training_iteration starts again at 0 in a restarted trial)."""
    grace = grace_period + freeze_epochs
    if epochs <= grace:
        return None
    return LastReportASHA(time_attr="epoch", max_t=epochs - 1, grace_period=grace, stop_last_trials=False)


def check_resumed_concurrency(cfg: SweepConfig, tune_dir: str, begun: int | None, unfinished: int) -> None:
    """ConfigError when the trials a resumed sweep would run at once cannot all have their
    CPUs: Tune restores its search with the number it began with (`begun`, unknown for
    sweeps from before the record), and its trials' workers and Ray Data tasks would wait
    on each other for ever. Counted on the trials left (`unfinished`), and with --use-gpu
    on those the GPUs hold (the others wait for a GPU holding no CPU)."""
    if not begun:
        return
    cpu_fit, gpu_fit, known, _, cpu_why = _fits_and_why(cfg)
    if _gpu_limits_unknown(gpu_fit, known):  # (GPU trials beyond the GPUs wait)
        return
    running = min(begun, unfinished, gpu_fit if gpu_fit is not None else begun)
    if running > max(1, cpu_fit):
        # (cpu_why: the head's trial slots where those are fewer: "CPUs" was said of them too)
        raise ConfigError(
            f"The sweep in {tune_dir!r} began running {begun} trials at once, which Tune keeps when "
            f"it resumes, and this cluster holds {max(1, cpu_fit)} of them ({cpu_why}); resume it on a "
            "cluster that holds them, or start a new sweep in another --output."
        )


def build_tuner(cfg: SweepConfig, manifest: dict[str, Any], cpu_format: str | None = None,
                resources: dict[str, float] | None = None, begun_concurrent: int | None = None,
                done: int = 0, *, restoring: bool):
    """(A new Tuner, or the interrupted sweep in TUNE_DIR restored (finished trials kept);
    the number of trials it runs at once, which the TrialGate it opens holds them to). A
    restored sweep runs as many at once as it began with (Tune restores its search with
    them): ConfigError when this cluster holds fewer (`begun_concurrent`,
    sweep_config.json), as their workers and Ray Data tasks would wait on each other for
    ever. `done`: the trials the sweep in TUNE_DIR finished (finished_trials); when that is
    all of them, none will run (no pretrained weights loaded). `restoring`: TUNE_DIR holds a
    sweep Tune can resume (can_resume)."""
    tune_dir = storage.normalize(cfg.run.output)
    experiment = storage.join(tune_dir, TUNE_RUN_NAME)
    if restoring:
        check_resumed_concurrency(cfg, tune_dir, begun_concurrent, cfg.sweep.num_samples - done)
        concurrent = begun_concurrent  # (None: a sweep from before the record)
    else:
        capacity = cluster_capacity(cfg)
        concurrent = min(cfg.sweep.max_concurrent or capacity, capacity)
        if cfg.sweep.max_concurrent and cfg.sweep.max_concurrent > capacity:
            # More trials than the CPUs hold: their workers and Ray Data tasks wait on each
            # other, and every trial's worker group times out (seen: no epoch in 4 minutes).
            log.warning("--max-concurrent %d is more trials than this cluster holds at once (%d: %s); "
                        "running %d at once", cfg.sweep.max_concurrent, capacity, _fits_and_why(cfg)[3], capacity)
    finished = done >= cfg.sweep.num_samples
    pretrained = None if finished else load_pretrained(cfg, len(manifest["classes"]))
    # (a sweep from before the record of the trials it runs at once: as many as this cluster holds)
    places = concurrent or cluster_capacity(cfg)
    gate = open_gate(places)  # (closed by sweep(), whatever happens after this)
    # In a list: with_parameters hands a bare ObjectRef to the trial as the object itself (a
    # state dict, then copied to every Train worker, whose ray.get of it failed every trial).
    trainable = ray.tune.with_parameters(
        run_trial, manifest=manifest, tune_dir=tune_dir,
        base={**to_dict(cfg), RESOLVED_KEY: {FILLED_KEY: defaults_filled(cfg)}},
        pretrained=None if pretrained is None else [pretrained], cpu_format=cpu_format,
        gate=[gate, places], ray_address=os.environ.get("RAY_ADDRESS"),
    )
    # The trial function only waits on its TorchTrainer (trial_resources).
    trainable = ray.tune.with_resources(trainable, resources or trial_resources())
    lo, hi = cfg.sweep.smoothing_range
    space = {
        "lr": ray.tune.loguniform(*cfg.lr_range()),
        "label_smoothing": ray.tune.uniform(lo, hi) if hi > lo else lo,
    }
    if restoring:
        if finished:  # (said as such: "Resuming" read as if trials would train)
            log.info("The sweep in %s finished its %d trials; its results are read back", experiment, done)
        else:
            log.info("Resuming the sweep in %s (%d of %d trials finished)", experiment, done,
                     cfg.sweep.num_samples)
        # Failed trials run again from their last checkpoint (the settings cannot have
        # changed: fer_ray.trainer.check_inputs refuses that); Tune starts them all at
        # once with the unfinished ones, and the gate holds them to `concurrent`.
        # The search space again (tuner.pkl keeps its keys only): should Tune fail to read
        # the state back, it begins the experiment again, and without it gave every trial an
        # empty config. (A sweep stopped before Tune saved any state is not restored at all:
        # can_resume.)
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space)
        return tuner, concurrent

    log.info("Sweeping %d trials, up to %d at once", cfg.sweep.num_samples, concurrent)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=cfg.sweep.num_samples,
            scheduler=asha(cfg.optim.epochs, cfg.sweep.grace_period, cfg.optim.freeze_epochs or 0),
            search_alg=_searcher(cfg, concurrent),
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_RUN_NAME,
            storage_path=tune_dir,
            callbacks=[TrialLine(cfg.optim.epochs, tune_dir), InterruptWatch()],
            failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    return tuner, concurrent


def collect_results(grid: Any, tune_dir: str, classes: list[str]) -> pd.DataFrame:
    """One row per trial; each trial's run folder is completed (best/, plots) on the way, or
    read back from its summary.json where a finished sweep deleted its checkpoints."""
    rows = []
    for result in grid:
        cfg = result.config or {}
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        trial_dir = storage.join(tune_dir, TRIALS_DIR, trial_id)
        row = {"trial_id": trial_id, "lr": cfg.get("lr"), "label_smoothing": cfg.get("label_smoothing"),
               "best_val_acc": math.nan, "best_epoch": None, "epochs_run": 0, "stopped_early": False,
               "status": "ERROR" if result.error else "TERMINATED",
               "error": _one_line(result.error) if result.error else None, "best_dir": None}
        if has_checkpoint(trial_dir):
            try:
                summary = finalize_run(saved_result(trial_dir), trial_dir, classes)
            except TrainingDiverged as e:  # (a trial at the top of the LR range, say)
                summary = None
                row.update(status="ERROR", error=str(e))
        else:
            summary = storage.read_json_or_none(storage.join(trial_dir, RUN_SUMMARY_FILE))
        if summary:
            # stopped_early: by --patience; fewer epochs without it were ASHA's or the budget's cut.
            # best_dir: where the trial's folder is now (summary.json names where it was written).
            row.update(best_val_acc=summary["accuracy"], best_epoch=summary["best_epoch"],
                       epochs_run=summary["epochs_run"], best_dir=storage.join(trial_dir, BEST_DIR),
                       stopped_early=summary["stopped_early"])
        rows.append(row)
    # Epochs stay whole numbers when some trial has none (a float column otherwise: 2.0).
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"best_epoch": "Int64"})
    return results.sort_values("trial_id", ignore_index=True)


def start_again(tune_dir: str) -> None:
    """Remove what a sweep that saved nothing left in `tune_dir` (Tune's experiment, the
    trials' folders, the settings and any outputs), so that the sweep starts anew. Said in the log."""
    log.info("Output %s holds a sweep whose trials saved no epoch; it starts again with these settings", tune_dir)
    for name in (TUNE_RUN_NAME, TRIALS_DIR, BEST_DIR):
        storage.delete_dir(storage.join(tune_dir, name))
    for name in (SWEEP_CONFIG_FILE, RESULTS_FILE, BEST_CONFIG_FILE, SUMMARY_PLOT):
        storage.delete_file(storage.join(tune_dir, name))


def prune_checkpoints(results: pd.DataFrame, best: dict[str, Any] | None, tune_dir: str) -> None:
    """Delete the checkpoints of the finished trials other than the best: a trial keeps two
    (its best epoch's and its latest, each with the optimizer's state besides the weights;
    ~170 MB for resnet18, more with the parameters for larger models), while its best/,
    history, reports and summary.json stay. The best trial's are kept (it can be trained
    on), and so are a failed trial's (a rerun resumes it from them)."""
    pruned = []
    for trial_id, status in zip(results["trial_id"], results["status"]):
        trial_dir = storage.join(tune_dir, TRIALS_DIR, trial_id)
        if (status == "TERMINATED" and (best is None or trial_id != best["trial_id"])
                and storage.exists(storage.join(trial_dir, RUN_SUMMARY_FILE))):
            checkpoints = storage.join(trial_dir, RAY_RUN_NAME)
            try:
                if storage.exists(checkpoints):
                    # Ray Train's record first: a deletion cut short leaves a trial that reads
                    # as pruned (its row from summary.json), not one whose record names
                    # checkpoints that are gone.
                    storage.delete_file(storage.join(checkpoints, CHECKPOINT_SNAPSHOT))
                    storage.delete_dir(checkpoints)
                    pruned.append(trial_id)
            except OSError as e:  # the sweep's outputs are written: not a reason to fail it
                log.warning("Could not delete the checkpoints in %s: %s", checkpoints, e)
    if pruned:
        log.info("Deleted the checkpoints of %d finished trial(s) other than the best (each keeps best/, its "
                 "history and reports; --keep-checkpoints keeps them)", len(pruned))


def _one_line(error: BaseException) -> str:
    """The root cause of a trial's error: the last 'SomeError: message' line of its trace."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Invalid)\b.*:", line)]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:500]


def best_trial(results: pd.DataFrame) -> pd.Series | None:
    """The finished trial with the best val accuracy; None when none finished. A failed
    trial's checkpoints are not a result (it may have failed as its backbone was unfrozen)."""
    scored = results[results["status"] == "TERMINATED"].dropna(subset=["best_val_acc"])
    return scored.loc[scored["best_val_acc"].idxmax()] if len(scored) else None


def write_outputs(results: pd.DataFrame, tune_dir: str) -> dict[str, Any] | None:
    """results.parquet, the best trial's model and config, and the summary plot."""
    from fer_ray.reports import plot_sweep

    histories = {}
    for trial_id in results["trial_id"]:
        path = storage.join(tune_dir, TRIALS_DIR, trial_id, HISTORY_FILE)
        if storage.exists(path):
            histories[trial_id] = pd.read_csv(io.BytesIO(storage.read_bytes(path)))
    best = best_trial(results)
    # best_config.json last (and removed first): outputs cut short (Ctrl-C, a bucket's
    # failure) leave no best_config.json beside another trial's best/ or none.
    with local_staging(tune_dir, last=BEST_CONFIG_FILE) as local:
        results.to_parquet(os.path.join(local, RESULTS_FILE), index=False)
        plot_sweep(results, histories, os.path.join(local, SUMMARY_PLOT))
        if best is not None:
            best_local = os.path.join(local, BEST_DIR)
            shutil.rmtree(best_local, ignore_errors=True)
            trial_dir = storage.join(tune_dir, TRIALS_DIR, best["trial_id"])
            storage.copy_dir(storage.join(trial_dir, BEST_DIR), best_local)
            best_config = storage.read_json(storage.join(trial_dir, CONFIG_FILE))
            # Without the trial's folder: `jobs/train.py --config best_config.json` given no
            # --output would otherwise train on inside the sweep's trial.
            best_config.get("run", {}).pop("output", None)
            best_config[TRIAL_KEY] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in best.to_dict().items()}
            storage.write_json(os.path.join(local, BEST_CONFIG_FILE), best_config)
    return None if best is None else best.to_dict()


def check_resumed_blur(tune_dir: str, sigma: str) -> bool:
    """A resumed sweep's validation blur (--input-blur, resolved) is the one it began with:
    its trials' scores would not compare otherwise. Checked once resolved (not with the
    other settings, trainer._check_resume_compatible): `auto` measures the same sigma again
    on the same shards. A sweep that saved no epoch starts again instead, as it does for
    the other settings (True: it was removed)."""
    begun = storage.read_json_or_none(storage.join(tune_dir, SWEEP_CONFIG_FILE)) or {}
    old = (begun.get("data") or {}).get("input_blur")
    try:
        changed = old is not None and not same_sigma(float(old), float(sigma))
    except (TypeError, ValueError):  # a sweep_config.json from before the blur was resolved
        return False
    if changed and saved_nothing(tune_dir):
        start_again(tune_dir)
        return True
    if changed:
        raise ConfigError(
            f"{tune_dir!r} holds a sweep with different settings (input_blur {old} -> {sigma}); "
            f"use a new --output, or --input-blur {old} to resume it."
        )
    return False


def sweep_cpu_format(cfg: SweepConfig, spec: Any, begun: dict[str, Any]) -> str | None:
    """The format every trial trains in on CPUs with --amp auto (None: --amp sets it, or
    GPUs): the one the sweep began with, else timed once, in a task that holds what a
    Train worker holds (so on a node where trials run; fer_ray.model.time_cpu_formats).
    Each trial timing its own picked fp32 in some trials and bf16 in others, on timings
    within noise: their scores (and the epochs a time budget fits) no longer compared."""
    if cfg.run.amp != "auto" or cfg.run.use_gpu:
        return None
    known = (begun.get(RESOLVED_KEY) or {}).get("cpu_format")
    if known or cfg.run.cpu_format:  # (another --cpu-format than the one known: refused at the start)
        return known or cfg.run.cpu_format
    import ray

    chosen, timed = ray.get(ray.remote(num_cpus=cfg.run.cpus_per_worker)(timed_cpu_format).remote(
        spec, cfg.data.batch_size, cfg.run.cpus_per_worker))
    log.info("Training step on a trial's CPUs: %s; every trial trains in %s", timed, chosen)
    return chosen


def can_resume(experiment: str) -> bool:
    """Whether Tune saved the state of the sweep in `experiment` (TUNE_DIR/ray_tune): its
    Tuner writes tuner.pkl when made, its state only once fit() has begun; a sweep stopped
    in between holds nothing to resume, and is begun anew."""
    import ray

    return ray.tune.Tuner.can_restore(experiment) and any(
        e.base_name.startswith("experiment_state") and e.base_name.endswith(".json")
        for e in storage.list_dir(experiment)
    )


def sweep_trial_resources(tune_dir: str, begun: dict[str, Any], resuming: bool) -> dict[str, float]:
    """What the sweep's trials hold (trial_resources): for a sweep resumed, what it began
    with, as Tune restores each trial with its request (a sweep from before the record:
    TRIAL_DRIVER_CPU). ConfigError when that is a TRIAL_SLOT this cluster lacks: its trials
    would wait for one forever."""
    import ray

    if not resuming:
        return trial_resources()
    kept = (begun.get(RESOLVED_KEY) or {}).get("trial_resources") or {"CPU": TRIAL_DRIVER_CPU}
    if TRIAL_SLOT in kept and not ray.cluster_resources().get(TRIAL_SLOT):
        raise ConfigError(
            f"The sweep in {tune_dir!r} began on a cluster whose head holds {TRIAL_SLOT} resources "
            "(cluster.yaml), which its trials hold and this Ray lacks; resume it on that cluster."
        )
    return kept


def finished_trials(tune_dir: str, resuming: bool) -> int:
    """How many trials of the sweep in TUNE_DIR Tune recorded as finished (0 where there is
    no sweep to resume, or a state Tune cannot read back)."""
    import ray

    experiment = storage.join(tune_dir, TUNE_RUN_NAME)
    if not resuming:
        return 0
    try:  # (the trainable only reads the state back here: nothing runs)
        return ray.tune.Tuner.restore(experiment, run_trial).get_results().num_terminated
    except Exception:  # noqa: BLE001 - then every trial counts as left to run
        return 0


def sweep(cfg: SweepConfig, manifest: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """Run (or resume) the sweep and write TUNE_DIR; Ray must be initialised."""
    tune_dir = storage.normalize(cfg.run.output)
    begun = storage.read_json_or_none(storage.join(tune_dir, SWEEP_CONFIG_FILE)) or {}
    resuming = can_resume(storage.join(tune_dir, TUNE_RUN_NAME))  # (a listing: a bucket round trip)
    resources = sweep_trial_resources(tune_dir, begun, resuming)
    # A finished sweep run again reads its trials' results back and starts no worker: its
    # rerun waited for the GPUs of a --use-gpu sweep (up to 15 minutes for the autoscaler,
    # or refused on a machine without them) and fetched the pretrained weights again.
    done = finished_trials(tune_dir, resuming)
    checked = not begun and done < cfg.sweep.num_samples  # a new sweep: the cluster first, as a run
    if checked:
        check_resources(cfg, driver_cpus=resources.get("CPU", 0))
    # Measured once here (see fer_ray.blur) rather than by every trial: all trials match the same.
    # (A resumed sweep's before any wait for GPUs: refused for its blur, it waited up to
    # FER_RAY_GPU_WAIT_S for GPU nodes first.)
    spec = resolve_settings(cfg, manifest).spec
    cfg.data.input_blur = str(spec.input_blur)
    if check_resumed_blur(tune_dir, cfg.data.input_blur):  # started again
        begun, done, resuming = {}, 0, False
        resources = sweep_trial_resources(tune_dir, begun, resuming)
    if not checked and done < cfg.sweep.num_samples:
        check_resources(cfg, driver_cpus=resources.get("CPU", 0))
    cpu_format = sweep_cpu_format(cfg, spec, begun)
    storage.makedirs(tune_dir)
    _INTERRUPTED.clear()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        tuner, concurrent = build_tuner(cfg, manifest, cpu_format, resources,
                                        (begun.get(RESOLVED_KEY) or {}).get("concurrent"), done,
                                        restoring=resuming)
        # The settings are written once the sweep can start (its pretrained weights loaded):
        # a sweep that failed before, say on a --pretrained-file of another architecture,
        # held its folder to the settings that failed, and the corrected rerun was refused.
        storage.write_json(storage.join(tune_dir, SWEEP_CONFIG_FILE),
                           {**to_dict(copy.deepcopy(cfg)),
                            RESOLVED_KEY: {"cpu_format": cpu_format, "trial_resources": resources,
                                           "concurrent": concurrent, "data": data_record(manifest),
                                           FILLED_KEY: defaults_filled(cfg)}})
        grid = tuner.fit()
    finally:
        close_gate()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():  # Tune leaves its own installed
                if handler is not None:
                    signal.signal(sig, handler)
    ended = grid.num_terminated + grid.num_errors
    if _INTERRUPTED.is_set() or ended < cfg.sweep.num_samples:
        # Tune's Ctrl-C handler ends the experiment and fit() returns as if it were done,
        # the running trials TERMINATED; the sweep's outputs would then crown an unfinished
        # trial. Nothing is written. (A sweep begun before InterruptWatch existed is
        # restored with the callbacks it began with: there only the count tells, and only
        # when some trial had not started.)
        log.warning("The sweep was stopped before all its %d trials ended", cfg.sweep.num_samples)
        raise KeyboardInterrupt("sweep interrupted")
    results = collect_results(grid, tune_dir, list(manifest["classes"]))
    best = write_outputs(results, tune_dir)
    if not cfg.sweep.keep_checkpoints:
        prune_checkpoints(results, best, tune_dir)
    return results, best
