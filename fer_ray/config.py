"""Typed job configs: defaults <- YAML/JSON file <- command-line flags.

Each job has one dataclass config made of sections (nested dataclasses). Every leaf field
is a command-line flag (`image_size` -> `--image-size`); leaf names are unique across
sections so flags stay flat. A `--config FILE` may set any leaf, either flat
(`lr: 0.001`) or inside its section (`optim: {lr: 0.001}`), so a run's own
`config.json` can be fed back to reproduce it. Unknown keys are rejected with the list
of valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


RESOLVED_KEY = "resolved"
# The largest --image-size and --data-size: 1024 px faces are far above any model's need,
# and larger sizes ran out of memory with a traceback once Ray had started.
MAX_IMAGE_SIZE = MAX_DATA_SIZE = 1024
TRIAL_KEY = "trial"  # a sweep's best_config.json: which trial it was, and how it did
# Under RESOLVED_KEY: the settings resolve_defaults filled in (not given), which a config
# file read with --config leaves unset, so they follow its new --epochs and --pretrained.
FILLED_KEY = "defaults_filled"


class ConfigError(ValueError):
    """A configuration a user gave that cannot be used; the message says what to do."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the job's docstring as written (its example commands) and each flag's
    default, but for flags that have none to show (required ones, and those whose default
    is None or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default == "" or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_input_blur(value: str) -> float | None:
    """--input-blur: 'auto' -> None (estimate), 'off' -> 0, else a sigma >= 0 in px."""
    value = str(value).strip().lower()
    if value == "auto":
        return None
    if value in ("off", "none"):
        return 0.0
    sigma = float(value)  # ValueError for anything else; the config check words it
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(value)
    return sigma


# --------------------------------------------------------------------------------------
# Training config
# --------------------------------------------------------------------------------------

AUGMENT_LEVELS = ("none", "light", "medium", "strong")
AMP_MODES = ("auto", "bf16", "fp16", "off")
# The formats --amp auto times on CPUs (fer_ray.model.CPU_FORMATS, as format_name names them).
CPU_FORMAT_NAMES = ("fp32", "fp32+channels_last", "bf16", "bf16+channels_last")
LR_SCALING = ("linear", "sqrt", "none")
SAMPLERS = ("none", "sqrt", "balanced")
INPUT_NORMS = ("dataset", "image")
OPTIMIZERS = ("adamw", "sgd")
SEARCHERS = ("random", "optuna")
# The settings that take one of a few values: validate checks them, --help lists them.
CHOICES: dict[str, tuple[str, ...]] = {
    "augment": AUGMENT_LEVELS, "sampler": SAMPLERS, "input_norm": INPUT_NORMS, "lr_scaling": LR_SCALING,
    "optimizer": OPTIMIZERS, "amp": AMP_MODES, "cpu_format": CPU_FORMAT_NAMES, "searcher": SEARCHERS,
}


@dataclass
class DataOptions:
    data: str = field(default="", metadata={"help": "prepared shards folder or URI (required, here or in --config)"})
    image_size: int = field(default=224, metadata={"help": "model input size in pixels"})
    data_size: int | None = field(
        default=None,
        metadata={
            "help": "size images are decoded and augmented at in Ray Data before the "
            "on-device resize to --image-size (default: the smaller of --image-size and "
            "the dataset's median image side)"
        },
    )
    batch_size: int = field(default=32, metadata={"help": "images per worker per step"})
    augment: str = field(
        default="medium", metadata={"help": f"augmentation strength: {'|'.join(AUGMENT_LEVELS)}"}
    )
    random_erasing: float | None = field(
        default=None,
        metadata={
            "help": "share of training images with random erasing (black holes a tenth "
            "to a quarter of the side, up to 1-3 by --augment level; Albumentations' "
            "CoarseDropout); default: the --augment level's (light 0.175, medium 0.35, "
            "strong 0.525); 0: none"
        },
    )
    blur_jitter: float = field(
        default=0.0,
        metadata={
            "help": "share of training images blurred a little more (a Gaussian of sigma 0.3-1 px "
            "at the data size) or a little less (an unsharp mask), one or the other; 0: none"
        },
    )
    sampler: str = field(
        default="none",
        metadata={
            "help": "repeat each training image about its class's rate times an epoch (the whole "
            "part, once more with the fraction as its chance), the rates by class: "
            "balanced (every class equally often), sqrt (by the inverse square root of its "
            "frequency) or none (every image once); the epoch keeps its size"
        },
    )
    input_blur: str = field(
        default="auto",
        metadata={
            "help": "Gaussian blur (sigma in px at --data-size) for val and scored images, to "
            "match training images that are blurrier: auto (measured on train vs val), off, "
            "or a number"
        },
    )
    input_norm: str = field(
        default="dataset",
        metadata={
            "help": "how images are normalised for the model: dataset (the model's mean/std) "
            "or image (each image to zero mean and unit std: brightness and contrast removed)"
        },
    )


@dataclass
class ModelOptions:
    model: str = field(default="resnet50", metadata={"help": "timm model name"})
    pretrained: bool = field(
        default=True, metadata={"help": "start from ImageNet weights (timm hub)"}
    )
    pretrained_file: str | None = field(
        default=None,
        metadata={"help": "local .pth/.safetensors with pretrained weights (offline clusters)"},
    )
    drop_rate: float = field(default=0.0, metadata={"help": "dropout before the classifier"})
    model_kwargs: dict = field(
        default_factory=dict,
        metadata={
            "help": "extra timm.create_model arguments as YAML/JSON, e.g. "
            "'{in_chans: 1, output_stride: 16}' (a 1-channel stem, dilated last stage)"
        },
    )


@dataclass
class OptimOptions:
    epochs: int = field(default=30, metadata={"help": "total epochs, both phases included"})
    time_budget: float = field(
        default=0.0,
        metadata={
            "help": "minutes the whole run may take, start-up included (a sweep's trial: from "
            "its workers' start): after each epoch the LR schedule is fitted to the epochs that "
            "fit (at most --epochs); 0: no limit"
        },
    )
    lr: float = field(
        default=1e-3,
        metadata={"help": "peak learning rate for one worker's batch (see --lr-scaling)"},
    )
    lr_scaling: str = field(
        default="linear",
        metadata={
            "help": "how the LR grows with the number of workers: linear (lr x workers), "
            "sqrt (lr x sqrt(workers)) or none"
        },
    )
    min_lr: float = field(default=1e-6, metadata={"help": "LR at the end of the cosine decay"})
    optimizer: str = field(
        default="adamw",
        metadata={"help": "adamw, or sgd (momentum 0.9, Nesterov)"},
    )
    weight_decay: float = field(
        default=0.05,
        metadata={"help": "weight decay (decoupled for adamw, L2 for sgd: ~5e-4 there)"},
    )
    clip_grad: float = field(
        default=0.0,
        metadata={"help": "clip the gradients' total norm to this before each step (e.g. 1.0); 0: off"},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    class_weights: bool = field(
        default=True, metadata={"help": "weight the loss by inverse class frequency"}
    )
    freeze_epochs: int | None = field(
        default=None,
        metadata={
            "help": "epochs of head-only training with the backbone frozen "
            "(default: 2 with pretrained weights, fewer when --epochs leaves no room, 0 without)"
        },
    )
    unfreeze: str = field(
        default="all",
        metadata={"help": "after the frozen phase, train the last N stages or 'all'"},
    )
    backbone_lr_scale: float | None = field(
        default=None,
        metadata={
            "help": "backbone LR as a fraction of --lr in the fine-tuning phase "
            "(default: 0.1 with pretrained weights, 1.0 without)"
        },
    )
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up per phase"})
    mixup: float = field(
        default=0.0,
        metadata={"help": "mixup alpha: blend pairs of training images and their labels (e.g. 0.2); 0: off"},
    )
    cutmix: float = field(
        default=0.0,
        metadata={
            "help": "cutmix alpha: paste a box of one training image into another, labels by area "
            "(e.g. 1.0); 0: off. With --mixup too, each batch takes one of the two"
        },
    )
    mix_prob: float = field(
        default=1.0, metadata={"help": "fraction of training batches that --mixup/--cutmix mix"}
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "keep an exponential moving average of the weights with this per-step decay "
            "(e.g. 0.999; warmed up over the first steps) and validate and save it; 0: off"
        },
    )
    patience: int = field(
        default=6, metadata={"help": "stop after this many epochs without a better val accuracy"}
    )


@dataclass
class RunOptions:
    output: str = field(
        default="", metadata={"help": "the run folder (jobs/tune.py: the sweep folder), local or a URI (required, here or in --config)"}
    )
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: int = field(
        default=1, metadata={"help": "CPUs reserved per worker (torch threads on CPU runs)"}
    )
    amp: str = field(
        default="auto",
        metadata={
            "help": "mixed precision: auto (bf16/fp16 on GPU; on CPU fp32 or bf16, whichever a few "
            "timed steps find faster when a run begins, or a sweep; a resumed run keeps its format), bf16, fp16, off"
        },
    )
    cpu_format: str | None = field(
        default=None,
        metadata={
            "help": "with --amp auto on CPUs, train in this format instead of timing them when the run begins: "
            "fp32, fp32+channels_last, bf16 or bf16+channels_last (a sweep's best_config.json gives the one "
            "its trials trained in)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the model's initialisation and, with each worker's rank and the epoch, of its dropout masks and mixup/cutmix draws"})
    max_failures: int = field(
        default=2, metadata={"help": "worker failures survived by restarting from a checkpoint "
                                     "(a spot node reclaimed under `ray up`'s autoscaler counts as one)"}
    )


@dataclass
class TrainConfig:
    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; raise ConfigError with what to do."""
        d, m, o, r = self.data, self.model, self.optim, self.run
        _require(bool(d.data and d.data.strip()), "--data is required: the shards folder written by jobs/prepare.py.")
        _require(bool(r.output and r.output.strip()), "--output is required: the folder this "
                 + ("sweep writes to (its trials, results and best model)." if hasattr(self, "sweep") else "run writes to."))
        _require(16 <= d.image_size <= MAX_IMAGE_SIZE,
                 f"--image-size must be between 16 and {MAX_IMAGE_SIZE} px, got {d.image_size}.")
        _require(
            d.data_size is None or 8 <= d.data_size <= MAX_DATA_SIZE,
            f"--data-size must be between 8 and {MAX_DATA_SIZE} px, got {d.data_size}.",
        )
        _require(d.batch_size >= 1, f"--batch-size must be at least 1, got {d.batch_size}.")
        _choice("augment", d.augment)
        _augmentation_share("random_erasing", d.random_erasing, d.augment)
        _augmentation_share("blur_jitter", d.blur_jitter, d.augment)
        _choice("sampler", d.sampler)
        _choice("input_norm", d.input_norm)
        _require(
            d.sampler == "none" or not o.class_weights,
            f"--sampler {d.sampler} and --class-weights both rebalance the classes; "
            "add --no-class-weights to use the sampler alone.",
        )
        try:
            parse_input_blur(d.input_blur)
        except ValueError:
            raise ConfigError(
                f"--input-blur must be auto, off or a sigma >= 0 in pixels, got {d.input_blur!r}."
            ) from None
        _require(0 <= m.drop_rate < 1, f"--drop-rate must be in [0, 1), got {m.drop_rate}.")
        _require(o.epochs >= 1, f"--epochs must be at least 1, got {o.epochs}.")
        _require(o.time_budget >= 0, f"--time-budget must be >= 0 minutes, got {o.time_budget}.")
        _require(o.lr > 0, f"--lr must be positive, got {o.lr}.")
        _choice("lr_scaling", o.lr_scaling)
        _require(o.min_lr >= 0, f"--min-lr must be non-negative, got {o.min_lr}.")
        if not hasattr(self, "sweep"):  # (a sweep's trials sample their LR: checked there)
            _require(o.min_lr < o.lr, f"--min-lr ({o.min_lr:g}), where the cosine ends, must be below --lr "
                                      f"({o.lr:g}), where it starts.")
            self._check_min_lr_below_the_backbones(o.lr, "--lr")
        _choice("optimizer", o.optimizer)
        _require(o.weight_decay >= 0, f"--weight-decay must be non-negative, got {o.weight_decay}.")
        _require(o.clip_grad >= 0, f"--clip-grad must be non-negative (0: off), got {o.clip_grad}.")
        _require(
            0 <= o.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1), got {o.label_smoothing}.",
        )
        _require(
            o.freeze_epochs is None or 0 <= o.freeze_epochs <= o.epochs,
            f"--freeze-epochs must be between 0 and --epochs ({o.epochs}), got {o.freeze_epochs}.",
        )
        _require(
            o.unfreeze == "all" or (o.unfreeze.isdigit() and int(o.unfreeze) >= 1),
            f"--unfreeze must be 'all' or a number of stages >= 1, got {o.unfreeze!r}.",
        )
        _require(
            o.backbone_lr_scale is None or 0 < o.backbone_lr_scale <= 1,
            f"--backbone-lr-scale must be in (0, 1], got {o.backbone_lr_scale}.",
        )
        _require(o.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {o.warmup_epochs}.")
        _require(o.mixup >= 0, f"--mixup must be >= 0 (0: off), got {o.mixup}.")
        _require(o.cutmix >= 0, f"--cutmix must be >= 0 (0: off), got {o.cutmix}.")
        _require(0 < o.mix_prob <= 1, f"--mix-prob must be in (0, 1], got {o.mix_prob}.")
        _require(
            not (o.mixup or o.cutmix) or d.batch_size % 2 == 0,
            f"--mixup/--cutmix pair each image with another in its batch: --batch-size must be "
            f"even, got {d.batch_size}.",
        )
        _require(0 <= o.ema_decay < 1, f"--ema-decay must be in [0, 1), got {o.ema_decay}.")
        _require(o.patience >= 1, f"--patience must be at least 1, got {o.patience}.")
        _require(r.num_workers >= 1, f"--num-workers must be at least 1, got {r.num_workers}.")
        _require(
            r.cpus_per_worker >= 1, f"--cpus-per-worker must be at least 1, got {r.cpus_per_worker}."
        )
        _choice("amp", r.amp)
        if r.cpu_format is not None:  # (used with --amp auto on CPUs only, as its help says)
            _choice("cpu_format", r.cpu_format)
        _require(r.max_failures >= 0, f"--max-failures must be >= 0, got {r.max_failures}.")
        # (torch.manual_seed takes up to 2**64 - 1, numpy's and Optuna's generators 2**32 - 1)
        _require(0 <= r.seed < 2**32, f"--seed must be from 0 to {2**32 - 1}, got {r.seed}.")
        reserved = sorted(set(m.model_kwargs) & set(RESERVED_MODEL_KWARGS))
        _require(
            not reserved,
            f"--model-kwargs cannot set {', '.join(reserved)}: fer_ray sets "
            + "; ".join(RESERVED_MODEL_KWARGS[k] for k in reserved) + ".",
        )
        _require(
            m.model_kwargs.get("in_chans", 3) in (1, 3),
            f"--model-kwargs in_chans must be 1 (a grayscale stem) or 3 (RGB), got {m.model_kwargs.get('in_chans')!r}: "
            "images are decoded to one or three channels.",
        )
        if m.pretrained_file and not m.pretrained:
            raise ConfigError("--pretrained-file was given with --no-pretrained (pretrained: false in "
                              "a --config file counts too); drop one of them.")
        if not m.pretrained:
            # Without ImageNet weights there is nothing to keep: frozen stages stay random.
            _require(
                not o.freeze_epochs,
                f"--freeze-epochs {o.freeze_epochs} trains only the head of a backbone that is not "
                "pretrained (random); give --freeze-epochs 0 (a --config file's freeze_epochs counts "
                "too), or train with --pretrained.",
            )
            _require(
                o.unfreeze == "all",
                f"--unfreeze {o.unfreeze} keeps the other stages of a backbone that is not pretrained "
                "random for the whole run; give --unfreeze all (a --config file's unfreeze counts "
                "too), or train with --pretrained.",
            )
        return self

    def _check_min_lr_below_the_backbones(self, lr: float, named: str) -> None:
        """Fine-tuning trains the backbone at lr x --backbone-lr-scale, and every group's
        cosine ends at --min-lr: below it, the backbone's "decay" would climb."""
        o = self.optim
        default = PRETRAINED_BACKBONE_LR_SCALE if self.model.pretrained else 1.0  # (resolve_defaults)
        scale = o.backbone_lr_scale if o.backbone_lr_scale is not None else default
        # (from scratch too: a --backbone-lr-scale given applies to the whole run)
        if o.min_lr >= lr * scale:
            raise ConfigError(
                f"--min-lr ({o.min_lr:g}), where the cosine ends, must be below the backbone's "
                f"{'fine-tuning ' if self.model.pretrained else ''}LR, "
                f"{named} x --backbone-lr-scale ({lr:g} x {scale:g} = {lr * scale:g}); lower --min-lr."
            )

    def resolve_defaults(self) -> "TrainConfig":
        """Fill the values whose default depends on other values (pretrained or not); their
        names are added to `self.defaults_filled` (config.json's FILLED_KEY)."""
        o = self.optim
        filled = defaults_filled(self)
        defaults = filled_defaults(self.model.pretrained, o.epochs)
        for name, value in defaults.items():
            if getattr(o, name) is None:
                setattr(o, name, value)
                filled.append(name)
        self.defaults_filled = tuple(dict.fromkeys(filled))
        return self


# --backbone-lr-scale's default for a pretrained model (from scratch: 1.0, one LR for all).
PRETRAINED_BACKBONE_LR_SCALE = 0.1


def filled_defaults(pretrained: bool, epochs: int) -> dict[str, Any]:
    """The defaults resolve_defaults fills in, which depend on other settings."""
    return {"freeze_epochs": min(2, epochs - 1) if pretrained else 0,
            "backbone_lr_scale": PRETRAINED_BACKBONE_LR_SCALE if pretrained else 1.0}


# timm.create_model arguments fer_ray passes itself, and where they come from.
RESERVED_MODEL_KWARGS = {
    "num_classes": "num_classes from the data's classes",
    "pretrained": "pretrained by --pretrained/--no-pretrained",
    "drop_rate": "drop_rate by --drop-rate",
    "pretrained_cfg_overlay": "pretrained_cfg_overlay by --pretrained-file",
}


def per_image_norm(input_norm: str) -> bool:
    """A model folder's `input_norm`: True for "image", False for "dataset"."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}: expected {' or '.join(INPUT_NORMS)}")
    return input_norm == "image"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_paths(**given: str | None) -> None:
    """ConfigError for a path flag given as an empty or blank string (an unset shell
    variable: `--output "$OUT"`), which would otherwise name the current folder. Keyword
    arguments: the flag's name without dashes (underscores for dashes) = its value."""
    for name, value in given.items():
        if value is None or not str(value).strip():
            raise ConfigError(f"--{name.replace('_', '-')} is empty (an unset shell variable?); give a folder.")


def _augmentation_share(name: str, share: float | None, augment: str) -> None:
    """A share of the training images that one augmentation step takes (None: the level's):
    between 0 and 1, and none without augmentation."""
    flag = "--" + name.replace("_", "-")
    _require(share is None or 0 <= share <= 1, f"{flag} must be between 0 and 1, got {share}.")
    _require(not (augment == "none" and share),
             f"{flag} is part of training augmentation; give an --augment level other than none.")


def _choice(name: str, value: str) -> None:
    choices = CHOICES[name]
    _require(value in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}.")


# --------------------------------------------------------------------------------------
# Generic machinery: dataclass <-> dict <-> argparse
# --------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what config.json holds)."""
    return dataclasses.asdict(config)


def _leaf_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Leaf name -> (section name or None, field) for a config dataclass."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sub_hints = typing.get_type_hints(t)
            for sf in dataclasses.fields(t):
                sf.type = sub_hints[sf.name]
                leaves[sf.name] = (f.name, sf)
        else:
            f.type = t
            leaves[f.name] = (None, f)
    return leaves


def _flatten(values: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    """Accept flat or sectioned keys (dashes or underscores); reject unknown ones."""
    leaves = _leaf_fields(cls)
    sections = {s for s, _ in leaves.values() if s}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in sections and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                sub_name = str(sub_key).replace("-", "_")
                if sub_name in leaves and leaves[sub_name][0] != name:
                    home = leaves[sub_name][0]
                    raise ConfigError(
                        f"Setting {sub_key!r} in {source} is under {name!r} but belongs in section "
                        + (f"{home!r}" if home else "none (give it at the top level)")
                        + f"; or give it flat, at the top level: {sub_name}: {sub_value!r}."
                    )
                if sub_name not in leaves:
                    _unknown(f"{name}.{sub_key}", leaves, source)
                flat[sub_name] = sub_value
        elif name in leaves:
            flat[name] = value
        else:
            _unknown(str(key), leaves, source)
    return flat


def _unknown(key: str, leaves: dict, source: str) -> None:
    valid = ", ".join(sorted(leaves))
    raise ConfigError(f"Unknown setting {key!r} in {source}; valid settings are: {valid}.")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 (and Python) do: an exponent without
    a dot or its sign (1e-1, 5e3) is a float, where YAML 1.1 left it text (timm then failed
    on --model-kwargs '{drop_path_rate: 1e-1}' with "'str' / 'int'"). Plain values only: a
    quoted '1e-1' stays text."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's type (ConfigError when it does not fit)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            items = value.split()
        else:  # a YAML list, or one number where two are due
            items = list(value) if isinstance(value, (list, tuple)) else [value]
        args = typing.get_args(tp)
        if len(items) != len(args):
            raise ConfigError(f"{_setting(name)} expects {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, t, name) for v, t in zip(items, args))
    if tp is dict:
        try:
            parsed = yaml_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{_setting(name)} is not valid YAML ({problem}): {value!r}; "
                              "write it as '{a: 1, b: 2}'.") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"{_setting(name)} expects a mapping such as '{{a: 1}}', got {value!r}.")
        # A key without a value would be dropped unseen (timm leaves out None arguments);
        # '{in_chans:1}' is one: YAML reads the key "in_chans:1", as it needs ": ".
        blank = [str(k) for k, v in parsed.items() if v is None]
        if blank:
            hint = (" (YAML needs a space after the colon: '{a: 1}', not '{a:1}')"
                    if any(":" in k for k in blank) else "")
            raise ConfigError(f"{_setting(name)} gives no value for {', '.join(map(repr, blank))}{hint}.")
        return parsed
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, str) and not value.strip():
            # `--pretrained-file "$WEIGHTS"` with WEIGHTS unset would mean "none" unsaid: the
            # hub's ImageNet weights instead of the user's file.
            raise ConfigError(f"{_setting(name)} is empty (an unset shell variable?); give a value, "
                              "or 'none' for none.")
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if value is None and tp in (str, bool):  # a key left blank in YAML (`output:`): "None", False
        raise ConfigError(f"{_setting(name)} is blank; give it a value or leave the key out.")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, (bool, int)) or value not in (0, 1):  # `pretrained: 0.5`, `[]`
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if tp is str:
            if isinstance(value, bool):  # YAML reads off/on/no/yes as booleans
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError):
        kind = "a finite number" if tp is float else tp.__name__
        raise ConfigError(f"{_setting(name)} expects {kind}, got {value!r}.") from None
    return value


def _setting(name: str) -> str:
    """A setting named as a --config file (its key) and the command line (its flag) call it;
    an environment variable (FER_RAY_...) by its name alone."""
    flag = f" (--{name.replace('_', '-')})" if name.islower() else ""
    return f"Setting {name!r}{flag}"


def from_flat(cls: type, flat: dict[str, Any]) -> Any:
    """Build a config dataclass from flat leaf values (unset leaves keep defaults)."""
    leaves = _leaf_fields(cls)
    sections: dict[str | None, dict[str, Any]] = {}
    for name, value in flat.items():
        section, f = leaves[name]
        sections.setdefault(section, {})[name] = _coerce(value, f.type, name)
    hints = typing.get_type_hints(cls)
    kwargs = dict(sections.get(None, {}))
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = hints[f.name](**sections.get(f.name, {}))
    return cls(**kwargs)


def load_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """Flat leaf values from a YAML or JSON file (a path or URI: a run's config.json on a
    bucket resumes or retrains that run)."""
    from fer_ray import storage

    p = str(path) if storage.is_uri(str(path)) else str(Path(path))
    if not storage.is_file(p):
        if storage.is_dir(p):
            from fer_ray.constants import BEST_CONFIG_FILE, CONFIG_FILE, SWEEP_CONFIG_FILE

            if not storage.exists(storage.join(p, SWEEP_CONFIG_FILE)):
                held = f"a run's {storage.join(p, CONFIG_FILE)} to resume or retrain it"
            elif any(f.name == "sweep" for f in dataclasses.fields(cls)):  # (jobs/tune.py)
                held = f"a sweep's {storage.join(p, SWEEP_CONFIG_FILE)} to resume it"
            else:
                held = f"a sweep's {storage.join(p, BEST_CONFIG_FILE)} to train its best trial's settings"
            raise ConfigError(f"Config file {p!r} is a folder; give a YAML file, or {held}.")
        raise ConfigError(f"Config file {p!r} does not exist.")
    try:
        values = yaml_load(storage.read_bytes(p).decode()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {p!r} is not text; give a YAML or JSON file of settings.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"Config file {p!r} is not valid YAML{where}: {problem}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {p!r} must hold a mapping of settings.")
    resolved = values.pop(RESOLVED_KEY, None)  # a run's config.json also lists derived values
    values.pop(TRIAL_KEY, None)  # and a sweep's best_config.json the trial's results
    flat = _flatten(values, cls, p)
    if isinstance(resolved, dict) and isinstance(resolved.get(FILLED_KEY), list):
        _unset_filled(flat, resolved[FILLED_KEY])
    return flat


def _unset_filled(flat: dict[str, Any], filled: list[str]) -> None:
    """Leave unset, to follow the new run's --epochs and --pretrained, the settings a run's
    config.json lists as filled-in defaults and still holds at the default its own settings
    give: one edited since, or a run's own kept across a resume with a larger --epochs, is
    kept as given."""
    epochs = flat.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return
    defaults = filled_defaults(bool(flat.get("pretrained", ModelOptions.pretrained)), epochs)
    for name in defaults.keys() & set(filled):
        if flat.get(name) == defaults[name]:
            del flat[name]


def defaults_filled(cfg: Any) -> list[str]:
    """The settings resolve_defaults filled in for `cfg` (FILLED_KEY's list; none before it ran)."""
    return list(getattr(cfg, "defaults_filled", ()))


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()
) -> None:
    """One flag per leaf field, defaulting to 'unset' so file values are not overridden."""
    sampled = getattr(cls, "SAMPLED", {})
    for name, (section, f) in _leaf_fields(cls).items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if name in sampled:  # parsed to be refused in one sentence (parse_config), not listed
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        items = _tuple_items(f.type)
        if items:
            parser.add_argument(
                flag,
                dest=name,
                nargs=items,
                default=argparse.SUPPRESS,
                metavar=("LO", "HI") if items == 2 else None,
                help=helptext if default is None else f"{helptext} (default: {' '.join(map(str, default))})",
            )
        elif f.type is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{helptext} (default: {default})",
            )
        else:
            choices = CHOICES.get(name)
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                # (the values listed in --help; checked by validate, in one sentence)
                metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                # None or "": no default (a required flag, or one derived later that the
                # help itself describes).
                help=helptext if default is None or default == "" else f"{helptext} (default: {default})",
            )


def _tuple_items(tp: Any) -> int:
    """How many values a tuple field (or an optional one) takes; 0 for other fields."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return len(typing.get_args(tp)) if typing.get_origin(tp) is tuple else 0


def parse_config(
    cls: type,
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
) -> tuple[Any, argparse.Namespace]:
    """Parse flags into `cls`: defaults <- --config file <- flags.

    Arguments the caller added to `parser` itself come back in the namespace.
    """
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings")
    add_config_flags(parser, cls)
    ns = parser.parse_args(argv)
    for name, instead in getattr(cls, "SAMPLED", {}).items():
        if name in vars(ns):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is what the sweep samples for each trial; give its range with {instead}.")
    flat: dict[str, Any] = {}
    if ns.config:
        flat.update(load_config_file(ns.config, cls))
    leaves = _leaf_fields(cls)
    flat.update({k: v for k, v in vars(ns).items() if k in leaves})
    return from_flat(cls, flat), ns


# --------------------------------------------------------------------------------------
# Sweep config: every training setting plus the search
# --------------------------------------------------------------------------------------

OPTUNA_MISSING = "--searcher optuna needs Optuna: `pip install optuna`, or use --searcher random."
# --lr-range when not given: around each optimizer's usual learning rates.
LR_RANGES = {"adamw": (1e-4, 3e-3), "sgd": (5e-3, 0.2)}


@dataclass
class SweepOptions:
    num_samples: int = field(default=8, metadata={"help": "trials to run"})
    max_concurrent: int | None = field(
        default=None,
        metadata={"help": "trials at once (default: as many as the cluster's CPUs/GPUs hold)"},
    )
    lr_range: tuple[float, float] | None = field(
        default=None,
        metadata={
            "help": "learning rate range, sampled log-uniformly (default: "
            + ", ".join(f"{lo:g} {hi:g} with --optimizer {o}" for o, (lo, hi) in LR_RANGES.items())
            + ")"
        },
    )
    smoothing_range: tuple[float, float] = field(
        default=(0.0, 0.3), metadata={"help": "label smoothing range, sampled uniformly"}
    )
    grace_period: int = field(
        default=2, metadata={"help": "epochs every trial runs before ASHA may stop it, counted after "
                                     "--freeze-epochs (a pretrained backbone's head-only epochs)"}
    )
    searcher: str = field(
        default="random",
        metadata={"help": "random search, or optuna (model-based; needs `pip install optuna`)"},
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep every trial's checkpoints; by default a finished sweep deletes those of its "
                          "finished trials but the best (each keeps best/, its history and reports)"},
    )


@dataclass
class SweepConfig(TrainConfig):
    sweep: SweepOptions = field(default_factory=SweepOptions)
    # Training settings each trial samples: refused as flags (a --config file's values are
    # left to the sweep, so a training preset feeds a sweep as it is).
    SAMPLED: typing.ClassVar[dict[str, str]] = {"lr": "--lr-range LO HI", "label_smoothing": "--smoothing-range LO HI"}

    def lr_range(self) -> tuple[float, float]:
        """--lr-range, or the usual range of the optimizer the trials use."""
        return self.sweep.lr_range or LR_RANGES[self.optim.optimizer]

    def validate(self) -> "SweepConfig":
        super().validate()
        s = self.sweep
        lo, hi = self.lr_range()
        _require(0 < lo < hi, f"--lr-range must be two positive numbers LO < HI, got {lo} {hi}.")
        _require(self.optim.min_lr < lo, f"--min-lr ({self.optim.min_lr:g}), where the cosine ends, must be "
                                         f"below the lowest LR a trial may draw ({lo:g}).")
        self._check_min_lr_below_the_backbones(lo, "the lowest LR of --lr-range")
        lo, hi = s.smoothing_range
        _require(
            0 <= lo <= hi < 1, f"--smoothing-range must satisfy 0 <= LO <= HI < 1, got {lo} {hi}."
        )
        _require(s.num_samples >= 1, f"--num-samples must be at least 1, got {s.num_samples}.")
        _require(
            s.max_concurrent is None or s.max_concurrent >= 1,
            f"--max-concurrent must be at least 1, got {s.max_concurrent}.",
        )
        _require(s.grace_period >= 1, f"--grace-period must be at least 1, got {s.grace_period}.")
        _choice("searcher", s.searcher)
        if s.searcher == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError(OPTUNA_MISSING) from None
        return self
