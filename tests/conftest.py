"""Shared fixtures: one Ray cluster per test session, tiny synthetic data, a tiny model.

Ray tests get a local cluster with 4 logical CPUs bound to 127.0.0.1: on a 2-core
machine a Tune trial, its Train worker and the Ray Data tasks each hold a CPU and would
otherwise wait on each other.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Small, fast runs: tiny images and a tiny timm model.
TINY_MODEL = "test_resnet"
TINY_SIZE = 32

# Ray Train's controller looks at its workers every 2 s, so a finished run waited up to that
# long to end (2.5-3 s of a tiny run's ~17 s fit here); looked at more often, the suite's
# training runs and sweep trials end sooner. Set before any Ray starts, for this process's
# cluster and the jobs tests run in subprocesses alike.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def tiny_train_args(data: str, output: str, *extra: str) -> list[str]:
    """jobs/train.py flags for a fast CPU run on the synthetic shards."""
    return [
        "--data", data, "--output", output, "--model", TINY_MODEL, "--no-pretrained",
        "--image-size", str(TINY_SIZE), "--batch-size", "16", "--epochs", "2", *extra,
    ]


def settings_for(shards, *flags: str):
    """The LoopSettings a tiny training run on `shards` with these flags would get."""
    import argparse

    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import check_inputs, resolve_settings

    cfg, _ = parse_config(
        TrainConfig,
        ["--data", str(shards), "--output", f"{shards}-unused", "--model", "test_resnet", "--no-pretrained",
         "--image-size", "32", *flags],
        argparse.ArgumentParser(),
    )
    return resolve_settings(cfg, check_inputs(cfg))


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that are free now (all held open while choosing)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def modules_unpickling_imports(obj, modules=("torch", "timm", "sklearn", "matplotlib", "fer_ray.trainer",
                                              "fer_ray.model")) -> list[str]:
    """Which of `modules` a fresh interpreter imports to unpickle `obj` as Ray would (what a
    Ray actor or task process pays for before it runs: seconds of CPU for timm's stack)."""
    import subprocess

    import ray.cloudpickle

    code = ("import pickle, sys\n"
            "pickle.loads(sys.stdin.buffer.read())\n"
            f"print(*(m for m in {tuple(modules)!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], input=ray.cloudpickle.dumps(obj), capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return out.stdout.decode().split()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # The dashboard on a free port, not Ray's default 8265: a Ray started without a dashboard
    # on this machine names 127.0.0.1:8265 as its State API (see fer_ray.cli.init_ray).
    # address="local": a Ray of the session's own, even while a `ray start` cluster runs on
    # this machine (ray.init would join that one and then refuse num_cpus).
    # Idle workers kept for 10 minutes (Ray: 1 s, once more workers than CPUs run, as a
    # trial's ~8 actors make them): the session's runs reuse the Ray Data workers that
    # imported Albumentations and torch (~5 s of CPU each here). Measured on a 2-core VM,
    # the same 2-trial sweep run twice in one cluster: 140 and 130 s with Ray's defaults,
    # 115 and 97 s with this (the later trials' first epochs waited 2-4 s for data instead
    # of 10-13). A soft limit of 12 workers beside it (83 s for the second sweep) cost the
    # scoring tests 12-20% (more workers started).
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_port=free_ports(1)[0], log_to_driver=True, ignore_reinit_error=True,
             _system_config={"idle_worker_killing_time_threshold_ms": 600_000})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory) -> Path:
    """Synthetic faces as split folders: 40 train and 10 val images per class, 32 px."""
    from fer_ray.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, {"train": 40, "val": 10}, size=TINY_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_shards(ray_cluster, synth_folder, tmp_path_factory) -> Path:
    from fer_ray.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "synth"
    prepare(str(synth_folder), str(out), shard_rows=100)
    return out


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, synth_shards, tmp_path_factory) -> Path:
    """One finished 2-epoch run, shared by the tests that read its outputs: a frozen-backbone
    epoch from "pretrained" weights given by --pretrained-file, then one fine-tuning epoch."""
    import timm
    import torch

    from jobs.train import main

    runs = tmp_path_factory.mktemp("runs")
    weights = runs / "pretrained.pth"
    torch.save(timm.create_model(TINY_MODEL).state_dict(), weights)
    out = runs / "tiny"
    args = tiny_train_args(str(synth_shards), str(out), "--pretrained", "--pretrained-file",
                           str(weights), "--freeze-epochs", "1")
    assert main(args) == 0
    return out


@contextlib.contextmanager
def ctrl_c_when(folder: Path, pattern: str, timeout_s: float = 300, sig: int | None = None):
    """Send this process SIGINT (a user's Ctrl-C), or `sig`, once `folder` holds a path
    matching `pattern`; afterwards the default SIGINT handler is back (Ray Train's stays
    registered otherwise)."""
    import signal
    import threading
    import time

    sig = signal.SIGINT if sig is None else sig

    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            if list(folder.glob(pattern)):
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
