"""Several workers (DDP over gloo), storage URIs, surviving a killed worker, GPU checks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pandas as pd
import pytest
import torch

from conftest import tiny_train_args
from jobs.train import main as train_main

CHECKPOINT_FILES = {"model.safetensors", "config.json", "train_state.pt", "val_predictions.parquet"}


def _alive_train_workers() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in actors]


def test_two_workers_with_file_uris_resume_from_the_last_checkpoint_after_one_is_killed(ray_cluster, synth_shards,
                                                                                       tmp_path) -> None:
    """Two DDP workers through both phases: a frozen-backbone epoch, then the model wrapped
    again with every parameter training. One of them is killed mid-run (SIGKILL, as a node
    lost): the worker group starts again from the last registered checkpoint, nothing
    missing, nothing repeated. One run for both (each costs seconds of start here)."""
    import timm

    from conftest import TINY_MODEL

    weights = tmp_path / "pretrained.pth"
    torch.save(timm.create_model(TINY_MODEL).state_dict(), weights)
    out = tmp_path / "ddp"
    args = tiny_train_args(f"file://{synth_shards}", f"file://{out}", "--num-workers", "2",
                           "--epochs", "4", "--lr", "0.001", "--pretrained", "--pretrained-file", str(weights),
                           "--freeze-epochs", "1", "--patience", "5")
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.update(code=train_main(args)))
    runner.start()

    # Wait until Ray has registered epoch 1's checkpoint (its snapshot names it), not just
    # until the files exist: a worker killed between the two loses that report.
    # The workers are found while epoch 1 runs: asked of the State API after the snapshot, a
    # round trip through the dashboard on a loaded machine, the run could end first.
    snapshot = out / "ray_train" / "checkpoint_manager_snapshot.json"
    deadline, pids = time.time() + 300, []
    while time.time() < deadline and runner.is_alive():
        if len(pids) == 2 and snapshot.exists() and "epoch_0001" in snapshot.read_text():
            break
        pids = pids if len(pids) == 2 else _alive_train_workers()
        time.sleep(0.2)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # mid-run: during epoch 2
    first = out / "ray_train" / "epoch_0001" / "train_state.pt"
    epoch1 = torch.load(first, weights_only=True)["state"]["history"][0]
    # The worker group is started again (without this, every check below would also hold for
    # a kill that did nothing).
    replaced, deadline = set(), time.time() + 600
    while runner.is_alive() and not replaced and time.time() < deadline:
        replaced = set(_alive_train_workers()) - set(pids)
        time.sleep(0.5)

    runner.join(timeout=600)
    assert replaced, "no new Train worker came up after the kill"
    assert result.get("code") == 0
    assert _alive_train_workers() == []

    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["global_batch"] == 32  # 16 per worker x 2 workers
    assert resolved["effective_lr"] == pytest.approx(0.002)  # linear scaling rule
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # nothing missing, nothing repeated
    assert history.iloc[0]["val_acc"] == pytest.approx(epoch1["val_acc"])  # epoch 1 was not redone
    assert history.iloc[0]["seconds"] == pytest.approx(epoch1["seconds"])
    assert history["steps"].tolist() == [(280 // 2) // 16] * 4  # each worker: its half, full batches
    assert history["phase"].tolist() == ["head", "finetune", "finetune", "finetune"]
    metrics = pd.read_parquet(out / "val_metrics.parquet").set_index("name")
    assert metrics.loc["accuracy", "support"] == 70  # val reduced over both workers, every image once
    checkpoints = list((out / "ray_train").glob("epoch_*"))
    assert 1 <= len(checkpoints) <= 2
    assert all({p.name for p in c.iterdir()} == CHECKPOINT_FILES for c in checkpoints)  # rank 0 alone writes
    assert (out / "best" / "model.safetensors").exists()


def test_use_gpu_without_gpus_fails_at_once(ray_cluster, synth_shards, tmp_path, capsys) -> None:
    start = time.time()
    assert train_main(tiny_train_args(str(synth_shards), str(tmp_path / "gpu"), "--use-gpu")) == 2
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert "--use-gpu needs 1 GPU(s) but the Ray cluster has 0" in err
