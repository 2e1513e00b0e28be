"""Driver side of training: resolve settings, build the TorchTrainer, write the run folder.

`jobs/train.py` and every Tune trial go through `build_trainer` and `finalize_run`, so a
trial is exactly a training run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Sequence

import pandas as pd
import ray.data
import ray.train

from fer_ray import storage
from fer_ray.blur import same_sigma
from fer_ray.cli import require_cpus, require_gpus, require_node_fits
from fer_ray.config import (
    FILLED_KEY,
    LR_RANGES,
    RESOLVED_KEY,
    ConfigError,
    TrainConfig,
    defaults_filled,
    parse_input_blur,
    to_dict,
)
from fer_ray.constants import (
    BEST_DIR,
    CONFIG_FILE,
    CONFUSION_MATRIX_FILE,
    DIVERGED,
    HISTORY_FILE,
    LEARNING_CURVES_FILE,
    MODEL_CONFIG_FILE,
    RAY_RUN_NAME,
    RUN_SUMMARY_FILE,
    SWEEP_CONFIG_FILE,
    TRAIN,
    VAL,
    VAL_METRICS_FILE,
    VAL_PREDICTIONS_FILE,
    WEIGHTS_FILE,
)
from fer_ray.data import (
    class_weights, resolve_data_size, sample_images, sampling_rates, train_counts, train_val_datasets,
)
from fer_ray.ingest import ShardedValConfig
from fer_ray.metrics import confusion_table, metrics_table, summary
from fer_ray.model import ModelSpec, check_input_size, check_model_name, create_model, data_config, fetch_pretrained_state
from fer_ray.prepare import read_manifest
from fer_ray.normalize import match_channels
from fer_ray.reports import plot_confusion_matrix, plot_learning_curves
from fer_ray.run_folders import has_checkpoint
from fer_ray.train_loop import (
    CHECKPOINT_SCORE, LoopSettings, TrainState, finished_why, is_finished, read_train_state, scaled_lr,
    steps_per_epoch, train_loop_per_worker,
)

log = logging.getLogger(__name__)


# Settings that cannot change when a run folder is trained again (resume; the optimizer's
# state is in the checkpoint).
RESUME_KEYS = (
    "model", "model_kwargs", "data", "image_size", "data_size", "optimizer", "input_norm", "unfreeze",
    "ema_decay",
    # (--backbone-lr-scale's default and the history's phase names follow it; the weights
    # came from one start or the other)
    "pretrained",
    # The schedule's position is counted in steps: another steps-per-epoch or phase boundary
    # would resume it elsewhere (a negative learning rate for a while, or a jump ahead).
    "batch_size", "num_workers", "lr_scaling", "freeze_epochs",
)
# A sweep's search, fixed when it starts: a resumed sweep is restored with the values it
# began with, so a changed one would be ignored (a larger --num-samples would never end;
# ASHA would stop longer trials at the old --epochs).
SWEEP_RESUME_KEYS = ("num_samples", "lr_range", "smoothing_range", "grace_period", "searcher", "epochs",
                     # (Tune restores the trials it runs at once: more CPUs a worker would
                     # leave Ray Data none, and every trial waiting)
                     "max_concurrent", "cpus_per_worker",
                     # What the trials train with besides the sampled values: a resumed trial
                     # (or one not yet started) would otherwise train with the new value, its
                     # results compared with trials that had the old one.
                     "augment", "random_erasing", "blur_jitter", "sampler", "drop_rate", "time_budget",
                     "min_lr", "weight_decay", "clip_grad", "class_weights", "backbone_lr_scale", "warmup_epochs",
                     "mixup", "cutmix", "mix_prob", "patience", "seed",
                     # the device and precision (--amp auto's CPU choice is kept in
                     # sweep_config.json) and the weights every trial starts from
                     "use_gpu", "amp", "cpu_format", "pretrained_file")
# What runs from before a setting existed used.
RESUME_DEFAULTS = {"optimizer": "adamw", "input_norm": "dataset", "blur_jitter": 0.0, "clip_grad": 0.0}


def resolve_settings(
    cfg: TrainConfig, manifest: dict[str, Any], pretrained_state: Any = None, started: float | None = None,
    budget_from_workers: bool = False,
) -> LoopSettings:
    """Everything the worker loop needs, from the config and the shards' manifest.

    `started` (time.time(); default now) is when the run began: --time-budget counts from it;
    with `budget_from_workers` (a sweep's trial), from the workers' start instead.
    """
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    classes = list(manifest["classes"])
    probe = create_model(m.model, len(classes), **m.model_kwargs)  # also checks name and args
    dcfg = data_config(probe)
    spec = ModelSpec(
        model=m.model,
        class_names=classes,
        image_size=d.image_size,
        data_size=resolve_data_size(d.image_size, manifest, d.data_size),
        channels=int(manifest["image"]["channels"]),
        mean=list(dcfg["mean"]),
        std=list(dcfg["std"]),
        model_kwargs=dict(m.model_kwargs),
        input_norm=d.input_norm,
    )
    # timm gives RGB statistics; a 1-channel stem sees their average.
    spec.mean, spec.std = match_channels(spec.mean, spec.in_chans), match_channels(spec.std, spec.in_chans)
    check_input_size(probe, m.model, spec.in_chans, d.image_size)
    spec.input_blur, spec.train_sharpness = resolve_input_blur(cfg, spec)
    return LoopSettings(
        spec=spec,
        batch_size=d.batch_size,
        num_train=int(manifest["splits"][TRAIN]["total"]),
        epochs=o.epochs,
        freeze_epochs=int(o.freeze_epochs or 0),
        unfreeze=o.unfreeze,
        lr=scaled_lr(o.lr, r.num_workers, o.lr_scaling),
        backbone_lr_scale=float(o.backbone_lr_scale or 1.0),
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        optimizer=o.optimizer,
        warmup_epochs=o.warmup_epochs,
        ema_decay=o.ema_decay,
        clip_grad=o.clip_grad,
        mixup=o.mixup,
        cutmix=o.cutmix,
        mix_prob=o.mix_prob,
        deadline=((started or time.time()) + o.time_budget * 60) if o.time_budget and not budget_from_workers else 0.0,
        budget_s=o.time_budget * 60 if budget_from_workers else 0.0,
        label_smoothing=o.label_smoothing,
        class_weights=class_weights(train_counts(manifest)) if o.class_weights else None,
        patience=o.patience,
        amp=r.amp,
        cpu_format=r.cpu_format,
        seed=r.seed,
        drop_rate=m.drop_rate,
        cpus_per_worker=r.cpus_per_worker,
        pretrained=bool(m.pretrained),
        pretrained_state=pretrained_state,
        output=storage.normalize(r.output),
    )


def resolve_input_blur(cfg: TrainConfig, spec: ModelSpec) -> tuple[float, float | None]:
    """--input-blur as a sigma: given, or measured on samples of train and val (auto); and,
    when there is a blur, the training images' sharpness, which lets scoring measure the
    blur again for the images it is given (fer_ray.predict.scoring_blur)."""
    from fer_ray import blur

    sigma = parse_input_blur(cfg.data.input_blur)
    train = None
    if sigma is None or sigma > 0:
        train = sample_images(cfg.data.data, TRAIN, spec.data_size, spec.channels)
    if sigma is not None:
        if sigma:
            log.info(blur.describe(sigma, {}, "--input-blur"))
        return sigma, round(blur.median_sharpness(blur.to_float(train)), 3) if sigma else None
    val = sample_images(cfg.data.data, VAL, spec.data_size, spec.channels)
    sigma, found = blur.estimate_blur(train, val)
    if sigma:
        log.info(blur.describe(sigma, found, f"measured on {len(train)} train and {len(val)} val images"))
    elif found["val_sharpness"] < blur.BLUR_RATIO * found["train_sharpness"]:
        log.warning(
            "Val images are much blurrier than train images; fer_ray can only blur, so scores "
            "on val may understate the model. Check how the splits were made."
        )
    return sigma, found["train_sharpness"] if sigma else None


def check_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """Validate the config against the data before any worker starts; return the manifest."""
    _PRELOADED.clear()  # (a state an earlier call read and no run took)
    cfg.validate()
    # Absolute: config.json then names the folder wherever a rerun starts, and a sweep's
    # trials (run from working folders of their own) find it.
    cfg.data.data = storage.normalize(cfg.data.data)
    existing = _check_output(cfg)  # (its sentences name --output as given)
    output = storage.normalize(cfg.run.output)
    if existing and not hasattr(cfg, "sweep") and not has_checkpoint(output):
        if storage.exists(storage.join(output, RUN_SUMMARY_FILE)):
            # A sweep's finished trial whose checkpoints the sweep deleted (fer_ray.tuning):
            # starting again would overwrite the model and reports its results name.
            raise ConfigError(
                f"--output {cfg.run.output!r} holds a finished run whose checkpoints were deleted (a sweep "
                "keeps only its best trial's); give a new --output to train these settings again."
            )
        # A run that failed or was stopped before its first checkpoint: nothing to resume,
        # so nothing holds it to its settings (a corrected rerun was refused as "different").
        log.info("Output %s holds a run that saved no epoch; it starts again with these settings", cfg.run.output)
        existing = None
    # The same for --output: `--config RUN/config.json` from another folder resumed nothing
    # and trained a new run under that folder instead.
    cfg.run.output = output
    manifest = read_manifest(cfg.data.data)
    for split in (TRAIN, VAL):
        if not manifest["splits"].get(split, {}).get("total"):
            raise ConfigError(f"Shards {cfg.data.data!r} have no {split!r} split; re-run jobs/prepare.py.")
    classes = manifest.get("classes") or []
    if len(classes) < 2:
        raise ConfigError(
            f"Shards {cfg.data.data!r} have {len(classes)} class ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two, one subfolder of images per class."
        )
    untrained = [c for c, n in (manifest["splits"][TRAIN].get("per_class") or {}).items() if n == 0]
    if untrained:  # (a FER2013 CSV without some class's Training rows: prepared with a warning)
        log.warning("Class(es) %s have no training image in %s: the model will never predict them",
                    ", ".join(untrained), cfg.data.data)
    num_train, workers = int(manifest["splits"][TRAIN]["total"]), cfg.run.num_workers
    if (num_train // workers) // cfg.data.batch_size < 1:  # (steps_per_epoch, as the workers count)
        raise ConfigError(
            f"{num_train} training images cannot fill one batch of {cfg.data.batch_size} on each of "
            f"{workers} worker(s); lower --batch-size or --num-workers."
        )
    if existing and cfg.optim.freeze_epochs is None:
        # Not given: the run's own (its default follows --epochs, and a run extended with a
        # larger --epochs was refused for the head phase it had not run).
        cfg.optim.freeze_epochs = _flat(existing).get("freeze_epochs")
        if "freeze_epochs" in ((existing.get(RESOLVED_KEY) or {}).get(FILLED_KEY) or ()):
            cfg.defaults_filled = ("freeze_epochs",)  # (still a default, as the run began with)
    cfg.resolve_defaults()
    check_model_name(cfg.model.model)
    try:
        _check_resume_compatible(cfg, existing, manifest)
    except ConfigError:
        from fer_ray import tuning

        if not (existing and hasattr(cfg, "sweep") and tuning.saved_nothing(output)):
            raise
        # A sweep whose trials all failed in their first epoch (or that was stopped before
        # one ended) holds nothing to resume: it starts again with the corrected settings
        # (resumed with its own, its failed trials ran again and failed alike).
        tuning.start_again(output)
        existing = None
    if not existing:  # (a resumed run has its weights in its checkpoint; a resumed sweep reads its file later)
        preload_pretrained_file(cfg, len(classes))
    what = "a sweep" if hasattr(cfg, "sweep") else "a run"  # (said once every check passed)
    # (not "resumes": a finished one trains no more, which the next line says)
    log.info("Output %s: %s", cfg.run.output, f"holds {what} begun there" if existing else f"{what} from the start")
    return manifest


def saved_result(run_dir: str) -> ray.train.Result:
    """The Result of the run in `run_dir` (a training run's folder, or a sweep's trial) read
    back from its checkpoints. Ray's checkpoint manager logs a record on finding them, with
    advice for a job that resumes (delete the folder to start anew): not said here (jobs
    drop it anyway, fer_ray.ray_logs; a library caller's logging may not)."""
    logger = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        return ray.train.Result.from_path(storage.join(run_dir, RAY_RUN_NAME))
    finally:
        logger.setLevel(level)


def _check_output(cfg: TrainConfig) -> dict[str, Any] | None:
    """--output: a new or empty folder, or a run's or sweep's folder to resume; never the
    data, a file, or a folder of something else. Returns the settings of the run or sweep
    there (its config.json or sweep_config.json), or None."""
    output, data = storage.normalize(cfg.run.output), cfg.data.data
    if storage.inside(output, data) or storage.inside(data, output):
        raise ConfigError(f"--output {cfg.run.output!r} and --data {cfg.data.data!r} overlap; "
                          "choose an --output outside the data.")
    if not storage.exists(output):
        storage.check_creatable(output, "--output")
        return None
    if not storage.is_dir(output):
        raise ConfigError(f"--output {cfg.run.output!r} is a file; choose a folder.")
    is_sweep = hasattr(cfg, "sweep")
    for name in (CONFIG_FILE, SWEEP_CONFIG_FILE):
        path = storage.join(output, name)
        if storage.exists(path):
            settings = storage.read_json(path)
            if "data" in settings:  # (a model folder's config.json is timm's)
                if (name == SWEEP_CONFIG_FILE) != is_sweep:
                    # A training run would resume "from" a sweep's folder and overwrite its
                    # best/ (easily done with --config SWEEP/best_config.json), and a sweep
                    # would write its trials into a run's folder.
                    held, job = ("a sweep", "training run") if not is_sweep else ("a training run", "sweep")
                    raise ConfigError(
                        f"--output {cfg.run.output!r} holds {held}; give this {job} a folder of its own."
                    )
                return settings
    if storage.list_dir(output, hidden=True):
        raise ConfigError(
            f"--output {cfg.run.output!r} is a non-empty folder that holds no training run or "
            "sweep; choose a new or empty folder."
        )
    return None


def _check_resume_compatible(cfg: TrainConfig, existing: dict[str, Any] | None,
                             manifest: dict[str, Any] | None = None) -> None:
    """A run's or a sweep's folder (`existing`: its settings) resumes only with the settings
    its checkpoints need, and on the shards it began with (`manifest`: --data's now)."""
    if existing is None:
        return
    old = {**RESUME_DEFAULTS, **_flat(existing)}
    new = _flat_settings(cfg)
    # data/x and ./data/x are one folder, as are /d/x and file:///d/x/
    if isinstance(old.get("data"), str) and isinstance(new.get("data"), str) \
            and storage.same_place(old["data"], new["data"]):
        new["data"] = old["data"]
    if hasattr(cfg, "sweep"):  # the range searched: --lr-range, or the optimizer's default one
        for flat in (old, new):
            if flat.get("lr_range") is None:
                flat["lr_range"] = list(LR_RANGES[flat.get("optimizer") or "adamw"])
    timed = (existing.get(RESOLVED_KEY) or {}).get("cpu_format")
    if hasattr(cfg, "sweep") and timed and new.get("cpu_format") and old.get("cpu_format") is None:
        # A sweep whose trials train in the format it timed (one from before --cpu-format,
        # or begun without it): another given would be said applied, and recorded, unused.
        old["cpu_format"] = timed
    keys = RESUME_KEYS + (SWEEP_RESUME_KEYS if hasattr(cfg, "sweep") else ())
    changed = [k for k in keys if k in old and old.get(k) != new.get(k)]
    if changed:
        shown = lambda v: "default" if v is None else repr(v)  # noqa: E731 - None: the flag not given
        diffs = ", ".join(f"{k} {shown(old[k])} -> {shown(new.get(k))}" for k in changed)
        raise ConfigError(
            f"{cfg.run.output!r} holds a {'sweep' if hasattr(cfg, 'sweep') else 'run'} with different "
            f"settings ({diffs}); "
            "use a new --output, or the same settings to resume it."
        )
    if manifest is not None:  # (after the settings: a run from before the data record is
        _check_same_data(cfg, existing, manifest)  # checked by steps per epoch, which they change)


def data_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a run or a sweep records of its shards (RESOLVED_KEY's "data"): the images it
    trains and validates on, as their manifest counts them. jobs/prepare.py run again into
    the same folder on other images, classes or split fraction changes it; on the same
    images, it does not."""
    splits = {name: {"total": int(split.get("total") or 0), "per_class": split.get("per_class")}
              for name, split in manifest["splits"].items() if name in (TRAIN, VAL)}
    carved = manifest.get("val_fraction") is not None  # (val drawn from train by the seed)
    # The images' channels and median side (the decode size's default), not the counts of
    # colour modes and sides, which runs from before cf364d2 could hold twice for the images
    # of a read task Ray ran again.
    image = {k: (manifest.get("image") or {}).get(k) for k in ("channels", "median_side")}
    return json.loads(json.dumps({"classes": list(manifest["classes"]), "splits": splits, "image": image,
                                  "val_fraction": manifest.get("val_fraction"),
                                  "seed": manifest.get("seed") if carved else None}))


def _check_same_data(cfg: TrainConfig, existing: dict[str, Any], manifest: dict[str, Any]) -> None:
    """ConfigError when --data's shards are not those the run or sweep in --output began on
    (prepared again into the same folder): the schedule counted another number of steps an
    epoch, the best epoch and early stopping would compare accuracies on two val splits, and
    the classifier's outputs would be read under other class names. Runs from before the
    record: their classes and steps per epoch."""
    old, new = existing.get(RESOLVED_KEY) or {}, data_record(manifest)
    if isinstance((old.get("data") or {}).get("image"), dict):  # (recorded whole before: as now)
        old = {**old, "data": {**old["data"], "image": {k: old["data"]["image"].get(k) for k in new["image"]}}}
    changes = []
    before = old.get("data") or {"classes": old.get("classes")}
    if before.get("classes") is not None and before["classes"] != new["classes"]:
        changes.append(f"classes {', '.join(before['classes'])} -> {', '.join(new['classes'])}")
    for split in (TRAIN, VAL):
        a, b = (before.get("splits") or {}).get(split), new["splits"][split]
        if a is None:
            continue
        if a["total"] != b["total"]:
            changes.append(f"{split} {a['total']} -> {b['total']} images")
        elif a["per_class"] != b["per_class"]:
            changes.append(f"{split}'s images per class")
    if "data" not in old and old.get("steps_per_epoch") is not None:
        steps = steps_per_epoch(int(manifest["splits"][TRAIN]["total"]), cfg.data.batch_size, cfg.run.num_workers)
        if steps != old["steps_per_epoch"]:
            changes.append(f"{old['steps_per_epoch']} -> {steps} steps an epoch")
    if not changes and "data" in old and old["data"] != new:
        changes.append("the images' sizes, or how val was drawn from train")
    if changes:
        what = "sweep" if hasattr(cfg, "sweep") else "run"
        raise ConfigError(
            f"{cfg.run.output!r} holds a {what} begun on other shards than {cfg.data.data!r} holds now "
            f"({'; '.join(changes)}: prepared again since?); use a new --output, or the shards it began on."
        )


def _flat_settings(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg`'s settings as a run's config.json holds them, flat (tuples as the saved lists)."""
    return json.loads(json.dumps(_flat(to_dict(cfg))))


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for name, section in d.items()
        if isinstance(section, dict) and name != RESOLVED_KEY
        for k, v in section.items()
    }


def check_resources(cfg: TrainConfig, driver_cpus: float = 0) -> None:
    """--use-gpu needs one GPU per worker, and a cluster joined needs the workers' CPUs and
    one for Ray Data (and `driver_cpus`, a sweep trial's own share, beside them), and a node
    that holds one worker; fail in one sentence rather than wait forever."""
    worker = {"CPU": float(cfg.run.cpus_per_worker), **({"GPU": 1.0} if cfg.run.use_gpu else {})}
    fewer = "lower --cpus-per-worker, or add a node type that holds one worker."
    require_node_fits(worker, "Each Train worker", fewer)  # (before any wait for GPUs)
    if cfg.run.use_gpu:
        require_gpus(cfg.run.num_workers)
        require_node_fits(worker, "Each Train worker", fewer, gpus_up=True)
    workers = cfg.run.num_workers * cfg.run.cpus_per_worker
    trial = f" (a sweep's trial also holds {driver_cpus:g} of one)" if driver_cpus else ""
    require_cpus(workers + 1 + driver_cpus, (
        f"training needs {workers:g} for its workers (--num-workers x --cpus-per-worker) and one "
        f"more for Ray Data's tasks{trial}, which would wait forever: lower --num-workers or "
        "--cpus-per-worker, or add nodes."
    ))


def build_trainer(
    cfg: TrainConfig,
    settings: LoopSettings,
    *,
    storage_path: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """The TorchTrainer for one run; checkpoints go to STORAGE/ray_train."""
    from ray.train.torch import TorchTrainer

    spec = settings.spec
    datasets = train_val_datasets(
        cfg.data.data, spec.data_size, spec.channels, cfg.data.augment, train_sampling_rates(cfg),
        cfg.data.random_erasing, cfg.data.blur_jitter,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(settings),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            storage_path=storage_path or storage.normalize(cfg.run.output),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1,  # the best epoch's (by val accuracy); Ray always keeps the latest too
                checkpoint_score_attribute=CHECKPOINT_SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=ShardedValConfig(),
    )


# A new run's --pretrained-file, read and checked by check_inputs (at most one: its key, its state)
_PRELOADED: dict[str, Any] = {}


def _pretrained_key(cfg: TrainConfig, num_classes: int) -> str:
    return json.dumps([cfg.model.model, num_classes, cfg.model.pretrained_file, cfg.run.seed,
                       cfg.model.model_kwargs], sort_keys=True, default=str)


def preload_pretrained_file(cfg: TrainConfig, num_classes: int) -> None:
    """Read a new run's --pretrained-file and check it against the model before Ray starts:
    a wrong path, another architecture's weights or a 1-channel stem were said only once
    Ray was up (a sweep's after its blur and CPU-format measurements; with --use-gpu after
    a wait of up to FER_RAY_GPU_WAIT_S for GPU nodes). load_pretrained hands over the state.
    Hub weights are still fetched there, after the resource checks. (check_inputs, its
    caller, has cleared any earlier state.)"""
    if cfg.model.pretrained and cfg.model.pretrained_file:
        log.info("Reading --pretrained-file %s", cfg.model.pretrained_file)
        _PRELOADED[_pretrained_key(cfg, num_classes)] = _fetch_pretrained(cfg, num_classes)


def _fetch_pretrained(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    return fetch_pretrained_state(
        cfg.model.model, num_classes, cfg.model.pretrained_file, seed=cfg.run.seed, **cfg.model.model_kwargs
    )


def load_pretrained(cfg: TrainConfig, num_classes: int) -> Any:
    """Fetch ImageNet weights once on the driver and share them through the object store."""
    import ray

    if not cfg.model.pretrained:
        return None
    state = _PRELOADED.pop(_pretrained_key(cfg, num_classes), None)
    _PRELOADED.clear()
    if state is None:
        log.info("Loading pretrained weights for %s", cfg.model.model)
        state = _fetch_pretrained(cfg, num_classes)
    return ray.put(state)


def train_sampling_rates(cfg: TrainConfig) -> list[float] | None:
    """--sampler's draws per image of each class and epoch; None without a sampler."""
    if cfg.data.sampler == "none":
        return None
    return sampling_rates(train_counts(read_manifest(cfg.data.data)), cfg.data.sampler)


def check_resumed_blur(run_dir: str, sigma: float) -> None:
    """ConfigError when a resumed run would validate under another blur than its epochs so
    far (--input-blur resolved; `auto` measures the same again on the same shards): the
    best epoch, and early stopping, compare val accuracies across them."""
    begun = storage.read_json_or_none(storage.join(run_dir, CONFIG_FILE)) or {}
    old = (begun.get(RESOLVED_KEY) or {}).get("input_blur")
    if old is not None and not same_sigma(float(old), float(sigma)):
        raise ConfigError(
            f"{run_dir!r} holds a run with different settings (input_blur {float(old):g} -> {float(sigma):g}: "
            f"its epochs were validated under the other blur); use a new --output, or --input-blur "
            f"{float(old):g} to resume it."
        )


def write_config(cfg: TrainConfig, settings: LoopSettings, run_dir: str, manifest: dict[str, Any]) -> None:
    """The resolved config, with the values derived from it, next to the run's outputs."""
    storage.write_json(storage.join(run_dir, CONFIG_FILE), run_config(cfg, settings, manifest))


def run_config(cfg: TrainConfig, settings: LoopSettings, manifest: dict[str, Any]) -> dict[str, Any]:
    """What write_config writes: the config, and under RESOLVED_KEY the values derived from
    it and its shards' record (data_record: a resume on others is refused)."""
    resolved = {
        "data": data_record(manifest),
        "classes": settings.spec.class_names,
        "data_size": settings.spec.data_size,
        "channels": settings.spec.channels,
        "mean": settings.spec.mean,
        "std": settings.spec.std,
        "input_blur": settings.spec.input_blur,
        "train_sharpness": settings.spec.train_sharpness,
        "effective_lr": settings.lr,
        "global_batch": cfg.data.batch_size * cfg.run.num_workers,
        "steps_per_epoch": steps_per_epoch(settings.num_train, cfg.data.batch_size, cfg.run.num_workers),
        "class_weights": settings.class_weights,
        "sampling_rates": train_sampling_rates(cfg),
        FILLED_KEY: defaults_filled(cfg),
    }
    return {**to_dict(cfg), RESOLVED_KEY: resolved}


@contextmanager
def local_staging(run_dir: str, last: str | None = None) -> Iterator[str]:
    """A local folder to write into; copied to the run folder afterwards when it is a URI,
    the file named `last` (written in the folder) after every other one and removed there
    before them: a copy cut short leaves no `last` beside half the rest (a run's
    summary.json beside half a best/). A local run folder is written in place, its `last`
    removed first: outputs rewritten (a rerun) and cut short kept the old summary.json."""
    local = storage.local_path(run_dir)
    if local:
        os.makedirs(local, exist_ok=True)
        if last is not None and os.path.isfile(os.path.join(local, last)):
            os.remove(os.path.join(local, last))
        yield local
        return
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as aside:
        yield tmp
        held = last is not None and os.path.isfile(os.path.join(tmp, last))
        if held:
            os.replace(os.path.join(tmp, last), os.path.join(aside, last))
            storage.delete_file(storage.join(run_dir, last))  # (the last run's, on a rerun)
        storage.copy_dir(tmp, run_dir)
        if held:
            storage.copy_dir(aside, run_dir)


class TrainingDiverged(ConfigError):
    """A run whose weights stopped being finite numbers before any epoch could be kept: the
    job ends in one sentence (exit 2), a sweep lists the trial as an error."""


def finalize_run(
    result: Any, run_dir: str, class_names: Sequence[str], state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write history, best/, val metrics, plots and summary.json from the run's checkpoints
    (`state`: the latest one's loop state, when already read); returns the summary."""
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"The run in {run_dir} reported no checkpoint; see the log above.")
    best = result.get_best_checkpoint(metric=CHECKPOINT_SCORE, mode="max") or latest
    state = state if state is not None else read_train_state(latest)
    if state.get("diverged") and int(state["best_epoch"]) < 1:
        raise TrainingDiverged(
            f"{DIVERGED} in epoch {state['epoch']}, before any epoch to keep: the weights "
            f"or the outputs on val stopped being finite numbers (NaN or inf). Train again in a new --output with a lower "
            f"--lr (or, with --amp fp16, bf16 or off); the run in {run_dir} has no model."
        )
    history = pd.DataFrame(state["history"])
    with local_staging(run_dir, last=RUN_SUMMARY_FILE) as local:
        history.to_csv(os.path.join(local, HISTORY_FILE), index=False)
        best_dir = os.path.join(local, BEST_DIR)
        os.makedirs(best_dir, exist_ok=True)
        with best.as_directory() as folder:
            for name in (WEIGHTS_FILE, MODEL_CONFIG_FILE):
                shutil.copy2(os.path.join(folder, name), os.path.join(best_dir, name))
            preds = pd.read_parquet(os.path.join(folder, VAL_PREDICTIONS_FILE))
        y_true, y_pred = preds["label"].to_numpy(), preds["pred"].to_numpy()
        table = metrics_table(y_true, y_pred, class_names)
        table.to_parquet(os.path.join(local, VAL_METRICS_FILE), index=False)
        cm = confusion_table(y_true, y_pred, class_names)
        plot_confusion_matrix(
            cm[list(class_names)].to_numpy(), class_names, os.path.join(local, CONFUSION_MATRIX_FILE),
            title=f"Val, epoch {state['best_epoch']}",
        )
        settings = storage.read_json_or_none(storage.join(run_dir, CONFIG_FILE)) or {}
        plot_learning_curves(history, os.path.join(local, LEARNING_CURVES_FILE),
                             ema_decay=float((settings.get("optim") or {}).get("ema_decay") or 0.0))
        outcome = {
            **summary(table),
            "best_epoch": int(state["best_epoch"]),
            "epochs_run": int(state["epoch"]),
            "stopped_early": bool(state["stopped_early"]),
            "diverged": bool(state.get("diverged", False)),  # the weights went NaN or inf: the run ended there
            "planned_epochs": int(state.get("planned_epochs") or 0),  # what the time budget fitted
            "epochs": int((settings.get("optim") or {}).get("epochs") or 0),  # of the --epochs it trained with
            "best_dir": storage.join(run_dir, BEST_DIR),
        }
        # What a sweep reads back once the trial's checkpoints are gone (fer_ray.tuning).
        storage.write_json(os.path.join(local, RUN_SUMMARY_FILE), outcome)
    return outcome


def _finished_run(cfg: TrainConfig, run_dir: str, class_names: Sequence[str]) -> dict[str, Any] | None:
    """A run folder whose last checkpoint ended the run (all its epochs, early stopping or its
    time budget): its outputs written again from its checkpoints, with no worker started and
    its config.json left as it trained (a rerun rewrote it with settings that never trained,
    such as another --lr); None for a run that goes on."""
    result = saved_result(run_dir)
    if result.checkpoint is None:
        return None
    saved = read_train_state(result.checkpoint)
    state, epochs = TrainState(**saved), cfg.optim.epochs
    if not is_finished(state, epochs):
        return None
    old, new = _flat(storage.read_json(storage.join(run_dir, CONFIG_FILE))), _flat_settings(cfg)
    own_epochs = int(old.get("epochs") or epochs)
    # Ended only by a rerun's --epochs at or below the epochs done (a run stopped at 5 of 20,
    # rerun with --epochs 3): it was told "it ran all its 5 epochs", and that --epochs was
    # "not applied". Its outputs come from the epochs done; its own --epochs goes on later.
    cut = not is_finished(state, own_epochs)
    if cut:
        log.info("Run stopped at epoch %d of its %d; --epochs %d trains no more, so its outputs are written "
                 "from the epochs done (--epochs %d goes on from there).", state.epoch, own_epochs, epochs,
                 own_epochs)
    else:
        # (the --epochs it trained with: "fitted 8 of 10", not of a rerun's --epochs 20)
        log.info("Run already finished at epoch %d; nothing to train (%s).", state.epoch,
                 finished_why(state, own_epochs))
    unused = [k for k in new if k in old and old[k] != new[k] and k != "output"  # (a moved folder)
              and not (cut and k == "epochs")]
    if unused:
        log.warning(
            "Not applied, as the run trains no more: %s; its config.json keeps the settings it trained with.",
            ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in unused),
        )
    return finalize_run(result, run_dir, class_names, state=saved)


def train(
    cfg: TrainConfig, manifest: dict[str, Any] | None = None, callbacks: Sequence[Any] = (),
    started: float | None = None,
) -> dict[str, Any]:
    """The whole training job (the driver of jobs/train.py); Ray must be initialised.
    `started` (time.time(), default now): when the job began, for --time-budget."""
    manifest = manifest or check_inputs(cfg)
    run_dir = storage.normalize(cfg.run.output)
    # A run resumed from a checkpoint has every weight there: the pretrained ones are not
    # needed again (a moved --pretrained-file, or no network, refused the resume).
    resuming = has_checkpoint(run_dir)
    if resuming:
        # (before the resource check: a finished run starts no worker, and its rerun waited
        # up to FER_RAY_GPU_WAIT_S for GPU nodes an autoscaler had let go)
        finished = _finished_run(cfg, run_dir, manifest["classes"])
        if finished is not None:
            return finished
    else:
        check_resources(cfg)  # (before the pretrained weights are fetched)
    if resuming and cfg.model.pretrained:
        log.info("Resuming from the run's checkpoint: its weights are there, the pretrained ones are not fetched")
    pretrained = None if resuming else load_pretrained(cfg, len(manifest["classes"]))
    settings = resolve_settings(cfg, manifest, pretrained, started=started)
    if resuming:  # (refused before any wait for GPUs)
        check_resumed_blur(cfg.run.output, settings.spec.input_blur)
        check_resources(cfg)
        # Written by the first worker once this run's first epoch is saved: written here, a
        # run stopped before then named settings that never trained (another --epochs, say),
        # which its next rerun's "not applied" line and summary.json then quoted.
        settings.resumed_config = {"path": storage.join(run_dir, CONFIG_FILE),
                                   "settings": run_config(cfg, settings, manifest)}
    else:
        write_config(cfg, settings, run_dir, manifest)
    trainer = build_trainer(cfg, settings, callbacks=callbacks)
    # Ray Train puts its own Ctrl-C handler in for the run and leaves it there: after the
    # run, Ctrl-C while the outputs are written did nothing twice and then exited 0.
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    except SystemExit as e:
        # Ray Train's own Ctrl-C handler aborts the run (the epochs saved so far stay), and
        # the driver's wait on it then ends in a bare SystemExit(1): exit 1 without a word.
        # Raised as the interruption it is, which the job script reports (exit 130).
        raise KeyboardInterrupt("training aborted") from e
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)
    return finalize_run(result, run_dir, manifest["classes"])
