"""Training end to end on a real Ray cluster: outputs, two phases, resume, bad input."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from conftest import TINY_MODEL, ctrl_c_when, modules_unpickling_imports, settings_for, tiny_train_args
from fer_ray.constants import FER_CLASSES
from fer_ray.model import load_model_dir
from jobs.train import main as train_main

RUN_FILES = [
    "config.json", "history.csv", "best/model.safetensors", "best/config.json",
    "learning_curves.png", "confusion_matrix.png", "val_metrics.parquet",
]


def test_run_folder_is_complete(tiny_run) -> None:
    for name in RUN_FILES:
        assert (tiny_run / name).stat().st_size > 0, name
    history = pd.read_csv(tiny_run / "history.csv")
    assert history.columns.tolist() == [
        "epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s",
        "data_wait_s", "steps", "planned_epochs", "format", "device",
    ]
    assert history["epoch"].tolist() == [1, 2]
    assert history["phase"].tolist() == ["head", "finetune"]  # --freeze-epochs 1
    assert (history["images_per_s"] > 0).all()
    # Waiting for batches is part of the epoch, never more than all of it.
    assert ((history["data_wait_s"] > 0) & (history["data_wait_s"] < history["seconds"])).all()
    assert (history["steps"] == 280 // 16).all()
    assert (history["planned_epochs"] == 2).all()  # no time budget: --epochs
    assert history["format"].isin(["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]).all()
    assert (history["device"] == "cpu").all()

    metrics = pd.read_parquet(tiny_run / "val_metrics.parquet").set_index("name")
    assert metrics.loc[list(FER_CLASSES), "support"].sum() == 70  # every val image, once
    assert metrics.loc["accuracy", "f1"] == pytest.approx(history["val_acc"].max())

    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["model"] == "test_resnet" and cfg["resolved"]["classes"] == list(FER_CLASSES)
    assert cfg["resolved"]["steps_per_epoch"] == 280 // 16
    assert cfg["resolved"]["defaults_filled"] == ["backbone_lr_scale"]  # (--freeze-epochs 1 given)

    model, spec = load_model_dir(str(tiny_run / "best"))
    assert spec.class_names == list(FER_CLASSES) and spec.image_size == 32 and spec.channels == 1
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_a_finished_runs_rerun_starts_no_worker_and_keeps_its_config(tiny_run, tmp_path, caplog,
                                                                    monkeypatch) -> None:
    """A rerun of a finished run rewrote config.json with what it was given (--lr 0.5 here),
    settings that never trained, without a word; now its outputs are written again from its
    checkpoints, no worker starts, and the settings not applied are named."""
    import logging

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("history.csv", "best"):  # written again from the checkpoints
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    config = (run / "config.json").read_text()
    data = json.loads(config)["data"]["data"]
    args = tiny_train_args(data, str(run), "--lr", "0.5", "--freeze-epochs", "1",
                           "--pretrained", "--pretrained-file", str(tmp_path / "moved.pth"))
    import fer_ray.trainer

    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run built a TorchTrainer")

    monkeypatch.setattr(fer_ray.trainer, "build_trainer", no_trainer)
    # Ray's loggers do not propagate to the root, where caplog listens: its handler is put
    # on the checkpoint manager's logger too, whose "run snapshot was found" advice (delete
    # the folder) reading the checkpoints back would log.
    ray_checkpoints = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    ray_checkpoints.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            assert train_main(args) == 0
    finally:
        ray_checkpoints.removeHandler(caplog.handler)
    assert (run / "config.json").read_text() == config
    assert "Run already finished at epoch 2; nothing to train (it ran all its 2 epochs" in caplog.text
    assert "Not applied, as the run trains no more: " in caplog.text and "lr 0.001 -> 0.5" in caplog.text
    assert "A run snapshot was found" not in caplog.text  # Ray's lines about resuming
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2]
    assert (run / "best" / "model.safetensors").stat().st_size > 0


def test_a_rerun_with_fewer_epochs_than_done_writes_the_outputs_and_says_so(tiny_run, tmp_path, caplog,
                                                                           monkeypatch) -> None:
    """A run stopped at epoch 2 of its 4, rerun with --epochs 1, was told "it ran all its 2
    epochs; a larger --epochs goes on" and "Not applied: epochs 4 -> 1", though that
    --epochs is what ended it (its outputs are written from the epochs done)."""
    import logging

    import fer_ray.trainer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    settings = json.loads((run / "config.json").read_text())
    settings["optim"]["epochs"] = 4  # the 2-epoch run, as if stopped at 2 of 4
    (run / "config.json").write_text(json.dumps(settings))
    (run / "history.csv").unlink()

    def no_trainer(*args, **kwargs):
        raise AssertionError("a run with nothing to train built a TorchTrainer")

    monkeypatch.setattr(fer_ray.trainer, "build_trainer", no_trainer)
    args = tiny_train_args(settings["data"]["data"], str(run), "--epochs", "1", "--freeze-epochs", "1",
                           "--pretrained", "--pretrained-file", str(tiny_run.parent / "pretrained.pth"))
    with caplog.at_level(logging.INFO):
        assert train_main(args) == 0
    assert ("Run stopped at epoch 2 of its 4; --epochs 1 trains no more, so its outputs are written from the "
            "epochs done (--epochs 4 goes on from there).") in caplog.text
    assert "Run already finished" not in caplog.text and "Not applied" not in caplog.text
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2]
    assert json.loads((run / "config.json").read_text())["optim"]["epochs"] == 4  # its own, kept


def test_a_resume_stopped_before_its_first_epoch_keeps_the_runs_config(tiny_run, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """A resume wrote config.json with what it was given before training anything: stopped
    before its first epoch, the folder named settings that never trained (--epochs 3 and
    --lr 0.5 here), which the next rerun's messages and summary.json then quoted. Written by
    the first worker once the first epoch is saved now (the extension test checks that)."""
    import fer_ray.trainer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = (run / "config.json").read_text()

    class StoppedAtOnce:
        def fit(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(fer_ray.trainer, "build_trainer", lambda *args, **kwargs: StoppedAtOnce())
    args = tiny_train_args(json.loads(config)["data"]["data"], str(run), "--epochs", "3", "--lr", "0.5",
                           "--freeze-epochs", "1", "--pretrained", "--pretrained-file",
                           str(tiny_run.parent / "pretrained.pth"))
    assert train_main(args) == 130
    assert (run / "config.json").read_text() == config


def test_a_checkpoints_loop_state_is_read_without_fetching_the_checkpoint(tmp_path, monkeypatch) -> None:
    """Whether a rerun is finished, and the run's history, come from the train-state file
    alone: as_directory copied the whole checkpoint (weights, their average, the optimizer's
    state) down from a bucket on every resume."""
    import pyarrow.fs as pafs
    import ray.train

    from fer_ray.constants import TRAIN_STATE_FILE
    from fer_ray.train_loop import TrainState, read_train_state

    (tmp_path / "run" / "epoch_0003").mkdir(parents=True)
    torch.save({"state": vars(TrainState(epoch=3, planned_epochs=3)), "optimizer": {}},
               tmp_path / "run" / "epoch_0003" / TRAIN_STATE_FILE)
    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a local filesystem
    checkpoint = ray.train.Checkpoint("run/epoch_0003", filesystem=bucket)
    monkeypatch.setattr(ray.train.Checkpoint, "as_directory", lambda self: pytest.fail("fetched it all"))
    state = read_train_state(checkpoint)
    assert state["epoch"] == 3 and state["planned_epochs"] == 3


def test_a_run_that_diverges_before_any_epoch_ends_in_one_sentence(ray_cluster, synth_shards, tmp_path,
                                                                  capsys) -> None:
    from types import SimpleNamespace

    from fer_ray.tuning import collect_results

    run = tmp_path / "sweep" / "trials" / "t1"  # where a sweep's trial would be
    args = tiny_train_args(str(synth_shards), str(run), "--lr", "1e30", "--epochs", "3")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "error: Training diverged in epoch 1, before any epoch to keep" in err, err[-2000:]
    assert not (run / "best").exists() and not (run / "summary.json").exists()
    assert train_main(args) == 2  # a rerun: finished, the same sentence, nothing trained
    assert "Training diverged in epoch 1, before any epoch to keep" in capsys.readouterr().err
    # A sweep lists such a trial as an error (the sweep went on to its other trials).
    trial = SimpleNamespace(config={"lr": 1e30, "label_smoothing": 0.1}, path=str(run), error=None)
    row = collect_results([trial], str(tmp_path / "sweep"), list(FER_CLASSES)).iloc[0]
    assert row["status"] == "ERROR" and row["error"].startswith("Training diverged in epoch 1")
    assert np.isnan(row["best_val_acc"])


def test_resumed_run_keeps_the_format_its_last_epoch_trained_in_then_ends_where_it_diverges(tiny_run, tmp_path,
                                                                                            caplog, capsys) -> None:
    """--amp auto times the formats when a run begins; a resumed run goes on in the one its
    last epoch used (timing them again switched formats mid-run on a difference within noise).

    Then the same run trained on at a learning rate of 1e30: weights gone NaN predict class
    0 for every image, and that epoch's "accuracy" (class 0's share of val) could be kept as
    the best model. Now the run ends at the first such epoch, which is never the best, and
    says so; a rerun finds it finished. (One run for both: each costs seconds of start.)"""
    from fer_ray.train_loop import kept_format

    assert kept_format([]) is None and kept_format([{"epoch": 1}]) is None  # new run / old history
    assert kept_format([{"format": "fp32"}, {"format": "bf16+channels_last"}]) == (torch.bfloat16, True)
    assert kept_format([{"format": "fp32"}]) == (None, False)
    assert kept_format([{"format": "fp16+channels_last"}]) is None  # a GPU's: timed again on a CPU
    # bf16 on a GPU (Ampere and later) is a CPU format's name too: the device tells them apart.
    assert kept_format([{"format": "bf16+channels_last", "device": "cuda"}]) is None
    assert kept_format([{"format": "bf16+channels_last", "device": "cpu"}]) == (torch.bfloat16, True)

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = pd.read_csv(run / "history.csv")
    config = json.loads((run / "config.json").read_text())
    data = config["data"]["data"]
    # Without --freeze-epochs: the run's own 1 (the default for 3 epochs is 2, and a run
    # extended with a larger --epochs was refused for the head phase it had not run). The
    # pretrained weights' file has moved since: the checkpoint holds every weight. Had the
    # run's 1 been its default, it stays marked as one in the config.json the resume writes.
    config["resolved"]["defaults_filled"] = ["freeze_epochs", "backbone_lr_scale"]
    (run / "config.json").write_text(json.dumps(config))
    args = tiny_train_args(data, str(run), "--epochs", "3", "--amp", "auto",
                           "--pretrained", "--pretrained-file", str(tmp_path / "moved.pth"))
    # The last checkpoint says its epoch trained in a format other than the one timed for
    # the run: the resumed epoch goes on in it, not in whatever timing the formats again
    # picks (with the keeping disabled, the timing picked a third one here).
    from fer_ray.constants import TRAIN_STATE_FILE

    last = max((run / "ray_train").glob("epoch_*")) / TRAIN_STATE_FILE
    saved = torch.load(last, weights_only=True)
    timed_before = saved["state"]["history"][-1]["format"]
    kept = "fp32+channels_last" if timed_before != "fp32+channels_last" else "bf16"
    saved["state"]["history"][-1]["format"] = kept
    torch.save(saved, last)
    assert train_main(args) == 0
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["phase"].tolist() == ["head", "finetune", "finetune"]
    assert history["format"].tolist()[1:] == [kept, kept]
    # The earlier epochs kept, not redone (epoch 2's format is the one written in above).
    pd.testing.assert_frame_equal(history.iloc[:2].drop(columns="format"), before.drop(columns="format"))
    # The last phase's cosine is refitted to end at the new last epoch: the learning rate
    # rises again from where the 2-epoch run had ended it (README).
    assert history["lr"].iloc[2] > history["lr"].iloc[1], history["lr"].tolist()
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["defaults_filled"] == ["freeze_epochs", "backbone_lr_scale"]
    assert "tag" in json.loads((run / "best" / "config.json").read_text())["pretrained_cfg"]  # still pretrained

    from safetensors.torch import load_file

    from fer_ray.trainer import saved_result

    capsys.readouterr()
    args = [*args, "--epochs", "5", "--lr", "1e30"]
    assert train_main(args) == 0
    # The job's last line says so (it read as a run that had ended by itself, exit 0 alike).
    assert "of 4 (it diverged in epoch 4: the epochs before it are kept); model:" in capsys.readouterr().out
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # not 5: it ended where it diverged
    assert np.isnan(history["val_acc"].iloc[3]) and history["val_acc"].iloc[:3].notna().all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is True and summary["best_epoch"] in (1, 2, 3) and summary["epochs_run"] == 4
    assert summary["accuracy"] == history["val_acc"].iloc[summary["best_epoch"] - 1]
    weights = load_file(run / "best" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert saved_result(str(run)).metrics["last_report"] is True  # (a sweep's ASHA lets it pass)
    with caplog.at_level(logging.INFO):
        assert train_main(args) == 0
    assert "it diverged in epoch 4 (its weights or outputs stopped being finite numbers)" in caplog.text


def test_ctrl_c_before_the_first_epoch_is_saved_says_the_rerun_starts_again(ray_cluster, synth_shards, tmp_path,
                                                                           capsys) -> None:
    """A stop before any epoch was saved said "the epochs finished so far are saved: rerun
    ... to resume after the last one"."""
    run = tmp_path / "run"
    with ctrl_c_when(run, "config.json"):  # (written before the workers start)
        status = train_main(tiny_train_args(str(synth_shards), str(run), "--epochs", "60"))
    assert status == 130
    assert not list(run.glob("ray_train/epoch_*"))
    err = capsys.readouterr().err
    assert ("interrupted before an epoch was saved; rerun the same command to start the run from the "
            "beginning") in err and "are saved" not in err


def test_ctrl_c_says_interrupted_and_the_rerun_resumes(ray_cluster, synth_shards, tmp_path, capsys) -> None:
    """Ray Train's SIGINT handler aborts the run and its wait then ended in SystemExit(1):
    exit 1 without a word. Now exit 130 and a sentence; the rerun continues the epochs."""
    run = tmp_path / "run"
    # (Epoch 1's checkpoint registered by the time epoch 3's appears: at epoch 2's, under a
    # loaded machine, Ray had not always registered it, and the rerun trained epoch 1 again.)
    with ctrl_c_when(run, "ray_train/epoch_0003"):
        status = train_main(tiny_train_args(str(synth_shards), str(run), "--epochs", "60"))
    assert status == 130
    assert "interrupted; the epochs finished so far are saved" in capsys.readouterr().err
    assert not (run / "history.csv").exists()  # the run did not finish
    saved = max(int(p.name.split("_")[1]) for p in (run / "ray_train").glob("epoch_*"))
    assert 3 <= saved < 60
    from fer_ray.constants import TRAIN_STATE_FILE

    # Every checkpoint's history holds the rows before it. Epoch 1's own may be gone: Ray
    # keeps the best and the latest, and may register epoch 2's before Ctrl-C lands.
    first = min((run / "ray_train").glob("epoch_*"))
    kept = torch.load(first / TRAIN_STATE_FILE, weights_only=True)["state"]["history"]
    # --amp may change on resume: fp16's GradScaler is handed the checkpoint's empty scaler
    # state (an fp32 or bf16 epoch's; it used to refuse it and the worker crashed).
    import signal

    ctrl_c = signal.getsignal(signal.SIGINT)
    assert train_main(tiny_train_args(str(synth_shards), str(run), "--epochs", str(saved + 1), "--amp", "fp16")) == 0
    # Ray Train's Ctrl-C handler is gone with the run (left in, Ctrl-C while the outputs were
    # written did nothing twice, then exited 0).
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, saved + 2))
    assert history["format"].iloc[-1].startswith("fp16")
    # Epoch 1 was not trained again: its row is the one its checkpoint holds (the last
    # epoch's checkpoint may not have been registered before Ctrl-C: that one may run again).
    assert history["seconds"].tolist()[0] == pytest.approx(kept[0]["seconds"])
    assert history["val_acc"].tolist()[0] == pytest.approx(kept[0]["val_acc"])


def test_a_finished_run_extended_counts_patience_afresh(ray_cluster, synth_shards, tmp_path) -> None:
    """A run that ran all its epochs, trained on with a larger --epochs (the LR rises again),
    kept the epochs without a gain from the end of its old schedule: --patience 3 after two
    such epochs stopped the extension after its first epoch. At a learning rate of 1e-12 a
    model without BatchNorm statistics (a ViT) ties val accuracy every epoch."""
    out = tmp_path / "extended"
    args = tiny_train_args(str(synth_shards), str(out), "--model", "test_vit", "--model-kwargs", '{"img_size": 32}',
                           "--lr", "1e-12", "--min-lr", "0", "--patience", "3")
    assert train_main([*args, "--epochs", "3"]) == 0  # epochs 2 and 3 no gain: 2 of 3
    assert train_main([*args, "--epochs", "5"]) == 0
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5] and history["val_acc"].nunique() == 1
    assert not json.loads((out / "summary.json").read_text())["stopped_early"]
    # config.json names the --epochs the extension trained with (its first worker wrote it).
    assert json.loads((out / "config.json").read_text())["optim"]["epochs"] == 5


def test_best_folder_holds_the_best_epoch_when_val_accuracy_ties(ray_cluster, synth_shards, tiny_run, tmp_path,
                                                                 caplog) -> None:
    """Two head-only epochs at a learning rate of 1e-12 score val the same: the loop calls
    the first best, and best/, val_metrics.parquet and Ray's kept checkpoint are its. The
    second, no better, ends the run by --patience 1 (the head phase is the last here)."""
    from fer_ray.constants import RAY_RUN_NAME

    out = tmp_path / "tie"
    args = tiny_train_args(str(synth_shards), str(out), "--pretrained", "--pretrained-file",
                           str(tiny_run.parent / "pretrained.pth"), "--epochs", "3", "--freeze-epochs", "3",
                           "--lr", "1e-12", "--min-lr", "0", "--patience", "1")
    assert train_main(args) == 0
    history = pd.read_csv(out / "history.csv")
    assert history["val_acc"].nunique() == 1 and len(history) == 2  # the tie, then early stopping
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["best_epoch"] == 1 and summary["epochs_run"] == 2
    with caplog.at_level(logging.INFO):  # a finished run: a larger --epochs trains no more
        assert train_main([*args, "--epochs", "4"]) == 0
    assert "nothing to train (early stopping ended it" in caplog.text
    kept = sorted(p.name for p in (out / RAY_RUN_NAME).glob("epoch_*"))
    assert kept == ["epoch_0001", "epoch_0002"]  # the best (the first of the tie) and the latest
    best = load_model_dir(str(out / "best"))[0].state_dict()
    first = load_model_dir(str(out / RAY_RUN_NAME / "epoch_0001"))[0].state_dict()
    assert all(torch.equal(best[k], first[k]) for k in best)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "resnet5O"], "Unknown timm model 'resnet5O'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
        (["--clip-grad", "-1"], "--clip-grad must be non-negative (0: off), got -1.0."),
        (["--time-budget", "-1"], "--time-budget must be >= 0 minutes"),
        (["--input-norm", "pixel"], "--input-norm must be one of dataset, image; got 'pixel'"),
        (["--pretrained", "--pretrained-file", "/no/such/weights.pth"], "does not exist"),
        (["--pretrained", "--model-kwargs", '{"bogus": 1}'], "--model-kwargs {'bogus': 1} do not fit test_resnet"),
        (["--model", "vit_tiny_patch16_224"], "vit_tiny_patch16_224 does not take 3-channel 32 px images (Input "
                                              "height (32) doesn't match model (224)"),
    ],
)
def test_bad_input_fails_before_workers_start(synth_shards, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "bad"
    assert train_main(tiny_train_args(str(synth_shards), str(out), *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (out / "ray_train").exists()


@pytest.mark.parametrize("weights", ["missing", "deeper"])
def test_a_bad_pretrained_file_is_said_before_ray_starts(synth_shards, tmp_path, monkeypatch, capsys,
                                                         weights) -> None:
    """--pretrained-file was read only once Ray was up (a sweep's after its blur and format
    measurements, a --use-gpu run's after its wait for GPU nodes)."""
    import jobs.train

    def no_ray(**_):
        raise AssertionError("Ray started")

    monkeypatch.setattr(jobs.train, "init_ray", no_ray)
    path = tmp_path / "w.pth"
    if weights == "deeper":  # (test_resnet's weights and a block it does not have)
        torch.save({**timm.create_model(TINY_MODEL).state_dict(),
                    "layer1.5.conv1.weight": torch.zeros(8, 8, 3, 3)}, path)
    out = tmp_path / "run"
    assert train_main(tiny_train_args(str(synth_shards), str(out), "--pretrained", "--pretrained-file",
                                      str(path), "--freeze-epochs", "1")) == 2
    err = capsys.readouterr().err
    assert ("does not exist" if weights == "missing" else "tensors of layers test_resnet does not have") in err


def test_the_pretrained_file_read_before_ray_is_the_state_the_workers_get(ray_cluster, synth_shards, tmp_path,
                                                                           monkeypatch) -> None:
    import ray

    from fer_ray import trainer
    from fer_ray.config import TrainConfig, parse_config

    torch.save(timm.create_model(TINY_MODEL).state_dict(), tmp_path / "w.pth")
    cfg, _ = parse_config(TrainConfig, tiny_train_args(str(synth_shards), str(tmp_path / "run"), "--pretrained",
                                                       "--pretrained-file", str(tmp_path / "w.pth"),
                                                       "--freeze-epochs", "1"), argparse.ArgumentParser())
    trainer.check_inputs(cfg)
    calls = []
    monkeypatch.setattr(trainer, "fetch_pretrained_state", lambda *a, **k: calls.append(a))
    state = ray.get(trainer.load_pretrained(cfg, len(FER_CLASSES)))
    assert not calls and set(state) == set(timm.create_model(TINY_MODEL, num_classes=len(FER_CLASSES)).state_dict())
    assert not trainer._PRELOADED  # (held no longer)


@pytest.mark.parametrize("case", ["file", "the_data", "inside_the_data", "foreign", "hidden_only", "model_folder",
                                  "sweep_folder"])
def test_outputs_that_are_not_run_folders_are_refused(synth_shards, tiny_run, tmp_path, capsys, case) -> None:
    out = tmp_path / "out"
    if case == "file":
        out.write_text("precious")
    elif case == "the_data":
        out = synth_shards
    elif case == "inside_the_data":
        out = synth_shards / "runs"
    elif case == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    elif case == "hidden_only":
        (out / ".git").mkdir(parents=True)
    elif case == "sweep_folder":  # with the same settings: `--config SWEEP/best_config.json`
        out.mkdir()
        shutil.copy(tiny_run / "config.json", out / "sweep_config.json")
        (out / "best").mkdir()
        (out / "best" / "model.safetensors").write_bytes(b"the sweep's best model")
    else:
        out = tiny_run / "best"  # a model folder: its config.json is timm's
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else None

    assert train_main(tiny_train_args(str(synth_shards), str(out))) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and err.count("\n") == 1, err
    assert (sorted(p.relative_to(out) for p in out.rglob("*")) if out.is_dir() else None) == before
    if case == "file":
        assert out.read_text() == "precious" and "is a file; choose a folder" in err


def test_data_and_output_are_recorded_absolute_so_reruns_and_trials_find_them(synth_shards, tmp_path,
                                                                              monkeypatch) -> None:
    """`--config RUN/config.json` from another folder trained a new run under that folder:
    config.json named the output as given (relative)."""
    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import check_inputs, resolve_settings

    monkeypatch.chdir(synth_shards.parent)
    out = os.path.relpath(tmp_path / "o", synth_shards.parent)
    cfg, _ = parse_config(TrainConfig, tiny_train_args(synth_shards.name, out), argparse.ArgumentParser())
    check_inputs(cfg)
    assert cfg.data.data == str(synth_shards) and cfg.run.output == str(tmp_path / "o")
    # The workers get it too: their "Resuming ... from" line names a bucket's checkpoint with
    # the scheme the run was given (a gs:// one read gcs://, pyarrow's name).
    assert resolve_settings(cfg, check_inputs(cfg)).output == str(tmp_path / "o")


def test_missing_shards_folder(tmp_path, synth_shards, capsys) -> None:
    assert train_main(tiny_train_args(str(tmp_path / "nothing"), str(tmp_path / "o"))) == 2
    assert f"{str(tmp_path / 'nothing')!r} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train_main(tiny_train_args(str(tmp_path / "empty"), str(tmp_path / "o"))) == 2
    assert "not a prepared shards folder (no manifest.json)" in capsys.readouterr().err
    assert train_main(tiny_train_args(str(synth_shards / "train"), str(tmp_path / "o"))) == 2
    assert f"is one split of the shards folder {str(synth_shards)!r}; give that folder" in capsys.readouterr().err


def test_changed_model_on_an_existing_run_is_refused(tiny_run, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = json.loads((run / "config.json").read_text())["data"]["data"]
    # The run's own weights and phases (tiny_train_args alone trains from scratch: no head phase).
    same = ["--pretrained", "--pretrained-file", str(tiny_run.parent / "pretrained.pth"), "--freeze-epochs", "1"]
    args = tiny_train_args(data, str(run), *same, "--model", "resnet18")
    assert train_main(args) == 2
    assert "different settings (model 'test_resnet' -> 'resnet18')" in capsys.readouterr().err
    # The optimizer's state is in the checkpoint: another optimizer cannot resume it, and a
    # run from before the setting existed (no "optimizer" in its config) used AdamW.
    assert train_main(tiny_train_args(data, str(run), *same, "--optimizer", "sgd")) == 2
    assert "different settings (optimizer 'adamw' -> 'sgd')" in capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    del config["optim"]["optimizer"]
    (run / "config.json").write_text(json.dumps(config))
    assert train_main(tiny_train_args(data, str(run), *same, "--optimizer", "sgd")) == 2
    assert "different settings (optimizer 'adamw' -> 'sgd')" in capsys.readouterr().err
    # The weights learnt one input normalisation; a run from before the setting used the dataset's.
    del config["data"]["input_norm"]
    (run / "config.json").write_text(json.dumps(config))
    assert train_main(tiny_train_args(data, str(run), *same, "--input-norm", "image")) == 2
    assert "different settings (input_norm 'dataset' -> 'image')" in capsys.readouterr().err
    # The architecture's arguments, the fine-tuned stages and the weight average are in the
    # checkpoint too (the weights, the optimizer's groups, the EMA copy).
    for flags, diff in [
        (["--model-kwargs", '{"drop_path_rate": 0.1}'], "model_kwargs {} -> {'drop_path_rate': 0.1}"),
        (["--unfreeze", "1"], "unfreeze 'all' -> '1'"),
        (["--ema-decay", "0.999"], "ema_decay 0.0 -> 0.999"),
        # The schedule's position is in steps: other steps per epoch would resume it elsewhere.
        (["--batch-size", "8"], "batch_size 16 -> 8"),
        (["--num-workers", "2"], "num_workers 1 -> 2"),
    ]:
        assert train_main(tiny_train_args(data, str(run), *same, *flags)) == 2
        assert f"different settings ({diff})" in capsys.readouterr().err
    # Weights from ImageNet or from scratch: --backbone-lr-scale's default and the history's
    # phase names follow it (a pretrained run resumed without it trained its backbone at 10x).
    assert train_main(tiny_train_args(data, str(run))) == 2
    assert "pretrained True -> False" in capsys.readouterr().err
    # Its epochs were validated under one blur (resolved: `auto` measures the same again):
    # the best epoch and early stopping compare across them. Checked on a run that goes on
    # (--epochs 3; a finished run trains no more, and says what it did not apply).
    assert json.loads((run / "config.json").read_text())["resolved"]["input_blur"] == 0
    assert train_main(tiny_train_args(data, str(run), *same, "--epochs", "3", "--input-blur", "1.5")) == 2
    assert "different settings (input_blur 0 -> 1.5: its epochs were validated" in capsys.readouterr().err


def test_a_run_on_shards_prepared_again_is_refused(tiny_run, tmp_path, capsys) -> None:
    """jobs/prepare.py run again into the run's --data (another val fraction, more images,
    other classes) and the run resumed on them unsaid: its schedule at another step, its
    best epoch compared across two val splits, its outputs read under the new class names."""
    run, data = tmp_path / "run", tmp_path / "shards"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    shutil.copytree(config["data"]["data"], data)
    config["data"]["data"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    same = ["--pretrained", "--pretrained-file", str(tiny_run.parent / "pretrained.pth"), "--freeze-epochs", "1"]

    def accepted() -> None:  # (the job's checks alone: the rerun itself rewrites a finished run's outputs)
        from fer_ray.config import TrainConfig, parse_config
        from fer_ray.trainer import check_inputs

        cfg, _ = parse_config(TrainConfig, tiny_train_args(str(data), str(run), *same), argparse.ArgumentParser())
        check_inputs(cfg)  # no ConfigError

    accepted()  # the same shards
    manifest = json.loads((data / "manifest.json").read_text())

    def prepared_again(change) -> str:
        changed = copy.deepcopy(manifest)
        change(changed)
        (data / "manifest.json").write_text(json.dumps(changed))
        assert train_main(tiny_train_args(str(data), str(run), *same)) == 2
        return capsys.readouterr().err

    def more_val(m) -> None:
        m["splits"]["val"]["total"] += 7
        m["splits"]["val"]["per_class"][m["classes"][0]] += 7

    err = prepared_again(more_val)
    total = manifest["splits"]["val"]["total"]
    assert f"holds a run begun on other shards than {str(data)!r} holds now (val {total} -> {total + 7} images: " \
           "prepared again since?); use a new --output, or the shards it began on." in err
    classes = manifest["classes"]
    renamed = [classes[1], classes[0], *classes[2:]]
    assert f"(classes {', '.join(classes)} -> {', '.join(renamed)}:" in prepared_again(
        lambda m: m.update(classes=renamed))
    assert "(the images' sizes, or how val was drawn from train:" in prepared_again(
        lambda m: m.update(val_fraction=0.2))
    # A run from before the record: its classes and steps per epoch.
    del config["resolved"]["data"]
    (run / "config.json").write_text(json.dumps(config))
    steps = config["resolved"]["steps_per_epoch"]

    def more_train(m) -> None:
        m["splits"]["train"]["total"] += 16 * 3

    assert f"({steps} -> {steps + 3} steps an epoch:" in prepared_again(more_train)
    # Another --batch-size changes the steps too: said as the setting it is, not as the data.
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert train_main(tiny_train_args(str(data), str(run), *same, "--batch-size", "8")) == 2
    err = capsys.readouterr().err
    assert "different settings (batch_size 16 -> 8)" in err and "other shards" not in err
    (data / "manifest.json").write_text(json.dumps({**manifest, "val_fraction": 0.2}))  # (not recorded then)
    accepted()


def test_a_finished_run_is_rerun_without_asking_for_resources(tiny_run, tmp_path, monkeypatch, capsys) -> None:
    """A finished run starts no worker: its rerun (outputs written again) waited up to 15
    minutes for GPU nodes an autoscaler had let go, or failed without them."""
    from fer_ray import trainer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = json.loads((run / "config.json").read_text())["data"]["data"]
    same = ["--pretrained", "--pretrained-file", str(tiny_run.parent / "pretrained.pth"), "--freeze-epochs", "1"]

    def no_resources(cfg, *args, **kwargs):
        raise trainer.ConfigError("--use-gpu needs 1 GPU(s)")

    monkeypatch.setattr(trainer, "check_resources", no_resources)
    assert train_main(tiny_train_args(data, str(run), *same)) == 0
    assert "best val accuracy" in capsys.readouterr().out
    assert train_main(tiny_train_args(data, str(run), *same, "--epochs", "3")) == 2  # one that goes on asks
    assert "--use-gpu needs 1 GPU(s)" in capsys.readouterr().err


def test_resume_check_takes_one_folder_under_two_spellings(tiny_run, tmp_path, monkeypatch) -> None:
    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import _check_output, _check_resume_compatible

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = Path(json.loads((run / "config.json").read_text())["data"]["data"])
    monkeypatch.chdir(data.parent)
    # (file:// URIs, with a last slash or not, were refused: "different settings (data ...)")
    for spelling in (f"./{data.name}", f"{data.name}/", str(data.parent / "." / data.name), f"file://{data}",
                     f"file://{data}/"):
        cfg, _ = parse_config(TrainConfig, tiny_train_args(spelling, str(run), "--pretrained", "--pretrained-file",
                              str(tiny_run.parent / "pretrained.pth"), "--freeze-epochs", "1"), argparse.ArgumentParser())
        cfg.resolve_defaults()
        _check_resume_compatible(cfg, _check_output(cfg))  # no ConfigError


def test_one_class_shards_are_refused_before_workers_start(synth_shards, tmp_path, capsys) -> None:
    shards = Path(shutil.copytree(synth_shards, tmp_path / "one"))
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"] = ["happy"]
    (shards / "manifest.json").write_text(json.dumps(manifest))

    assert train_main(tiny_train_args(str(shards), str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "have 1 class (happy); a classifier needs at least two" in err and err.count("\n") == 1


def test_a_class_without_training_images_is_said_before_training(synth_shards, tmp_path, caplog) -> None:
    """A FER2013 CSV without some class's Training rows is prepared (its seven classes are
    fixed) and trained on: the model never predicts that class, and nothing said so."""
    from fer_ray import trainer
    from fer_ray.config import TrainConfig, parse_config

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["per_class"]["disgust"] = 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg, _ = parse_config(TrainConfig, tiny_train_args(str(shards), str(tmp_path / "run")), argparse.ArgumentParser())
    with caplog.at_level("WARNING", logger="fer_ray.trainer"):
        trainer.check_inputs(cfg)
    assert "Class(es) disgust have no training image in" in caplog.text


def test_a_batch_larger_than_the_data_is_refused_before_workers_start(synth_shards, tmp_path, capsys) -> None:
    """It passed the driver's checks and failed in every worker (retried --max-failures times)."""
    total = json.loads((synth_shards / "manifest.json").read_text())["splits"]["train"]["total"]
    args = tiny_train_args(str(synth_shards), str(tmp_path / "o"), "--batch-size", str(total + 2))
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert f"{total} training images cannot fill one batch of {total + 2} on each of 1 worker(s)" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_run_with_ema_mixup_per_image_norm_and_bf16_validates_saves_and_resumes(ray_cluster, synth_shards,
                                                                                  tmp_path) -> None:
    """The training options a run has off by default, in one run (each run costs its worker
    group's start): EMA, mixup/cutmix, per-image normalisation, bf16 autocast on a CPU,
    blur jitter."""
    from safetensors.torch import load_file

    from fer_ray.constants import TRAIN_STATE_FILE, WEIGHTS_FILE
    from fer_ray.predict import Scorer

    run = tmp_path / "options"
    flags = ["--ema-decay", "0.9", "--lr", "0.01", "--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "0.5",
             "--input-norm", "image", "--amp", "bf16", "--blur-jitter", "0.5"]
    assert train_main(tiny_train_args(str(synth_shards), str(run), *flags)) == 0
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2] and history["train_loss"].notna().all()
    assert history["val_acc"].notna().all() and history["format"].str.startswith("bf16").all()
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optim"]["mixup"], cfg["optim"]["cutmix"], cfg["optim"]["mix_prob"]) == (0.2, 1.0, 0.5)
    assert cfg["data"]["input_norm"] == "image" and cfg["data"]["blur_jitter"] == 0.5
    model_cfg = json.loads((run / "best" / "config.json").read_text())
    assert model_cfg["fer_ray"]["input_norm"] == "image"
    # Trained from random weights: the folder does not name timm's published ones.
    assert "tag" not in model_cfg["pretrained_cfg"] and "origin_url" not in model_cfg["pretrained_cfg"]
    assert Scorer(str(run / "best"), False, False, 1).normalize.per_image  # scored the way it trained

    last = run / "ray_train" / "epoch_0002"
    averaged = load_file(last / WEIGHTS_FILE)
    trained = torch.load(last / TRAIN_STATE_FILE, weights_only=True)["trained_model"]
    assert averaged.keys() == trained.keys()
    # The folder holds the average, the train state the weights the optimizer stepped.
    assert any(t.is_floating_point() and not torch.equal(t, averaged[k]) for k, t in trained.items())
    # Resuming restores both and goes on.
    assert train_main(tiny_train_args(str(synth_shards), str(run), *flags, "--epochs", "3")) == 0
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2, 3]


def test_validation_is_blurred_to_match_and_training_batches_are_not() -> None:
    """The input blur matches val to blurred training images: validation blurs what it
    scores, training sees its images as they are (README, "Training images blurrier ...")."""
    from fer_ray.blur import gaussian_blur
    from fer_ray.constants import IMAGE_COL, LABEL_COL
    from fer_ray.normalize import DeviceNormalize
    from fer_ray.train_loop import evaluate, train_epoch

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(1, 7)
            self.seen: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(x.detach().clone())
            return self.head(x.mean((1, 2, 3))[:, None])

    class NoSchedule:
        def step_update(self, num_updates: int) -> None:
            pass

    images = torch.randint(0, 256, (4, 32, 32, 1), dtype=torch.uint8)
    batches = [{IMAGE_COL: images, LABEL_COL: torch.tensor([0, 1, 2, 3])}]
    normalize = DeviceNormalize(32, [0.5], [0.25], in_chans=1, blur_sigma=2.0)
    plain = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    blurred = (gaussian_blur(images.permute(0, 3, 1, 2).float(), 2.0) / 255 - 0.5) / 0.25
    model = Recording()
    train_epoch(model, model, batches, normalize, torch.nn.CrossEntropyLoss(),
                torch.optim.SGD(model.parameters(), lr=0.0), NoSchedule(),
                torch.amp.GradScaler("cpu", enabled=False), None, 0, torch.device("cpu"))
    evaluate(model, batches, normalize, None, 0.0, torch.device("cpu"))
    trained, validated = model.seen
    torch.testing.assert_close(trained, plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(validated, blurred, atol=1e-4, rtol=1e-4)
    assert (validated - plain).abs().max() > 0.1  # (the blur is not too small to tell)


def test_mixup_and_cutmix_train_on_soft_targets() -> None:
    """train_epoch's loss is the weighted, smoothed cross-entropy on the mixed batch and
    its soft targets (timm's Mixup draws from numpy's global generator: same seed, same mix)."""
    import numpy as np
    from timm.data import Mixup

    from fer_ray.constants import IMAGE_COL, LABEL_COL
    from fer_ray.model import create_model
    from fer_ray.normalize import DeviceNormalize
    from fer_ray.train_loop import train_epoch

    torch.manual_seed(0)
    model = create_model("test_resnet", 7, in_chans=1)
    normalize = DeviceNormalize(32, [0.5], [0.25], in_chans=1)
    images = torch.randint(0, 256, (8, 32, 32, 1), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1])  # row i is mixed with row 7 - i: another class
    criterion = torch.nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 7), label_smoothing=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are

    class NoSchedule:
        def step_update(self, num_updates: int) -> None:
            pass

    def run(mix) -> float:
        np.random.seed(3)
        loss_sum, correct, seen, steps = train_epoch(
            model, model, [{IMAGE_COL: images, LABEL_COL: labels}], normalize, criterion, optimizer,
            NoSchedule(), torch.amp.GradScaler("cpu", enabled=False), None, 0, torch.device("cpu"),
            mix=mix,
        )
        assert (seen, steps) == (8, 1)
        counted.append(correct)
        return loss_sum / seen

    counted = []

    for mix in (Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=7),
                Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=7)):
        loss = run(mix)
        np.random.seed(3)
        x, target = mix(normalize(images, match_blur=False), labels)
        assert target.shape == (8, 7) and 0 < target.max() < 1  # soft: two classes share each row
        model.train()
        logits = model(x)
        expected = criterion(logits, target).item()
        assert loss == pytest.approx(expected, rel=1e-5)
        # Train accuracy counts each image as the label that dominates its mix (it was
        # counted against its own label, which lost the mix in about half the batches).
        assert counted[-1] == (logits.argmax(1) == target.argmax(1)).sum().item()
        assert loss != pytest.approx(run(None), rel=1e-3)  # unmixed: another loss
    # A mix where the other image always dominates: every label is the other row's.
    np.random.seed(3)
    x, target = mix(normalize(images, match_blur=False), labels)
    flipped = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_minmax=(0.9, 0.95), label_smoothing=0.0, num_classes=7)
    run(flipped)
    np.random.seed(3)
    x, target = flipped(normalize(images, match_blur=False), labels)
    assert (target.argmax(1) == labels.flip(0)).all()
    assert counted[-1] == (model(x).argmax(1) == labels.flip(0)).sum().item()


def test_the_ema_decay_reaches_its_value_after_the_first_epoch() -> None:
    """timm's warm-up (power 2/3) reached 0.999 only after 31,600 steps: in the CPU preset's
    ~18,000 steps --ema-decay 0.999, 0.9995 and 0.9999 averaged alike."""
    from timm.utils import ModelEmaV3

    from fer_ray.train_loop import build_ema, ema_warmup_power

    model = torch.nn.Linear(2, 2)
    for decay in (0.999, 0.9995, 0.9999):
        ema = build_ema(model, decay, 448)  # as the loop builds it
        assert ema.get_decay(100) < ema.get_decay(300) < decay  # warming up
        assert ema.get_decay(449) == pytest.approx(decay, abs=1e-6)  # (get_decay counts from step 1)
        assert ema.get_decay(5000) == decay
    late = [ModelEmaV3(model, decay=d, use_warmup=True, warmup_power=ema_warmup_power(d, 448)).get_decay(2000)
            for d in (0.999, 0.9995)]
    assert late == [0.999, 0.9995]  # two decays, two averages


def test_a_resumed_optimizer_keeps_the_peak_lr_of_this_runs_settings() -> None:
    """A rerun with another --lr restored the checkpoint's initial_lr into the groups, and
    the schedule a time budget refitted mid-phase went back to the old peak."""
    from fer_ray.train_loop import load_optimizer_state

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    old = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.01}], lr=0.1)
    for g in old.param_groups:
        g["initial_lr"] = g["lr"]
    new = torch.optim.SGD([{"params": [params[0]], "lr": 0.05}, {"params": [params[1]], "lr": 0.005}], lr=0.05)
    for g in new.param_groups:
        g["initial_lr"] = g["lr"]
    load_optimizer_state(new, old.state_dict())
    assert [g["initial_lr"] for g in new.param_groups] == [0.05, 0.005]


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_clip_grad_bounds_each_steps_gradient_norm(amp) -> None:
    """--clip-grad: the step takes the gradients clipped to that total norm (SGD at LR 1 moves
    the weights by exactly the clipped gradient); 0 leaves them as they are."""
    from fer_ray.constants import IMAGE_COL, LABEL_COL
    from fer_ray.normalize import DeviceNormalize
    from fer_ray.train_loop import train_epoch

    class NoSchedule:
        def step_update(self, num_updates: int) -> None:
            pass

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 1), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1])
    moved = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 7))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_epoch(model, model, [{IMAGE_COL: images, LABEL_COL: labels}], DeviceNormalize(32, [0.5], [0.25], in_chans=1),
                    torch.nn.CrossEntropyLoss(), optimizer, NoSchedule(), torch.amp.GradScaler("cpu", enabled=False),
                    amp, 0, torch.device("cpu"), clip_grad=clip)
        moved[clip] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3)
    assert moved[0.0] > 0.1


def test_a_resumed_optimizer_takes_this_runs_weight_decay() -> None:
    """A rerun with another --weight-decay kept the checkpoint's for the rest of the phase,
    while config.json named the new one."""
    from fer_ray.train_loop import load_optimizer_state

    params = [torch.nn.Parameter(torch.zeros(2))]
    old = torch.optim.AdamW(params, lr=0.1, weight_decay=0.05)
    new = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["weight_decay"] == 0.0


def test_optimizer_choice_reaches_the_loop_and_keeps_the_lr_groups(synth_shards) -> None:
    """--optimizer sgd: SGD with Nesterov momentum 0.9 and L2 weight decay, the head and
    backbone LRs kept per group; the default stays AdamW."""
    from fer_ray.model import create_model
    from fer_ray.train_loop import build_optimizer

    model = create_model("test_resnet", 7, in_chans=1)
    head, body = list(model.get_classifier().parameters()), list(model.conv1.parameters())
    groups = [{"params": head, "lr": 0.05}, {"params": body, "lr": 0.005}]

    s = settings_for(synth_shards, "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "5e-4")
    assert s.optimizer == "sgd"
    sgd = build_optimizer(groups, s)
    assert type(sgd) is torch.optim.SGD
    assert [(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in sgd.param_groups] == [
        (0.05, 0.9, True, 5e-4), (0.005, 0.9, True, 5e-4)]

    default = settings_for(synth_shards)
    assert default.optimizer == "adamw"
    adamw = build_optimizer([{"params": head, "lr": 0.001}], default)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("epochs, freeze, phase", [(10, 0, "finetune"), (2, 2, "head"), (40, 0, "finetune"),
                                                   (2, 3, "head")])
def test_schedule_warms_up_then_decays_to_min_lr_at_the_phase_end(epochs, freeze, phase) -> None:
    """A 2-epoch head phase ended at half the peak LR, and a 10-epoch one at 2.4% of it,
    when the cosine ran its length after the warm-up instead of within the phase. A time
    budget that ends the run inside the head phase (2 of 3 frozen epochs) ends its cosine."""
    from types import SimpleNamespace

    from fer_ray.train_loop import build_scheduler

    s = SimpleNamespace(epochs=epochs, freeze_epochs=freeze, warmup_epochs=1, lr=0.05, min_lr=1e-6)
    steps = 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)
    scheduler = build_scheduler(optimizer, phase, s, steps)
    n = (epochs - freeze if phase == "finetune" else min(freeze, epochs)) * steps
    lrs = []
    for step in range(n + 1):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(s.lr * 0.01)
    assert lrs[steps] == pytest.approx(s.lr)  # the warm-up's end (1 epoch, or half a 2-epoch phase)
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:]))  # then only down
    assert lrs[n] == pytest.approx(s.min_lr)
    assert lrs[n - 1] < 0.03 * s.lr  # the last step trains near the bottom (10 cosine steps in the head case)


def test_a_plan_that_grows_does_not_move_the_warm_up_back() -> None:
    """The warm-up was capped at half the planned phase each time the schedule was built: a
    time budget's first plan of 4 fine-tuning epochs (warm-up 2 of the 3 asked), grown to
    10 at step 20, made the warm-up 3 epochs again and the learning rate fell from its peak
    back into the ramp. The phase keeps the warm-up it began with."""
    from types import SimpleNamespace

    from fer_ray.train_loop import build_scheduler

    s = SimpleNamespace(epochs=6, freeze_epochs=2, warmup_epochs=3, lr=1e-3, min_lr=1e-6)
    steps = 10
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)

    def lrs(scheduler, steps_: range) -> list[float]:
        out = []
        for step in steps_:
            scheduler.step_update(num_updates=step)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    first = build_scheduler(optimizer, "finetune", s, steps)
    assert first.warmup_t == 20 and lrs(first, range(20, 21)) == [pytest.approx(s.lr)]
    s.epochs = 12  # the plan grows at the end of the phase's second epoch
    grown = build_scheduler(optimizer, "finetune", s, steps, first.warmup_t)
    after = lrs(grown, range(20, 101))
    assert after[0] == pytest.approx(s.lr)  # still at the peak, then only down
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(s.min_lr)
    assert build_scheduler(optimizer, "finetune", s, steps).warmup_t == 30  # a phase begun on this plan


def test_each_worker_and_each_resume_draws_its_own_dropout_and_mixup() -> None:
    import numpy as np

    from fer_ray.train_loop import reseed

    def draws(seed, rank, epoch):
        reseed(seed, rank, epoch)
        return torch.nn.functional.dropout(torch.ones(64), 0.5).tolist(), np.random.beta(1.0, 1.0)

    assert draws(0, 0, 0) == draws(0, 0, 0)  # reproducible
    outcomes = [draws(0, 0, 0), draws(0, 1, 0), draws(0, 0, 3), draws(1, 0, 0)]
    assert len({str(o) for o in outcomes}) == 4  # another worker, a resume, another --seed


def test_epochs_that_fit_counts_whole_epochs_with_a_margin() -> None:
    from fer_ray.train_loop import epochs_that_fit

    assert epochs_that_fit(1, 22, deadline=1000.0, now=0.0, epoch_seconds=100.0) == 1 + 9  # 1000 // 105
    assert epochs_that_fit(1, 5, deadline=1000.0, now=0.0, epoch_seconds=100.0) == 5  # at most --epochs
    assert epochs_that_fit(3, 22, deadline=50.0, now=60.0, epoch_seconds=10.0) == 3  # past the deadline


def test_time_budget_plan_grows_once_the_warm_up_epoch_is_behind(monkeypatch) -> None:
    """The first epoch (pipeline warm-up included) sets the plan until a second has run;
    then the slowest of the latest epochs after it does, which may give room for more
    epochs (up to --epochs) or fewer."""
    from types import SimpleNamespace

    import fer_ray.train_loop as tl

    clock = [0.0]
    monkeypatch.setattr(tl, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(tl, "log0", lambda message: None)  # (outside a Ray Train worker)
    s = SimpleNamespace(epochs=22, deadline=1000.0, freeze_epochs=0)
    state, times, mark = tl.TrainState(), [], 0.0
    planned = []
    for epoch_seconds in (200, 100, 100, 150, 150):
        clock[0] += epoch_seconds
        state.epoch += 1
        mark, _ = tl._fit_to_deadline(s, state, 22, times, mark, "finetune", None, None, 10, torch.device("cpu"))
        planned.append(s.epochs)
    assert times == [200, 100, 100, 150, 150]
    # after epoch 1: 1 + 800 // 210; epoch 2: 2 + 700 // 105 (grows); 3: 3 + 600 // 105;
    # 4 (slower): 4 + 450 // 157.5; 5: 5 + 300 // 157.5
    assert planned == [4, 8, 8, 6, 6]
    assert state.planned_epochs == 6
    # One slow epoch (other work on the machine) shortens the plan only while it is among
    # the last ESTIMATE_WINDOW (3) epochs.
    s.deadline = 3000.0
    for epoch_seconds in (400, 100, 100, 100, 100):
        clock[0] += epoch_seconds
        state.epoch += 1
        mark, _ = tl._fit_to_deadline(s, state, 22, times, mark, "finetune", None, None, 10, torch.device("cpu"))
        planned.append(s.epochs)
    # after epoch 6 (clock 1100, window 150, 150, 400): 6 + 1900 // 420; 7: 7 + 1800 // 420;
    # 8: 8 + 1700 // 420; 9 (window 100, 100, 100): 9 + 1600 // 105, at most 22; 10: the same
    assert planned[5:] == [10, 11, 12, 22, 22]
    # The budget now fits the run whole: no plan is kept, so a rerun with a larger --epochs
    # goes on (it was refused: "its --time-budget fitted 22 of 30 epochs").
    assert state.planned_epochs == 0 and not tl.is_finished(state, 30)
    s.deadline = 1e6
    clock[0] += 100
    state.epoch += 1
    tl._fit_to_deadline(s, state, 22, times, mark, "finetune", None, None, 10, torch.device("cpu"))
    assert s.epochs == 22  # never beyond --epochs


def test_cpu_formats_are_timed_on_a_copy_and_the_fastest_wins() -> None:
    from fer_ray.model import (
        CPU_FORMATS, FP32_FORMATS, create_model, fastest_format, fastest_inference_format, format_name,
        probe_batch, time_cpu_formats,
    )

    torch.manual_seed(0)
    model = create_model("test_resnet", 7, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = time_cpu_formats(model, 16, 1, 32, steps=2)
    assert len(seconds) == len(CPU_FORMATS) and all(0 < t < 60 for t in seconds)
    scoring = time_cpu_formats(model, 16, 1, 32, FP32_FORMATS, train=False, steps=2)
    assert len(scoring) == 2 and all(0 < t < 60 for t in scoring)
    assert fastest_format([0.2, 0.1], FP32_FORMATS) == (None, True)
    chosen, timed = fastest_inference_format(model, 1, 32, "auto")
    assert chosen in CPU_FORMATS and timed.count(" ms") == 4 and timed.endswith(format_name(*chosen))
    assert fastest_inference_format(model, 1, 32, "off")[0] in FP32_FORMATS
    assert fastest_inference_format(model, 1, 32, "bf16")[0][0] is torch.bfloat16
    assert [probe_batch(size) for size in (32, 48, 96, 128, 160, 224, 384)] == [32, 32, 32, 18, 12, 8, 8]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None for p in model.parameters())
    assert fastest_format([0.3, 0.2, 0.1, 0.4]) == (torch.bfloat16, False)
    assert fastest_format([0.1, 0.2, 0.3, 0.4]) == (None, False)
    # Logs name formats, not dtypes (the training line read 'amp=torch.bfloat16').
    assert [format_name(d, c) for d, c in [(None, False), (torch.bfloat16, True), (torch.float16, False)]] == [
        "fp32", "bf16+channels_last", "fp16"]


def test_time_budget_fits_the_schedule_and_ends_in_time(ray_cluster, synth_shards, tmp_path, capsys, caplog) -> None:
    """--time-budget: after the first epoch the cosine schedule is fitted to the epochs that
    fit, so the run ends within the budget with its learning rate decayed, not cut off."""
    import math
    import time

    run, budget_s, configured = tmp_path / "budget", 60.0, 200
    start = time.time()
    args = tiny_train_args(str(synth_shards), str(run), "--epochs", str(configured),
                           "--time-budget", str(budget_s / 60),
                           "--patience", "1000")  # the budget, not early stopping, ends it
    assert train_main(args) == 0
    elapsed = time.time() - start
    history = pd.read_csv(run / "history.csv")
    n = len(history)
    # The last line says what ended the run (it read as if the run had stopped by itself).
    assert f"of {n} (the time budget fitted {n} of --epochs {configured}); model:" in capsys.readouterr().out
    # Rerun with a larger --epochs: the budget's plan ended it, so it trains no more, and both
    # the log and the last line name the --epochs it trained with (they named the rerun's).
    with caplog.at_level(logging.INFO):
        assert train_main([*args, "--epochs", str(2 * configured)]) == 0
    assert f"(the time budget fitted {n} of --epochs {configured}); model:" in capsys.readouterr().out
    assert f"its --time-budget fitted {n} of {configured} epochs" in caplog.text
    assert (history["phase"] == "scratch").all()  # from random weights: nothing is fine-tuned
    assert history["epoch"].tolist() == list(range(1, n + 1))
    assert 3 <= n < configured
    from fer_ray.constants import TRAIN_STATE_FILE

    state = torch.load(run / "ray_train" / f"epoch_{n:04d}" / TRAIN_STATE_FILE, weights_only=True)["state"]
    assert state["planned_epochs"] == n  # the plan, kept for a resume
    from fer_ray.trainer import saved_result

    # Only the budget's last epoch is reported as the last (a sweep's ASHA lets it pass).
    result = saved_result(str(run))
    assert result.metrics["epoch"] == n and result.metrics["last_report"] is True
    assert all(m["last_report"] is (m["epoch"] == n) for _, m in result.best_checkpoints)
    # Training ended by the deadline (no epoch began without room for it; the last one can
    # only overrun by its own stall): its checkpoint saved by then. (Timed to the whole job,
    # writing the run folder and Ray's shutdown after it took much of the slack when loaded.)
    saved = (run / "ray_train" / f"epoch_{n:04d}").stat().st_mtime - start
    assert saved < budget_s + 20 + history["seconds"].iloc[-1], (saved, elapsed)
    assert elapsed < budget_s + 60 + history["seconds"].iloc[-1], elapsed  # (and the whole job, loosely)
    # Fitted after the first epoch (and again when epochs sped up or slowed down): each
    # epoch after the warm-up one runs on the cosine of the plan in force when it ran, which
    # spans the plan's epochs after the warm-up.
    plans, peak = history["planned_epochs"], history["lr"].max()
    assert plans.iloc[0] == configured and (plans < configured).any()
    for epoch, plan, lr in zip(history["epoch"], plans, history["lr"]):
        if epoch > 1:
            expected = 0.5 * (1 + math.cos(math.pi * (epoch - 2) / (plan - 1))) * peak
            assert lr == pytest.approx(expected, rel=0.05, abs=1e-5), (epoch, plan)
    # So the last epoch runs on the plan that ends there, low on its cosine where the
    # schedule of `configured` epochs would still be near its peak. Only a last epoch that
    # itself overran the estimate (a stall of the machine: seen once in CI, 26 s against
    # 0.5-3 s) can end the run on a longer plan; its checkpoint still records the end.
    if plans.iloc[-1] != n:
        assert history["seconds"].iloc[-1] > history["seconds"].iloc[1:-1].max(), history
    else:  # below where the unfitted schedule would be at the last epoch
        assert history["lr"].iloc[-1] < 0.5 * (1 + math.cos(math.pi * (n - 2) / (configured - 1))) * peak


def test_timed_batches_adds_up_the_waits() -> None:
    import time

    from fer_ray.train_loop import TimedBatches

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    timed = TimedBatches(slow())
    got = []
    for item in timed:
        got.append(item)
        time.sleep(1.0)  # the loop's own work is not waiting
    assert got == [0, 1, 2]
    assert 0.15 <= timed.wait < 1.5  # (with the loop's own 3 s counted it would be >= 3.15)


def test_cpu_formats_are_warmed_in_turn_then_timed_with_fewer_steps_when_slow() -> None:
    """Training steps: each format in one block (warm-up, then timed). Inference: each
    format warmed up in a block, then timed in rounds of one pass of each."""
    from fer_ray.model import CPU_FORMATS, create_model, time_cpu_formats

    calls: list[torch.memory_format] = []

    class Counted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = create_model("test_resnet", 7)  # 3 channels: 1 leaves the format ambiguous

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else torch.contiguous_format)
            return self.inner(x)

    model = Counted()
    expected = [torch.channels_last if cl else torch.contiguous_format for _, cl in CPU_FORMATS]
    time_cpu_formats(model, 8, 3, 32, train=True, steps=3, warmup=2)
    assert calls == [fmt for fmt in expected for _ in range(5)]  # in the order given
    calls.clear()
    time_cpu_formats(model, 8, 3, 32, train=True, steps=3, warmup=2, max_seconds=0.0)
    assert calls == [fmt for fmt in expected for _ in range(2)]  # no time left: one warm-up, one timed
    calls.clear()
    time_cpu_formats(model, 8, 3, 32, train=False, steps=3, warmup=2)
    assert calls == [fmt for fmt in expected for _ in range(2)] + expected * 3
    calls.clear()
    time_cpu_formats(model, 8, 3, 32, train=False, steps=3, warmup=2, max_seconds=0.0)
    assert calls == expected + expected  # one warm-up each, one round


def test_a_sweep_trials_budget_counts_from_its_workers_start(synth_shards, monkeypatch) -> None:
    """A sweep trial's workers may wait minutes for the nodes an autoscaler brings up: its
    --time-budget starts when they do (the latest worker's clock), not when the trial did;
    a training job's counts from the job's start."""
    from types import SimpleNamespace

    import fer_ray.train_loop as tl
    import fer_ray.tuning as tuning
    from fer_ray.trainer import resolve_settings

    job = settings_for(synth_shards, "--time-budget", "2")
    assert job.deadline > 0 and job.budget_s == 0
    seen = {}
    monkeypatch.setattr(tuning, "resolve_settings",
                        lambda *a, **k: seen.update(k) or (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(tuning.ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    with pytest.raises(RuntimeError, match="stop"):
        tuning.run_trial({"lr": 0.01, "label_smoothing": 0.1}, {"optim": {"time_budget": 2.0}}, {}, "/tmp/x", None)
    assert seen.get("budget_from_workers") is True
    import argparse

    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import check_inputs

    cfg, _ = parse_config(TrainConfig, ["--data", str(synth_shards), "--output", f"{synth_shards}-unused", "--model", "test_resnet",
                                        "--no-pretrained", "--image-size", "32", "--time-budget", "2"],
                          argparse.ArgumentParser())
    trial = resolve_settings(cfg, check_inputs(cfg), budget_from_workers=True)
    assert trial.deadline == 0 and trial.budget_s == 120.0

    monkeypatch.setattr(tl, "time", SimpleNamespace(time=lambda: 1000.0))
    monkeypatch.setattr(tl, "all_reduce", lambda values, device, op=None: [values[0] + 7.0])  # a later worker
    tl.start_budget_clock(trial, torch.device("cpu"))
    assert trial.deadline == 1127.0
    before = job.deadline
    tl.start_budget_clock(job, torch.device("cpu"))
    assert job.deadline == before  # a job's deadline is left as it was


def test_class_weighted_loss_is_the_same_for_labels_and_their_one_hot_targets() -> None:
    """Mixup/cutmix hand the loss soft targets, for which torch divides a class-weighted
    loss by the batch size instead of the batch's weight: about half the loss (and the
    gradient) of the same batch as labels with FER2013's weights."""
    from fer_ray.train_loop import WeightedCrossEntropy

    torch.manual_seed(0)
    logits, labels = torch.randn(32, 7), torch.randint(0, 7, (32,))
    weight = torch.tensor([1.0, 9.4, 1.0, 0.6, 0.8, 0.9, 1.3])
    one_hot = torch.nn.functional.one_hot(labels, 7).float()
    for smoothing in (0.0, 0.1):
        loss = WeightedCrossEntropy(weight, smoothing)
        reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, labels)
        assert loss(logits, labels).item() == pytest.approx(reference.item(), rel=1e-5)
        assert loss(logits, one_hot).item() == pytest.approx(reference.item(), rel=1e-5)
    unweighted = WeightedCrossEntropy(None, 0.1)
    assert unweighted(logits, one_hot).item() == pytest.approx(unweighted(logits, labels).item(), rel=1e-5)
    # Under autocast (as training calls it) the batch's weight is summed in fp32: a matmul
    # of the targets and the weights ran in bf16 there (0.1% off the loss).
    mixed = 0.63 * one_hot + 0.37 * one_hot.roll(1, 0)
    loss = WeightedCrossEntropy(weight, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = loss(logits.bfloat16(), mixed)
    assert in_bf16.dtype == torch.float32
    assert in_bf16.item() == pytest.approx(loss(logits.bfloat16().float(), mixed).item(), rel=1e-6)


def _weighted_loss_rank(rank: int, world: int, init: str, expected: list[torch.Tensor]) -> None:
    from fer_ray.train_loop import WeightedCrossEntropy

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 7)
        x, labels, weight = _weighted_batch()
        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        WeightedCrossEntropy(weight, 0.1)(ddp(x[part]), labels[part]).backward()
        for got, want in zip([p.grad for p in model.parameters()], expected):
            torch.testing.assert_close(got, want)
    finally:
        torch.distributed.destroy_process_group()


def _weighted_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    # The first worker's half holds the rare class (weight 9.4), the second none of it.
    labels = torch.tensor([1, 1, 1, 0, 2, 3, 4, 5, 3, 3, 4, 0, 2, 6, 5, 3])
    return torch.randn(16, 5), labels, torch.tensor([1.0, 9.4, 1.0, 0.6, 0.8, 0.9, 1.3])


def test_class_weighted_loss_under_ddp_gives_the_gradient_of_the_whole_batch(tmp_path) -> None:
    """Each worker divided its loss by its own batch's weight before DDP averaged the
    gradients: two workers, one holding the heavy rare class, gave the other worker's
    images twice or more their say on one worker."""
    from fer_ray.train_loop import WeightedCrossEntropy

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7)
    x, labels, weight = _weighted_batch()
    WeightedCrossEntropy(weight, 0.1)(model(x), labels).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    torch.multiprocessing.start_processes(
        _weighted_loss_rank, args=(2, f"file://{tmp_path / 'init'}", expected), nprocs=2, start_method="spawn",
    )


@pytest.mark.parametrize("scale", [0.1, 0.01, 0.001])
def test_every_param_group_warms_up_to_its_own_peak(scale) -> None:
    """One warm-up start for all groups (1% of the head's LR) started a backbone at
    --backbone-lr-scale 0.1 at a tenth of its peak, left one at 0.01 flat and made one at
    0.001 fall from ten times its peak."""
    from types import SimpleNamespace

    from fer_ray.train_loop import build_optimizer, build_scheduler

    s = SimpleNamespace(epochs=10, freeze_epochs=2, warmup_epochs=1, lr=1e-3, min_lr=1e-7, optimizer="adamw",
                        weight_decay=0.05)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": s.lr},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": s.lr * scale}]
    optimizer = build_optimizer(groups, s)
    scheduler = build_scheduler(optimizer, "finetune", s, 100)
    lrs = []
    for step in range(0, 101, 10):
        scheduler.step_update(num_updates=step)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    for group, peak in ((0, s.lr), (1, s.lr * scale)):
        curve = [lr[group] for lr in lrs]
        assert curve[0] <= 0.011 * peak and curve[-1] == pytest.approx(peak, rel=1e-6)
        assert all(a < b for a, b in zip(curve, curve[1:]))  # rising through the warm-up


def test_a_plan_that_grows_past_a_cut_head_phase_refits_its_cosine(monkeypatch) -> None:
    """A slow first epoch cut the plan inside the head phase (3 of 5 frozen epochs); when
    the plan grew again, the head's cosine still ended at epoch 3 and its epochs 4-5 ran
    at --min-lr."""
    from types import SimpleNamespace

    import fer_ray.train_loop as tl

    clock = [0.0]
    monkeypatch.setattr(tl, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(tl, "log0", lambda message: None)
    s = SimpleNamespace(epochs=30, deadline=1000.0, freeze_epochs=5, warmup_epochs=0, lr=1e-3, min_lr=1e-6)
    steps = 10
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)
    scheduler = tl.build_scheduler(optimizer, "head", s, steps)
    state, times, mark, plans = tl.TrainState(), [], 0.0, []
    for epoch_seconds in (300, 60, 60):  # the warm-up epoch slow, then fast
        clock[0] += epoch_seconds
        state.epoch += 1
        state.global_step += steps
        mark, scheduler = tl._fit_to_deadline(s, state, 30, times, mark, "head", optimizer, scheduler, steps,
                                              torch.device("cpu"))
        plans.append(s.epochs)
    assert plans[0] == 3 and plans[-1] > 5  # cut into the head phase, then grown past it
    scheduler.step_update(num_updates=4 * steps)  # the first step of head epoch 5 (of 5)
    assert optimizer.param_groups[0]["lr"] > 10 * s.min_lr


def test_a_phases_first_step_is_never_below_zero() -> None:
    """A --sampler epoch a step short of epoch_steps put the fine-tuning phase's first step
    at -1, where timm's warm-up line gives a negative learning rate."""
    from fer_ray.train_loop import phase_step

    assert phase_step(global_step=2 * 897 - 2, phase_start=2, epoch_steps=897) == 0
    assert phase_step(global_step=2 * 897 + 5, phase_start=2, epoch_steps=897) == 5


def test_a_finished_run_says_why_it_trains_nothing_more() -> None:
    """"Run already finished at epoch 1; nothing to train." said neither why nor what would
    go on (a larger --epochs does, unless early stopping or the time budget ended the run)."""
    from fer_ray.train_loop import TrainState, finished_why

    assert "early stopping ended it; train longer in a new --output" in finished_why(
        TrainState(epoch=5, stopped_early=True), 10)
    assert finished_why(TrainState(epoch=7, planned_epochs=7), 40) == (
        "its --time-budget fitted 7 of 40 epochs; train longer in a new --output")
    assert finished_why(TrainState(epoch=3), 3) == "it ran all its 3 epochs; a larger --epochs goes on from there"
    # A budget's plan stays the end whatever --epochs a rerun gives (is_finished): a rerun
    # with --epochs at the plan was told that a larger one would go on.
    assert finished_why(TrainState(epoch=3, planned_epochs=3), 3) == (
        "its --time-budget fitted 3 epochs; train longer in a new --output")


def test_a_run_that_saved_no_epoch_starts_again_with_new_settings(tiny_run, tmp_path, caplog) -> None:
    """A run that failed before its first checkpoint (a bad --model-kwargs, say) kept its
    config.json, and the corrected rerun was refused: "holds a run with different settings"."""
    from fer_ray.config import ConfigError, TrainConfig, parse_config
    from fer_ray.trainer import check_inputs

    data = json.loads((tiny_run / "config.json").read_text())["data"]["data"]

    def cfg(run: Path) -> TrainConfig:
        return parse_config(TrainConfig, tiny_train_args(data, str(run), "--image-size", "40"),
                            argparse.ArgumentParser())[0]

    failed = tmp_path / "failed"
    failed.mkdir()
    shutil.copy(tiny_run / "config.json", failed / "config.json")
    with caplog.at_level("INFO", logger="fer_ray.trainer"):
        check_inputs(cfg(failed))  # no ConfigError
    assert "holds a run that saved no epoch; it starts again with these settings" in caplog.text
    with pytest.raises(ConfigError, match=r"different settings \(.*image_size 32 -> 40"):
        check_inputs(cfg(tiny_run))  # a run with checkpoints keeps its settings


def test_the_loop_settings_carry_the_flags_that_shape_training(synth_shards, tmp_path) -> None:
    """Each flag as the workers get it (LoopSettings), where the unit tests of the pieces
    (scaled_lr, class_weights, sampling_rates, the scheduler) take their inputs by hand:
    the LR scaling rules, dropout, warm-up, and the class weights and sampler rates in the
    manifest's class order (the synthetic classes are balanced: skewed here)."""
    from fer_ray.trainer import train_sampling_rates

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    classes = manifest["classes"]
    skewed = {c: 10 * (i + 1) for i, c in enumerate(classes)}  # the last class the largest
    manifest["splits"]["train"]["per_class"] = skewed
    (shards / "manifest.json").write_text(json.dumps(manifest))
    base = ["--lr", "0.01", "--num-workers", "4", "--input-blur", "0"]
    for rule, lr in [("linear", 0.04), ("sqrt", 0.02), ("none", 0.01)]:
        assert settings_for(shards, *base, "--lr-scaling", rule).lr == pytest.approx(lr)
    s = settings_for(shards, *base, "--drop-rate", "0.3", "--warmup-epochs", "2.5", "--class-weights")
    assert (s.drop_rate, s.warmup_epochs) == (0.3, 2.5)
    weights = s.class_weights
    assert weights[0] == pytest.approx(len(classes) * weights[-1])  # 10 images against 70
    assert weights == sorted(weights, reverse=True) and np.mean(weights) == pytest.approx(1.0)
    assert settings_for(shards, *base, "--no-class-weights").class_weights is None
    assert settings_for(shards, *base, "--cpu-format", "bf16").cpu_format == "bf16"  # (a sweep's best_config.json)
    from fer_ray.config import TrainConfig, parse_config

    cfg, _ = parse_config(TrainConfig, ["--data", str(shards), "--output", f"{shards}-unused", "--sampler", "balanced",
                                        "--no-class-weights"], argparse.ArgumentParser())
    rates = train_sampling_rates(cfg)
    # each class drawn as often as the others: rate x count the same for every class
    assert [r * skewed[c] for r, c in zip(rates, classes)] == pytest.approx([sum(skewed.values()) / len(classes)] * len(classes))


def test_cpu_format_names_are_the_timed_formats() -> None:
    from fer_ray.config import CPU_FORMAT_NAMES
    from fer_ray.model import CPU_FORMATS, format_name

    assert CPU_FORMAT_NAMES == tuple(format_name(*f) for f in CPU_FORMATS)


def test_the_data_record_leaves_out_counts_a_retried_read_task_doubles() -> None:
    """prepare counts colour modes and sides in an actor that a read task Ray runs again
    reports to twice: those counts would have refused a resume on the same images."""
    from fer_ray.trainer import data_record

    manifest = {"classes": ["a", "b"], "val_fraction": None, "seed": 0,
                "splits": {"train": {"total": 3, "per_class": {"a": 1, "b": 2}},
                           "val": {"total": 1, "per_class": {"a": 1, "b": 0}}},
                "image": {"median_side": 48, "min_side": 48, "max_side": 48, "channels": 1, "modes": {"L": 3}}}
    retried = copy.deepcopy(manifest)
    retried["image"]["modes"] = {"L": 5}
    assert data_record(retried) == data_record(manifest)
    for key, value in [("channels", 3), ("median_side", 96)]:
        other = copy.deepcopy(manifest)
        other["image"][key] = value
        assert data_record(other) != data_record(manifest)


def test_a_data_record_of_the_whole_image_summary_still_resumes() -> None:
    """Records written while the data record held the manifest's whole image summary compare
    by the keys it holds now: a resume on the same shards was refused ("prepared again")."""
    from fer_ray.config import ConfigError, TrainConfig, parse_config
    from fer_ray.trainer import _check_same_data, data_record

    manifest = {"classes": ["a", "b"], "val_fraction": None, "seed": 0,
                "splits": {"train": {"total": 3, "per_class": {"a": 1, "b": 2}},
                           "val": {"total": 1, "per_class": {"a": 1, "b": 0}}},
                "image": {"median_side": 48, "min_side": 48, "max_side": 48, "channels": 1, "modes": {"L": 3}}}
    cfg, _ = parse_config(TrainConfig, ["--data", "d", "--output", "o"], argparse.ArgumentParser())
    whole = {**data_record(manifest), "image": dict(manifest["image"])}
    _check_same_data(cfg, {"resolved": {"data": whole}}, manifest)  # no ConfigError
    whole["image"]["channels"] = 3
    with pytest.raises(ConfigError, match="the images' sizes"):
        _check_same_data(cfg, {"resolved": {"data": whole}}, manifest)


def test_the_dataset_config_ray_trains_actors_unpickle_imports_no_model_code(ray_cluster, synth_shards,
                                                                             tmp_path) -> None:
    """Ray Train's controller and dataset manager actors unpickle the trainer's dataset_config:
    defined in fer_ray.trainer, it made each of them import timm, scikit-learn and the rest
    first (seconds of CPU per training run)."""
    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import build_trainer, check_inputs, resolve_settings

    cfg, _ = parse_config(TrainConfig, tiny_train_args(str(synth_shards), str(tmp_path / "run")),
                          argparse.ArgumentParser())
    trainer = build_trainer(cfg, resolve_settings(cfg, check_inputs(cfg)))
    assert type(trainer.data_config).__name__ == "ShardedValConfig"
    assert modules_unpickling_imports(trainer.data_config) == []
