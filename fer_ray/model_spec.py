"""A model folder's description and a check that its weights file is whole, without
torch or timm (a scoring job's driver checks the folder; only its actors build the model).

A model folder holds `model.safetensors` and timm's `config.json`, whose `fer_ray` section
is the ModelSpec (fer_ray.model writes and loads both).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from fer_ray import storage
from fer_ray.config import ConfigError, per_image_norm
from fer_ray.constants import MODEL_CONFIG_FILE, WEIGHTS_FILE

# A safetensors file: an 8-byte little-endian header length, the JSON header, the data.
_HEADER_LEN = struct.Struct("<Q")
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass
class ModelSpec:
    """What inference needs besides the weights (the `fer_ray` section of config.json)."""

    model: str
    class_names: list[str]
    image_size: int
    data_size: int
    channels: int
    mean: list[float]
    std: list[float]
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args
    input_blur: float = 0.0  # Gaussian sigma (px at data_size) applied to images it scores
    # With a blur: the training images' median sharpness (fer_ray.blur), so scoring can
    # measure the blur that matches the images it is given instead (--input-blur auto).
    train_sharpness: float | None = None
    # "dataset": (x - mean) / std; "image": each image to zero mean and unit std
    input_norm: str = "dataset"

    @property
    def in_chans(self) -> int:
        """Channels the model's first layer takes (images are expanded or averaged to it)."""
        return int(self.model_kwargs.get("in_chans", 3))


def read_model_spec(folder: str) -> ModelSpec:
    """The description of a model folder (local path or URI); ConfigError if not one."""
    return _read(folder)[0]


def check_model_folder(folder: str) -> ModelSpec:
    """read_model_spec, and ConfigError unless the weights file is whole: a safetensors
    header whose tensors fill the file exactly, with a classifier of one output per class
    name. Reads config.json and the header only; loading the weights is left to whoever
    runs the model (fer_ray.model.load_model_dir)."""
    spec, cfg = _read(folder)
    weights = storage.join(folder, WEIGHTS_FILE)
    try:
        tensors = _safetensors_header(weights)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{weights!r} is not a whole safetensors file ({e}); the model folder is damaged, "
            "copy the run's best/ folder again."
        ) from None
    head = (cfg.get("pretrained_cfg") or {}).get("classifier")
    shape = tensors.get(f"{head}.weight", {}).get("shape") if isinstance(head, str) else None
    if shape and shape[0] != len(spec.class_names):
        raise ConfigError(
            f"Model folder {folder!r} has {shape[0]} outputs but names {len(spec.class_names)} "
            "classes; it is damaged, retrain or re-export it."
        )
    return spec


def _read(folder: str) -> tuple[ModelSpec, dict[str, Any]]:
    cfg_path = storage.join(folder, MODEL_CONFIG_FILE)
    weights = storage.join(folder, WEIGHTS_FILE)
    if storage.is_file(folder):
        raise ConfigError(f"Model folder {folder!r} is a file; pass the folder that holds it (a run's best/).")
    if not storage.is_dir(folder):
        raise ConfigError(f"Model folder {folder!r} does not exist; pass a run's best/ folder.")
    if not (storage.is_file(cfg_path) and storage.is_file(weights)):
        best = storage.join(folder, "best")  # (a run's or a sweep's folder given for its model)
        inside = storage.is_file(storage.join(best, WEIGHTS_FILE)) and storage.is_file(storage.join(best, MODEL_CONFIG_FILE))
        raise ConfigError(
            f"{folder!r} is not a fer_ray model folder (it needs {WEIGHTS_FILE} and "
            f"{MODEL_CONFIG_FILE}); " + (f"its model is in {best!r}: pass that." if inside
                                         else "pass a training run's or a sweep's best/ folder.")
        )
    try:
        cfg = json.loads(storage.read_bytes(cfg_path))
        spec = ModelSpec(**cfg["fer_ray"])
        per_image_norm(spec.input_norm)  # a value this version knows
        return spec, cfg
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{cfg_path!r} is not a fer_ray model config ({type(e).__name__}: {e}); "
            "pass a training run's or a sweep's best/ folder."
        ) from None


def _safetensors_header(path: str) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file's header lists (name -> dtype, shape, data_offsets);
    ValueError unless the header parses and its tensors end where the file does."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        return safetensors_header(f, f.size())


def safetensors_header(f: Any, size: int) -> dict[str, dict[str, Any]]:
    """_safetensors_header of an open binary file of `size` bytes."""
    if size < _HEADER_LEN.size:
        raise ValueError(f"{size} bytes")
    (n,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
    if n > min(_MAX_HEADER, size - _HEADER_LEN.size):
        raise ValueError(f"header of {n} bytes in a file of {size}")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError("unreadable header") from None
    if not header or _HEADER_LEN.size + n + end != size:
        raise ValueError(f"its tensors take {end} bytes, the file holds {size - _HEADER_LEN.size - n}")
    return header
