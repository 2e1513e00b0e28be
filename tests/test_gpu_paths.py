"""The parts of the GPU and multi-worker paths that a CPU machine can check: where a
GPU run's checkpoint is read, which precision a GPU gets, the autoscaler request for GPU
nodes, and what several workers must agree on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fer_ray.train_loop as tl
from fer_ray import cli
from fer_ray.config import ConfigError
from fer_ray.constants import TRAIN_STATE_FILE
from fer_ray.model import cuda_amp_dtype

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA, as a cluster's head node")
def test_train_state_saved_by_a_gpu_worker_loads_on_a_driver_without_one(tmp_path, monkeypatch) -> None:
    """A GPU worker's checkpoint holds its optimizer's tensors on the GPU; the job's driver
    (a cluster's CPU head node) reads the history from it after the run."""
    import torch.serialization as ser

    with monkeypatch.context() as m:  # tensors saved as a GPU worker saves them
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        torch.save({"state": {"history": [{"epoch": 1}]}, "optimizer": {"exp_avg": torch.ones(3)}},
                   tmp_path / TRAIN_STATE_FILE)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
        torch.load(tmp_path / TRAIN_STATE_FILE, weights_only=True)

    state = tl.load_train_state(str(tmp_path))

    assert state["state"]["history"] == [{"epoch": 1}]
    assert state["optimizer"]["exp_avg"].device.type == "cpu"


def test_gpus_with_only_emulated_bf16_train_and_score_in_fp16(monkeypatch) -> None:
    # torch says bf16 is supported on a T4 or V100 unless emulation is ruled out.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert cuda_amp_dtype() is torch.float16
    assert tl.resolve_amp("auto", torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert cuda_amp_dtype() is torch.bfloat16
    assert tl.resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert tl.resolve_amp("auto", torch.device("cpu")) is None  # timed per CPU instead


@pytest.mark.parametrize("gpus_come", [True, False])
def test_the_request_for_gpu_nodes_is_withdrawn_after_the_wait(monkeypatch, gpus_come) -> None:
    """A standing request keeps the autoscaler's GPU nodes up past their idle timeout."""
    import ray
    import ray.autoscaler.sdk as sdk

    calls = []
    monkeypatch.setattr(sdk, "request_resources", lambda **kwargs: calls.append(kwargs))
    polls = iter([0, 0, 2 if gpus_come else 0] + [0] * 10_000)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": next(polls)})
    monkeypatch.setattr(cli, "GPU_POLL_S", 0.001)

    if gpus_come:
        cli.require_gpus(2, wait_s=30)
    else:
        with pytest.raises(ConfigError, match="needs 2 GPU"):
            cli.require_gpus(2, wait_s=0.05)

    ask = {"bundles": [{"GPU": 1}, {"GPU": 1}]}
    # Asked for at every look while short (Ray Data's coordinator replaces requests every
    # 20 s), then withdrawn.
    assert calls[-1] == {} and all(c == ask for c in calls[:-1])
    assert len(calls) == 3 if gpus_come else len(calls) > 3  # first, after the poll that found 0, last


def test_the_cluster_ceiling_is_read_from_the_config_ray_up_leaves_on_the_head(monkeypatch, tmp_path) -> None:
    """Ray 2.60's `ray up` autoscaler does not publish its config to the GCS."""
    from ray._private.state import state

    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)
    monkeypatch.setattr(cli, "BOOTSTRAP_CONFIG", str(REPO / "cluster.yaml"))  # what ray up copies there
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    # head once (CPU 0), up to 4 GPU workers (CPU 4, GPU 1) and 2 CPU workers (CPU 16)
    assert cli.autoscaler_limits() == {"CPU": 48, "GPU": 4, "fer_ray_trial": 8}  # (and the head's trial slots)
    monkeypatch.delenv("RAY_ADDRESS")  # a local Ray: no ceiling, whatever files lie around
    assert cli.autoscaler_limits() is None
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a Ray of the job's own too
    assert cli.autoscaler_limits() is None
    assert cli.bootstrap_limits(str(tmp_path / "missing.yaml")) is None
    (tmp_path / "bad.yaml").write_text("available_node_types: [1, 2]\n")
    assert cli.bootstrap_limits(str(tmp_path / "bad.yaml")) is None
    # The cluster's max_workers bounds all worker nodes together: 8 GPU nodes allowed by
    # their type, 6 by the cluster (the --use-gpu refusal advises raising the type's).
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = 8
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(config))
    assert config["max_workers"] == 6
    assert cli.bootstrap_limits(str(tmp_path / "wider.yaml")) == {"CPU": 2 * 16 + 4 * 4, "GPU": 6, "fer_ray_trial": 8}


def test_a_worker_no_node_holds_is_refused_though_the_totals_hold_it(monkeypatch, tmp_path) -> None:
    """require_cpus compares cluster-wide totals: 8 CPUs a worker on cluster.yaml's 4-CPU GPU
    nodes (48 CPUs in all), or 12 on two 8-CPU nodes, passed, and Ray waited for ever."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    up = [{"Alive": True, "Resources": {"CPU": 0.0, "fer_ray_trial": 8.0}}]  # cluster.yaml's head alone
    monkeypatch.setattr(ray, "nodes", lambda: up)
    monkeypatch.setattr(cli, "BOOTSTRAP_CONFIG", str(REPO / "cluster.yaml"))
    cli.require_node_fits({"CPU": 4.0, "GPU": 1.0}, "Each Train worker", "fewer.")  # a g5.xlarge to come
    cli.require_node_fits({"CPU": 16.0}, "Each Train worker", "fewer.")  # a c7i to come
    with pytest.raises(ConfigError, match=r"Each Train worker needs 8 CPU, 1 GPU on one node, and no node up or "
                                          r"among the autoscaler's node types holds that \(the nodes with a GPU hold "
                                          r"at most 4 CPU\); fewer"):
        cli.require_node_fits({"CPU": 8.0, "GPU": 1.0}, "Each Train worker", "fewer.")
    # A node type whose resources are left to detection may hold anything.
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    del config["available_node_types"]["gpu_worker"]["resources"]
    (tmp_path / "detected.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(cli, "BOOTSTRAP_CONFIG", str(tmp_path / "detected.yaml"))
    cli.require_node_fits({"CPU": 8.0, "GPU": 1.0}, "Each Train worker", "fewer.")
    # A cluster started by hand: the nodes up are all it has; their GPUs are counted once
    # require_gpus has waited for them.
    monkeypatch.setattr(cli, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: None)
    up[:] = [{"Alive": True, "Resources": {"CPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    cli.require_node_fits({"CPU": 8.0, "GPU": 1.0}, "Each Train worker", "fewer.")
    with pytest.raises(ConfigError, match=r"no node up holds that \(the nodes with a GPU hold at most 4 CPU\)"):
        cli.require_node_fits({"CPU": 8.0, "GPU": 1.0}, "Each Train worker", "fewer.", gpus_up=True)
    with pytest.raises(ConfigError, match=r"needs 20 CPU on one node, and no node up holds that \(the most any holds: 16 CPU\)"):
        cli.require_node_fits({"CPU": 20.0}, "Each Train worker", "fewer.")
    monkeypatch.delenv("RAY_ADDRESS")  # a Ray of the job's own is sized for the job
    cli.require_node_fits({"CPU": 12.0}, "Each Train worker", "fewer.")


@pytest.mark.parametrize("address", [None, "local"])
def test_a_ray_of_the_jobs_own_without_gpus_fails_at_once(monkeypatch, address) -> None:
    """Only a cluster's autoscaler can bring GPUs: RAY_ADDRESS=local waited its 15 minutes."""
    import time

    import ray
    import ray.autoscaler.sdk as sdk

    monkeypatch.setattr(sdk, "request_resources", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 0})
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: None)
    monkeypatch.setattr(cli, "GPU_WAIT_S", 3.0)  # (instead of 900, should it wait)
    monkeypatch.setattr(cli, "GPU_POLL_S", 0.01)
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="needs 1 GPU"):
        cli.require_gpus(1)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("limits", [None, {"CPU": 48, "GPU": 4}, {"CPU": 48}])  # (GPUs left to detection)
def test_a_clusters_wait_for_gpus_warns_when_no_autoscaler_is_known(monkeypatch, caplog, limits) -> None:
    """A `ray start` cluster has no autoscaler: the 15-minute wait said only "Waiting"."""
    import ray
    import ray.autoscaler.sdk as sdk

    monkeypatch.setattr(sdk, "request_resources", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 0})
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: limits)
    monkeypatch.setattr(cli, "GPU_POLL_S", 0.01)
    with caplog.at_level("INFO", logger="fer_ray"), pytest.raises(ConfigError, match="after waiting 0 s"):
        cli.require_gpus(1, wait_s=0.05)
    waiting = [r for r in caplog.records if r.getMessage().startswith("Waiting up to")]
    assert len(waiting) == 1
    warned = "FER_RAY_GPU_WAIT_S=0 fails at once" in waiting[0].getMessage()
    assert warned == (limits is None) and (waiting[0].levelname == "WARNING") == warned


def test_gpus_the_autoscaler_can_never_bring_up_are_refused_at_once(monkeypatch) -> None:
    import ray
    import ray.autoscaler.sdk as sdk

    calls = []
    monkeypatch.setattr(sdk, "request_resources", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 0})
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: {"CPU": 48, "GPU": 4})
    with pytest.raises(ConfigError, match="can bring up at most 4"):
        cli.require_gpus(8, wait_s=900)  # (would otherwise wait 15 minutes)
    assert calls == []


@pytest.mark.parametrize("current, limits, address, expected", [
    ({"CPU": 4}, None, "", 2),  # 1 worker + 1 Ray Data CPU per trial
    ({"CPU": 16, "GPU": 2}, None, "", 2),  # the GPUs here
    ({"CPU": 4, "GPU": 1}, {"CPU": 48, "GPU": 4}, "127.0.0.1:6379", 4),  # cluster.yaml's ceiling
    ({"CPU": 4, "GPU": 1}, None, "127.0.0.1:6379", 1),  # limits unknown (a `ray start` cluster): the GPUs up
    ({"CPU": 32, "GPU": 4}, None, "127.0.0.1:6379", 4),  # (all 16 at once filled a GPU box's memory)
    ({"CPU": 32}, None, "127.0.0.1:6379", 1),  # no GPU up yet: one, not none
    ({"CPU": 4, "GPU": 4}, None, "127.0.0.1:6379", 2),  # and no more than the CPUs hold (Ray Data's too)
    ({"CPU": 0, "fer_ray_trial": 3}, {"CPU": 48, "GPU": 4, "fer_ray_trial": 3}, "127.0.0.1:6379", 3),  # head slots
])
def test_sweep_concurrency_counts_what_the_cluster_may_grow_to(monkeypatch, current, limits, address, expected) -> None:
    """A sweep on cluster.yaml used to run one GPU trial at a time: the cap was taken from
    the one GPU node the start-up wait had brought up."""
    import argparse

    import ray

    from fer_ray import tuning
    from fer_ray.config import SweepConfig, parse_config

    monkeypatch.setattr(ray, "cluster_resources", lambda: current)
    monkeypatch.setattr(tuning, "autoscaler_limits", lambda: limits)
    monkeypatch.setenv("RAY_ADDRESS", address)
    gpu = "GPU" in current or (limits is None and address)
    flags = ["--data", "d", "--output", "o", "--num-samples", "16"] + (["--use-gpu"] if gpu else [])
    cfg, _ = parse_config(SweepConfig, flags, argparse.ArgumentParser())
    assert tuning.cluster_capacity(cfg) == expected
    if limits is None and address:  # --max-concurrent may ask for more where the GPUs hold trials
        cfg.sweep.max_concurrent = 20  # back (those beyond wait holding no CPU), not the CPUs
        cpu_fit, gpu_fit = int(current.get("CPU", 0) // 2), int(current.get("GPU", 0))
        assert tuning.cluster_capacity(cfg) == (20 if gpu_fit <= cpu_fit else expected)


def test_workers_plan_the_same_epochs_whatever_their_clocks(monkeypatch) -> None:
    """The time budget's plan uses the latest clock of all workers: a worker whose clock
    runs behind would otherwise plan one epoch more near a boundary and wait in DDP for
    workers that have stopped."""
    clock = [0.0]
    monkeypatch.setattr(tl, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(tl, "log0", lambda message: None)

    def plan(skew: float) -> int:
        """This worker's plan after a 100 s epoch, the other worker's clock `skew` s ahead."""
        monkeypatch.setattr(tl, "all_reduce", lambda values, device, op=None: [values[0], values[1] + skew])
        s = SimpleNamespace(epochs=22, deadline=1000.0, freeze_epochs=0)
        state = tl.TrainState()
        clock[0] = 100.0
        state.epoch = 1
        tl._fit_to_deadline(s, state, 22, [], 0.0, "finetune", None, None, 10, torch.device("cpu"))
        return s.epochs

    assert plan(0.0) == 1 + 900 // 105  # 9: from this worker's clock
    assert plan(60.0) == 1 + 840 // 105  # 9: still fits from the later clock
    assert plan(90.0) == 1 + 810 // 105  # 8: the later clock decides for both


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broadcast_buffers_gives_every_worker_rank_zeros_batchnorm_statistics(tmp_path) -> None:
    """Each worker's BatchNorm statistics drift with its own batches between DDP's syncs;
    the loop calls broadcast_buffers before validating so that every worker validates with
    rank 0's, the checkpointed model's (that call is read, not tested: on the tiny data a
    two-worker run's metrics come out the same either way). Here: what broadcast_buffers
    does, in two gloo processes on this machine."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch, torch.distributed as dist
        from fer_ray.train_loop import broadcast_buffers
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", rank=rank, world_size=2)
        bn = torch.nn.BatchNorm2d(3)
        bn.running_mean.fill_(rank + 1.0)
        bn.num_batches_tracked.fill_(10 * (rank + 1))
        broadcast_buffers(bn)
        print(bn.running_mean.tolist(), int(bn.num_batches_tracked))
        dist.destroy_process_group()
    """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["[1.0, 1.0, 1.0] 10"] * 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")


@needs_cuda
def test_gpu_training_in_fp16_resumes_in_bf16_and_gpu_scoring_agrees_with_the_cpu(
    ray_cluster, synth_shards, synth_folder, tmp_path
) -> None:
    """One GPU worker end to end: an fp16 epoch (GradScaler, channels_last), a resumed bf16
    epoch (the saved scaler state is not for bf16), then scoring on the GPU with flip TTA
    gives the CPU's fp32 predictions."""
    import pandas as pd

    from jobs.predict import main as predict_main
    from jobs.train import main as train_main
    from tests.conftest import tiny_train_args

    run = tmp_path / "run"
    assert train_main(tiny_train_args(str(synth_shards), str(run), "--epochs", "1", "--use-gpu",
                                      "--amp", "fp16")) == 0
    assert train_main(tiny_train_args(str(synth_shards), str(run), "--epochs", "2", "--use-gpu",
                                      "--amp", "bf16")) == 0
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history[["train_loss", "val_loss"]].notna().all().all()

    scored = {}
    for name, flags in {"gpu": ["--use-gpu"], "cpu": ["--amp", "off"]}.items():
        out = tmp_path / name
        assert predict_main(["--model", str(run / "best"), "--input", str(synth_folder / "val"),
                             "--output", str(out), "--tta", *flags]) == 0
        scored[name] = pd.read_parquet(out / "predictions").sort_values("path").reset_index(drop=True)
    gpu, cpu = scored["gpu"], scored["cpu"]
    assert gpu["path"].tolist() == cpu["path"].tolist() and len(gpu) == 7 * 10
    probs = [c for c in gpu.columns if c.startswith("prob_")]
    # bf16 autocast on the GPU against fp32 on the CPU: close, not equal.
    assert (gpu[probs] - cpu[probs]).abs().to_numpy().max() < 0.05
    assert (gpu["pred"] == cpu["pred"]).mean() >= 0.95


@pytest.mark.parametrize("address, cpus, limits, refused", [
    ("127.0.0.1:6379", 2, None, True),  # a 2-CPU `ray start` head: the worker takes both
    ("127.0.0.1:6379", 3, None, False),
    ("127.0.0.1:6379", 0, {"CPU": 48, "GPU": 4}, False),  # cluster.yaml: its autoscaler adds them
    ("127.0.0.1:6379", 0, {"GPU": 4}, True),  # CPUs of its node types left to detection: none known
    ("", 2, None, False),  # a Ray of the job's own is sized for the job (init_ray)
])
def test_a_joined_cluster_too_small_for_the_workers_and_ray_data_is_refused(
    monkeypatch, address, cpus, limits, refused,
) -> None:
    """On a joined cluster with no CPU left beside the Train workers, Ray Data's tasks
    waited forever: the job hung instead of failing."""
    import argparse

    import ray

    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import check_resources

    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": cpus}}])
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: limits)
    monkeypatch.setattr(cli, "BOOTSTRAP_CONFIG", "/nonexistent/ray_bootstrap_config.yaml")  # (not this machine's)
    cfg, _ = parse_config(TrainConfig, ["--data", "d", "--output", "o", "--cpus-per-worker", "2"],
                          argparse.ArgumentParser())
    if refused:
        with pytest.raises(ConfigError, match="training needs 2 for its workers .* and one more for Ray Data"):
            check_resources(cfg)
    else:
        check_resources(cfg)
    if cpus == 3 and not limits:  # a sweep's trial holds a sliver of a CPU beside them
        from fer_ray.tuning import TRIAL_DRIVER_CPU

        with pytest.raises(ConfigError, match=r"one more for Ray Data's tasks \(a sweep's trial also holds 0.01"):
            check_resources(cfg, driver_cpus=TRIAL_DRIVER_CPU)
