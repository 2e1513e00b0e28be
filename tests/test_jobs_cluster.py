"""The jobs on a real `ray start` cluster, submitted with `ray job submit` as on a cloud cluster.

The cluster is this machine's own, isolated from the in-process cluster the other Ray tests
share (conftest.py): its own temp dir (so `ray.init()` never discovers it), its own ports and
worker-port range, its own token (RAY_AUTH_TOKEN; ~/.ray/auth_token is neither read nor
written), and it is stopped by killing only its own processes: plain `ray stop` would kill
every Ray process on the machine.

What the README relies on and these tests check:
- token auth: every CLI call needs RAY_AUTH_MODE=token plus the token; jobs inherit both
  from the cluster, so a job's `ray.init()` connects without further setup;
- `--working-dir .` uploads the repo minus .gitignore'd paths and Ray's default excludes
  (.git, .venv, venv, __pycache__), and the uploaded copy of `fer_ray` is the one that
  drivers and workers import, ahead of the editable install;
- a variable set in the nodes' environment (FER_RAY_BUCKET on the cloud) reaches the job's
  shell, which expands it when the entrypoint is wrapped in `bash -c '...'`;
- prepare -> train -> predict run as jobs and write their folders.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import REPO, TINY_MODEL, TINY_SIZE, free_ports

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30

# Runs `ray start --block` as a child subreaper: every process of the cluster, including
# the ones Ray detaches into new sessions (job drivers) or orphans when the raylet exits,
# stays a descendant of this process. It reaps them all (PID 1 in some containers does
# not, which leaves zombies) and exits once the last one is gone, so the fixture can stop
# exactly this cluster and know when it has stopped. If pytest itself dies, the kernel
# sends this process SIGTERM and the cluster stops too.
_REAPER = r"""
import ctypes, os, signal, subprocess, sys
try:
    libc = ctypes.CDLL(None)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux only)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except AttributeError:
    pass
head = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: head.poll() is None and head.terminate())
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        pass
"""

# Where does `fer_ray` come from, in the job's driver and in a task on a worker?
_PROBE = r"""
import json, ray, fer_ray.constants
ray.init()
@ray.remote
def where():
    import fer_ray.constants
    return fer_ray.constants.__file__
print("PROBE " + json.dumps({"driver": fer_ray.constants.__file__,
                             "task": ray.get(where.remote())}))
"""


def _free_port_range(size: int) -> int:
    """First port of `size` free ports, below Linux's ephemeral range and above the
    10002-19999 that every other Ray instance's workers use by default."""
    for _ in range(50):
        start = random.randrange(20000, 32000 - size)
        try:
            for port in range(start, start + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise RuntimeError("no free port range for Ray workers")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


class LocalCluster:
    """A `ray start --head` cluster on 127.0.0.1 with token auth, driven through the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Ray puts unix sockets under the temp dir; their paths must stay under 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="frc", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port, *self._other_ports = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.env = self.cli_env(token=self.token)
        # Seen by every process of the cluster, like FER_RAY_BUCKET set in cluster.yaml.
        self.env["FER_RAY_TEST_ROOT"] = str(root)
        self.log = root / "ray_start.log"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def cli_env(token: str | None = None, mode: str | None = "token") -> dict[str, str]:
        """This environment minus every RAY_* variable (the in-process test cluster sets some)
        but the suite's Ray Train health-check interval (conftest), with the venv's `ray` and
        `python` first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop("PYTHONPATH", None)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # On SIGTERM `ray start --block` would first drain the node for up to 30 s, waiting
        # on the detached actors Ray Data and Train leave behind; a test cluster has nothing
        # to drain.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]  # (conftest)
        if mode is not None:
            env["RAY_AUTH_MODE"] = mode
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        return env

    def start(self) -> None:
        worker_ports = _free_port_range(200)
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": self.dashboard_port,
            **dict(zip(
                ["--ray-client-server-port", "--node-manager-port", "--object-manager-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port"],
                self._other_ports,
                strict=True,
            )),
            "--min-worker-port": worker_ports,
            "--max-worker-port": worker_ports + 199,
        }
        cmd = [
            sys.executable, "-c", _REAPER,
            # Ray still advertises GCS and raylet on the machine's reachable IP (it replaces
            # 127.0.0.1); the dashboard and job API listen on 127.0.0.1 only.
            RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--temp-dir", self.temp_dir, "--num-cpus", "4", "--num-gpus", "0",
            "--object-store-memory", str(512 * 2**20),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--disable-usage-stats",
            *[f"{flag}={value}" for flag, value in ports.items()],
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                cmd, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{self.log.read_text()[-3000:]}")
            if self._jobs_api_ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"cluster not ready in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def _jobs_api_ready(self) -> bool:
        request = urllib.request.Request(
            f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> list[int]:
        """Stop this cluster only; returns the pids that had to be killed by force."""
        if self.process is None:
            return []
        # SIGTERM to `ray start --block` stops the processes it started (without the drain,
        # see cli_env); the raylet takes its workers along. The reaper exits when nothing
        # of the cluster is left.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
            forced = []
        except subprocess.TimeoutExpired:
            forced = _descendants(self.process.pid)
            for pid in forced:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return forced

    def submit(self, *entrypoint: str, timeout: float, working_dir: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`ray job submit` from the repo root; waits for the job like a user would."""
        cmd = [RAY, "job", "submit", "--address", self.address]
        if working_dir:
            cmd += ["--working-dir", "."]
        return subprocess.run(
            [*cmd, "--", *entrypoint], cwd=REPO, env=env or self.env,
            capture_output=True, text=True, timeout=timeout,
        )


def _ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        forced = c.stop()
    assert not forced, f"cluster processes needed SIGKILL: {forced}"


@pytest.fixture(scope="module")
def faces(cluster) -> Path:
    from fer_ray.synthetic import generate_dataset

    out = cluster.root / "faces"
    generate_dataset(out, {"train": 30, "val": 8}, size=TINY_SIZE, seed=0)
    return out


# Epochs of the stopped and resubmitted job: the stop lands while the job still trains
# (with 3, a tiny epoch of ~1.5 s here, the job ended its last before `ray job stop` did;
# the stop is now asked of the Jobs API straight away, which leaves more room still).
JOB_EPOCHS = 6


@pytest.fixture(scope="module")
def run(cluster, faces) -> SimpleNamespace:
    """Shards prepared and a training job begun in one job, stopped by `ray job stop` after
    its first epoch; then the same training command submitted again and run to the end, the
    val faces scored by that job too. These jobs serve the tests of preparing, of the run
    folder, of the resume and of scoring: each job submitted costs seconds of start here
    (the CLI, the job's supervisor and driver), the training about a minute on 2 cores."""
    import torch

    shards, out, preds = cluster.root / "shards", cluster.root / "run", cluster.root / "preds"
    train = ["python", "jobs/train.py", "--data", str(shards), "--output", str(out),
             "--model", TINY_MODEL, "--no-pretrained", "--epochs", str(JOB_EPOCHS),
             "--image-size", str(TINY_SIZE), "--batch-size", "16"]
    # Paths come from a variable of the nodes' environment, expanded by the job's own
    # shell: the way `s3://$FER_RAY_BUCKET/...` is passed on a cloud cluster (README).
    prepare = ('python jobs/prepare.py --source "$FER_RAY_TEST_ROOT/faces" --output "$FER_RAY_TEST_ROOT/shards" '
               '--shard-rows 100')
    job_id = f"fer-ray-stop-{secrets.token_hex(4)}"
    _ok(subprocess.run(
        [RAY, "job", "submit", "--address", cluster.address, "--working-dir", ".",
         "--submission-id", job_id, "--no-wait", "--", "bash", "-c", f"{prepare} && exec {shlex.join(train)}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120,
    ))
    snapshot = out / "ray_train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not (snapshot.exists() and "epoch_0001" in snapshot.read_text()):
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    # Through the Jobs API, as `ray job stop` asks it: the CLI's own start (importing Ray while
    # the job has both cores, 3-8 s) let a job of tiny epochs end before the stop landed.
    request = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}/stop", method="POST",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read()).get("stopped") is True, "the job had ended before the stop"
    deadline = time.monotonic() + 120  # (the CLI waited for the job to end; the API answers at once)
    while _job_status(cluster, job_id) not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, "the job did not stop within 120 s"
        time.sleep(0.5)
    status = subprocess.run([RAY, "job", "status", "--address", cluster.address, job_id],
                            env=cluster.env, capture_output=True, text=True, timeout=60)
    latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    before = torch.load(out / "ray_train" / latest / "train_state.pt", weights_only=True)["state"]
    predict = ["python", "jobs/predict.py", "--model", str(out / "best"), "--input",
               str(cluster.root / "faces" / "val"), "--output", str(preds), "--batch-size", "32"]
    output = _ok(cluster.submit("bash", "-c", f"{shlex.join(train)} && {shlex.join(predict)}", timeout=420))
    return SimpleNamespace(out=out, output=output, stop_status=status.stdout + status.stderr, before=before,
                           shards=shards, preds=preds)


def _job_status(cluster, job_id: str) -> str:
    request = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["status"]


# ---- against no cluster: fast, not slow-marked ------------------------------------------


def test_job_submit_to_closed_port_fails_fast() -> None:
    [port] = free_ports(1)  # nothing listens there once the probe socket is closed
    start = time.monotonic()
    result = subprocess.run(
        [RAY, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--", "true"],
        env=LocalCluster.cli_env(token="0" * 64), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"Failed to connect to Ray at address: http://127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - start < 30


# ---- on the cluster ---------------------------------------------------------------------


@pytest.mark.slow
def test_job_submit_needs_the_clusters_token(cluster) -> None:
    wrong = cluster.cli_env(token="f" * 64)
    result = cluster.submit("true", timeout=60, working_dir=False, env=wrong)
    assert result.returncode != 0
    assert "Invalid authentication token" in result.stderr

    # Without RAY_AUTH_MODE=token the CLI sends no token, even with RAY_AUTH_TOKEN set.
    unset = cluster.cli_env(token=cluster.token, mode=None)
    result = cluster.submit("true", timeout=60, working_dir=False, env=unset)
    assert result.returncode != 0
    assert "Missing authentication token" in result.stderr


@pytest.mark.slow
def test_job_with_a_wrong_token_says_so_in_one_sentence(cluster, faces) -> None:
    env = cluster.cli_env(token="f" * 64)
    env["RAY_ADDRESS"] = cluster.gcs_address
    # Ray retries a rejected GCS connection once a second, 20 times by default; 2 is enough here.
    env["RAY_gcs_server_port_wait_time_s"] = "2"
    result = subprocess.run(
        [sys.executable, "jobs/prepare.py", "--source", str(faces), "--output",
         str(cluster.root / "never")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The Ray cluster at RAY_ADDRESS=") and "rejected" in last


@pytest.mark.slow
def test_working_dir_upload_and_which_fer_ray_is_imported(cluster) -> None:
    probe = cluster.root / "probe.py"
    probe.write_text(_PROBE)

    def where(**kwargs) -> dict[str, str]:
        output = _ok(cluster.submit("python", str(probe), timeout=120, **kwargs))
        line = next(x for x in output.splitlines() if x.startswith("PROBE "))
        return json.loads(line[len("PROBE "):])

    # --working-dir: the uploaded copy wins over the editable install, on driver and workers.
    uploaded = where()
    packages = Path(cluster.temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    pkg = next(p for p in packages if Path(uploaded["driver"]).is_relative_to(p))
    assert Path(uploaded["task"]).is_relative_to(pkg)

    # What was uploaded: the code, not .gitignore'd folders nor Ray's default excludes.
    names = {p.name for p in pkg.iterdir()}
    assert {"fer_ray", "jobs", "pyproject.toml"} <= names
    assert not names & {".git", ".venv", "demo_out", "runs", "data", "fer_ray.egg-info"}
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"uploaded working dir is {size / 2**20:.1f} MiB"

    # No --working-dir: the job runs where the cluster was started and imports the install.
    installed = where(working_dir=False)
    assert Path(installed["driver"]).is_relative_to(REPO / "fer_ray")
    assert Path(installed["task"]).is_relative_to(REPO / "fer_ray")


@pytest.mark.slow
def test_train_job_writes_the_run_folder(run) -> None:
    out, output = run.out, run.output
    assert "best val accuracy" in output
    # The loop's own line per epoch; Ray Train's report and checkpoint lines are quieted.
    assert f"epoch {JOB_EPOCHS}/{JOB_EPOCHS}" in output
    assert "Reporting training result" not in output and "Checkpoint successfully created" not in output
    assert "DeprecationWarning" not in output
    # The job's runtime env (its uploaded working dir) and fer_ray's worker set-up hook
    # merge: Ray Data's lines stay in its log file.
    assert "execution finished in" not in output and "Progress bars disabled" not in output
    for name in ("config.json", "history.csv", "learning_curves.png", "confusion_matrix.png",
                 "val_metrics.parquet"):
        assert (out / name).is_file(), name
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_prepare_and_predict_jobs_write_their_folders(run) -> None:
    assert (run.shards / "manifest.json").is_file()
    summary = json.loads((run.preds / "summary.json").read_text())
    assert summary["scored"] == summary["labelled"] == 8 * 7 and summary["errors"] == 0  # every val face
    assert sum(len(pd.read_parquet(f)) for f in (run.preds / "predictions").glob("*.parquet")) == 8 * 7


@pytest.mark.slow
def test_stopped_job_resubmitted_resumes(run) -> None:
    """`ray job stop` mid-run, then the same command again: it resumes, it does not restart."""
    assert "was stopped" in run.stop_status
    assert 1 <= run.before["epoch"] < JOB_EPOCHS  # stopped mid-run
    assert f"Resuming after epoch {run.before['epoch']}" in run.output
    history = pd.read_csv(run.out / "history.csv")
    assert history["epoch"].tolist() == list(range(1, JOB_EPOCHS + 1))
    for i, row in enumerate(run.before["history"]):  # epochs done before the stop are kept as they were
        assert history.iloc[i]["val_acc"] == pytest.approx(row["val_acc"])
        assert history.iloc[i]["seconds"] == pytest.approx(row["seconds"])
