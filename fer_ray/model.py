"""timm models: creation, pretrained weights, staged freezing, and self-describing folders.

A model folder holds `model.safetensors` and timm's `config.json` (architecture,
label names, input size, mean/std) plus a `fer_ray` section (class names, the size and
channels images are decoded at). `timm.create_model("local-dir:FOLDER", pretrained=True)`
loads it without fer_ray; `load_model_dir` does the same and returns the description
(`fer_ray.model_spec`: the description and a check of the folder without torch or timm).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import timm
import torch
from timm.models import group_parameters

from fer_ray import storage
from fer_ray.config import ConfigError
from fer_ray.constants import MODEL_CONFIG_FILE, WEIGHTS_FILE
from fer_ray.model_spec import ModelSpec, read_model_spec  # noqa: F401 - fer_ray.model.ModelSpec as before

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown timm model {name!r}; see timm.list_models() for names.{hint}")
    arch, _, tag = name.partition(".")
    # (timm.is_model takes any tag: "resnet18.bogus" then failed in create_model with a
    # traceback; tags without weights, such as "untrained", are timm's too)
    tagged = timm.list_models(f"{arch}.*", include_tags=True) if tag else []
    if tag and name not in tagged:
        tags = [t.partition(".")[2] for t in tagged]
        close = difflib.get_close_matches(tag, tags, n=5, cutoff=0.6) or tags[:8]
        raise ConfigError(f"timm's {arch} has no weights tagged {tag!r}"
                          + (f"; its tags include: {', '.join(close)}." if close else "; it has no tags."))


def create_model(name: str, num_classes: int, drop_rate: float = 0.0, **kwargs: Any) -> torch.nn.Module:
    """A timm model with a fresh `num_classes` head (random weights)."""
    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # (timm asserts: "Invalid pool type: x")
        raise ConfigError(f"--model-kwargs {kwargs} do not fit {name}: {str(e).rstrip('.') or type(e).__name__}.") from None


def fetch_pretrained_state(
    name: str, num_classes: int, pretrained_file: str | None = None, seed: int = 0, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """ImageNet weights with a fresh head, fetched once (on the driver) for all workers.

    timm fetches its hub weights, or reads `pretrained_file`, and adapts the classifier
    and first conv (`in_chans=1` sums the RGB filters). The fresh head is drawn from `seed`
    (--seed: the workers load this state over the model they seeded, so an unseeded driver
    gave every run another head). Raises ConfigError when the weights cannot be had.
    """
    overlay, given, made = None, None, []  # (made: temporary files to remove at the end)
    if pretrained_file:
        if storage.is_dir(pretrained_file):  # (a run's best/, say: "does not exist" misled)
            raise ConfigError(f"--pretrained-file {pretrained_file!r} is a folder; give the weights file in it "
                              f"(a model folder's {WEIGHTS_FILE}).")
        if not storage.is_file(pretrained_file):
            raise ConfigError(f"--pretrained-file {pretrained_file!r} does not exist.")
        local = storage.local_path(pretrained_file)
        if local is None:
            local = _download(pretrained_file)
            made.append(local)
        # timm reads a file as safetensors by its name alone: a Hugging Face cache blob, a
        # bucket object or a renamed .bin went to torch.load and was refused with advice to
        # unpickle it. Such a file is handed over under a .safetensors name.
        if not local.endswith(".safetensors") and _is_safetensors(local):
            link = os.path.join(tempfile.mkdtemp(prefix="fer_ray_weights_"), "weights.safetensors")
            os.symlink(os.path.abspath(local), link)
            made.append(link)
            local = link
        overlay = {"file": local}
        try:
            given = set(timm.models.load_state_dict(local))
        except Exception as e:  # noqa: BLE001 - (a text file: KeyError: 101; an empty one: EOFError)
            _remove(made)
            raise ConfigError(
                f"--pretrained-file {pretrained_file!r} is not a weights file torch or safetensors can "
                f"read ({type(e).__name__}: {' '.join(str(e).split())[:200] or 'no detail'})."
            ) from None
    unreachable = hub_unreachable() if not pretrained_file and weights_on_hub(name) else None
    loads: list[Any] = []  # (module, what its load_state_dict left missing): _check_weights_cover
    try:
        with _hub_offline(unreachable is not None), torch.random.fork_rng(devices=[]), _recording_loads(loads):
            torch.manual_seed(seed)
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs
            )
    except Exception as e:  # noqa: BLE001 - network, hub and file errors all end the same way
        # Wrong --model-kwargs read as such (create_model's ConfigError), not as a failed download.
        create_model(name, num_classes, **kwargs)
        if pretrained_file:
            # (weights of a 1-channel stem, from a run on gray images, into a 3-channel one)
            text, stem = str(e), re.search(r"weight shape \(\d+, (\d+),.*inconsistent with input_size", str(e))
            # (1 or 3 only: a space-to-depth stem's (TResNet's) second dimension is no channel count)
            if stem and stem[1] in ("1", "3") and int(stem[1]) != int(kwargs.get("in_chans", 3)):
                text = f"{text.rstrip('.')}; its first layer takes {stem[1]} channel(s): add --model-kwargs " \
                       f"'{{in_chans: {stem[1]}}}'"
            elif (shapes := _SIZE_MISMATCH.findall(text)):  # (torch lists every one: lines by the hundred)
                (key, theirs, ours), more = shapes[0], len(shapes) - 1
                raise ConfigError(
                    f"--pretrained-file {pretrained_file!r} does not hold {name}'s weights: {len(shapes)} of its "
                    f"tensors have another shape there (e.g. {key}: [{theirs}] in the file, [{ours}] in "
                    f"{name}{f', and {more} more' if more else ''}); give weights of this architecture (and its "
                    "--model-kwargs), or --no-pretrained."
                ) from None
            raise ConfigError(
                f"Could not load --pretrained-file {pretrained_file!r} into {name}: {type(e).__name__}: "
                f"{' '.join(text.split())[:600]}"
            ) from None
        if "size mismatch" in str(e):  # (the weights came, and --model-kwargs changed a layer's shape)
            raise ConfigError(
                f"The pretrained weights of {name} do not fit --model-kwargs {kwargs} "
                f"({' '.join(str(e).split())[:300]}); leave out those that change its layers, or --no-pretrained."
            ) from None
        if unreachable:
            why = f"{unreachable}; not in the Hub's local cache either"
        else:  # (the Hub's answer, or a URL-hosted weight file's download error)
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}".rstrip(": ")
        raise ConfigError(
            f"Could not download pretrained weights for {name} ({why}); with no "
            "network, pass --pretrained-file PATH (a local .pth or .safetensors) or --no-pretrained."
        ) from None
    finally:
        _remove(made)  # (a bucket's weights, copied here only for timm to read, or a link to them)
    # What timm's load left missing, after its renaming of the architecture's other
    # checkpoint layouts (Facebook's ConvNeXt names, say); a file's own names where the
    # model loaded its weights another way. Hub weights too: timm loads them leniently into
    # a new head, so layers --model-kwargs added (a larger depth) stayed random unsaid.
    into_model = [result for module, result in loads if module is model]
    if given is not None:
        missing = set(into_model[-1].missing_keys) if into_model else set(model.state_dict()) - given
        # (layers --model-kwargs add, such as a ViT's fc_norm with global_pool avg, are in
        # no file of the architecture: said as for the Hub's weights, not refused)
        missing -= set(_warn_new_layers(model, missing, name, num_classes, kwargs))
        _check_weights_cover(model, missing, name, pretrained_file)
        if into_model:
            _check_no_other_layers(model, into_model[-1].unexpected_keys, name, pretrained_file)
    elif into_model:
        _warn_new_layers(model, set(into_model[-1].missing_keys), name, num_classes, kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _recording_loads(loads: list[Any]) -> Any:
    """Within: (module, result) of every Module.load_state_dict call appended to `loads`."""
    real = torch.nn.Module.load_state_dict

    def recording(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = real(self, *args, **kwargs)
        loads.append((self, result))
        return result

    torch.nn.Module.load_state_dict = recording
    try:
        yield
    finally:
        torch.nn.Module.load_state_dict = real


def _warn_new_layers(model: torch.nn.Module, missing: set[str], name: str, num_classes: int,
                     kwargs: dict[str, Any]) -> list[str]:
    """A warning naming the tensors the published weights left unset (`missing`) that exist
    only because of --model-kwargs (a larger depth): timm loads Hub weights into a new head
    leniently, and those layers trained from their initial values unsaid. Not an error:
    some are meant to start fresh (a ViT's fc_norm with global_pool avg), and timm itself
    loads some architectures' weights leniently (DLA's, ConvNeXt's fcmae). Returns them."""
    if not set(kwargs) - {"in_chans"}:
        return []
    try:
        with torch.device("meta"):  # (the architecture without those kwargs: names only)
            base = timm.create_model(name, num_classes=num_classes, in_chans=int(kwargs.get("in_chans", 3)))
    except Exception:  # noqa: BLE001 - a model that cannot be built without storage: nothing said
        return []
    new = [k for k in model.state_dict() if k in missing and k not in base.state_dict()
           and not k.endswith("num_batches_tracked")]
    if new:
        log.warning("The pretrained weights of %s do not hold %d tensors --model-kwargs %s add (e.g. %s): "
                    "those start from their initial values.", name, len(new), kwargs, ", ".join(new[:2]))
    return new


def _check_weights_cover(model: torch.nn.Module, missing: set[str], name: str, pretrained_file: str) -> None:
    """ConfigError unless a --pretrained-file set every tensor of the model but its
    classifier (`missing`: the model's tensors it did not set): timm loads a file into a
    model with a new head leniently, and the weights of another architecture left most of
    the backbone random, trained as if pretrained (a file of no matching tensor at all,
    with a frozen random backbone)."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ""
    heads = head if isinstance(head, (list, tuple)) else [head]
    wanted = [k for k in model.state_dict()
              if not k.endswith("num_batches_tracked") and not any(k.startswith(h + ".") for h in heads if h)]
    missing = [k for k in wanted if k in missing]
    # The classifier's siblings in a head module (ConvNeXt's head.norm beside head.fc):
    # self-supervised weights (timm's convnextv2 fcmae) hold none, and timm loads them
    # leniently from the Hub too. Said, not refused, when nothing else is missing.
    parents = {h.rpartition(".")[0] for h in heads if h and "." in h}
    in_head = [k for k in missing if any(k.startswith(p + ".") for p in parents)]
    if in_head and len(in_head) == len(missing):
        log.warning("--pretrained-file %r holds no %s of %s's head (as self-supervised weights do): "
                    "those start from their initial values.", pretrained_file, ", ".join(in_head[:4]), name)
        return
    if missing:
        raise ConfigError(
            f"--pretrained-file {pretrained_file!r} does not hold {name}'s weights: {len(missing)} of its "
            f"{len(wanted)} tensors besides the classifier are missing (e.g. {', '.join(missing[:2])}); "
            "give weights of this architecture, or --no-pretrained."
        )


# torch's load_state_dict error, one line per tensor: (name, shape in the file, shape here)
_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _check_no_other_layers(model: torch.nn.Module, unexpected: Sequence[str], name: str,
                           pretrained_file: str) -> None:
    """ConfigError when a --pretrained-file holds layers inside the model's own modules that
    the model does not have: the weights of a deeper sibling (resnet34's into resnet18,
    resnet101's into resnet50) set every tensor of the shallower model, and it trained as if
    pretrained from a cut-down copy of another network. Tensors of modules the model lacks
    altogether (a self-supervised decoder, another classifier's name) are only said; extra
    tensors of a module the model has (buffers it does not save) are left to timm's log."""
    modules = dict(model.named_modules())
    inside, outside = [], []
    for key in unexpected:
        parent = key.rpartition(".")[0]
        if parent in modules:
            continue
        parts = parent.split(".")
        ancestors = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        (inside if any(a in modules for a in ancestors) else outside).append(key)
    if inside:
        inside.sort(key=lambda k: k.endswith("num_batches_tracked"))  # (a weight's name first)
        raise ConfigError(
            f"--pretrained-file {pretrained_file!r} does not hold {name}'s weights: it holds {len(inside)} "
            f"tensors of layers {name} does not have (e.g. {', '.join(inside[:2])}), as a deeper variant's "
            "weights do (or --model-kwargs that remove layers); give weights of this architecture (and its "
            "--model-kwargs), or --no-pretrained."
        )
    if outside:
        log.warning("--pretrained-file %r holds %d tensors of modules %s does not have (e.g. %s): left out.",
                    pretrained_file, len(outside), name, ", ".join(outside[:2]))


def _is_safetensors(path: str) -> bool:
    """Whether a local file is a whole safetensors file (its header parses, its tensors end
    where it does)."""
    from fer_ray.model_spec import safetensors_header

    try:
        with open(path, "rb") as f:
            safetensors_header(f, os.fstat(f.fileno()).st_size)
    except (OSError, ValueError):
        return False
    return True


def _remove(paths: list[str]) -> None:
    for path in paths:
        os.remove(path)
        if os.path.basename(os.path.dirname(path)).startswith("fer_ray_weights_"):
            os.rmdir(os.path.dirname(path))
    paths.clear()


HUB_PROBE_TIMEOUT_S = 5.0


def weights_on_hub(name: str) -> bool:
    """Whether timm fetches `name`'s weights from the Hugging Face Hub (nearly all its
    models) rather than from a URL of their own."""
    from timm.models import get_pretrained_cfg

    if name.startswith("hf-hub:"):
        return True
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown tag: timm's own error comes with the load
        return False
    return bool(cfg and cfg.hf_hub_id)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face Hub (HF_ENDPOINT) takes no connection, or None when it does.

    Without network huggingface_hub retries each request five times with back-off (about
    50 s) before it looks in its cache; one connection attempt tells sooner. Behind a proxy
    the Hub is not probed (a direct connection would fail where the proxy's succeeds).
    """
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    # The proxies requests would use: the *_proxy variables, or the system's settings.
    proxies = urllib.request.getproxies()
    if any(proxies.get(k) for k in (url.scheme, "all")) and not urllib.request.proxy_bypass(host):
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode for the block: requests fail at once and downloads
    come from the local cache (the mode HF_HUB_OFFLINE=1 sets, read on every request)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _download(uri: str) -> str:
    suffix = Path(storage.name_of(uri)).suffix  # (timm reads .safetensors by its name)
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


def check_input_size(model: torch.nn.Module, name: str, in_chans: int, size: int) -> None:
    """One forward pass at the training input size, on the driver: a model built for a
    fixed size (ViTs, for one) would otherwise fail in every worker."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, size, size))
    except Exception as e:  # noqa: BLE001 (the model's own message says what it needs)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{name} does not take {in_chans}-channel {size} px images ({first}); choose another "
            f"--image-size, or give the model its input size, e.g. --model-kwargs '{{\"img_size\": {size}}}'."
        ) from None
    finally:
        model.train(was_training)


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """Mean/std and interpolation the model's weights expect (timm's resolved data config)."""
    return timm.data.resolve_model_data_config(model)


# --------------------------------------------------------------------------------------
# Freezing for two-phase fine-tuning
# --------------------------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names by stage, stem first and classifier last (timm's coarse groups). A
    model without timm's group matcher (PiT, PoolFormer and a few more) has two groups: the
    rest, then its classifier; so has one whose matcher has no coarse groups (RDNet asserts
    that it has none: every run of it failed in its workers)."""
    if hasattr(model, "group_matcher"):
        try:
            matcher = model.group_matcher(coarse=True)
        except (AssertionError, NotImplementedError):
            matcher = None
        if matcher is not None:
            groups = group_parameters(model, matcher)
            return [groups[k] for k in sorted(groups)]
    head = {id(p) for p in model.get_classifier().parameters()}
    names = [(name, id(p) in head) for name, p in model.named_parameters()]
    return [[n for n, is_head in names if not is_head], [n for n, is_head in names if is_head]]


def set_trainable(model: torch.nn.Module, unfreeze: str | int | None) -> set[str]:
    """Freeze all but the head (None), the head plus the last N stages, or nothing ('all').

    Returns the names of trainable backbone parameters. Frozen stages go to eval mode
    so their BatchNorm statistics stay those of the pretrained weights.
    """
    groups = parameter_groups(model)
    head = set(groups[-1])
    if unfreeze == "all":
        trainable = {n for g in groups for n in g}
    else:
        n_stages = 0 if unfreeze is None else int(unfreeze)
        trainable = set(head)
        for g in groups[-1 - n_stages : -1] if n_stages else []:
            trainable.update(g)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable - head


def set_frozen_eval(model: torch.nn.Module) -> None:
    """Put each module whose own parameters are all frozen in eval mode, that module alone
    (call after model.train()): a frozen BatchNorm keeps its running statistics. Not its
    children: a ViT holds its class token and position embedding itself, and eval() on it
    turned the whole model, trainable blocks and head included, to eval mode (no dropout,
    no drop-path) whenever those were frozen.

    A module with no parameters of its own follows the nearest module around it that has
    parameters (its children's included): eval mode when they are all frozen. So a
    BatchNorm without affine keeps its statistics, and the stochastic depth (DropPath,
    DropBlock) or dropout inside a frozen block stops dropping its features, which the
    head then trained on noisier than they are when scored."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        params = list(module.parameters(recurse=False))
        around = name
        while not params and around:
            around = around.rpartition(".")[0]  # ("" at the top: the model itself)
            params = list(modules[around].parameters())
        if params and not any(p.requires_grad for p in params):
            module.training = False


# --------------------------------------------------------------------------------------
# Self-describing model folders
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Precision and memory format on a CPU: which is fastest depends on the CPU (bf16 and
# channels_last trained 1.37x faster than fp32 on one 2-core VM, slower on another), so it
# is measured.
# --------------------------------------------------------------------------------------

# (autocast dtype or None for fp32, channels_last)
CPU_FORMATS = ((None, False), (None, True), (torch.bfloat16, False), (torch.bfloat16, True))
FP32_FORMATS = CPU_FORMATS[:2]


def format_name(amp_dtype: torch.dtype | None, channels_last: bool) -> str:
    """How logs name a format: fp32, bf16 or fp16 (autocast), +channels_last."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    return name + ("+channels_last" if channels_last else "")


def time_cpu_formats(
    model: torch.nn.Module, batch_size: int, in_chans: int, image_size: int,
    formats: tuple = CPU_FORMATS, train: bool = True, steps: int = 3, warmup: int = 2,
    max_seconds: float = 15.0,
) -> list[float]:
    """Seconds of one step of `model` in each of `formats` on a random batch (a training
    step, forward and backward, or with train=False an inference forward): each format on
    its own copy, in turn, the best of `steps` timed steps after `warmup` untimed ones;
    fewer when steps are slow, each format taking about its share of `max_seconds` (at
    least one step of each kind).

    Training steps, one format at a time, as training runs it: a process's first steps in a
    format pay one-off costs (kernel set-up, memory first touched), and timing the formats
    in alternation, one step each per round, kept paying them. On a 2-core Intel Xeon VM
    with AMX that way timed resnet10t's bf16 + channels_last training step at 67 ms against
    40 for fp32, and the CPU preset trained in fp32, while step after step bf16 +
    channels_last ran at 37 ms against 41 (batch 32; 57 against 67-77 ms at batch 64).

    Inference (train=False): each format warmed up in turn (on one copy of the model per
    memory format, kept: fp32 and bf16 autocast run the same weights), then timed in rounds,
    one pass of each per round. A scoring actor times them while
    the rest of its job starts (the driver's imports, Ray Data's actors), and timed one
    after another, a burst of that work fell on one format's passes alone: in one of five
    `jobs/predict.py` runs on FER2013 val (resnet18, 48 px, 2-core Intel Xeon VM with AMX)
    bf16 + channels_last timed 42 ms against bf16's 30 and the job scored in bf16, which
    runs batches of 256 at ~1,550 images/s against bf16 + channels_last's ~2,300. In
    rounds, a burst slows every format's pass of that round and the best of each is
    kept (bench/PERFORMANCE.md)."""
    x = torch.randn(min(batch_size, 32), in_chans, image_size, image_size)
    y = torch.zeros(len(x), dtype=torch.long)  # class 0: valid for any number of classes
    share = max_seconds / len(formats)
    seconds, steppers = [], []
    copies: dict[bool, torch.nn.Module] = {}  # inference: one per memory format (autocast leaves weights alone)
    for amp_dtype, channels_last in formats:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if train or channels_last not in copies:
            copies[channels_last] = copy.deepcopy(model).train(train).to(memory_format=fmt)
        probe = copies[channels_last]
        xf = x.contiguous(memory_format=fmt)

        def step(probe: torch.nn.Module = probe, xf: torch.Tensor = xf, amp_dtype: torch.dtype | None = amp_dtype) -> float:
            t = time.perf_counter()
            with torch.inference_mode(not train), torch.autocast(
                "cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                out = probe(xf).float()
                if train:
                    torch.nn.functional.cross_entropy(out, y).backward()
            if train:
                probe.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        began = time.perf_counter()
        for _ in range(max(1, warmup)):
            step()
            if time.perf_counter() - began > share / 2:
                break
        if not train:  # timed below, in rounds
            steppers.append(step)
            continue
        best = math.inf
        for _ in range(max(1, steps)):
            best = min(best, step())
            if time.perf_counter() - began > share:
                break
        seconds.append(best)
        del probe, step
        copies.clear()
    if steppers:
        seconds = [math.inf] * len(steppers)
        began = time.perf_counter()
        for _ in range(max(1, steps)):
            for i, step in enumerate(steppers):
                seconds[i] = min(seconds[i], step())
            if time.perf_counter() - began > max_seconds / 2:
                break
    return seconds


def cuda_amp_dtype() -> torch.dtype:
    """Mixed precision on this GPU: bf16 where it computes in bf16 natively (Ampere and
    newer), else fp16 (training adds a GradScaler). torch's `is_bf16_supported()` also
    says yes where bf16 is only emulated (T4, V100), and slowly."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def fastest_format(seconds: list[float], formats: tuple = CPU_FORMATS) -> tuple[torch.dtype | None, bool]:
    """The (amp dtype, channels_last) of `formats` with the fewest seconds per step."""
    return formats[min(range(len(formats)), key=lambda i: seconds[i])]


def timings_line(seconds: list[float], formats: tuple = CPU_FORMATS, unit: str = "s") -> str:
    """How logs give the time_cpu_formats timings: "fp32 0.182 s, bf16 0.223 s", or in ms."""
    shown = (lambda t: f"{t:.3f} s") if unit == "s" else (lambda t: f"{t * 1000:.1f} ms")
    return ", ".join(f"{format_name(*f)} {shown(t)}" for f, t in zip(formats, seconds))


def timed_cpu_format(spec: Any, batch_size: int, threads: int) -> tuple[str, str]:
    """(the fastest CPU format's name, the timings as a line) of a training step of the
    model `spec` (a ModelSpec) describes, on `threads` threads: a sweep times it once, in a
    task of its own, for all its trials (fer_ray.tuning.sweep_cpu_format)."""
    torch.set_num_threads(threads)
    model = create_model(spec.model, len(spec.class_names), **spec.model_kwargs)
    seconds = time_cpu_formats(model, batch_size, spec.in_chans, spec.image_size)
    return format_name(*fastest_format(seconds)), timings_line(seconds)


# What each --amp value lets a CPU scorer time (the GPU takes the dtype as it is).
SCORING_FORMATS = {"auto": CPU_FORMATS, "off": FP32_FORMATS, "bf16": CPU_FORMATS[2:]}


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp's autocast dtype: off None (fp32), bf16, fp16, and auto bf16 where the GPU has
    it, fp16 on older GPUs; on a CPU auto is None here (training and scoring then time fp32
    against bf16 on this CPU: `time_cpu_formats`)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    return cuda_amp_dtype()


def fastest_inference_format(
    model: torch.nn.Module, in_chans: int, image_size: int, amp: str = "auto"
) -> tuple[tuple[torch.dtype | None, bool], str]:
    """The (autocast dtype, channels_last) that a few timed forward passes of a copy of
    `model` find fastest on this CPU among what `amp` allows (SCORING_FORMATS: auto times fp32
    and bf16, each with and without channels_last), and a line saying what was timed.
    bf16 scored the CPU preset 1.5-2.1x as fast as fp32 where the CPU computes it natively
    (AVX512-BF16, AMX) and changed 0.4-0.6% of FER2013 val's predictions; elsewhere it is
    emulated and fp32 wins."""
    formats = SCORING_FORMATS[amp]
    probe = probe_batch(image_size)
    seconds = time_cpu_formats(model, probe, in_chans, image_size, formats, train=False)
    chosen = fastest_format(seconds, formats)
    timed = timings_line(seconds, formats, unit="ms")
    return chosen, f"forward pass of {probe} images on this CPU: {timed}; scoring in {format_name(*chosen)}"


def fold_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """An inference copy of eval-mode `model` with each BatchNorm that only follows a
    convolution (or linear layer) folded into that layer's weights and bias, and how many
    were folded: torch.fx's conv-bn fusion, the same outputs up to float rounding. The
    model as it is, and 0, when torch.fx cannot trace it or nothing folds; BatchNorm subclasses that hold
    more than the norm (timm's BatchNormAct2d) stay as they are.

    A folded layer saves the BatchNorm's pass over its activations: on a 2-core Intel Xeon
    VM with AMX, the Scorer alone (batches of 256) scored the CPU preset's resnet10t (32 px)
    1.22-1.35x as fast in fp32 (~4,500 -> 5,500-6,070 images/s) and 1.07-1.13x in bf16 +
    channels_last, resnet18 at 48 px 1.07-1.11x (bench/PERFORMANCE.md).

    Nothing is folded when a convolution, linear layer or BatchNorm module is called more
    than once (torch.fx's fusion would change the other calls' weights too)."""
    from torch.fx.experimental.optimization import fuse

    if model.training:
        raise ValueError("fold_batchnorm folds running statistics: put the model in eval mode first")

    norm = torch.nn.modules.batchnorm._BatchNorm
    try:
        traced = torch.fx.symbolic_trace(copy.deepcopy(model))
        calls = _module_calls(traced, (torch.nn.modules.conv._ConvNd, torch.nn.Linear, norm))
        if any(c > 1 for c in calls.values()):
            return model, 0
        before = sum(_module_calls(traced, norm).values())
        folded = fuse(traced, inplace=True, no_trace=True)
    except Exception:  # noqa: BLE001 - any model torch.fx cannot trace is scored as it is
        return model, 0
    count = before - sum(_module_calls(folded, norm).values())
    return (folded.eval(), count) if count else (model, 0)


def _module_calls(graph_module: torch.fx.GraphModule, types: type | tuple[type, ...]) -> Counter:
    """How many times the traced graph calls each of its modules of `types`, by name."""
    modules = dict(graph_module.named_modules())
    return Counter(n.target for n in graph_module.graph.nodes
                   if n.op == "call_module" and isinstance(modules.get(n.target), types))


def probe_batch(image_size: int) -> int:
    """Images per timed forward pass: 32 up to 96 px, fewer for larger images, at least 8.
    Small models need the 32 for a stable ranking (resnet10t at 32 px: fp32 won one of four
    probes of 8 images, none of 32); ResNet50 at 224 px ranks the same with 8 (bf16 +
    channels_last, 2.1x fp32 + channels_last at 64 images per batch), whose probe then takes
    ~5 s on 2 cores (5 passes of each format) instead of ~15."""
    return max(8, min(32, round(32 * (96 / image_size) ** 2)))


# pretrained_cfg's keys that name the published weights an architecture comes with (their
# tag, source, paper and licence): not true of a model trained from random initialisation.
WEIGHTS_PROVENANCE = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids",
                      "paper_name", "license", "notes")


def _own_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as safetensors writes it: contiguous (channels_last weights cannot be written
    as they are), and a tensor that shares its memory with an earlier one copied (CoaT's
    convolutional position encodings are one module under two names: safetensors refused
    them, and the run failed at its first checkpoint). Every name stays, as timm's loader
    loads them all."""
    seen, out = set(), {}
    for name, tensor in state.items():
        where = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone(memory_format=torch.contiguous_format) if where in seen \
            else tensor.contiguous()
        if tensor.numel():
            seen.add(where)
    return out


def save_model_dir(model: torch.nn.Module, folder: str | Path, spec: ModelSpec, pretrained: bool = True) -> None:
    """Write model.safetensors + config.json (timm's format, plus the fer_ray section).
    pretrained=False: the model began from random weights, so config.json does not name
    the published weights timm's pretrained_cfg describes for its architecture."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # save_for_hf would save weights as they are

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_own_tensors(model.state_dict()), str(folder / WEIGHTS_FILE))
    # The whole image, resized (fer_ray crops nothing): timm's default eval transform
    # otherwise resizes to 1/0.875 of the size and crops the centre, which training never did;
    # and "squash" as fer_ray resizes, both sides to the size (timm's "center" resized the
    # shorter side and cropped the middle of a non-square image).
    data = {"input_size": (spec.in_chans, spec.image_size, spec.image_size),
            "mean": tuple(spec.mean), "std": tuple(spec.std), "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": "bilinear"}
    path = folder / MODEL_CONFIG_FILE
    # model_args rebuild the same model (timm before 1.0.30 records none itself: a 1-channel
    # stem came back with 3); data_config is only in timm 1.0.30 and later.
    kwargs = {"data_config": data} if "data_config" in inspect.signature(save_config_for_hf).parameters else {}
    save_config_for_hf(model, path, model_args=dict(spec.model_kwargs),
                       model_config={"label_names": list(spec.class_names), "fer_ray": asdict(spec)}, **kwargs)
    if kwargs and pretrained:
        return
    config = json.loads(path.read_text())
    if not kwargs:  # what data_config sets: the input this model was trained on
        cfg = config["pretrained_cfg"]
        if list(cfg.get("input_size") or [])[1:] != [spec.image_size] * 2:
            cfg["pool_size"] = None  # the original weights' pooled map, at their size
        cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()})
        for key in ("test_input_size", "test_pool_size", "test_crop_pct"):  # the original weights' test
            cfg.pop(key, None)  # size: timm's use_test_size fed a 48 px model 288 px images
    if not pretrained:
        for key in WEIGHTS_PROVENANCE:
            config["pretrained_cfg"].pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def load_model_dir(folder: str) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the model from its folder alone (timm's local-dir loader), in eval mode."""
    spec = read_model_spec(folder)
    local = storage.local_path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        if local is None:
            storage.copy_dir(folder, tmp)
            local = tmp
        try:
            model = timm.create_model(f"local-dir:{local}", pretrained=True)
        except Exception:
            _check_weights_fit(local, folder)  # the clearer sentence when that is the cause
            raise
    if model.num_classes != len(spec.class_names):
        raise ConfigError(
            f"Model folder {folder!r} has {model.num_classes} outputs but names "
            f"{len(spec.class_names)} classes; it is damaged, retrain or re-export it."
        )
    return model.eval(), spec


def _check_weights_fit(local: str, folder: str) -> None:
    """ConfigError when the weights in `local` (a model folder on this machine) are not the
    tensors of the model its config.json names: a model.safetensors of one run beside the
    config.json of another, or an edited architecture. timm's own error then names a
    missing key or even an attribute (AttributeError: Conv2d has no attribute `0`)."""
    from fer_ray.model_spec import _safetensors_header

    try:
        want = {k: list(v.shape) for k, v in timm.create_model(f"local-dir:{local}", pretrained=False).state_dict().items()
                if not k.endswith("num_batches_tracked")}
        have = {k: list(v["shape"]) for k, v in _safetensors_header(os.path.join(local, WEIGHTS_FILE)).items()
                if not k.endswith("num_batches_tracked")}
    except Exception:  # noqa: BLE001 - not told apart here: the caller's error stands
        return
    differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if differ:
        arch = json.loads(Path(local, MODEL_CONFIG_FILE).read_text()).get("architecture", "?")
        raise ConfigError(
            f"The weights in {folder!r} do not fit the model its {MODEL_CONFIG_FILE} names ({arch}): "
            f"{len(differ)} of {len(want | have)} tensors differ in name or shape (e.g. {differ[0]!r}); "
            "the two files come from different runs or config.json was edited: copy the run's best/ folder again."
        )

