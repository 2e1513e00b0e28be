"""Config resolution: defaults <- file <- flags, validation, derived defaults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fer_ray.config import ConfigError, TrainConfig, parse_config, to_dict


def parse(argv: list[str]) -> TrainConfig:
    cfg, _ = parse_config(TrainConfig, argv, argparse.ArgumentParser())
    return cfg


def test_defaults_follow_the_seed_project() -> None:
    cfg = parse([])
    assert cfg.model.model == "resnet50" and cfg.model.pretrained
    assert cfg.data.batch_size == 32 and cfg.data.image_size == 224
    assert cfg.optim.label_smoothing == 0.1 and cfg.optim.class_weights
    assert cfg.run.amp == "auto" and cfg.run.max_failures == 2


def test_flags_override_file_which_overrides_defaults(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 7\noptim:\n  label_smoothing: 0.2\n")
    cfg = parse(["--config", str(path), "--epochs", "3", "--no-class-weights"])
    assert cfg.optim.lr == 0.01  # from the file
    assert cfg.optim.label_smoothing == 0.2  # from the file's section
    assert cfg.optim.epochs == 3  # the flag wins
    assert cfg.optim.class_weights is False
    assert cfg.data.batch_size == 32  # default kept


def test_run_config_json_feeds_back(tmp_path) -> None:
    cfg = parse(["--model", "resnet18", "--lr", "0.004", "--data", "d", "--output", "o"])
    saved = {**to_dict(cfg), "resolved": {"effective_lr": 0.004}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    again = parse(["--config", str(path)])
    assert to_dict(again) == to_dict(cfg)


def test_a_sweeps_best_config_feeds_back(tmp_path) -> None:
    cfg = parse(["--model", "resnet18", "--lr", "0.004", "--data", "d", "--output", "o"])
    saved = {**to_dict(cfg), "resolved": {"effective_lr": 0.004},
             "trial": {"trial_id": "a1b2c3", "best_val_acc": 0.61, "status": "TERMINATED"}}
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps(saved))
    assert to_dict(parse(["--config", str(path)])) == to_dict(cfg)


def test_malformed_yaml_is_one_sentence_naming_the_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: [3\n")
    with pytest.raises(ConfigError) as e:
        parse(["--config", str(path)])
    assert "is not valid YAML at line 3" in str(e.value) and "\n" not in str(e.value)


def test_unknown_setting_is_rejected_with_valid_names(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="Unknown setting 'learning_rate'.*label_smoothing"):
        parse(["--config", str(path)])


def test_a_setting_in_the_wrong_section_is_told_its_section(tmp_path) -> None:
    """It was called unknown, and the list of valid settings that followed named it."""
    path = tmp_path / "c.yaml"
    path.write_text("optim: {image_size: 48}\n")
    with pytest.raises(ConfigError, match="'image_size' .* is under 'optim' but belongs in section 'data'; "
                                          "or give it flat, at the top level: image_size: 48"):
        parse(["--config", str(path)])
    path.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="Unknown setting 'optim.learning_rate'"):
        parse(["--config", str(path)])
    path.write_text("data: {image_size: 40}\n")
    assert parse(["--config", str(path)]).data.image_size == 40


def test_yaml_booleans_and_one_number_for_a_range(tmp_path) -> None:
    """YAML reads `off` as false: `amp: off` and `input_blur: off` were refused ("got
    'False'"); one number for a range crashed with a TypeError."""
    from fer_ray.config import SweepConfig, parse_config

    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput: o\namp: off\ninput_blur: off\n")
    cfg = parse(["--config", str(path)]).validate()
    assert cfg.run.amp == "off" and cfg.data.input_blur == "off"
    path.write_text("data: d\noutput: o\nlr_range: 0.001\n")
    with pytest.raises(ConfigError, match="'lr_range' \\(--lr-range\\) expects 2 values, got 0.001"):
        parse_config(SweepConfig, ["--config", str(path)], argparse.ArgumentParser())


def test_model_kwargs_numbers_with_an_exponent_are_numbers(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads 1e-1 as the text '1e-1': timm then failed on "'str' / 'int'",
    the message blaming --model-kwargs, where Python and YAML 1.2 read a number."""
    cfg = parse(["--data", "d", "--output", "o", "--model-kwargs", "{drop_path_rate: 1e-1, in_chans: 1}"])
    assert cfg.model.model_kwargs == {"drop_path_rate": 0.1, "in_chans": 1}
    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput: o\nlr: 1e-3\nmodel_kwargs: {drop_path_rate: 5E-2, act_layer: relu, x: [2e1, '1e1']}\n")
    cfg = parse(["--config", str(path)])
    assert cfg.model.model_kwargs == {"drop_path_rate": 0.05, "act_layer": "relu", "x": [20.0, "1e1"]}  # quoted: text
    assert cfg.optim.lr == 0.001


def test_a_blank_yaml_value_is_named_not_read_as_the_text_none(tmp_path) -> None:
    """`output:` left blank was the text "None": the run wrote to ./None."""
    path = tmp_path / "c.yaml"
    path.write_text("data: d\noutput:\n")
    with pytest.raises(ConfigError, match="Setting 'output' \\(--output\\) is blank; give it a value or leave the key out"):
        parse(["--config", str(path)])
    path.write_text("data: d\noutput: o\npretrained_file:\n")  # a setting that may be none stays none
    assert parse(["--config", str(path)]).model.pretrained_file is None
    # A blank yes/no key was False unsaid (`use_gpu:` trained on the CPU); 0.5 or [] one too.
    for text in ("use_gpu:", "pretrained: 0.5", "class_weights: []"):
        path.write_text(f"data: d\noutput: o\n{text}\n")
        with pytest.raises(ConfigError, match=rf"Setting '{text.split(':')[0]}' \(--[a-z-]+\) (is blank|expects bool)"):
            parse(["--config", str(path)])
    path.write_text("data: d\noutput: o\nuse_gpu: no\npretrained: 1\nclass_weights: off\n")
    cfg = parse(["--config", str(path)])
    assert (cfg.run.use_gpu, cfg.model.pretrained, cfg.optim.class_weights) == (False, True, False)


def test_a_folder_given_as_config_is_named(tmp_path) -> None:
    """`--config runs/r50` (a run folder) was said not to exist."""
    with pytest.raises(ConfigError, match=r"is a folder; give a YAML file, or a run's .*config.json"):
        parse(["--config", str(tmp_path)])
    (tmp_path / "sweep_config.json").write_text("{}")
    # jobs/train.py: the best trial's settings (a sweep_config.json is refused there);
    # jobs/tune.py: the sweep's own, to resume it.
    with pytest.raises(ConfigError, match=r"is a folder; give a YAML file, or a sweep's .*best_config.json to "
                                          r"train its best trial's settings\.$"):
        parse(["--config", str(tmp_path)])
    from fer_ray.config import SweepConfig

    with pytest.raises(ConfigError, match=r"is a folder; give a YAML file, or a sweep's .*sweep_config.json to "
                                          r"resume it\.$"):
        parse_config(SweepConfig, ["--config", str(tmp_path)], argparse.ArgumentParser())


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'epochs' \\(--epochs\\) expects int"):
        parse(["--epochs", "three"])


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "--data is required"),
        (["--data", "d"], "--output is required"),
        (["--data", "d", "--output", "o", "--label-smoothing", "1.5"], r"--label-smoothing must be in \[0, 1\), got 1.5"),
        (["--data", "d", "--output", "o", "--amp", "fp8"], "--amp must be one of"),
        (["--data", "d", "--output", "o", "--unfreeze", "some"], "--unfreeze must be 'all' or a number of stages >= 1, got 'some'"),
        (["--data", "d", "--output", "o", "--no-pretrained", "--pretrained-file", "w.pth"],
         "--pretrained-file was given with --no-pretrained"),
        (["--data", "d", "--output", "o", "--epochs", "2", "--freeze-epochs", "3"], r"--freeze-epochs must be between 0 and --epochs \(2\), got 3"),
        (["--data", "d", "--output", "o", "--mixup", "-0.2"], "--mixup must be >= 0"),
        (["--data", "d", "--output", "o", "--cpu-format", "bf16+nhwc"],
         "--cpu-format must be one of fp32, fp32\\+channels_last, bf16, bf16\\+channels_last; got 'bf16\\+nhwc'"),
        (["--data", "d", "--output", "o", "--cutmix", "1", "--mix-prob", "0"], "--mix-prob must be in"),
        (["--data", "d", "--output", "o", "--cutmix", "1", "--batch-size", "33"],
         "--batch-size must be even"),
        (["--data", "d", "--output", "o", "--sampler", "uniform"], "--sampler must be one of"),
        (["--data", "d", "--output", "o", "--optimizer", "adam"], "--optimizer must be one of"),
        (["--data", "d", "--output", "o", "--sampler", "sqrt"], "add --no-class-weights"),
        (["--data", "d", "--output", "o", "--random-erasing", "1.5"], "--random-erasing must be between"),
        (["--data", "d", "--output", "o", "--augment", "none", "--random-erasing", "0.3"],
         "give an --augment level other than none"),
        (["--data", "d", "--output", "o", "--blur-jitter", "-0.1"], "--blur-jitter must be between 0 and 1"),
        (["--data", "d", "--output", "o", "--augment", "none", "--blur-jitter", "0.5"],
         "--blur-jitter is part of training augmentation"),
        # Accepted until now, then a crash in every worker or a run that trains nothing useful:
        (["--data", "d", "--output", "o", "--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
        # torch.manual_seed overflowed in every worker, or inside the pretrained download's
        # error ("Could not download pretrained weights"); numpy and Optuna take 32 bits.
        (["--data", "d", "--output", "o", "--seed", str(2**32)], "--seed must be from 0 to 4294967295"),
        # An unset shell variable (`--pretrained-file "$WEIGHTS"`) meant "none": the hub's weights.
        (["--data", "d", "--output", "o", "--pretrained-file", ""],
         r"'pretrained_file' \(--pretrained-file\) is empty \(an unset shell variable\?\)"),
        (["--data", "d", "--output", "o", "--freeze-epochs", " "], r"'freeze_epochs' \(--freeze-epochs\) is empty"),
        (["--data", "d", "--output", "o", "--lr", "1e-4", "--min-lr", "1e-3"],
         r"--min-lr \(0.001\), where the cosine ends, must be below --lr \(0.0001\)"),
        # The backbone fine-tunes at --lr x --backbone-lr-scale: below --min-lr its cosine climbed.
        (["--data", "d", "--output", "o", "--lr", "5e-6"],
         r"below the backbone's fine-tuning LR, --lr x --backbone-lr-scale \(5e-06 x 0.1 = 5e-07\); lower --min-lr"),
        # From scratch too, where a --backbone-lr-scale given scales the whole run's backbone.
        (["--data", "d", "--output", "o", "--no-pretrained", "--lr", "1e-3", "--backbone-lr-scale", "0.0005"],
         r"below the backbone's LR, --lr x --backbone-lr-scale \(0.001 x 0.0005 = 5e-07\)"),
        (["--data", "d", "--output", "o", "--time-budget", "inf"], "'time_budget' \\(--time-budget\\) expects a finite number"),
        (["--data", "d", "--output", "o", "--lr", "nan"], "'lr' \\(--lr\\) expects a finite number"),
        (["--data", "d", "--output", "o", "--model-kwargs", "{num_classes: 3, drop_rate: 0.2}"],
         "--model-kwargs cannot set drop_rate, num_classes: fer_ray sets drop_rate by --drop-rate"),
        # YAML reads '{in_chans:1}' as the key "in_chans:1" without a value, which timm dropped:
        # the run trained with a 3-channel stem without a word.
        (["--data", "d", "--output", "o", "--model-kwargs", "{in_chans:1}"],
         r"gives no value for 'in_chans:1' \(YAML needs a space after the colon"),
        (["--data", "d", "--output", "o", "--model-kwargs", "{drop_path_rate: }"],
         "gives no value for 'drop_path_rate'."),
        (["--data", "d", "--output", "o", "--no-pretrained", "--unfreeze", "1"],
         "--unfreeze 1 keeps the other stages of a backbone that is not pretrained"),
        (["--data", "d", "--output", "o", "--no-pretrained", "--freeze-epochs", "2"],
         "--freeze-epochs 2 trains only the head of a backbone that is not pretrained"),
        # A traceback (bad YAML; arrays of terabytes once Ray had started) or a crash in every
        # worker (images have 1 or 3 channels):
        (["--data", "d", "--output", "o", "--model-kwargs", "{in_chans: 1"],
         r"\(--model-kwargs\) is not valid YAML .*: '\{in_chans: 1'; write it as"),
        (["--data", "d", "--output", "o", "--data-size", "100000"], "--data-size must be between 8 and 1024 px"),
        (["--data", "d", "--output", "o", "--image-size", "5000"], "--image-size must be between 16 and 1024 px"),
        (["--data", "d", "--output", "o", "--model-kwargs", "{in_chans: 5}"],
         "--model-kwargs in_chans must be 1 .* or 3 .*, got 5"),
    ],
)
def test_validation_messages(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(flags).validate()


def test_defaults_that_depend_on_pretraining() -> None:
    tuned = parse(["--data", "d", "--output", "o"]).validate().resolve_defaults()
    assert tuned.optim.freeze_epochs == 2 and tuned.optim.backbone_lr_scale == 0.1
    scratch = parse(["--data", "d", "--output", "o", "--no-pretrained"]).validate().resolve_defaults()
    assert scratch.optim.freeze_epochs == 0 and scratch.optim.backbone_lr_scale == 1.0
    explicit = parse(["--data", "d", "--output", "o", "--freeze-epochs", "4"]).resolve_defaults()
    assert explicit.optim.freeze_epochs == 4


def test_a_runs_config_file_leaves_the_defaults_it_filled_to_the_new_flags(tmp_path) -> None:
    """config.json held --freeze-epochs and --backbone-lr-scale as filled in for its run, as
    if given: `--config RUN/config.json --epochs 30` kept a 2-epoch run's 1 head epoch, and
    with --no-pretrained (refused until --freeze-epochs 0) its backbone trained at 0.1 x --lr."""
    path = tmp_path / "config.json"

    def saved(cfg: TrainConfig, resolved: dict) -> str:
        path.write_text(json.dumps({**to_dict(cfg), "resolved": resolved}))
        return str(path)

    run = parse(["--data", "d", "--output", "o", "--epochs", "2"]).validate().resolve_defaults()
    assert run.optim.freeze_epochs == 1 and run.defaults_filled == ("freeze_epochs", "backbone_lr_scale")
    config = saved(run, {"defaults_filled": list(run.defaults_filled)})
    longer = parse(["--config", config, "--epochs", "30"]).validate().resolve_defaults()
    assert longer.optim.freeze_epochs == 2 and longer.optim.backbone_lr_scale == 0.1
    scratch = parse(["--config", config, "--no-pretrained"]).validate().resolve_defaults()
    assert scratch.optim.freeze_epochs == 0 and scratch.optim.backbone_lr_scale == 1.0
    # One no longer at its default by the file's own settings is kept, as given: edited in
    # the file, or a run's 1 head epoch kept when it was resumed with --epochs 30.
    for edit in ({"freeze_epochs": 1, "epochs": 30}, {"freeze_epochs": 0}, {"backbone_lr_scale": 0.5}):
        cfg = parse(["--data", "d", "--output", "o", "--epochs", "2"]).validate().resolve_defaults()
        for name, value in edit.items():
            setattr(cfg.optim, name, value)
        again = parse(["--config", saved(cfg, {"defaults_filled": list(run.defaults_filled)}),
                       "--epochs", "30"]).validate().resolve_defaults()
        kept = {name: value for name, value in edit.items() if name != "epochs"}
        assert {name: getattr(again.optim, name) for name in kept} == kept, edit
    assert again.optim.freeze_epochs == 2  # (the one left at its default follows --epochs 30)
    # Given, they are kept; and a config.json from before the record holds them as given.
    given = parse(["--data", "d", "--output", "o", "--epochs", "2", "--freeze-epochs", "1",
                   "--backbone-lr-scale", "0.5"]).validate().resolve_defaults()
    assert given.defaults_filled == ()
    for cfg, resolved in ((given, {"defaults_filled": []}), (run, {})):
        again = parse(["--config", saved(cfg, resolved), "--epochs", "30"]).validate().resolve_defaults()
        assert (again.optim.freeze_epochs, again.optim.backbone_lr_scale) == (1, cfg.optim.backbone_lr_scale)
        assert again.defaults_filled == ()


@pytest.mark.parametrize("name", ["demo.yaml", "fer2013-cpu.yaml", "fer2013-gpu.yaml"])
def test_shipped_configs_parse_and_validate(name: str) -> None:
    from fer_ray.model import check_model_name

    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = parse(["--config", str(path), "--data", "d", "--output", "o"]).validate()
    check_model_name(cfg.model.model)
    assert cfg.optim.epochs >= 1


def test_a_config_file_that_is_not_text_is_named(tmp_path) -> None:
    (tmp_path / "weights.pth").write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(ConfigError, match="is not text; give a YAML or JSON file of settings"):
        parse(["--config", str(tmp_path / "weights.pth"), "--data", "d", "--output", "o"])


def test_help_lists_the_values_of_flags_that_take_one_of_a_few(capsys) -> None:
    """--augment AUGMENT, --amp AMP, ...: the values were only told once one was wrong."""
    import argparse

    from fer_ray.config import SweepConfig, parse_config

    with pytest.raises(SystemExit):
        parse_config(SweepConfig, ["--help"], argparse.ArgumentParser())
    out = capsys.readouterr().out
    for shown in ("--augment {none,light,medium,strong}", "--amp {auto,bf16,fp16,off}", "--optimizer {adamw,sgd}",
                  "--sampler {none,sqrt,balanced}", "--searcher {random,optuna}"):
        assert shown in out, shown
    with pytest.raises(ConfigError, match="--augment must be one of none, light, medium, strong; got 'heavy'"):
        parse_config(SweepConfig, ["--data", "d", "--output", "o", "--augment", "heavy"],
                     argparse.ArgumentParser())[0].validate()
