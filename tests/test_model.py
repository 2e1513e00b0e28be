"""timm models: names, pretrained weights from a file, freezing, model folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from fer_ray.config import ConfigError
from fer_ray.constants import FER_CLASSES
from fer_ray.model import (
    ModelSpec,
    create_model,
    fetch_pretrained_state,
    fold_batchnorm,
    load_model_dir,
    parameter_groups,
    read_model_spec,
    save_model_dir,
    set_frozen_eval,
    set_trainable,
)


def spec() -> ModelSpec:
    return ModelSpec("test_resnet", list(FER_CLASSES), 32, 32, 1, [0.5] * 3, [0.5] * 3)


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(ConfigError, match="Unknown timm model 'resnet5O'.*resnet50"):
        create_model("resnet5O", 7)


def test_a_mistyped_weights_tag_is_one_sentence_naming_the_tags() -> None:
    """timm.is_model takes any tag: "resnet18.a1_in1kk" ended in create_model's RuntimeError."""
    with pytest.raises(ConfigError, match="timm's resnet18 has no weights tagged 'a1_in1kk'; its tags include: a1_in1k"):
        create_model("resnet18.a1_in1kk", 7)
    assert create_model("test_resnet.r160_in1k", 7) is not None  # a tag timm has
    assert create_model("mnasnet_050.untrained", 7) is not None  # one without weights


def test_a_model_without_coarse_groups_freezes_all_but_its_classifier() -> None:
    """RDNet's group_matcher(coarse=True) asserts it has none: every rdnet run failed in its
    workers when the first phase was built."""
    model = create_model("rdnet_tiny", 7)
    groups = parameter_groups(model)
    assert len(groups) == 2 and set(groups[1]) == {n for n, _ in model.get_classifier().named_parameters(prefix="head.fc")}
    assert set_trainable(model, None) == set()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(groups[1])


def test_staged_unfreezing_follows_timm_stages() -> None:
    model = create_model("test_resnet", 7)
    groups = parameter_groups(model)
    assert groups[-1] == ["fc.weight", "fc.bias"]
    assert set_trainable(model, None) == set()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    last = set_trainable(model, "1")
    assert last == set(groups[-2]) and all(n.startswith("layer4") for n in last)
    assert len(set_trainable(model, "all")) == sum(len(g) for g in groups[:-1])


def test_a_model_without_timms_group_matcher_trains_its_classifier_first() -> None:
    """PiT, PoolFormer and a few more timm models have no group matcher: their head phase
    trains the classifier, and unfreezing opens the rest."""
    model = create_model("pit_ti_224", 7)
    assert not hasattr(model, "group_matcher")
    groups = parameter_groups(model)
    assert groups[-1] == ["head.weight", "head.bias"] and len(groups) == 2
    assert set_trainable(model, None) == set()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert set_trainable(model, "1") == set(groups[0]) == set_trainable(model, "all")


def test_frozen_modules_stay_in_eval_mode() -> None:
    model = create_model("test_resnet", 7)
    set_trainable(model, None)
    model.train()
    set_frozen_eval(model)
    assert not model.bn1.training and model.fc.training


def test_a_frozen_vits_own_tokens_leave_its_trainable_parts_in_train_mode() -> None:
    """A ViT holds its class token and position embedding itself: eval() on it, frozen,
    put the whole model in eval mode, the head and the trainable blocks' dropout included."""
    model = create_model("test_vit", 7, drop_rate=0.1)
    set_trainable(model, "1")
    model.train()
    set_frozen_eval(model)
    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert trainable and all(m.training for m in trainable)
    assert model.head.training and model.head_drop.training
    frozen_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
                    and not any(p.requires_grad for p in m.parameters())]
    assert frozen_norms and not any(m.training for m in frozen_norms)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_loads_backbone_and_fresh_head(tmp_path, suffix) -> None:
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), str(path))
    state = fetch_pretrained_state("test_resnet", 7, str(path))
    torch.testing.assert_close(state["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert state["fc.weight"].shape == (7, source.num_features)


def test_the_pretrained_models_fresh_head_is_drawn_from_the_seed(tmp_path) -> None:
    """The head was drawn from the driver's unseeded generator: one --seed, another head
    every run (the workers load this state over the model they seeded)."""
    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    before = torch.random.get_rng_state()
    heads = [fetch_pretrained_state("test_resnet", 7, str(path), seed=seed)["fc.weight"] for seed in (3, 3, 4)]
    torch.testing.assert_close(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])
    assert torch.equal(torch.random.get_rng_state(), before)  # the driver's own draws are left as they were


@pytest.mark.parametrize("name, options", [
    ("weights.pth", ""),
    # timm reads a .safetensors file by its name: the suffix was taken from after the '?' of
    # an S3-compatible endpoint's options, and torch.load refused the file.
    ("weights.safetensors", "?endpoint_override=127.0.0.1:9000&scheme=http"),
])
def test_pretrained_file_in_a_bucket_is_read_through_a_temporary_copy_then_removed(tmp_path, monkeypatch, name,
                                                                                   options) -> None:
    import tempfile

    import pyarrow.fs as pafs
    from safetensors.torch import save_file

    from fer_ray import model as fer_model
    from fer_ray import storage

    source = timm.create_model("test_resnet", num_classes=1000)
    if name.endswith(".pth"):
        torch.save(source.state_dict(), tmp_path / name)
    else:
        save_file(source.state_dict(), str(tmp_path / name))
    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a local filesystem
    monkeypatch.setattr(storage, "resolve",
                        lambda path: (bucket, path.split("://", 1)[1].split("?")[0].split("/", 1)[1]))
    made, real_mkstemp = [], tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        made.append(real_mkstemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fer_model.tempfile, "mkstemp", mkstemp)
    state = fetch_pretrained_state("test_resnet", 7, f"s3://bucket/{name}{options}")

    torch.testing.assert_close(state["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert len(made) == 1 and not Path(made[0][1]).exists()


def test_a_pretrained_file_in_a_layout_timm_translates_is_accepted(tmp_path) -> None:
    """ConvNeXt weights as Facebook's repository saves them (other tensor names, which timm's
    ConvNeXt renames on loading) were refused as not this architecture's: the check compared
    the file's names with the model's."""
    import re

    source = timm.create_model("convnext_atto", num_classes=1000)

    def facebook(key: str) -> str:
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        return "norm." + key[len("head.norm."):] if key.startswith("head.norm.") else key.replace("head.fc.", "head.")

    renamed = {facebook(k): v for k, v in source.state_dict().items()}
    assert "downsample_layers.0.0.weight" in renamed and "stages.1.0.dwconv.weight" in renamed
    torch.save({"model": renamed}, tmp_path / "convnext_atto_1k.pth")
    state = fetch_pretrained_state("convnext_atto", 7, str(tmp_path / "convnext_atto_1k.pth"))
    torch.testing.assert_close(state["stem.0.weight"], source.state_dict()["stem.0.weight"])
    torch.testing.assert_close(state["stages.3.blocks.1.mlp.fc2.weight"],
                               source.state_dict()["stages.3.blocks.1.mlp.fc2.weight"])


def test_missing_pretrained_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--pretrained-file .* does not exist"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "nope.pth"))
    (tmp_path / "best").mkdir()  # a run's model folder: it was said not to exist
    with pytest.raises(ConfigError, match="--pretrained-file .*best' is a folder; give the weights file in it "
                                          "\\(a model folder's model.safetensors\\)"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "best"))


def test_hub_weights_that_do_not_fit_the_model_kwargs_are_named(monkeypatch, caplog) -> None:
    """Hub weights loaded into a model --model-kwargs had changed: a layer they lack stayed
    at its initial values without a word (timm loads them leniently into a new head), and a
    changed shape was told as a failed download ("with no network, pass --pretrained-file").
    The Hub is stood in for by a load as timm's: the published model's weights, its
    classifier dropped, non-strict."""
    import logging

    import fer_ray.model

    real = timm.create_model

    def as_from_the_hub(name, pretrained=False, pretrained_cfg_overlay=None, **kw):
        model = real(name, **kw)
        if pretrained:
            published = real(name).state_dict()
            model.load_state_dict({k: v for k, v in published.items() if not k.startswith("fc.")}, strict=False)
        return model

    monkeypatch.setattr(fer_ray.model, "hub_unreachable", lambda: None)
    monkeypatch.setattr(timm, "create_model", as_from_the_hub)
    with caplog.at_level(logging.WARNING, logger="fer_ray.model"):
        assert fetch_pretrained_state("test_resnet", 7, drop_rate=0.1)  # the layers as published: no word
        assert not caplog.records
        assert fetch_pretrained_state("test_resnet", 7, layers=(2, 1, 1, 1))  # a block more: named
    assert ("The pretrained weights of test_resnet do not hold 10 tensors --model-kwargs {'layers': (2, 1, 1, 1)} "
            "add (e.g. layer1.1.conv1.weight, layer1.1.bn1.weight): those start from their initial values.") \
        in caplog.text
    with pytest.raises(ConfigError, match=r"The pretrained weights of test_resnet do not fit --model-kwargs "
                                          r"\{'channels': \(32, 48, 48, 128\)\} \(Error\(s\) in loading state_dict "
                                          r"for ResNet: size mismatch for layer4"):
        fetch_pretrained_state("test_resnet", 7, channels=(32, 48, 48, 128))


def test_a_gray_runs_weights_into_a_three_channel_stem_say_which_kwargs_fit(tmp_path) -> None:
    """A 1-channel file (a run on gray images) into a 3-channel model ended in timm's
    "Correct the source pretrained_cfg", with no word of --model-kwargs."""
    torch.save(create_model("test_resnet", 7, in_chans=1).state_dict(), tmp_path / "gray.pth")
    with pytest.raises(ConfigError, match=r"into test_resnet: RuntimeError: .*inconsistent with input_size\[0\]=3\. "
                                          r"Correct .* channels; its first layer takes 1 channel\(s\): add "
                                          r"--model-kwargs '\{in_chans: 1\}'$"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "gray.pth"))
    assert fetch_pretrained_state("test_resnet", 7, str(tmp_path / "gray.pth"), in_chans=1)


def test_a_pretrained_file_of_other_weights_is_named(tmp_path) -> None:
    """timm loads a file into a model with a new head leniently: resnet18's weights into
    resnet34 left its extra blocks random, a dict of no matching tensor left the whole
    backbone random, and the run trained (head-only first) as if pretrained; a file that
    is not weights at all ended in "KeyError: 101" or a bare "EOFError"."""
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"does not hold resnet34's weights: \d+ of its \d+ tensors besides "
                                          r"the classifier are missing \(e\.g\. layer1\.2\."):
        fetch_pretrained_state("resnet34", 7, str(tmp_path / "r18.pth"))
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foo.pth")
    with pytest.raises(ConfigError, match="does not hold test_resnet's weights"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "foo.pth"))
    # A file without the BatchNorm statistics (parameters only): the head would train on
    # features normalised by the defaults, 0 and 1.
    params = {k: v for k, v in timm.create_model("test_resnet").state_dict().items() if "running_" not in k}
    torch.save(params, tmp_path / "params.pth")
    with pytest.raises(ConfigError, match=r"does not hold test_resnet's weights: .*running_mean"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "params.pth"))
    (tmp_path / "notes.pth").write_text("not weights")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("notes.pth", "empty.pth"):
        with pytest.raises(ConfigError, match="is not a weights file torch or safetensors can read"):
            fetch_pretrained_state("test_resnet", 7, str(tmp_path / name))
    # A 1-channel stem from RGB weights is still their architecture: accepted.
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "t.pth")
    assert fetch_pretrained_state("test_resnet", 7, str(tmp_path / "t.pth"), in_chans=1)["conv1.0.weight"].shape[1] == 1


def test_weights_of_a_deeper_sibling_are_refused_and_a_mismatch_is_said_in_one_line(tmp_path, caplog) -> None:
    """resnet34's weights set every tensor of resnet18 (the same widths, more blocks) and
    were accepted without a word: the run trained from a cut-down copy of another network
    as if pretrained. resnet50's into resnet18 ended in torch's list of every mismatched
    tensor, 23 lines."""
    deeper = {k: v.contiguous() for k, v in timm.create_model("resnet34").state_dict().items()}
    save_file(deeper, str(tmp_path / "r34.safetensors"))
    with pytest.raises(ConfigError, match=r"does not hold resnet18's weights: it holds 96 tensors of layers "
                                          r"resnet18 does not have \(e\.g\. layer1\.2\."):
        fetch_pretrained_state("resnet18", 7, str(tmp_path / "r34.safetensors"))
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ConfigError) as e:
        fetch_pretrained_state("resnet18", 7, str(tmp_path / "r50.pth"))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)
    assert (r"23 of its tensors have another shape there (e.g. layer1.0.conv1.weight: [64, 64, 1, 1] in the file, "
            "[64, 64, 3, 3] in resnet18, and 22 more)") in str(e.value)
    # Tensors of modules the model has none of (a self-supervised decoder): said, not refused.
    extra = {**timm.create_model("test_resnet").state_dict(), "decoder.proj.weight": torch.zeros(2, 2)}
    torch.save(extra, tmp_path / "mae.pth")
    with caplog.at_level("WARNING", logger="fer_ray.model"):
        assert fetch_pretrained_state("test_resnet", 7, str(tmp_path / "mae.pth"))
    assert "holds 1 tensors of modules test_resnet does not have (e.g. decoder.proj.weight): left out" in caplog.text


@pytest.mark.parametrize("name", ["blob_3f2a9c", "weights.bin"])
def test_a_safetensors_file_of_another_name_is_read_as_one(tmp_path, name) -> None:
    """timm reads a file as safetensors by its name alone: a Hugging Face cache blob or a
    renamed file went to torch.load, refused with advice to unpickle it."""
    import os
    import tempfile

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / name))
    before = set(os.listdir(tempfile.gettempdir()))
    state = fetch_pretrained_state("test_resnet", 7, str(tmp_path / name))
    torch.testing.assert_close(state["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("fer_ray_weights_")}


def test_no_network_names_the_offline_flag(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(ConfigError, match="--pretrained-file PATH .* or --no-pretrained"):
        fetch_pretrained_state("test_resnet", 7)


def test_an_unreachable_hub_fails_at_once_or_loads_the_cached_weights(tmp_path, monkeypatch) -> None:
    """huggingface_hub retried ~50 s without network before its sentence (or the cache)."""
    import time

    import huggingface_hub.constants as hub

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: no Hub here
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"\(127\.0\.0\.1: Connection refused; not in the Hub's local cache"):
        fetch_pretrained_state("test_resnet", 7)
    assert time.monotonic() - start < 15
    assert hub.HF_HUB_OFFLINE is False  # offline only while loading

    # The weights in huggingface_hub's cache, as an earlier download with network left them.
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    reference = timm.create_model("test_resnet")
    save_file(reference.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    start = time.monotonic()
    state = fetch_pretrained_state("test_resnet", 7)
    assert time.monotonic() - start < 15
    assert torch.equal(state["conv1.0.weight"], reference.state_dict()["conv1.0.weight"])
    assert state["fc.weight"].shape[0] == 7


def test_the_hub_is_probed_only_without_a_proxy_and_for_hub_hosted_weights(monkeypatch) -> None:
    import huggingface_hub.constants as hub
    import timm.models

    from fer_ray.model import hub_unreachable, weights_on_hub

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    assert "Connection refused" in hub_unreachable()
    # Behind a proxy a direct connection says nothing about the Hub: not probed...
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert hub_unreachable() is None
    # ...unless the Hub's host bypasses the proxy.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert "Connection refused" in hub_unreachable()

    assert weights_on_hub("test_resnet") and weights_on_hub("hf-hub:timm/resnet18.a1_in1k")
    # A model whose weights sit at a URL of their own: the Hub is not what fails it.
    monkeypatch.setattr(timm.models, "get_pretrained_cfg",
                        lambda name: SimpleNamespace(hf_hub_id=None, url="https://example.org/w.pth"))
    assert not weights_on_hub("some_net")


def test_model_folder_round_trip_and_timm_can_load_it(tmp_path) -> None:
    model = create_model("test_resnet", 7).eval()
    save_model_dir(model, tmp_path, spec())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["label_names"] == list(FER_CLASSES)
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded, loaded_spec = load_model_dir(str(tmp_path))
    assert loaded_spec == spec()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    torch.testing.assert_close(plain(x), model(x))
    # timm's own eval transform for the folder resizes the whole image, as fer_ray does; it
    # cropped the centre 87.5% (Resize(36), CenterCrop(32)), which training never saw.
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(plain), is_training=False)
    names = [type(t).__name__ for t in transform.transforms]
    assert "CenterCrop" not in names or transform.transforms[names.index("CenterCrop")].size == (32, 32)
    resize = transform.transforms[names.index("Resize")]
    # Both sides to 32, as fer_ray resizes: timm's "center" crop mode resized the shorter
    # side of a non-square image and cropped its middle.
    assert list(resize.size) == [32, 32], resize
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1)), "L").convert("RGB")
    assert transform(wide)[0, 16, 0] < -0.9  # the left edge (black) is in view, not cropped away


def test_a_model_with_tensors_under_two_names_is_saved_and_loads(tmp_path) -> None:
    """CoaT's position encodings are one module under two names: safetensors refused the
    shared tensors, and every coat run failed at its first checkpoint."""
    model = create_model("coat_tiny", 7, img_size=32).eval()
    kwargs = {"img_size": 32}
    save_model_dir(model, tmp_path, ModelSpec("coat_tiny", list(FER_CLASSES), 32, 32, 3, [0.5] * 3, [0.5] * 3, kwargs))
    loaded, _ = load_model_dir(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_model_trained_from_random_weights_does_not_name_published_ones(tmp_path) -> None:
    model = create_model("resnet18", 7).eval()
    save_model_dir(model, tmp_path / "pretrained", spec())
    save_model_dir(model, tmp_path / "scratch", spec(), pretrained=False)
    kept = json.loads((tmp_path / "pretrained" / "config.json").read_text())["pretrained_cfg"]
    cleared = json.loads((tmp_path / "scratch" / "config.json").read_text())["pretrained_cfg"]
    assert kept["tag"] and kept["origin_url"]  # timm's resnet18 default weights: a1_in1k
    assert not set(cleared) & {"tag", "hf_hub_id", "url", "origin_url", "paper_ids", "license"}
    assert cleared["input_size"] == [3, 32, 32] and cleared["classifier"] == "fc"
    loaded, _ = load_model_dir(str(tmp_path / "scratch"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_not_a_model_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_model_spec(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a fer_ray model folder"):
        read_model_spec(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a fer_ray model config"):
        read_model_spec(str(tmp_path))
    # A run's (or a sweep's) folder given for its model: the job names the best/ inside.
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (run / "best" / name).write_text("{}")
    with pytest.raises(ConfigError, match=r"not a fer_ray model folder .*; its model is in '.*run/best': pass that\."):
        read_model_spec(str(run))


def test_model_kwargs_survive_the_model_folder(tmp_path) -> None:
    kwargs = {"in_chans": 1, "output_stride": 16}
    model = create_model("resnet18", 7, **kwargs).eval()
    save_model_dir(model, tmp_path, ModelSpec("resnet18", list(FER_CLASSES), 48, 48, 1, [0.45], [0.23], kwargs))
    loaded, loaded_spec = load_model_dir(str(tmp_path))
    assert loaded_spec.in_chans == 1 and loaded_spec.model_kwargs == kwargs
    x = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(loaded(x), model(x))


def test_bad_model_kwargs_are_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--model-kwargs .* do not fit resnet18"):
        create_model("resnet18", 7, not_an_argument=1)
    # timm refuses some values by assertion: a traceback from the first model build, after
    # Ray had started.
    with pytest.raises(ConfigError, match=r"--model-kwargs \{'global_pool': 'bogus'\} do not fit test_resnet: "
                                          r"Invalid pool type: bogus\.$"):
        create_model("test_resnet", 7, global_pool="bogus")
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "t.pth")
    with pytest.raises(ConfigError, match="do not fit test_resnet: Invalid pool type"):
        fetch_pretrained_state("test_resnet", 7, str(tmp_path / "t.pth"), global_pool="bogus")


def test_a_pretrained_file_without_layers_timm_leaves_fresh_is_accepted(tmp_path, caplog) -> None:
    """Weights that leave out what the Hub's load leaves fresh too were refused as another
    architecture's: self-supervised ConvNeXt V2 weights (fcmae) hold no head.norm, and a
    ViT's own weights no fc_norm, which global_pool avg adds."""
    import logging

    source = timm.create_model("convnextv2_atto", num_classes=1000)
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, tmp_path / "fcmae.pth")
    vit = {"img_size": 32, "patch_size": 8}
    torch.save(timm.create_model("test_vit", **vit).state_dict(), tmp_path / "vit.pth")
    with caplog.at_level(logging.WARNING, logger="fer_ray.model"):
        state = fetch_pretrained_state("convnextv2_atto.fcmae", 7, str(tmp_path / "fcmae.pth"))
        torch.testing.assert_close(state["stem.0.weight"], source.state_dict()["stem.0.weight"])
        assert fetch_pretrained_state("test_vit", 7, str(tmp_path / "vit.pth"), global_pool="avg", **vit)
    assert "holds no head.norm.weight, head.norm.bias of convnextv2_atto.fcmae's head" in caplog.text
    assert "do not hold 2 tensors --model-kwargs" in caplog.text and "fc_norm.weight" in caplog.text
    # A head of its own is no pass for the backbone: a file missing a block is still refused.
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "stages.3"))},
               tmp_path / "short.pth")
    with pytest.raises(ConfigError, match="does not hold convnextv2_atto's weights"):
        fetch_pretrained_state("convnextv2_atto", 7, str(tmp_path / "short.pth"))


def test_channels_last_model_saves(tmp_path) -> None:
    model = create_model("test_resnet", 7).to(memory_format=torch.channels_last).eval()
    save_model_dir(model, tmp_path, spec())
    loaded, _ = load_model_dir(str(tmp_path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def _with_running_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm given running statistics and an affine part far from the identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t"])
def test_folded_batchnorm_scores_as_the_model_does(name) -> None:
    model = _with_running_stats(create_model(name, 7, in_chans=1))
    folded, count = fold_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert count == len(norms) > 0  # in these resnets every BatchNorm follows a convolution
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
        cl = folded.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is left as it was


def test_batchnorm_is_left_where_it_cannot_fold() -> None:
    class Branching(torch.nn.Module):  # the convolution's output is used twice
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Untraceable(Branching):  # control flow on a tensor's value
        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    class Shared(Branching):  # one convolution called twice, once before the BatchNorm
        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    for cls in (Branching, Untraceable, Shared):
        model = _with_running_stats(cls())
        assert fold_batchnorm(model) == (model, 0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(create_model("test_resnet", 7))


def test_a_model_saved_with_timm_before_1_0_30_keeps_no_test_size_of_the_original_weights(tmp_path, monkeypatch) -> None:
    """timm before 1.0.30 has no data_config to save: the fallback set the input size but
    left the ImageNet weights' test size (288 px for resnet18.a1_in1k), which timm's
    use_test_size then fed a 48 px face model."""
    import inspect

    import timm.models._hub as hub
    from timm.data import resolve_data_config

    from fer_ray.model import ModelSpec, create_model, load_model_dir, save_model_dir

    real = hub.save_config_for_hf

    def old_timm(model, config_path, model_config=None, model_args=None):
        return real(model, config_path, model_config=model_config, model_args=model_args)

    monkeypatch.setattr(hub, "save_config_for_hf", old_timm)
    assert "data_config" not in inspect.signature(hub.save_config_for_hf).parameters
    model = create_model("resnet18.a1_in1k", 7, in_chans=1)
    assert model.pretrained_cfg["test_input_size"][1:] == (288, 288)
    spec = ModelSpec(model="resnet18.a1_in1k", class_names=[str(i) for i in range(7)], image_size=48,
                     data_size=48, channels=1, mean=[0.5], std=[0.25], model_kwargs={"in_chans": 1})
    save_model_dir(model, tmp_path / "best", spec)
    config = json.loads((tmp_path / "best" / "config.json").read_text())["pretrained_cfg"]
    assert "test_input_size" not in config and config["pool_size"] is None and config["crop_pct"] == 1.0
    loaded, _ = load_model_dir(str(tmp_path / "best"))
    assert resolve_data_config({}, model=loaded, use_test_size=True)["input_size"] == (1, 48, 48)


def test_stochastic_depth_in_a_frozen_stage_stops_and_in_a_trainable_one_goes_on() -> None:
    """DropPath and DropBlock have no parameters or buffers: in a frozen stage they stayed in
    train mode, dropping the frozen features the head trained on."""
    model = create_model("resnet10t", 7, drop_path_rate=0.2, drop_block_rate=0.1)
    set_trainable(model, "1")  # (the last stage trains)
    model.train()
    set_frozen_eval(model)
    drops = {n: m for n, m in model.named_modules() if "drop_path" in n or "drop_block" in n}
    frozen = [m for n, m in drops.items() if not n.startswith("layer4.")]
    trained = [m for n, m in drops.items() if n.startswith("layer4.")]
    assert frozen and trained and not any(m.training for m in frozen) and all(m.training for m in trained)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))),
                               model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))


def test_a_frozen_stages_batchnorm_without_affine_parameters_keeps_its_statistics() -> None:
    """A BatchNorm with no parameters of its own was left in train mode in a frozen stage,
    its running statistics drifting from the pretrained ones; one in a trainable stage trains."""
    model = create_model("test_resnet", 7)
    model.layer1[0].bn1 = torch.nn.BatchNorm2d(model.layer1[0].bn1.num_features, affine=False)
    model.layer4[0].bn1 = torch.nn.BatchNorm2d(model.layer4[0].bn1.num_features, affine=False)
    # (one wrapped alone in a container without parameters follows the block around that)
    model.layer1[0].bn2 = torch.nn.Sequential(torch.nn.BatchNorm2d(model.layer1[0].bn2.num_features, affine=False))
    set_trainable(model, "1")
    model.train()
    set_frozen_eval(model)
    assert not model.layer1[0].bn1.training and model.layer4[0].bn1.training
    assert not model.layer1[0].bn2[0].training
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, before)
