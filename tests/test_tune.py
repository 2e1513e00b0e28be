"""Ray Tune sweeps: a 2-trial ASHA sweep end to end, resume, failures, bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from conftest import ctrl_c_when, modules_unpickling_imports, tiny_train_args
from fer_ray.config import SweepConfig, parse_config, to_dict
from fer_ray.model import load_model_dir
from fer_ray.tuning import RESULT_COLUMNS, best_trial, trial_config
from jobs.train import main as train_main
from jobs.tune import main as tune_main


def sweep_args(data: str, output: str, *extra: str) -> list[str]:
    return [*tiny_train_args(data, output), "--num-samples", "2", "--max-concurrent", "1",
            "--grace-period", "1", *extra]


def test_trial_config_overrides_only_the_swept_values() -> None:
    import argparse

    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", "o", "--epochs", "4", "--num-samples", "5"],
                          argparse.ArgumentParser())
    trial = trial_config(to_dict(cfg), lr=0.002, label_smoothing=0.05, output="o/trials/t1")
    assert trial.optim.lr == 0.002 and trial.optim.label_smoothing == 0.05
    assert trial.run.output == "o/trials/t1" and trial.optim.epochs == 4
    assert not hasattr(trial, "sweep")
    # The sweep's filled defaults stay marked in its trials' config.json (and best_config.json).
    base = {**to_dict(cfg.resolve_defaults()), "resolved": {"defaults_filled": list(cfg.defaults_filled)}}
    trial = trial_config(base, lr=0.002, label_smoothing=0.05, output="o/trials/t1")
    assert trial.optim.freeze_epochs == 2 and trial.defaults_filled == ("freeze_epochs", "backbone_lr_scale")
    assert trial_config(to_dict(cfg), 0.002, 0.05, "o/t").defaults_filled == ()  # (a sweep begun before)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (1e-4, 3e-3)),  # AdamW's usual range
        (["--optimizer", "sgd"], (5e-3, 0.2)),  # SGD's: AdamW's would barely move it
        (["--optimizer", "sgd", "--lr-range", "0.01", "0.1"], (0.01, 0.1)),  # given: kept
    ],
)
def test_lr_range_follows_the_optimizer_unless_given(flags, expected) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", "o", *flags], parser)
    assert cfg.validate().lr_range() == expected
    assert "0.005 0.2 with --optimizer sgd" in " ".join(parser.format_help().split())  # --help says so


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.logger = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_sweep_stopped_while_every_trial_runs_resumes_and_writes_every_output(ray_cluster, synth_shards, tmp_path,
                                                                               capsys, caplog, monkeypatch):
    """Ctrl-C while both trials run, the rerun that finishes them, what the sweep writes, and
    a finished sweep run again. One sweep for all (each trial start costs seconds of CPU).

    Ctrl-C: Tune's SIGINT handler ends the experiment, marks the trials it stopped TERMINATED
    as if finished, and fit() returns as if done: the sweep crowned an unfinished trial in
    best/ and exited 0. With a trial still waiting, the count of ended trials also told;
    with every trial running, as here, only the InterruptWatch does (SIGUSR1, a batch
    system's warning, the same: test_the_interrupt_watch_notes_every_signal_tune_stops_on).
    A --max-concurrent above what the cluster holds (4 CPUs: 2 trials) is held to it."""
    out = tmp_path / "sweep"
    args = sweep_args(str(synth_shards), str(out), "--max-concurrent", "9", "--epochs", "3")
    # (the epoch registered, not only its folder there: the job's line says what was saved)
    with caplog.at_level("INFO", logger="fer_ray.tuning"), \
            ctrl_c_when(out, "trials/*/ray_train/checkpoint_manager_snapshot.json"):
        assert tune_main([*args, "--keep-checkpoints"]) == 130
    assert "--max-concurrent 9 is more trials than this cluster holds at once (2:" in caplog.text
    assert "Sweeping 2 trials, up to 2 at once" in caplog.text
    assert "interrupted; each trial's finished epochs are saved" in capsys.readouterr().err
    for name in ("results.parquet", "best", "best_config.json"):
        assert not (out / name).exists(), name
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # Tune's handler is not left behind
    assert len(list((out / "trials").glob("*/config.json"))) == 2  # both trials had begun

    # The rerun (without --keep-checkpoints: not a setting the trials depend on) finishes them.
    records = _Records()
    records.logger.addHandler(records)
    try:
        assert tune_main(args) == 0
    finally:
        records.logger.removeHandler(records)
    # Reading the trials' results back is not a resumed job: no "delete the existing folder".
    assert not [m for m in records.messages if "brand new training job" in m]
    printed = capsys.readouterr().out
    assert printed.count(" done: lr ") == 2  # one line per finished trial

    results = pd.read_parquet(out / "results.parquet")
    assert results.columns.tolist() == RESULT_COLUMNS and len(results) == 2
    assert (results["status"] == "TERMINATED").all()
    assert results["lr"].between(1e-4, 3e-3).all() and results["label_smoothing"].between(0, 0.3).all()
    assert (results["epochs_run"] >= 1).all() and (results["epochs_run"] <= 3).all()
    best = results.loc[results["best_val_acc"].idxmax()]
    best_config = json.loads((out / "best_config.json").read_text())
    assert best_config["resolved"]["defaults_filled"] == ["freeze_epochs", "backbone_lr_scale"]
    assert best_config["trial"]["trial_id"] == best["trial_id"]
    assert best_config["optim"]["lr"] == pytest.approx(best["lr"])
    assert best_config["trial"]["best_val_acc"] == results["best_val_acc"].max()
    assert isinstance(best_config["trial"]["best_epoch"], int)
    assert "output" not in best_config["run"]  # a training run from it needs its own --output
    _, spec = load_model_dir(str(out / "best"))
    assert spec.model == "test_resnet"
    assert (out / "tune_summary.png").stat().st_size > 0
    formats = set()
    for trial_id in results["trial_id"]:
        history = pd.read_csv(out / "trials" / trial_id / "history.csv")
        # every epoch once: those before Ctrl-C kept, the rest trained by the rerun
        ran = results.set_index("trial_id").loc[trial_id, "epochs_run"]
        assert history["epoch"].tolist() == list(range(1, ran + 1))
        formats |= set(history["format"])
    # --amp auto on CPUs: the formats timed once for the sweep, every trial in the same
    # (each trial timing its own trained some in fp32 and some in bf16), kept for a resume.
    assert formats == {json.loads((out / "sweep_config.json").read_text())["resolved"]["cpu_format"]}
    # and best_config.json gives it: retrained from it, the best trial's format, not timed again
    assert {best_config["run"]["cpu_format"]} == formats
    # Only the best trial keeps its checkpoints; every trial keeps its model, reports and summary.
    kept = {p.parent.name for p in (out / "trials").glob("*/ray_train")}
    assert kept == {best["trial_id"]}
    for trial_id in results["trial_id"]:
        trial = out / "trials" / trial_id
        assert (trial / "best" / "model.safetensors").is_file() and (trial / "val_metrics.parquet").is_file()
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["accuracy"] == results.set_index("trial_id").loc[trial_id, "best_val_acc"]

    # A finished sweep run again trains nothing and reports the same results, without
    # asking for its trials' resources (a --use-gpu sweep's rerun waited for GPUs) or
    # loading pretrained weights.
    import fer_ray.tuning as tuning

    def not_needed(*args, **kwargs):
        raise AssertionError("a finished sweep's rerun asked for resources or weights")

    monkeypatch.setattr(tuning, "check_resources", not_needed)
    monkeypatch.setattr(tuning, "load_pretrained", not_needed)
    stamps = {p: p.stat().st_mtime for p in (out / "trials").glob("*/ray_train/epoch_*")}
    assert tune_main(args) == 0
    monkeypatch.undo()
    again = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(again, results)
    assert {p: p.stat().st_mtime for p in (out / "trials").glob("*/ray_train/epoch_*")} == stamps
    assert {p.parent.name for p in (out / "trials").glob("*/ray_train")} == kept  # no pruned trial trained again
    # A pruned trial's folder is not trained in again (from scratch, over the model its row names).
    pruned = next(t for t in results["trial_id"] if t not in kept)
    capsys.readouterr()
    assert train_main(["--config", str(out / "trials" / pruned / "config.json")]) == 2
    assert "holds a finished run whose checkpoints were deleted" in capsys.readouterr().err
    # stopped_early is early stopping by --patience (3 epochs never trigger it), not ASHA's cut.
    assert not results["stopped_early"].any()
    # Another model cannot resume these trials' checkpoints: refused before any trial starts.
    capsys.readouterr()
    assert tune_main([*args, "--model", "resnet18"]) == 2
    assert "different settings (model 'test_resnet' -> 'resnet18')" in capsys.readouterr().err
    # A resumed sweep is restored with the search it began with: a changed one is refused
    # (a larger --num-samples used to leave the rerun exiting 130, "interrupted", forever).
    for flags, diff in [(["--num-samples", "4"], "num_samples 2 -> 4"),
                        (["--smoothing-range", "0", "0.2"], "smoothing_range [0.0, 0.3] -> [0.0, 0.2]"),
                        (["--epochs", "2"], "epochs 3 -> 2"), (["--max-concurrent", "1"], "max_concurrent 9 -> 1"),
                        (["--cpus-per-worker", "2"], "cpus_per_worker 1 -> 2"),
                        # and what the trials train with (sweep_config.json was rewritten with it)
                        (["--patience", "1"], "patience 6 -> 1"), (["--augment", "strong"], "augment 'medium' -> 'strong'"),
                        (["--amp", "bf16"], "amp 'auto' -> 'bf16'"),
                        # (its CPU format, timed once, was dropped from sweep_config.json)
                        (["--use-gpu"], "use_gpu False -> True"),
                        # and the blur validation matches (saved as measured: auto resumes)
                        (["--input-blur", "1.5"], "input_blur 0.0 -> 1.5")]:
        assert tune_main([*args, *flags]) == 2
        assert f"different settings ({diff})" in capsys.readouterr().err
    # Nor on shards prepared again into --data (its trials' val accuracies would not compare).
    manifest = (synth_shards / "manifest.json").read_text()
    changed = json.loads(manifest)
    changed["splits"]["val"]["total"] += 1
    try:
        (synth_shards / "manifest.json").write_text(json.dumps(changed))
        assert tune_main(args) == 2
    finally:
        (synth_shards / "manifest.json").write_text(manifest)
    assert "holds a sweep begun on other shards than" in capsys.readouterr().err


def test_asha_judges_a_trial_by_its_best_epoch_so_far() -> None:
    """A trial whose val accuracy peaked before a rung is judged on that peak, the number
    the sweep selects on: judged on its latest epoch, it was stopped below a worse trial."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from fer_ray.tuning import METRIC, asha

    scheduler = asha(epochs=8, grace_period=2)  # one rung, at epoch 2
    scheduler.set_search_properties(METRIC, "max")
    steady, peaked = SimpleNamespace(trial_id="steady"), SimpleNamespace(trial_id="peaked")

    def report(trial, epoch: int, val_acc: float, best: float) -> str:
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_acc": val_acc, "best_val_acc": best})

    for trial in (steady, peaked):
        scheduler.on_trial_add(None, trial)
    report(steady, 1, 0.45, 0.45)
    assert report(steady, 2, 0.45, 0.45) == TrialScheduler.CONTINUE
    report(peaked, 1, 0.60, 0.60)
    assert report(peaked, 2, 0.30, 0.60) == TrialScheduler.CONTINUE


def test_pruning_deletes_only_finished_non_best_trials_checkpoints(tmp_path, monkeypatch, caplog) -> None:
    from fer_ray import storage, tuning
    from fer_ray.trainer import has_checkpoint

    def trial(name: str, summary: bool = True) -> Path:
        folder = tmp_path / "trials" / name
        (folder / "ray_train" / "epoch_0001").mkdir(parents=True)
        (folder / "ray_train" / "checkpoint_manager_snapshot.json").write_text("{}")
        if summary:
            (folder / "summary.json").write_text("{}")
        return folder

    best, other, failed, unsummarised = trial("best"), trial("other"), trial("failed"), trial("old", summary=False)
    results = pd.DataFrame({"trial_id": ["best", "other", "failed", "old"],
                            "status": ["TERMINATED", "TERMINATED", "ERROR", "TERMINATED"]})
    tuning.prune_checkpoints(results, {"trial_id": "best"}, str(tmp_path))
    assert not (other / "ray_train").exists() and (other / "summary.json").exists()
    # The best trial's stay (it can be trained on), a failed one's too (a rerun resumes it),
    # and a trial without summary.json has nothing else to read its row from.
    assert all((t / "ray_train" / "epoch_0001").is_dir() for t in (best, failed, unsummarised))

    # A deletion that fails is a warning (the sweep's outputs are written), and the trial
    # no longer reads as having checkpoints: its row comes from summary.json on a rerun.
    other = trial("other")
    def fail(path):
        raise OSError("bucket says no")
    monkeypatch.setattr(storage, "delete_dir", fail)
    with caplog.at_level("WARNING", logger="fer_ray.tuning"):
        tuning.prune_checkpoints(results, {"trial_id": "best"}, str(tmp_path))
    assert "Could not delete the checkpoints" in caplog.text and "bucket says no" in caplog.text
    assert not has_checkpoint(str(other))


def test_the_best_trial_is_a_finished_one() -> None:
    """A trial that failed after some epochs has checkpoints but is not a result."""
    results = pd.DataFrame({"trial_id": ["a", "b", "c"], "best_val_acc": [0.6, 0.5, float("nan")],
                            "status": ["ERROR", "TERMINATED", "TERMINATED"]})
    assert best_trial(results)["trial_id"] == "b"
    assert best_trial(results.iloc[[0, 2]]) is None  # none finished: the job exits 1


def test_sweep_from_pretrained_weights_starts_every_trial_from_them(ray_cluster, synth_shards, tmp_path,
                                                                   monkeypatch, capsys) -> None:
    """The weights are fetched once, by the driver (counted here), and handed to the trials
    through the object store; the trial's backbone is the file's.

    Before it, the same sweep stopped once its Tuner was made (ray_tune/tuner.pkl written)
    but before Tune saved a state: Tune's restore found none and began the experiment again
    without the search space (not kept in tuner.pkl), every trial of every rerun failing on
    a missing 'lr'. (Here, not in a sweep of its own: each trial start costs seconds of CPU.)

    Its search is --searcher optuna (the dev extra installs Optuna): Tune's OptunaSearch,
    given the sweep's space, metric and seed, samples within the ranges given and the sweep
    ends with its outputs, a stop before the first trial and a rerun included."""
    import ray.tune
    import timm
    import torch

    from fer_ray import tuning

    weights, moved = tmp_path / "pretrained.pth", tmp_path / "moved.pth"
    fetched = []

    def fetch(*args, **kwargs):  # once read by the driver, the file is gone: a trial cannot read it
        fetched.append(args)
        state = load_pretrained(*args, **kwargs)
        if weights.exists():
            weights.rename(moved)
        return state

    load_pretrained = tuning.load_pretrained
    monkeypatch.setattr(tuning, "load_pretrained", fetch)

    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    out = tmp_path / "sweep"
    args = [*tiny_train_args(str(synth_shards), str(out), "--epochs", "1"), "--pretrained", "--pretrained-file",
            str(weights), "--freeze-epochs", "1", "--num-samples", "1", "--max-failures", "0",
            "--searcher", "optuna", "--lr-range", "1e-3", "2e-3", "--smoothing-range", "0.05", "0.1"]
    # A sweep that fails on its weights before Tune starts holds its folder to nothing: the
    # corrected rerun (another file, another --seed) was refused as "different settings".
    (tmp_path / "notes.pth").write_text("not weights")
    wrong = [a if a != str(weights) else str(tmp_path / "notes.pth") for a in args]
    assert tune_main([*wrong, "--seed", "5"]) == 2
    handler = signal.getsignal(signal.SIGINT)

    def stopped(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ray.tune.Tuner, "fit", stopped)
        assert tune_main(args) == 130
    assert (out / "ray_tune" / "tuner.pkl").exists() and not list((out / "ray_tune").glob("experiment_state*"))
    assert not tuning.can_resume(str(out / "ray_tune"))  # begun anew, not restored
    assert ("interrupted before any trial saved an epoch; rerun the same command to start the sweep from the "
            "beginning") in capsys.readouterr().err
    moved.rename(weights)  # (the driver read it: the file is back for the rerun's read)

    fetched.clear()
    assert tune_main(args) == 0, capsys.readouterr().err
    assert len(fetched) == 1 and moved.exists() and not weights.exists()
    # Tune's SIGINT handler (and fer_ray's watch around it) is gone: a later Ctrl-C stops as usual.
    assert signal.getsignal(signal.SIGINT) is handler
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 1 and (results["status"] == "TERMINATED").all(), results["error"].tolist()
    assert results["lr"].between(1e-3, 2e-3).all() and results["label_smoothing"].between(0.05, 0.1).all()
    assert json.loads((out / "sweep_config.json").read_text())["sweep"]["searcher"] == "optuna"
    # Only the head trained (--freeze-epochs 1): the backbone is the file's.
    model = load_model_dir(str(out / "best"))[0]
    head = model.pretrained_cfg["classifier"]
    trained, given = model.state_dict(), torch.load(moved)
    backbone = [k for k in given if not k.startswith(head + ".")]
    assert len(backbone) > 10
    for k in backbone:
        torch.testing.assert_close(trained[k], given[k])


def test_a_restored_sweep_is_given_its_search_space(tmp_path, monkeypatch) -> None:
    """Tune.restore with no param_space: a restore that finds no state Tune can read begins
    the experiment again, with no search space (tuner.pkl keeps its keys only)."""
    import argparse

    import ray.tune

    import fer_ray.tuning as tuning

    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", str(tmp_path), "--lr-range", "0.001", "0.01",
                                        "--smoothing-range", "0.05", "0.05", "--no-pretrained"], argparse.ArgumentParser())
    given = {}
    monkeypatch.setattr(tuning, "check_resumed_concurrency", lambda *args: None)
    monkeypatch.setattr(tuning, "open_gate", lambda places: None)
    monkeypatch.setattr(ray.tune.Tuner, "restore", staticmethod(lambda path, trainable, **kwargs: given.update(kwargs)))
    tuning.build_tuner(cfg, {"classes": ["a", "b"]}, None, {"CPU": 0.01}, 1, done=2, restoring=True)
    space = given["param_space"]
    assert (space["lr"].lower, space["lr"].upper, space["label_smoothing"]) == (0.001, 0.01, 0.05)
    assert given["resume_unfinished"] and given["resume_errored"]


def test_the_interrupt_watch_notes_every_signal_tune_stops_on(monkeypatch) -> None:
    """SIGUSR1 takes the SIGINT path above (Tune's handler wrapped by InterruptWatch): checked
    here without a sweep of its own."""
    from fer_ray import tuning

    assert set(tuning.STOP_SIGNALS) == {signal.SIGINT, signal.SIGUSR1}
    seen = []
    # Tune's handlers, as Tune installs them before it sets its callbacks up.
    monkeypatch.setattr(tuning.signal, "getsignal", lambda sig: lambda s, frame: seen.append(s))
    installed = {}
    monkeypatch.setattr(tuning.signal, "signal", installed.__setitem__)
    tuning.InterruptWatch().setup()
    assert installed.keys() == set(tuning.STOP_SIGNALS)
    tuning._INTERRUPTED.clear()
    installed[signal.SIGUSR1](signal.SIGUSR1, None)
    assert tuning._INTERRUPTED.is_set() and seen == [signal.SIGUSR1]  # noted, then Tune's handler ran
    tuning._INTERRUPTED.clear()


def test_failed_trials_are_recorded_not_fatal(ray_cluster, synth_shards, tmp_path, capsys, caplog) -> None:
    out = tmp_path / "failing"
    # Shards whose train files are not Parquet: every trial's training raises (the driver
    # reads only the manifest with --input-blur off; a batch too large is now refused there).
    shards = Path(shutil.copytree(synth_shards, tmp_path / "broken"))
    for f in (shards / "train").glob("*.parquet"):
        f.write_bytes(b"not a parquet file")
    base = sweep_args(str(shards), str(out), "--input-blur", "off", "--max-failures", "0")  # 2 trials
    # (a first sweep of one trial: each trial start, failing or not, costs seconds of CPU)
    assert tune_main([*base, "--num-samples", "1"]) == 1  # no trial finished: a script sees it
    printed = capsys.readouterr()
    assert "error: no trial finished" in printed.err
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 1 and (results["status"] == "ERROR").all()
    assert str(results["best_epoch"].dtype) == "Int64"  # whole epochs, none known here
    assert results["error"].str.contains("ArrowInvalid|Could not read schema").all()
    assert not (out / "best").exists()
    # Each failure's line names its error file in the sweep's folder (it named the copy in
    # Ray's session folder, which goes with the cluster).
    for trial_id in results["trial_id"]:
        error_file = out / "ray_tune" / trial_id / "error.txt"
        assert f"trial {trial_id} failed; its error is in {error_file}" in printed.out and error_file.is_file()
    # No trial saved an epoch: a rerun with other settings (2 trials, another weight decay)
    # starts the sweep again (it was refused as "different settings", and the same
    # settings ran the failed trials again).
    args = [*base, "--weight-decay", "0.002"]
    with caplog.at_level("INFO", logger="fer_ray.tuning"):
        assert tune_main(args) == 1
    assert "holds a sweep whose trials saved no epoch; it starts again with these settings" in caplog.text
    assert json.loads((out / "sweep_config.json").read_text())["optim"]["weight_decay"] == 0.002
    again = pd.read_parquet(out / "results.parquet").sort_values("trial_id")
    assert len(again) == 2 and (again["status"] == "ERROR").all()  # the new sweep's trials, not 3
    # Its first trial samples what the first sweep's did: random search is seeded by --seed.
    assert again["lr"].iloc[0] == results["lr"].iloc[0]
    assert again["label_smoothing"].iloc[0] == results["label_smoothing"].iloc[0]
    capsys.readouterr()

    # The data mended, the same command runs the failed trials again, as many at once as the
    # sweep began with (1): Tune put both back at once (its searcher limits only the trials it
    # creates), and on a cluster that held fewer their Train workers starved Ray Data.
    shutil.rmtree(shards / "train")
    shutil.copytree(synth_shards / "train", shards / "train")
    assert tune_main([*args, "--keep-checkpoints"]) == 0
    results = pd.read_parquet(out / "results.parquet")
    assert (results["status"] == "TERMINATED").all() and len(results) == 2
    # Each trial's start (its config.json, written once it passed the gate) and its last
    # report to Tune (its last epoch's, in whole seconds): the first ended before the second began.
    starts = sorted((trial / "config.json").stat().st_mtime for trial in (out / "trials").iterdir())
    ends = sorted(json.loads((out / "ray_tune" / trial.name / "result.json").read_text().splitlines()[-1])["timestamp"]
                  for trial in (out / "trials").iterdir())
    assert ends[0] <= starts[1] + 1, f"the second trial began before the first one ended: {starts}, {ends}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr-range", "0", "0.1"], "--lr-range must be two positive numbers"),
        (["--lr-range", "0.01", "0.001"], "--lr-range must be two positive numbers"),
        (["--smoothing-range", "0.1", "1.2"], "--smoothing-range must satisfy"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--lr-range", "1e-4", "1e-2", "--min-lr", "2e-4"], "--min-lr (0.0002), where the cosine ends, must "
                                                            "be below the lowest LR a trial may draw (0.0001)"),
        (["--pretrained", "--lr-range", "5e-6", "1e-3"], "below the backbone's fine-tuning LR, the lowest LR of "
                                                         "--lr-range x --backbone-lr-scale (5e-06 x 0.1 = 5e-07)"),
        (["--lr", "0.01"], "--lr is what the sweep samples for each trial; give its range with --lr-range LO HI."),
        (["--label-smoothing", "0.2"], "--label-smoothing is what the sweep samples"),
    ],
)
def test_bad_sweep_settings(synth_shards, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "bad"
    assert tune_main(sweep_args(str(synth_shards), str(out), *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_searcher_optuna_without_optuna_is_refused_before_ray_starts(synth_shards, tmp_path, capsys, monkeypatch) -> None:
    import sys

    import jobs.tune

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    monkeypatch.setattr(jobs.tune, "init_ray", lambda **_: pytest.fail("Ray was started"))
    out = tmp_path / "optuna"
    assert tune_main(sweep_args(str(synth_shards), str(out), "--searcher", "optuna")) == 2
    assert "--searcher optuna needs Optuna: `pip install optuna`" in capsys.readouterr().err
    assert not out.exists()


def test_help_leaves_out_what_the_sweep_samples(capsys) -> None:
    with pytest.raises(SystemExit):
        tune_main(["--help"])
    text = capsys.readouterr().out.split("\noptions:")[1]  # the flags (the docstring above names the two)
    assert "--lr-range" in text and "--smoothing-range" in text and "--lr-scaling" in text
    assert "--lr LR" not in text and "--label-smoothing" not in text


def test_unknown_flag_is_rejected(synth_shards, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tune_main(sweep_args(str(synth_shards), str(tmp_path / "x"), "--learning-rate", "0.1"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


def test_a_sweep_into_a_training_runs_folder_is_refused(synth_shards, tiny_run, tmp_path, capsys) -> None:
    """A sweep would write its trials and best/ into a training run's folder."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert tune_main(sweep_args(str(synth_shards), str(out))) == 2
    err = capsys.readouterr().err
    assert "holds a training run; give this sweep a folder of its own" in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_resumed_sweep_takes_the_default_lr_range_given_as_flags(synth_shards, tmp_path) -> None:
    """A sweep begun without --lr-range searched its optimizer's default range; the same
    range given as flags on the rerun was refused as a changed search (None -> [...])."""
    import argparse

    from fer_ray.config import ConfigError
    from fer_ray.trainer import _check_resume_compatible

    def cfg(*extra: str) -> SweepConfig:
        return parse_config(SweepConfig, sweep_args(str(synth_shards), str(tmp_path / "s"), *extra),
                            argparse.ArgumentParser())[0].resolve_defaults()

    begun = json.loads(json.dumps(to_dict(cfg())))  # as sweep_config.json holds it
    _check_resume_compatible(cfg("--lr-range", "1e-4", "3e-3"), begun)  # AdamW's default range
    with pytest.raises(ConfigError, match=r"lr_range \[0.0001, 0.003\] -> \[0.0001, 0.01\]"):
        _check_resume_compatible(cfg("--lr-range", "1e-4", "1e-2"), begun)
    # A setting begun unset is named as the default, not as None.
    assert begun["data"]["data_size"] is None
    with pytest.raises(ConfigError, match=r"\(data_size default -> 32\)"):
        _check_resume_compatible(cfg("--data-size", "32"), begun)
    # A sweep from before --blur-jitter existed trained without it: its trials left to run
    # would train with it, their scores compared with the finished ones'.
    del begun["data"]["blur_jitter"]
    _check_resume_compatible(cfg(), begun)
    with pytest.raises(ConfigError, match=r"blur_jitter 0.0 -> 0.5"):
        _check_resume_compatible(cfg("--blur-jitter", "0.5"), begun)
    # And before --clip-grad: without clipping.
    del begun["optim"]["clip_grad"]
    _check_resume_compatible(cfg(), begun)
    with pytest.raises(ConfigError, match=r"clip_grad 0.0 -> 1.0"):
        _check_resume_compatible(cfg("--clip-grad", "1"), begun)


@pytest.mark.parametrize("epochs, grace, rungs, frozen", [
    (8, 2, [2], 0), (20, 2, [8, 2], 0), (2, 1, [1], 0), (2, 2, None, 0),
    # A pretrained backbone's frozen epochs come before the grace period: the default rung
    # at epoch 2 judged trials with only their heads trained.
    (20, 2, [16, 4], 2), (4, 2, None, 2),
])
def test_asha_never_stops_a_trial_at_its_last_epoch(epochs, grace, rungs, frozen) -> None:
    """Stopped at its last report, a trial's TorchTrainer is killed before it releases its
    workers (ray-project/ray#54305). With max_t one past the last epoch, ASHA had a rung
    at the last epoch whenever epochs was grace x 4^k (8 for the default grace of 2)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from fer_ray.tuning import asha

    scheduler = asha(epochs, grace, frozen)
    if rungs is None:  # no epoch between the grace period and the end: nothing to stop
        assert scheduler is None
        return
    scheduler.set_search_properties("val_acc", "max")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    actions = {}
    for i, trial in enumerate(trials):
        for epoch in range(1, epochs + 1):
            # t3 is the best until the last epoch, where it is by far the worst
            acc = (0.9 if epoch < epochs else 0.1) if i == 3 else 0.5 + 0.01 * i
            actions[trial.trial_id, epoch] = scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_acc": acc})
    assert actions["t3", epochs] == TrialScheduler.CONTINUE
    assert sorted({m for bracket in scheduler._brackets for m, _ in bracket._rungs}, reverse=True) == rungs


def test_asha_lets_a_trials_last_report_pass_wherever_its_plan_ends() -> None:
    """A trial's time budget (or early stopping) can end it at one of ASHA's rungs, below
    max_t: stopped at that last report, its TorchTrainer would be killed before it releases
    its workers. The loop marks its last report; ASHA lets it pass (and records the rung)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from fer_ray.tuning import LAST_REPORT, METRIC, asha

    scheduler = asha(epochs=20, grace_period=2)  # rungs at 2 and 8
    scheduler.set_search_properties(METRIC, "max")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(5)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    for trial, acc in zip(trials[:3], (0.9, 0.8, 0.7)):
        scheduler.on_trial_result(None, trial, {"epoch": 2, METRIC: acc})
    weak = {"epoch": 2, METRIC: 0.1}
    assert scheduler.on_trial_result(None, trials[3], {**weak, LAST_REPORT: False}) == TrialScheduler.STOP
    stopped = scheduler._num_stopped
    assert scheduler.on_trial_result(None, trials[4], {**weak, LAST_REPORT: True}) == TrialScheduler.CONTINUE
    assert scheduler._num_stopped == stopped  # its count of stopped trials, as Tune prints it


def test_sweep_plot_ticks_label_the_learning_rates_without_crowding() -> None:
    """Within one decade matplotlib labelled every minor tick of the log axis, and the
    labels ran into each other ("3x10^-4 4x10^-4")."""
    from fer_ray.reports import lr_ticks

    assert lr_ticks(1e-4, 3e-3) == pytest.approx([1e-4, 2e-4, 5e-4, 1e-3, 2e-3])
    assert lr_ticks(1e-5, 5e-2) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])  # decades only: 9 were too many
    assert lr_ticks(1.6e-4, 4.4e-4) == pytest.approx([1.6e-4, 2e-4, 4.4e-4])  # the ends when one falls inside
    assert lr_ticks(3e-4, 3e-4) == pytest.approx([3e-4])
    # Close ends: rounded to 2 digits they were one tick (0.0013) outside the data, no label
    # on the axis; now the ends themselves, written with the digits that tell them apart.
    from fer_ray.reports import tick_labels

    ticks = lr_ticks(1.2613e-3, 1.2681e-3)
    assert ticks == pytest.approx([1.2613e-3, 1.2681e-3])
    assert [tick_labels(ticks)(t, None) for t in ticks] == ["0.00126", "0.00127"]
    assert [tick_labels([1.6e-4, 2e-4])(t, None) for t in (1.6e-4, 2e-4)] == ["0.00016", "0.0002"]
    assert lr_ticks(1.95e-4, 4.4e-4) == pytest.approx([2e-4, 4.4e-4])  # an end beside a tick: the tick


def test_sweep_plot_rings_the_best_finished_trial_and_marks_failed_ones(tmp_path, monkeypatch) -> None:
    """The ring went to the highest accuracy of any trial, a failed one included (best/
    holds the best finished trial); failed trials were not shown, and with none finished
    the LR axis ran 1-10 whatever was searched."""
    import fer_ray.reports as reports

    figures = []
    monkeypatch.setattr(reports.plt, "close", figures.append)
    results = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "lr": [1e-4, 5e-4, 2e-3, 3e-3], "label_smoothing": [0.1, 0.2, 0.0, 0.3],
        "best_val_acc": [0.40, 0.45, 0.60, float("nan")], "status": ["TERMINATED", "TERMINATED", "ERROR", "ERROR"],
    })
    reports.plot_sweep(results, {}, tmp_path / "sweep.png")
    left = figures[-1].axes[0]
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert labels == ["best 0.450 (trial b)", "failed (2)"]
    assert left.get_title() == "2 of 4 trials finished, 2 failed"

    reports.plot_sweep(results.assign(status="ERROR"), {}, tmp_path / "none.png")
    left = figures[-1].axes[0]
    assert left.get_title() == "0 of 4 trials finished, 4 failed"
    assert 1e-5 < left.get_xlim()[0] and left.get_xlim()[1] < 1e-1  # around the LRs searched, not 1-10
    assert (tmp_path / "none.png").stat().st_size > 0


def test_a_resumed_sweep_keeps_the_resources_its_trials_began_with(tmp_path, monkeypatch) -> None:
    """Tune restores each trial with the resources it was created with: a sweep begun on
    cluster.yaml's head slots, resumed on a Ray without them, waited forever."""
    import ray

    from fer_ray import tuning
    from fer_ray.config import ConfigError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    began = {"resolved": {"trial_resources": {tuning.TRIAL_SLOT: 1}}}
    assert tuning.sweep_trial_resources(str(tmp_path), began, False) == {"CPU": tuning.TRIAL_DRIVER_CPU}  # a new sweep
    assert tuning.sweep_trial_resources(str(tmp_path), {}, True) == {"CPU": tuning.TRIAL_DRIVER_CPU}  # no record: before it
    with pytest.raises(ConfigError, match="began on a cluster whose head holds fer_ray_trial resources"):
        tuning.sweep_trial_resources(str(tmp_path), began, True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0, tuning.TRIAL_SLOT: 1000.0})
    assert tuning.sweep_trial_resources(str(tmp_path), began, True) == {tuning.TRIAL_SLOT: 1}


def test_a_sweep_resumes_only_where_its_trials_fit_at_once(monkeypatch) -> None:
    """Tune restores a sweep's search with the trials it ran at once: resumed where fewer
    fit (a smaller machine, or more CPUs per worker), every trial's workers and Ray Data
    tasks waited on each other with no message."""
    import argparse

    import ray

    from fer_ray import tuning
    from fer_ray.config import ConfigError
    from fer_ray.trainer import SWEEP_RESUME_KEYS

    resources = {"CPU": 8}
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", "o", "--num-samples", "8"],
                          argparse.ArgumentParser())
    assert tuning.cluster_capacity(cfg) == 4  # 1 worker CPU + 1 for Ray Data each
    tuning.check_resumed_concurrency(cfg, "o", 4, 8)
    tuning.check_resumed_concurrency(cfg, "o", None, 8)  # a sweep from before the record
    with pytest.raises(ConfigError, match=r"began running 6 trials at once, .* this cluster holds 4 of them "
                                          r"\(each takes its workers' CPUs and one for Ray Data\)"):
        tuning.check_resumed_concurrency(cfg, "o", 6, 8)
    tuning.check_resumed_concurrency(cfg, "o", 6, 3)  # 3 trials left: they fit
    # With GPUs, the trials beyond them wait for one holding no CPU: only those the GPUs
    # hold must fit the CPUs.
    resources = {"CPU": 8, "GPU": 2}
    cfg.run.use_gpu = True
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: {"CPU": 8, "GPU": 2})
    tuning.check_resumed_concurrency(cfg, "o", 6, 8)
    resources = {"CPU": 3, "GPU": 2}  # 1 trial's CPUs, 2 trials' GPUs
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: {"CPU": 3, "GPU": 2})
    with pytest.raises(ConfigError, match="this cluster holds 1 of them \\(each takes its workers' CPUs"):
        tuning.check_resumed_concurrency(cfg, "o", 6, 8)
    # The head's trial slots, where fewer, are the limit: they are named (it said "CPUs").
    resources = {"CPU": 48, "fer_ray_trial": 3}
    cfg.run.use_gpu = False
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: None)
    with pytest.raises(ConfigError, match="this cluster holds 3 of them \\(each takes one of the head's fer_ray_trial slots\)"):
        tuning.check_resumed_concurrency(cfg, "o", 6, 8)
    # --cpus-per-worker sets how many fit: a resumed sweep keeps the one it began with.
    assert "cpus_per_worker" in SWEEP_RESUME_KEYS


@pytest.mark.parametrize("resources, use_gpu, why", [
    ({"CPU": 8}, False, "each takes its workers' CPUs and one for Ray Data"),
    ({"CPU": 48, "GPU": 4}, True, "each takes a GPU per Train worker"),
    ({"CPU": 48, "fer_ray_trial": 3}, False, "each takes one of the head's fer_ray_trial slots"),
])
def test_the_concurrency_warning_names_the_limit_that_holds_trials_back(monkeypatch, resources, use_gpu, why) -> None:
    """--max-concurrent above what the cluster holds was always put down to its CPUs, also
    where its GPUs or the head's trial slots were the limit."""
    import argparse

    import ray

    from fer_ray import tuning
    from fer_ray.config import SweepConfig, parse_config

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: None)
    flags = ["--data", "d", "--output", "o", "--num-samples", "8"] + (["--use-gpu"] if use_gpu else [])
    cfg, _ = parse_config(SweepConfig, flags, argparse.ArgumentParser())
    assert tuning._fits_and_why(cfg)[3] == why
    assert tuning.cluster_capacity(cfg) == {"CPU": 4, "GPU": 4, "fer_ray_trial": 3}[list(resources)[-1]]


def test_trials_that_diverged_before_saving_an_epoch_are_said_so(ray_cluster, synth_shards, tmp_path,
                                                                 capsys, monkeypatch) -> None:
    """A trial that diverged in its first epoch is an error that says so (collect_results);
    the job counted those among the failed ("no trial finished; each trial's error is in
    ..."), and took trials that ended without an epoch and without an error for diverged."""
    import fer_ray.tuning as tuning
    from fer_ray.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged) as diverged:  # the trial's error, as collect_results records it
        from fer_ray.trainer import finalize_run

        class Diverged:
            checkpoint = object()

            def get_best_checkpoint(self, **kwargs):
                return None

        finalize_run(Diverged(), "run", ["a", "b"], state={"diverged": True, "best_epoch": 0, "epoch": 1})
    rows = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "status": ["ERROR", "ERROR", "ERROR", "TERMINATED"],
                         "error": [str(diverged.value), str(diverged.value), "boom", None]})
    for kept, said in [(["a", "b", "c"], "2 diverged in their first epoch (a lower --lr-range?) and 1 failed; "),
                       (["a", "d"], "1 diverged in their first epoch (a lower --lr-range?) and 1 ended without one; "),
                       (["d"], "1 ended without one; ")]:
        monkeypatch.setattr(tuning, "sweep", lambda cfg, manifest: (rows[rows["trial_id"].isin(kept)], None))
        assert tune_main(sweep_args(str(synth_shards), str(tmp_path / "s"))) == 1
        err = capsys.readouterr().err
        assert f"error: no trial kept an epoch: {said}the trials are in" in err, err
    monkeypatch.setattr(tuning, "sweep", lambda cfg, manifest: (rows[rows["trial_id"] == "c"], None))
    assert tune_main(sweep_args(str(synth_shards), str(tmp_path / "s"))) == 1
    assert "error: no trial finished; each trial's error is in" in capsys.readouterr().err


def test_the_trial_gate_lets_as_many_trials_in_as_it_has_places() -> None:
    from fer_ray.gate import TrialGate

    gate = TrialGate(2)
    assert gate.enter("a") and gate.enter("b") and not gate.enter("c")
    assert gate.enter("a")  # (a trial asking again holds its place)
    gate.leave("a")
    gate.leave("a")  # (the trial's own leave and the driver's: once)
    assert gate.enter("c") and not gate.enter("d")
    # Its actor's process imports no model code: defined in fer_ray.tuning, it imported timm,
    # scikit-learn and the rest first (~5 s of CPU beside every sweep's first trial).
    assert modules_unpickling_imports(TrialGate) == []


def test_a_trial_stopped_without_a_word_gives_its_place_back_through_the_sweeps_callback(ray_cluster,
                                                                                         capsys) -> None:
    """Tune ends an ASHA-stopped trial's actor without running its code to the end: its
    place is given back by TrialLine, which finds the gate by name (Tune runs the callbacks,
    pickled with the sweep, in another process under Ray Client)."""
    import pickle
    from types import SimpleNamespace

    import ray

    from fer_ray.tuning import TrialLine, _named_gate, close_gate, open_gate

    gate = open_gate(1)
    try:
        assert ray.get(gate.enter.remote("a")) and not ray.get(gate.enter.remote("b"))
        line = pickle.loads(pickle.dumps(TrialLine(2, "/tmp/sweep")))  # (as Tune restores it)
        line.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"epoch": 1, "best_epoch": 1,
                                                                                 "best_val_acc": 0.5},
                                                      config={"lr": 0.01, "label_smoothing": 0.1}))
        assert ray.get(gate.enter.remote("b")) and not ray.get(gate.enter.remote("c"))
        line.on_trial_error(0, [], SimpleNamespace(trial_id="b"))
        assert ray.get(gate.enter.remote("c"))
    finally:
        close_gate()
    assert _named_gate() is None
    assert "trial a done" in capsys.readouterr().out


def test_a_trials_line_tells_a_stopped_trial_from_one_its_time_budget_cut(monkeypatch, capsys) -> None:
    """A trial that ran every epoch its --time-budget fitted was "stopped after 12 of 40
    epochs", as an ASHA-stopped trial is."""
    from types import SimpleNamespace

    import fer_ray.tuning as tuning

    monkeypatch.setattr(tuning, "_leave_gate", lambda trial_id: None)
    line = tuning.TrialLine(40, "/tmp/sweep")
    # Its last report: the plan (fitted again after the epoch, so not the row's planned_epochs)
    # ran out; ASHA's stopped trials end on a report that is not their last; early stopping.
    for ran, last, early in ((12, True, False), (5, False, False), (5, True, True), (40, True, False)):
        result = {"epoch": ran, "best_epoch": ran, "best_val_acc": 0.5, "val_acc": 0.5, "planned_epochs": 13,
                  "last_report": last, "stopped_early": early}
        line.on_trial_complete(0, [], SimpleNamespace(trial_id=f"t{ran}_{last}", last_result=result,
                                                      config={"lr": 0.01, "label_smoothing": 0.1}))
    # Diverged after a kept epoch: its last report, its val accuracy not a number.
    result = {"epoch": 3, "best_epoch": 2, "best_val_acc": 0.5, "val_acc": float("nan"), "last_report": True,
              "stopped_early": False}
    line.on_trial_complete(0, [], SimpleNamespace(trial_id="nan", last_result=result,
                                                  config={"lr": 0.01, "label_smoothing": 0.1}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("at epoch 12 (its --time-budget fitted 12 of 40 epochs)")
    assert lines[1].endswith("at epoch 5 (stopped after 5 of 40 epochs)")
    assert lines[2].endswith("at epoch 5 (stopped after 5 of 40 epochs)")
    assert lines[3].endswith("at epoch 40")
    assert lines[4].endswith("at epoch 2 (stopped after 3 of 40 epochs)")


def test_a_sweep_that_saved_nothing_starts_again_with_another_input_blur(tmp_path, caplog) -> None:
    """Only --input-blur changed on a sweep none of whose trials saved an epoch: it was
    refused ("different settings"), where any other change started it again."""
    import fer_ray.tuning as tuning
    from fer_ray.config import ConfigError

    out = tmp_path / "s"
    (out / "trials" / "t1").mkdir(parents=True)
    (out / "sweep_config.json").write_text(json.dumps({"data": {"input_blur": "0.0"}}))
    with caplog.at_level("INFO", logger="fer_ray.tuning"):
        assert tuning.check_resumed_blur(str(out), "1.5") is True
    assert "holds a sweep whose trials saved no epoch; it starts again" in caplog.text
    assert not (out / "sweep_config.json").exists() and not (out / "trials").exists()
    # A sweep with a saved epoch is still held to its blur; the same blur resumes.
    (out / "trials" / "t1").mkdir(parents=True)
    (out / "trials" / "t1" / "summary.json").write_text("{}")
    (out / "sweep_config.json").write_text(json.dumps({"data": {"input_blur": "0.0"}}))
    assert tuning.check_resumed_blur(str(out), "0.0") is False
    with pytest.raises(ConfigError, match=r"different settings \(input_blur 0.0 -> 1.5\)"):
        tuning.check_resumed_blur(str(out), "1.5")


def test_a_resumed_sweep_refused_for_its_blur_is_refused_before_any_wait_for_gpus(tmp_path, monkeypatch) -> None:
    """A --use-gpu sweep resumed with another validation blur asked the autoscaler for GPU
    nodes and waited for them (up to FER_RAY_GPU_WAIT_S) before the refusal it could give
    at once, as a training run gives it."""
    import argparse
    import types

    import fer_ray.tuning as tuning
    from fer_ray.config import ConfigError

    out = tmp_path / "s"
    (out / "trials" / "t1").mkdir(parents=True)
    (out / "trials" / "t1" / "summary.json").write_text("{}")  # an epoch saved: held to its blur
    (out / "sweep_config.json").write_text(json.dumps({"data": {"input_blur": "0.0"}}))
    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", str(out), "--use-gpu", "--num-samples", "2"],
                          argparse.ArgumentParser())
    monkeypatch.setattr(tuning, "finished_trials", lambda tune_dir, resuming: 0)
    monkeypatch.setattr(tuning, "sweep_trial_resources", lambda tune_dir, begun, resuming: {"CPU": 0.01})
    monkeypatch.setattr(tuning, "resolve_settings",
                        lambda cfg, manifest: types.SimpleNamespace(spec=types.SimpleNamespace(input_blur=1.5)))

    def waits_for_gpus(*args, **kwargs):
        raise AssertionError("waited for GPUs")

    monkeypatch.setattr(tuning, "check_resources", waits_for_gpus)
    with pytest.raises(ConfigError, match=r"different settings \(input_blur 0.0 -> 1.5\)"):
        tuning.sweep(cfg, {"classes": ["a", "b"]})

    # A new sweep checks the cluster first, as a training run does (the blur is measured
    # on the data, a model built to probe it: work for a sweep the cluster cannot hold).
    def too_small(*args, **kwargs):
        raise ConfigError("no GPUs")

    def measured(*args, **kwargs):
        raise AssertionError("measured first")

    monkeypatch.setattr(tuning, "check_resources", too_small)
    monkeypatch.setattr(tuning, "resolve_settings", measured)
    cfg.run.output = str(tmp_path / "new")
    with pytest.raises(ConfigError, match="no GPUs"):
        tuning.sweep(cfg, {"classes": ["a", "b"]})


def test_sweep_outputs_cut_short_leave_no_best_config_of_another_trial(tmp_path, monkeypatch) -> None:
    """A rerun whose outputs were cut short (Ctrl-C once fit() returned) left the earlier
    best trial's best_config.json beside the new best trial's best/ (or no best/)."""
    import fer_ray.reports as reports
    import fer_ray.tuning as tuning

    out = tmp_path / "sweep"
    trial = out / "trials" / "t1"
    (trial / "best").mkdir(parents=True)
    (trial / "best" / "model.safetensors").write_bytes(b"w")
    (trial / "config.json").write_text(json.dumps({"optim": {"lr": 0.001}, "run": {"output": str(trial)}}))
    (out / "best_config.json").write_text(json.dumps({"trial": {"trial_id": "t0"}}))  # the run before
    results = pd.DataFrame({"trial_id": ["t1"], "lr": [0.001], "label_smoothing": [0.1],
                            "best_val_acc": [0.5], "status": ["TERMINATED"]})

    def stopped(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(reports, "plot_sweep", stopped)
        with pytest.raises(KeyboardInterrupt):
            tuning.write_outputs(results, str(out))
    assert not (out / "best_config.json").exists()

    tuning.write_outputs(results, str(out))
    assert json.loads((out / "best_config.json").read_text())["trial"]["trial_id"] == "t1"
    assert (out / "best" / "model.safetensors").read_bytes() == b"w"


def test_a_trial_takes_the_drivers_ray_address(monkeypatch) -> None:
    """Ray sets RAY_ADDRESS for the driver only: a trial's process took itself for a Ray of
    its own (cli.on_cluster) and read no autoscaler limits when cutting its training data."""
    from fer_ray.cli import on_cluster
    from fer_ray.tuning import adopt_driver_address

    monkeypatch.setenv("RAY_ADDRESS", "placeholder")  # (so that the teardown removes what the test sets)
    monkeypatch.delenv("RAY_ADDRESS")
    adopt_driver_address(None)  # a driver on a Ray of its own
    assert not on_cluster()
    adopt_driver_address("http://10.0.0.1:8265")
    assert on_cluster() and os.environ["RAY_ADDRESS"] == "http://10.0.0.1:8265"
    adopt_driver_address("auto")  # a process's own is kept
    assert os.environ["RAY_ADDRESS"] == "http://10.0.0.1:8265"


def test_the_sweep_hands_its_ray_address_to_every_trial(tmp_path, monkeypatch) -> None:
    """The wiring of the above: the driver's RAY_ADDRESS goes into the trainable's
    parameters, and a trial adopts it before anything else."""
    import argparse
    from types import SimpleNamespace

    import ray.tune

    import fer_ray.tuning as tuning

    cfg, _ = parse_config(SweepConfig, ["--data", "d", "--output", str(tmp_path), "--no-pretrained"],
                          argparse.ArgumentParser())
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    handed = {}
    monkeypatch.setattr(tuning, "open_gate", lambda places: None)
    monkeypatch.setattr(ray.tune, "with_parameters", lambda trainable, **kwargs: handed.update(kwargs) or trainable)
    monkeypatch.setattr(ray.tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tuning, "cluster_capacity", lambda cfg: 1)
    monkeypatch.setattr(ray.tune, "Tuner", lambda *args, **kwargs: None)
    tuning.build_tuner(cfg, {"classes": ["a", "b"]}, None, {"CPU": 0.01}, None, done=cfg.sweep.num_samples,
                       restoring=False)
    assert handed["ray_address"] == "http://10.0.0.1:8265"

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(tuning, "trial_config", lambda *args: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        tuning.run_trial({"lr": 0.01, "label_smoothing": 0.1}, {}, {}, str(tmp_path), None,
                         ray_address=handed["ray_address"])
    assert os.environ["RAY_ADDRESS"] == "http://10.0.0.1:8265"


def test_a_resumed_sweep_refuses_another_cpu_format(monkeypatch) -> None:
    """A sweep from before --cpu-format (its timed format only under `resolved`) resumed
    with another: its trials trained in the recorded one while saying "as --cpu-format
    gives it", and sweep_config.json then recorded the format never applied. Refused with
    the other settings (so a sweep that saved nothing starts again instead, check_inputs)."""
    import argparse

    from fer_ray.config import ConfigError, SweepConfig, parse_config
    import fer_ray.tuning as tuning
    from fer_ray.trainer import _check_resume_compatible
    from fer_ray.tuning import sweep_cpu_format

    def cfg(*flags):
        return parse_config(SweepConfig, ["--data", "d", "--output", "o", *flags], argparse.ArgumentParser())[0]

    begun = {"run": {"amp": "auto"}, "resolved": {"cpu_format": "fp32+channels_last"}}  # (no run.cpu_format)
    with pytest.raises(ConfigError, match=r"different settings \(cpu_format 'fp32\+channels_last' -> 'bf16'\)"):
        _check_resume_compatible(cfg("--cpu-format", "bf16"), begun)
    _check_resume_compatible(cfg("--cpu-format", "fp32+channels_last"), begun)
    _check_resume_compatible(cfg(), begun)
    monkeypatch.setattr(tuning, "timed_cpu_format", lambda *args: (_ for _ in ()).throw(AssertionError("timed")))
    assert sweep_cpu_format(cfg("--cpu-format", "fp32+channels_last"), None, begun) == "fp32+channels_last"
    assert sweep_cpu_format(cfg(), None, begun) == "fp32+channels_last"
    assert sweep_cpu_format(cfg("--cpu-format", "bf16"), None, {}) == "bf16"  # given: not timed
    assert sweep_cpu_format(cfg("--amp", "off", "--cpu-format", "bf16"), None, {}) is None
