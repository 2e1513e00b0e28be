"""The per-worker training loop (runs inside each Ray Train worker).

It reads straight down: settings -> data shards -> model -> phase (frozen head, then
fine-tuning) -> epochs of train + validate -> checkpoint and report. Every value it
needs arrives resolved in `LoopSettings`; it knows nothing about flags or files.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from fer_ray import storage
from fer_ray.constants import (
    IMAGE_COL,
    LABEL_COL,
    TRAIN,
    TRAIN_STATE_FILE,
    VAL,
    VAL_PREDICTIONS_FILE,
    WEIGHTS_FILE,
)
from fer_ray.model import (
    CPU_FORMATS,
    ModelSpec,
    create_model,
    fastest_format,
    format_name,
    resolve_amp,
    save_model_dir,
    set_frozen_eval,
    set_trainable,
    time_cpu_formats,
    timings_line,
)
from fer_ray.normalize import DeviceNormalize

HEAD_PHASE = "head"
FINETUNE_PHASE = "finetune"
# What history.csv and the epoch line call the one phase of a model trained from random
# weights: nothing pretrained is fine-tuned there (the loop runs it as FINETUNE_PHASE).
SCRATCH_PHASE = "scratch"


@dataclass
class LoopSettings:
    """Everything the loop needs, resolved on the driver."""

    spec: ModelSpec  # the model and how its images are prepared (also its folder's config)
    batch_size: int
    num_train: int
    epochs: int
    freeze_epochs: int
    unfreeze: str
    lr: float
    backbone_lr_scale: float
    min_lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    class_weights: list[float] | None
    patience: int
    amp: str
    seed: int
    drop_rate: float = 0.0
    optimizer: str = "adamw"  # or "sgd": momentum 0.9, Nesterov
    ema_decay: float = 0.0  # 0: no moving average of the weights
    clip_grad: float = 0.0  # the gradients' total norm is clipped to this; 0: off
    mixup: float = 0.0  # mixup alpha; 0: off
    cutmix: float = 0.0  # cutmix alpha; 0: off
    mix_prob: float = 1.0  # fraction of batches mixed
    deadline: float = 0.0  # time.time() by which the run must end (--time-budget); 0: none
    # A sweep trial's --time-budget in seconds, counted from when its workers start: its
    # workers may wait minutes for the nodes an autoscaler brings up. 0: none (or `deadline`).
    budget_s: float = 0.0
    cpus_per_worker: int = 1
    # A sweep's trials on CPUs with --amp auto: the format timed once for all of them
    # (format_name; fer_ray.tuning), so that they train alike. None: timed by the run.
    cpu_format: str | None = None
    pretrained: bool = False  # began from pretrained weights (its model folders say so)
    pretrained_state: Any = None  # an ObjectRef to a state dict, fetched once by the driver
    # A resumed run's config.json ({"path", "settings"}), written by rank 0 once its first
    # epoch's checkpoint is saved (fer_ray.trainer.train); None: written by the driver.
    resumed_config: dict[str, Any] | None = None
    output: str = ""  # the run's folder as given (a bucket's log lines keep its scheme)

    def __post_init__(self) -> None:
        if isinstance(self.spec, dict):  # arrived through Ray as a plain dict (asdict)
            self.spec = ModelSpec(**self.spec)


@dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer: the loop's position."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    planned_epochs: int = 0  # epochs the time budget left room for; 0: not planned yet
    warmup_steps: int = -1  # the running phase's warm-up, fixed at its start (-1: not yet)
    diverged: bool = False  # the weights or val outputs stopped being finite numbers: the run ended there
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def phase_of(epoch: int, freeze_epochs: int) -> str:
    return HEAD_PHASE if epoch < freeze_epochs else FINETUNE_PHASE


def kept_format(history: list[dict[str, Any]]) -> tuple[torch.dtype | None, bool] | None:
    """The CPU format (amp dtype, channels_last) a resumed run's last epoch trained in on a
    CPU, so that --amp auto does not time the formats again and switch mid-run on a timing
    within noise; None for a new run, a history without formats, one a CPU does not train
    in, or a last epoch trained on a GPU (its bf16 is not a CPU's choice: timed again)."""
    if not history or "format" not in history[-1] or history[-1].get("device", "cpu") != "cpu":
        return None
    return named_format(history[-1]["format"])


def is_finished(state: TrainState, epochs: int) -> bool:
    """Whether a run at `state` trains nothing more with --epochs `epochs`: early stopping
    ended it, or it ran the epochs of its plan (the time budget's, kept across restarts, or
    --epochs, which a rerun may raise or lower)."""
    end = min(state.planned_epochs, epochs) if state.planned_epochs else epochs
    return state.stopped_early or state.diverged or state.epoch >= end


def finished_why(state: TrainState, epochs: int) -> str:
    """Why a finished run trains nothing more, and what would go on (README: a run that early
    stopping or its time budget ended stays finished)."""
    if state.diverged:
        return (f"it diverged in epoch {state.epoch} (its weights or outputs stopped being finite numbers); "
                "train again in a new --output with a lower --lr")
    if state.stopped_early:
        return "early stopping ended it; train longer in a new --output"
    if state.planned_epochs:  # (a plan is kept only when it cut the run short: is_finished)
        of = f" of {epochs}" if state.planned_epochs < epochs else ""
        return f"its --time-budget fitted {state.planned_epochs}{of} epochs; train longer in a new --output"
    return f"it ran all its {state.epoch} epochs; a larger --epochs goes on from there"


def named_format(name: str | None) -> tuple[torch.dtype | None, bool] | None:
    """The CPU format (amp dtype, channels_last) format_name calls `name`; None for another."""
    return next((f for f in CPU_FORMATS if format_name(*f) == name), None)


def phase_step(global_step: int, phase_start: int, epoch_steps: int) -> int:
    """The step within a phase that begins at epoch `phase_start`. Epochs drawn by
    --sampler vary by a few steps around `epoch_steps`, so a phase's first step may be
    counted a step or two early: not below 0, where timm's warm-up line goes negative."""
    return max(0, global_step - phase_start * epoch_steps)


def phase_bounds(phase: str, s: LoopSettings) -> tuple[int, int]:
    """(first epoch, number of epochs) of a phase; a time budget may end the run inside the
    head phase (`s.epochs` below --freeze-epochs)."""
    if phase == HEAD_PHASE:
        return 0, min(s.freeze_epochs, s.epochs)
    return s.freeze_epochs, s.epochs - s.freeze_epochs


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: list[float], device: torch.device, op: Any = dist.ReduceOp.SUM) -> list[float]:
    """Each value reduced over all workers (sum by default; every worker gets the result)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _is_distributed():
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_finite(*modules: torch.nn.Module) -> bool:
    """Whether every floating-point weight and buffer (BatchNorm statistics) of `modules`
    is a finite number."""
    return all(bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values()
               if t.is_floating_point())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every worker. DDP copies them only at the
    start of a forward pass, so after an epoch's last step, and in the EMA copy, each
    worker holds its own; validation then scores exactly the model rank 0 checkpoints."""
    if _is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate each array over all workers (every worker gets the result)."""
    if not _is_distributed():
        return arrays
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def log0(message: str) -> None:
    """Progress from rank 0 only (Ray forwards worker stdout to the driver's console).

    Written to the stream directly: Ray Train's patched print() would echo it twice.
    """
    import sys

    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Phase set-up: which parameters train, with which LR schedule
# --------------------------------------------------------------------------------------


class WeightedCrossEntropy(torch.nn.Module):
    """Cross-entropy with label smoothing and optional class weights, for labels and for
    soft (mixup/cutmix) targets alike: the weighted loss is divided by the batch's total
    weight in both cases. torch divides by the batch size for soft targets, so with class
    weights a mixed batch's loss (and gradient) was about half a plain batch's.

    Under DDP (gradients averaged over workers) the total is the whole step's, every
    worker's batch together: each worker dividing by its own batch's weight gave the
    images of a worker whose batch weighed less more say than the same images on one
    worker. Every worker takes the same number of steps, so each calls this alike."""

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float) -> None:
        super().__init__()
        self.weight = weight
        self.ce = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing,
                                            reduction="mean" if weight is None else "none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.ce(logits, target)
        # (Summed, not a matmul: autocast would run a matmul in bf16 or fp16.)
        total = ((target.float() * self.weight).sum(-1) if target.is_floating_point() else self.weight[target]).sum()
        if _is_distributed() and torch.is_grad_enabled():
            # The mean of the workers' totals: DDP's average of the gradients then divides
            # the sum over every worker's images by the whole step's weight.
            total = total.detach().clone()
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return self.ce(logits, target).sum() / total


def build_phase(
    model: torch.nn.Module, phase: str, s: LoopSettings, steps_per_epoch: int, warmup_steps: int = -1,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """Freeze/unfreeze, wrap for DDP, and build the optimizer (AdamW, or SGD with Nesterov
    momentum) with a warm-up + cosine schedule."""
    import ray.train.torch

    unfreeze = None if phase == HEAD_PHASE else s.unfreeze
    backbone = set_trainable(model, unfreeze)
    backbone_lr = s.lr * (s.backbone_lr_scale if phase == FINETUNE_PHASE else 1.0)
    head_params, backbone_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone_params if name in backbone else head_params).append(p)
    groups = [{"params": head_params, "lr": s.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": backbone_lr})
    optimizer = build_optimizer(groups, s)
    scheduler = build_scheduler(optimizer, phase, s, steps_per_epoch, warmup_steps)
    # A fresh DDP wrapper per phase: DDP registers exactly the parameters that train.
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
    return wrapped, optimizer, scheduler


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The checkpoint's optimizer state, each group keeping the peak LR (`initial_lr`) and
    weight decay this run's settings gave it: the saved peak (a resume with another --lr or
    --backbone-lr-scale) came back when a time budget refitted the schedule mid-phase, and
    the saved decay stayed for the rest of the phase (a resume with another --weight-decay)."""
    mine = [(g.get("initial_lr", g["lr"]), g["weight_decay"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (peak, decay) in zip(optimizer.param_groups, mine):
        group["initial_lr"], group["weight_decay"] = peak, decay


def build_optimizer(groups: list[dict[str, Any]], s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or SGD with Nesterov momentum 0.9 (L2 weight decay)."""
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=0.9, nesterov=True, weight_decay=s.weight_decay)
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, phase: str, s: LoopSettings, steps_per_epoch: int, warmup_steps: int = -1,
) -> Any:
    """Warm-up, then cosine decay to `min_lr` over the phase's epochs (per step). The
    warm-up is --warmup-epochs, at most half the phase; `warmup_steps` (>= 0): the one the
    phase began with (TrainState.warmup_steps), kept when a time budget's plan grows (a
    warm-up that grew with the plan moved its end past steps already taken, and the
    learning rate fell from its peak back into the ramp mid-phase)."""
    from timm.scheduler import CosineLRScheduler

    _, n_epochs = phase_bounds(phase, s)
    total = max(1, n_epochs * steps_per_epoch)
    asked = int(round(s.warmup_epochs * steps_per_epoch)) if warmup_steps < 0 else warmup_steps
    warmup = min(asked, total // 2)
    # warmup_prefix: the cosine starts after the warm-up, so it gets the phase's other steps.
    # timm warms every group up from one value: 1% of the lowest group's peak, so that a
    # backbone at --backbone-lr-scale of the head's LR rises to its peak too (from 1% of
    # the head's it started near, or above, its own peak).
    peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=s.min_lr, warmup_t=warmup,
        warmup_lr_init=min(peaks) * 0.01, warmup_prefix=True, t_in_epochs=False,
    )


def build_ema(model: torch.nn.Module, decay: float, epoch_steps: int) -> Any:
    """timm's ModelEmaV3 of `model` whose decay warms up over the first epoch to `decay`."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=ema_warmup_power(decay, epoch_steps))


def ema_warmup_power(decay: float, steps: int) -> float:
    """The warmup_power of timm's ModelEmaV3 whose decay, 1 - (1 + t)^-power at step t,
    reaches `decay` after `steps` steps (the first epoch's) and stays there. timm's default
    power, 2/3, reaches 0.999 only after 31,600 steps and 0.9999 after a million: in the
    CPU preset's ~18,000 steps --ema-decay 0.999, 0.9995 and 0.9999 all averaged alike."""
    return math.log(1.0 / (1.0 - decay)) / math.log(1.0 + max(1, steps))


# --time-budget estimates an epoch's time from this many of the latest epochs.
ESTIMATE_WINDOW = 3


def epochs_that_fit(done: int, configured: int, deadline: float, now: float, epoch_seconds: float) -> int:
    """How many epochs in all the run can have and still end by `deadline`: those done plus
    the whole epochs of `epoch_seconds` (+5% margin) left, at most `configured`."""
    room = int(max(0.0, deadline - now) // (epoch_seconds * 1.05))
    return min(configured, done + room)


# --------------------------------------------------------------------------------------
# One epoch of training and of validation
# --------------------------------------------------------------------------------------


class TimedBatches:
    """Iterates `batches`, adding up the seconds spent waiting for each next batch: how long
    the loop stood idle for its input (the first batch of an epoch included)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.wait = 0.0

    def __iter__(self) -> Any:
        it = iter(self.batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - start
            yield batch


def train_epoch(
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    batches: Any,
    normalize: DeviceNormalize,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    step_in_phase: int,
    device: torch.device,
    ema: Any = None,
    global_step: int = 0,
    mix: Any = None,
    clip_grad: float = 0.0,
) -> tuple[float, float, int, int]:
    """Returns (loss sum, correct, images, steps) on this worker. `ema` (timm's ModelEmaV3)
    follows the model after every step; `global_step` is the steps done before this epoch.
    `mix` (timm's Mixup) blends the batch and turns its labels into soft targets; accuracy
    on a mixed batch is counted against the label that dominates each image's mix.
    `clip_grad` > 0: the gradients' total norm is clipped to it (after DDP averaged them,
    and unscaled from fp16's loss scale) before each step."""
    wrapped.train()
    set_frozen_eval(model)
    # Sums stay on the device: a .item() per step would wait for the GPU every batch.
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    seen, steps = 0, 0
    for batch in batches:
        x = normalize(batch[IMAGE_COL], match_blur=False)  # training images as they are
        y = batch[LABEL_COL]
        target = y
        if mix is not None:
            x, target = mix(x, y)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = wrapped(x)
            loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)  # (a step whose gradients overflowed is still skipped)
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        scaler.step(optimizer)
        scaler.update()
        steps += 1
        scheduler.step_update(num_updates=step_in_phase + steps)
        if ema is not None:
            ema.update(model, step=global_step + steps)
        loss_sum += loss.detach().float() * len(y)
        # On a mixed batch each image counts as the label that dominates its mix (its own
        # label lost to the other image's in about half the mixed batches).
        correct += (logits.argmax(1) == (y if mix is None else target.argmax(1))).sum()
        seen += len(y)
    return loss_sum.item(), int(correct.item()), seen, steps


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Any,
    normalize: DeviceNormalize,
    amp_dtype: torch.dtype | None,
    label_smoothing: float,
    device: torch.device,
) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss sum, labels, predictions) on this worker's share of the val split."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    # Kept on the device until the end (one sync per epoch, not one per batch).
    loss_sum, labels, preds = torch.zeros((), device=device), [], []
    for batch in batches:
        x = normalize(batch[IMAGE_COL])
        y = batch[LABEL_COL]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
        loss_sum += criterion(logits, y)
        labels.append(y)
        preds.append(logits.argmax(1))
    cat = lambda xs: torch.cat(xs).cpu().numpy() if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return loss_sum.item(), cat(labels), cat(preds)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    phase: str,
    labels: np.ndarray,
    preds: np.ndarray,
    trained: torch.nn.Module | None = None,
    pretrained: bool = True,
) -> None:
    """`model` is what was validated and goes in the model folder; `trained`, when that is a
    moving average, is the model the optimizer steps (kept in the train state to resume);
    pretrained=False: training began from random weights."""
    save_model_dir(model, folder, spec, pretrained=pretrained)
    torch.save(
        {
            "state": asdict(state),
            "phase": phase,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            **({"trained_model": trained.state_dict()} if trained is not None else {}),
        },
        os.path.join(folder, TRAIN_STATE_FILE),
    )
    pd.DataFrame({"label": labels, "pred": preds}).to_parquet(
        os.path.join(folder, VAL_PREDICTIONS_FILE), index=False
    )


def load_checkpoint(folder: str, model: torch.nn.Module) -> dict[str, Any]:
    """Restore weights in place; return the rest (load_train_state)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
    return load_train_state(folder)


def read_train_state(checkpoint: Any) -> dict[str, Any]:
    """A Ray checkpoint's loop state (TrainState's fields), its train-state file read alone:
    `as_directory` would fetch the whole checkpoint from a bucket (the weights, their
    average and the optimizer's state) to read the epoch it ended at."""
    import io

    with checkpoint.filesystem.open_input_file(f"{checkpoint.path.rstrip('/')}/{TRAIN_STATE_FILE}") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")["state"]


def load_train_state(folder: str) -> dict[str, Any]:
    """A checkpoint's train state (history, optimizer, scaler...), loaded without
    unrestricted pickle and onto the CPU: a GPU worker saved the optimizer's tensors on its
    GPU, and the job's driver (a cluster's CPU head node) may have none."""
    return torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True, map_location="cpu")


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (its whole metrics dict) and every checkpoint at INFO in
    each worker: two long lines an epoch beside the loop's own, which says the same. Its
    warnings still show."""
    import logging

    try:  # internal modules; a Ray that moved them just keeps its lines
        from ray.train.v2._internal.execution import context as train_context
        from ray.train.v2._internal.execution import storage as train_storage
    except ImportError:
        return
    for logger in (train_context.logger, train_storage.logger):
        logger.setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    s = LoopSettings(**config)
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(s.cpus_per_worker)
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(s.seed)

    # Data: each worker gets an equal share of train (so every worker takes the same
    # number of steps) and its own share of val.
    train_shard = ray.train.get_dataset_shard(TRAIN)
    val_shard = ray.train.get_dataset_shard(VAL)
    epoch_steps = steps_per_epoch(s.num_train, s.batch_size, world)
    if epoch_steps < 1:
        raise ValueError(
            f"{s.num_train} training images cannot fill one batch of {s.batch_size} on each of "
            f"{world} workers; lower --batch-size or --num-workers."
        )
    on_gpu = device.type == "cuda"
    iter_args = {
        "batch_size": s.batch_size,
        "device": device,
        "dtypes": {IMAGE_COL: torch.uint8, LABEL_COL: torch.int64},
        "pin_memory": on_gpu,
        "prefetch_batches": 2,
    }

    # Model
    spec = s.spec
    model = create_model(spec.model, len(spec.class_names), drop_rate=s.drop_rate, **spec.model_kwargs)
    if s.pretrained_state is not None:
        model.load_state_dict(ray.get(s.pretrained_state))
    model.to(device)
    # Resume: after a worker failure, or when the same run folder is run again.
    state, restored = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(folder, model)
        state = TrainState(**restored["state"])
        log0(f"Resuming after epoch {state.epoch} (step {state.global_step}) from "
             f"{storage.full_path(checkpoint.filesystem, checkpoint.path, s.output)}")  # (a bucket's: with its scheme)
    # channels_last: tensor cores on GPUs, and on most CPUs oneDNN's fast kernels (5-140%
    # faster training steps for the timm CNNs measured on one VM, slower on another). On a
    # CPU, --amp auto measures fp32 and bf16, each with and without channels_last, and
    # trains in the fastest (every worker in the same, from their summed step times).
    amp_dtype, channels_last = resolve_amp(s.amp, device), True
    timed = s.amp == "auto" and device.type == "cpu"  # the format is this run's choice
    kept = kept_format(state.history) if timed else None
    swept = named_format(s.cpu_format) if timed else None
    if kept is not None:  # a resumed run goes on in the format it was training in
        amp_dtype, channels_last = kept
        log0(f"Training in {format_name(*kept)} as the run's last epoch did (--amp auto times the "
             "formats when a run begins; --amp off or bf16 sets one)")
    elif swept is not None:
        amp_dtype, channels_last = swept
        log0(f"Training in {format_name(*swept)} as --cpu-format gives it (in a sweep's trials, and "
             "best_config.json: timed once for all the trials)")
    elif timed:
        seconds = all_reduce(time_cpu_formats(model, s.batch_size, spec.in_chans, spec.image_size), device)
        amp_dtype, channels_last = fastest_format(seconds, CPU_FORMATS)
        per_worker = [t / max(world, 1) for t in seconds]  # (summed over the workers)
        log0(f"Training step on this CPU: {timings_line(per_worker)}; "
             f"training in {format_name(amp_dtype, channels_last)}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    normalize = DeviceNormalize.for_model(spec, channels_last=channels_last).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # The loss scale goes on across phases; a run saved without fp16 has none (an empty
    # state, which GradScaler refuses) and --amp may change on resume.
    if restored is not None and restored.get("scaler"):
        scaler.load_state_dict(restored["scaler"])
    weight = torch.tensor(s.class_weights, dtype=torch.float32, device=device) if s.class_weights else None
    # With soft (mixed) targets too: smoothing and class weights apply to them as to labels.
    criterion = WeightedCrossEntropy(weight, s.label_smoothing)
    mix = None
    if s.mixup or s.cutmix:
        from timm.data import Mixup

        mix = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mix_prob,
                    label_smoothing=0.0, num_classes=len(spec.class_names))

    start_budget_clock(s, device)
    configured_epochs = s.epochs  # --epochs: the most a time budget's plan may grow to
    if state.planned_epochs:  # the schedule the time budget fitted, kept across restarts
        s.epochs = min(state.planned_epochs, s.epochs)  # (a rerun may lower --epochs)
    if is_finished(state, configured_epochs):  # (a sweep's trial: a run's job stops before workers start)
        log0(f"Run already finished at epoch {state.epoch}; nothing to train ({finished_why(state, configured_epochs)}).")
        return
    if state.history and state.epoch >= int(state.history[-1].get("planned_epochs") or 0) > 0:
        # A run that ran all its epochs, extended by a larger --epochs: the cosine is refitted
        # and the LR rises again, so early stopping counts from here, as at a phase's start
        # (the epochs without a gain at the end of the old schedule stopped the extension
        # after its first epoch or two).
        state.bad_epochs = 0
    # The moving average of the weights (timm's ModelEmaV3, its decay warmed up over the
    # first epoch: ema_warmup_power) is what validates and what the model folder holds; a
    # checkpoint keeps the weights the optimizer steps beside it.
    ema = None
    if s.ema_decay:
        ema = build_ema(model, s.ema_decay, epoch_steps)  # a copy of what was restored
        if restored is not None and "trained_model" in restored:  # (a run begun without EMA: none)
            model.load_state_dict(restored["trained_model"])
    eval_model = ema.module if ema is not None else model

    log0(
        f"Training {spec.model} on {world} worker(s) ({device.type}, {format_name(amp_dtype, channels_last)}), "
        f"{s.num_train} images, {epoch_steps} steps/epoch of {s.batch_size}x{world}, "
        f"{spec.image_size}px from {spec.data_size}px data"
        + (f", val blurred by sigma {spec.input_blur:g} px" if spec.input_blur else "")
        + (", each image normalised to zero mean and unit std" if spec.input_norm == "image" else "")
        + (f", weights averaged (EMA decay {s.ema_decay:g})" if ema is not None else "")
        + (f", mixup {s.mixup:g} / cutmix {s.cutmix:g} on {s.mix_prob:.0%} of batches" if mix is not None else "")
    )
    phase, wrapped, optimizer, scheduler = None, model, None, None
    epoch_times, mark = [], time.time()  # whole epochs (train, val, report) in this process
    epoch = state.epoch
    while epoch < s.epochs:  # (a time budget may move the end either way)
        if phase_of(epoch, s.freeze_epochs) != phase:
            phase = phase_of(epoch, s.freeze_epochs)
            if epoch == phase_bounds(phase, s)[0]:  # the phase begins (not resumed inside it)
                state.warmup_steps = -1
            wrapped, optimizer, scheduler = build_phase(model, phase, s, epoch_steps, state.warmup_steps)
            state.warmup_steps = scheduler.warmup_t
            if epoch == s.freeze_epochs and epoch > 0:  # patience counts in the final phase only
                state.bad_epochs = 0
            if restored is not None and restored["phase"] == phase and epoch == state.epoch:
                load_optimizer_state(optimizer, restored["optimizer"])
        phase_start, _ = phase_bounds(phase, s)
        step_in_phase = phase_step(state.global_step, phase_start, epoch_steps)
        scheduler.step_update(num_updates=step_in_phase)
        lr = optimizer.param_groups[0]["lr"]

        # The model starts alike on every worker (seeded above); its dropout masks and timm's
        # mixup draws (numpy's global generator) differ by worker, and by epoch, seeded at
        # each: a run resumed at an epoch draws there what it would have drawn unstopped.
        reseed(s.seed, rank, epoch)
        start = time.time()
        train_batches = TimedBatches(train_shard.iter_torch_batches(drop_last=True, **iter_args))
        loss_sum, correct, seen, steps = train_epoch(
            wrapped, model, train_batches,
            normalize, criterion, optimizer, scheduler, scaler, amp_dtype, step_in_phase, device,
            ema, state.global_step, mix, s.clip_grad,
        )
        train_seconds = time.time() - start
        broadcast_buffers(eval_model)
        val_loss_sum, labels, preds = evaluate(
            eval_model, val_shard.iter_torch_batches(**iter_args), normalize, amp_dtype,
            s.label_smoothing, device,
        )
        loss_sum, correct, seen, val_loss_sum = all_reduce(
            [loss_sum, correct, seen, val_loss_sum], device
        )
        labels, preds = gather_arrays([labels, preds])
        seconds = time.time() - start

        # A model whose weights went NaN or inf predicts class 0 for every image (argmax of
        # NaN), and its "accuracy" is class 0's share of val: never an improvement; the run
        # ends here, its best epoch kept (every worker decides alike). The weights checked
        # are rank 0's, which the checkpoint holds: another worker's own BatchNorm
        # statistics may keep an fp16 overflow whose step the GradScaler skipped everywhere.
        # With fp16 the weights can stay finite while the outputs are not (every step
        # skipped): a val loss that is not finite counts too.
        broken = 1.0 if rank == 0 and not all_finite(model, eval_model) else 0.0
        diverged = all_reduce([broken], device, op=dist.ReduceOp.MAX)[0] > 0 or not math.isfinite(val_loss_sum)

        state.global_step += steps
        state.epoch = epoch + 1
        val_acc = math.nan if diverged else float((labels == preds).mean()) if len(labels) else 0.0
        improved = not diverged and val_acc > state.best_val_acc
        if improved:
            state.best_val_acc, state.best_epoch, state.bad_epochs = val_acc, state.epoch, 0
        else:
            state.bad_epochs += 1
        # Early stopping only once the final phase runs: the frozen phase is short by design.
        final_phase = phase == phase_of(s.epochs - 1, s.freeze_epochs)
        state.stopped_early = (not diverged and final_phase and state.bad_epochs >= s.patience
                               and state.epoch < s.epochs)
        state.diverged = diverged
        row = {
            "epoch": state.epoch,
            "phase": phase if s.pretrained else SCRATCH_PHASE,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss_sum / max(len(labels), 1),
            "val_acc": val_acc,
            "seconds": round(seconds, 2),
            "images_per_s": round(seen / max(train_seconds, 1e-9), 1),
            # This worker's training pass stood idle this long waiting for batches.
            "data_wait_s": round(train_batches.wait, 2),
            "steps": steps,  # optimizer steps, the same on every worker
            "planned_epochs": s.epochs,  # the run's length when this epoch ran
            "format": format_name(amp_dtype, channels_last),  # precision and memory format trained in
            "device": device.type,  # cpu or cuda
        }
        state.history.append(row)
        log0(
            f"epoch {state.epoch}/{s.epochs} [{row['phase']}] lr {lr:.2e} "
            f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
            f"val loss {row['val_loss']:.4f} acc {val_acc:.4f}{' *' if improved else ''} | "
            f"{seconds:.1f}s {row['images_per_s']:.0f} img/s, {row['data_wait_s']:.1f}s waiting for data"
            + (f" | early stop: no gain for {state.bad_epochs} epochs" if state.stopped_early else "")
        )
        if diverged:
            kept = f"epoch {state.best_epoch} is kept as the best" if state.best_epoch > 0 else "no epoch to keep"
            log0(f"Training diverged in epoch {state.epoch}: the weights or the outputs on val are no longer "
                 f"finite numbers (NaN or inf), so the run ends here; {kept}. Lower --lr (or, with --amp fp16, use bf16 or off).")

        # The time budget's plan for what is left, before the checkpoint so that it keeps
        # the plan: a run the budget ends here is finished for a rerun, not resumed.
        if s.deadline and not state.stopped_early and not diverged and state.epoch < s.epochs:
            mark, scheduler = _fit_to_deadline(
                s, state, configured_epochs, epoch_times, mark, phase, optimizer, scheduler,
                epoch_steps, device,
            )
        metrics = {**row, "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
                   "stopped_early": state.stopped_early, CHECKPOINT_SCORE: checkpoint_score(val_acc, improved),
                   # The function returns after this report (a sweep's scheduler lets it: fer_ray.tuning).
                   "last_report": bool(state.stopped_early or diverged or state.epoch >= s.epochs)}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, eval_model, spec, optimizer, scaler, state, phase, labels, preds,
                                trained=model if ema is not None else None,
                                pretrained=s.pretrained)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{state.epoch:04d}")
        if rank == 0 and s.resumed_config is not None:  # (after the epoch it trained with is saved)
            try:
                storage.write_json(s.resumed_config["path"], s.resumed_config["settings"])
                s.resumed_config = None
            except OSError as e:  # (a bucket's hiccup ended a run whose epoch was saved): next epoch
                log0(f"Could not write {s.resumed_config['path']} ({e}); tried again after the next epoch")
        if state.stopped_early or diverged:
            break
        epoch += 1


def start_budget_clock(s: LoopSettings, device: torch.device) -> None:
    """A sweep trial's --time-budget starts when its workers do (each time they start: a
    trial's workers restarted after a failure have the whole budget again); every worker
    takes the latest start, so that all plan the same epochs."""
    if s.budget_s and not s.deadline:
        s.deadline = all_reduce([time.time()], device, op=dist.ReduceOp.MAX)[0] + s.budget_s


def _fit_to_deadline(
    s: LoopSettings, state: TrainState, configured_epochs: int, epoch_times: list[float],
    mark: float, phase: str, optimizer: torch.optim.Optimizer, scheduler: Any, epoch_steps: int,
    device: torch.device,
) -> tuple[float, Any]:
    """--time-budget, after each epoch that does not end the plan: how many epochs fit.

    The estimate is the slowest of the last ESTIMATE_WINDOW whole epochs (train, val and
    report, on the slowest worker) after the process's first, which also pays the
    pipeline's warm-up and so is used only until a second epoch has run. A window, not the
    whole run: one epoch slowed by other work on a shared machine cuts the plan for a few
    epochs, not for the rest of the run (seen here: a 2-minute epoch among 50-second ones
    took a 28-epoch plan down to 15). When the number that fits changes, the run is shortened or
    lengthened (up to --epochs) and the cosine schedule refitted to end there, so the
    learning rate still decays to its end. The plan is kept in the train state for a resume.
    Appends to `epoch_times`, sets `s.epochs`; returns the new (mark, scheduler)."""
    # The slowest worker's epoch and the latest clock: every worker must plan the same
    # number of epochs (one that stopped early would leave the others waiting in DDP).
    now = time.time()
    seconds, now = all_reduce([now - mark, now], device, op=dist.ReduceOp.MAX)
    epoch_times.append(seconds)
    estimate = max(epoch_times[1:][-ESTIMATE_WINDOW:]) if len(epoch_times) > 1 else epoch_times[0]
    fit = epochs_that_fit(state.epoch, configured_epochs, s.deadline, now, estimate)
    if fit != s.epochs:
        log0(f"Time budget: {estimate:.0f} s per epoch leaves room for {fit} of at most "
             f"{configured_epochs} epochs; the learning-rate schedule now ends at epoch {fit}")
        before = phase_bounds(phase, s)
        s.epochs = fit
        # The running phase's cosine is refitted when its end moved: the plan shrank into it,
        # or grew again past a head phase it had cut short (which would otherwise run its
        # last epochs at --min-lr).
        if scheduler is not None and fit > state.epoch and phase_bounds(phase, s) != before:
            scheduler = build_scheduler(optimizer, phase, s, epoch_steps, state.warmup_steps)
            state.warmup_steps = scheduler.warmup_t
    # Kept only when the budget cut the run short: a run it fitted whole ran all its epochs,
    # and a rerun with a larger --epochs goes on (is_finished).
    state.planned_epochs = s.epochs if s.epochs < configured_epochs else 0
    return now, scheduler


# The metric Ray keeps the best checkpoint by (fer_ray.trainer): val accuracy on the epochs
# that improved on the best so far, below any accuracy on the others. Ray keeps the later of
# two checkpoints with equal scores, and the loop calls the earlier of two equal val
# accuracies best: by val_acc alone, a tie left best/ holding another epoch than best_epoch.
CHECKPOINT_SCORE = "checkpoint_score"


def checkpoint_score(val_acc: float, improved: bool) -> float:
    return val_acc if improved else -1.0


def reseed(seed: int, rank: int, epoch: int) -> int:
    """Seed torch's and numpy's global generators for the training steps of worker `rank`
    from epoch `epoch` on: a seed of its own for each (seed, rank, epoch). Returns it."""
    step_seed = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    torch.manual_seed(step_seed)
    np.random.seed(step_seed)
    return step_seed


def steps_per_epoch(num_train: int, batch_size: int, workers: int) -> int:
    """Optimizer steps per epoch: each worker's equal share, full batches only."""
    return (num_train // workers) // batch_size


def scaled_lr(lr: float, workers: int, rule: str) -> float:
    """The LR for `workers` x the per-worker batch (linear or square-root scaling rule)."""
    return {"linear": lr * workers, "sqrt": lr * math.sqrt(workers), "none": lr}[rule]
