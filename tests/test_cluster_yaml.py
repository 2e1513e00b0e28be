"""cluster.yaml: valid for the installed Ray's autoscaler, and shaped as the README says.

Pure: nothing is launched; the file is checked against the schema Ray ships and against
the node types, image, token and bucket variable the docs rely on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

BUCKET_VAR = "FER_RAY_BUCKET"
HEAD, GPU_WORKER, CPU_WORKER = "head", "gpu_worker", "cpu_worker"


@pytest.fixture(scope="module")
def text() -> str:
    return (REPO / "cluster.yaml").read_text()


@pytest.fixture(scope="module")
def config(text: str) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_valid_against_rays_schema(config: dict, schema: dict) -> None:
    jsonschema.validate(config, schema)
    # What `ray up` does first: fill in the AWS defaults, merge the setup commands, validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_schema_check_is_not_vacuous(config: dict, schema: dict) -> None:
    broken = copy.deepcopy(config)
    broken["available_node_types"][GPU_WORKER]["min_wokers"] = 0  # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_head_runs_no_training(config: dict) -> None:
    assert config["head_node_type"] == HEAD
    head = config["available_node_types"][HEAD]
    assert head["resources"]["CPU"] == 0


def test_sweep_trials_run_on_the_head_not_on_spot_workers(config: dict, monkeypatch) -> None:
    """A trial's function, and the Train controller Ray pins to its node, ran on a spot GPU
    worker (the head holds no CPU): its preemption failed the whole trial, which Tune does
    not retry, where Ray Train alone would have restarted its workers."""
    import ray

    from fer_ray.tuning import TRIAL_DRIVER_CPU, TRIAL_SLOT, trial_resources

    nodes = config["available_node_types"]
    assert nodes[HEAD]["resources"][TRIAL_SLOT] >= 4  # the GPU workers' trials at once, at least
    assert all(TRIAL_SLOT not in n.get("resources", {}) for name, n in nodes.items() if name != HEAD)
    head_up = {k: float(v) for k, v in nodes[HEAD]["resources"].items()}
    monkeypatch.setattr(ray, "cluster_resources", lambda: head_up)
    assert trial_resources() == {TRIAL_SLOT: 1}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # a laptop, `ray start`
    assert trial_resources() == {"CPU": TRIAL_DRIVER_CPU}


def test_gpu_worker_scales_from_zero_on_spot(config: dict) -> None:
    gpu = config["available_node_types"][GPU_WORKER]
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert re.match(r"(g5|g6|g6e|p4d|p5)\.", gpu["node_config"]["InstanceType"])
    assert "IamInstanceProfile" in gpu["node_config"]  # workers write checkpoints to S3


def test_cpu_worker_for_preprocessing(config: dict) -> None:
    cpu = config["available_node_types"][CPU_WORKER]
    assert cpu["min_workers"] == 0
    assert cpu["max_workers"] >= 1
    assert not re.match(r"(g|p)\d", cpu["node_config"]["InstanceType"])
    assert cpu["docker"]["worker_image"].endswith("-cpu")
    assert "IamInstanceProfile" in cpu["node_config"]


def test_images_match_the_installed_ray_and_python_311(config: dict) -> None:
    docker = config["docker"]
    images = [docker["image"], docker["head_image"],
              config["available_node_types"][CPU_WORKER]["docker"]["worker_image"]]
    for image in images:
        # The job CLI and the cluster must run the same Ray.
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image
    assert docker["image"].endswith("-gpu")
    amis = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(amis) == 1 and "deeplearning" in amis.pop()


def test_bucket_variable_set_once_for_every_node(config: dict, text: str) -> None:
    settings = [o for o in config["docker"]["run_options"] if BUCKET_VAR in o]
    # Top-level run_options reach head and workers alike.
    assert len(settings) == 1 and re.fullmatch(rf"--env {BUCKET_VAR}=[\w.-]+", settings[0])
    assert text.count(f"{BUCKET_VAR}=") == 1
    # The documented way to use it, and `ray up` refusing the placeholder.
    assert f"s3://${BUCKET_VAR}/" in text
    placeholder = settings[0].split("=", 1)[1]
    assert any(f'"${BUCKET_VAR}" != {placeholder}' in c for c in config["setup_commands"])


def test_token_auth_on_every_node(config: dict) -> None:
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_project_is_synced_and_installed(config: dict) -> None:
    assert config["file_mounts"]["~/fer_ray"] == "."
    assert ".gitignore" in config["rsync_filter"]  # keeps .venv and data out of the rsync
    assert any("pip install" in c and "-e ~/fer_ray" in c for c in config["setup_commands"])


def run_install_command(config: dict, tmp_path: Path, gpu: bool) -> list[str]:
    """The setup command that installs the project, run by bash with a stand-in `pip` that
    records each call's arguments (a line each), and an `nvidia-smi` on the PATH when `gpu`
    (nothing else on it: a machine with /usr/bin/nvidia-smi took the GPU branch for both)."""
    import shutil
    import subprocess

    (command,) = [c for c in config["setup_commands"] if "-e ~/fer_ray" in c]
    bin_dir = tmp_path / ("gpu" if gpu else "cpu")
    bin_dir.mkdir()
    record = bin_dir / "pip-args"
    tools = {"pip": f'echo "$@" >> {record}\n'} | ({"nvidia-smi": "exit 0\n"} if gpu else {})
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    subprocess.run([shutil.which("bash"), "-c", command], check=True, env={"PATH": str(bin_dir)})
    return record.read_text().splitlines()


def test_cpu_nodes_install_pytorchs_cpu_build(config: dict, tmp_path: Path) -> None:
    # Without a GPU in the container (the head, the CPU workers) torch and torchvision come
    # from PyTorch's CPU index alone, within the project's caps, before the project; with
    # one, everything from PyPI as before.
    pyproject = (REPO / "pyproject.toml").read_text()
    caps = [re.search(rf'"({name}[<>=][^"]*)"', pyproject).group(1) for name in ("torch", "torchvision")]
    torch_call, project_call = run_install_command(config, tmp_path, gpu=False)
    assert torch_call == f"install --quiet --index-url https://download.pytorch.org/whl/cpu {caps[0]} {caps[1]}"
    assert re.fullmatch(r"install --quiet -e \S*/fer_ray", project_call)  # (~ expanded by bash)
    (gpu_call,) = run_install_command(config, tmp_path, gpu=True)
    assert re.fullmatch(r"install --quiet -e \S*/fer_ray", gpu_call)


def test_jobs_named_in_the_file_exist(text: str) -> None:
    for script in set(re.findall(r"jobs/\w+\.py", text)):
        assert (REPO / script).is_file(), script
