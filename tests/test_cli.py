"""What every job shares: a cluster in RAY_ADDRESS that cannot be used ends the job in one
sentence and exit status 2, quickly, instead of Ray's minutes of retries or a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_train_args
from fer_ray.cli import _host_port
from fer_ray.synthetic import generate_dataset

# Ray alone retries a closed GCS port for well over two minutes.
BOUND_S = 60


def test_run_job_exit_statuses_and_the_interrupted_line(capsys) -> None:
    from fer_ray.cli import run_job
    from fer_ray.config import ConfigError

    def interrupted():
        raise KeyboardInterrupt

    def bad():
        raise ConfigError("--lr must be positive, got 0.")

    assert run_job(lambda: None) == 0 and run_job(lambda: 1) == 1
    assert run_job(bad) == 2 and capsys.readouterr().err == "error: --lr must be positive, got 0.\n"
    assert run_job(interrupted) == 130 and "resume" in capsys.readouterr().err
    assert run_job(interrupted, interrupted="interrupted; nothing was written") == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("ray://head:10001", ("head", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
        ("local", None),
        ("http://127.0.0.1:8265", None),
    ],
)
def test_host_port(address: str, expected: tuple[str, int] | None) -> None:
    assert _host_port(address) == expected


@pytest.fixture(scope="module")
def tiny_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    generate_dataset(root, {"train": 2, "val": 1}, size=32, seed=0)
    return root


def _run_prepare(faces: Path, out: Path, **env_vars: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**_no_ray_env(), **env_vars}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "jobs/prepare.py", "--source", str(faces), "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    return result, time.monotonic() - start


def _one_sentence(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("text, expected, warned", [
    ("", 900.0, False), ("120", 120.0, False), (" 0 ", 0.0, False),
    ("15m", 900.0, True), ("-5", 900.0, True), ("inf", 900.0, True),
    ("1e10", 900.0, True),  # past threading.TIMEOUT_MAX: the connect watchdog died in a traceback
])
def test_a_bad_wait_variable_is_named_and_the_default_used(monkeypatch, capsys, text, expected, warned) -> None:
    """FER_RAY_GPU_WAIT_S=15m made every job, --help too, end in a traceback at import."""
    from fer_ray.cli import env_seconds

    monkeypatch.setenv("FER_RAY_GPU_WAIT_S", text)
    assert env_seconds("FER_RAY_GPU_WAIT_S", 900) == expected
    err = capsys.readouterr().err
    assert ("FER_RAY_GPU_WAIT_S=" in err and "is not a number of seconds; using 900" in err) == warned


@pytest.mark.parametrize("job, flags", [
    ("make_synthetic.py", ["--output", "OUT"]),
    ("prepare.py", ["--source", "SRC", "--output", "OUT"]),
])
def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, job, flags) -> None:
    """numpy refuses negative seeds: make_synthetic failed after its first folder (and then
    refused its own rerun as "not empty"), prepare after Ray had started."""
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("SRC", str(tmp_path)) for a in flags]
    run = subprocess.run([sys.executable, str(REPO / "jobs" / job), *argv, "--seed", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--seed" in run.stderr and "0 or more" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job", ["make_synthetic.py", "prepare.py", "train.py", "tune.py", "predict.py"])
def test_an_output_that_cannot_be_made_is_one_sentence_before_ray_starts(
    job, tmp_path, synth_folder, synth_shards, tiny_run
) -> None:
    """A file where --output needs a folder: a traceback of NotADirectoryError, in prepare,
    train and predict after Ray had started."""
    (tmp_path / "notes.txt").write_text("precious")
    out = str(tmp_path / "notes.txt" / "out")
    flags = {
        "make_synthetic.py": ["--output", out],
        "prepare.py": ["--source", str(synth_folder), "--output", out],
        "train.py": tiny_train_args(str(synth_shards), out),
        "tune.py": tiny_train_args(str(synth_shards), out),
        "predict.py": ["--model", str(tiny_run / "best"), "--input", str(synth_folder / "val"), "--output", out],
    }[job]
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / job), *flags], cwd=REPO, env=_no_ray_env(),
                            capture_output=True, text=True, timeout=120)
    if job == "make_synthetic.py":  # argparse's error
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
    else:
        last = _one_sentence(result)
    assert f"--output {out!r} cannot be created: {str(tmp_path / 'notes.txt')!r} is a file" in last
    assert "Started a local Ray" not in result.stderr and time.monotonic() - start < BOUND_S
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("job", ["make_synthetic.py", "prepare.py", "train.py", "tune.py", "predict.py"])
def test_help_shows_defaults_only_where_there_are_some_and_loads_no_torch(job) -> None:
    """train and tune imported torch and Ray Train before parsing (5-15 s for --help or a
    mistyped flag); required flags showed "(default: None)" or "(default: )"; the example
    commands of each job's docstring were not shown."""
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "jobs" / job), "--help"],
                            cwd=REPO, env=_no_ray_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--output" in result.stdout
    assert f"    python jobs/{job} --" in result.stdout  # the docstring's examples, as written
    assert "(default: None)" not in result.stdout and "(default: )" not in result.stdout
    assert "(default: " in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "ray.train" not in imported


@pytest.mark.parametrize("flags, message", [
    (["--shard-rows", "0"], "--shard-rows must be at least 1"),
    (["--val-fraction", "1.5"], "--val-fraction must be greater than 0 and less than 1"),
    (["--source", "MISSING"], "does not exist"),
])
def test_prepare_checks_its_input_before_ray_starts(tmp_path, synth_folder, flags, message) -> None:
    argv = ["--source", str(synth_folder), "--output", str(tmp_path / "out")]
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv + flags]
    result = subprocess.run([sys.executable, str(REPO / "jobs/prepare.py"), *argv], cwd=REPO, env=_no_ray_env(),
                            capture_output=True, text=True, timeout=120)
    assert message in _one_sentence(result)
    assert "Started a local Ray" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", [True, False])
def test_a_val_fraction_the_source_does_not_use_is_said(tmp_path, synth_folder, monkeypatch, caplog, given) -> None:
    """--val-fraction 0.3 on a source with its own val/ ran as if val were carved anew."""
    import jobs.prepare

    def stop(*args, **kwargs):  # (the check comes before Ray starts: no need to prepare)
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.prepare, "init_ray", stop)
    argv = ["--source", str(synth_folder), "--output", str(tmp_path / "out")] + (["--val-fraction", "0.3"] * given)
    with caplog.at_level("WARNING", logger="fer_ray.prepare"):
        assert jobs.prepare.main(argv) == 130
    said = f"--val-fraction 0.3 is not used: {synth_folder} has a val split of its own (its val folder)"
    assert (said in caplog.text) is given


def test_dead_address_fails_fast(tiny_faces, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    result, seconds = _run_prepare(tiny_faces, tmp_path / "out", RAY_ADDRESS=f"127.0.0.1:{port}")
    last = _one_sentence(result)
    assert last.startswith(f"error: Nothing answers at RAY_ADDRESS='127.0.0.1:{port}'")
    assert seconds < BOUND_S


def test_a_dashboard_url_as_address_is_named(tiny_faces, tmp_path) -> None:
    # Ray's docs export the dashboard's URL as RAY_ADDRESS for `ray job submit`.
    result, seconds = _run_prepare(tiny_faces, tmp_path / "out", RAY_ADDRESS="http://127.0.0.1:8265")
    last = _one_sentence(result)
    assert last.startswith("error: RAY_ADDRESS='http://127.0.0.1:8265' is a web address")
    assert "host:port" in last
    assert seconds < BOUND_S and not (tmp_path / "out").exists()


def test_silent_address_fails_after_the_deadline(tiny_faces, tmp_path) -> None:
    # A port that accepts and never answers (a dashboard port given as RAY_ADDRESS does
    # the same): ray.init would wait forever.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result, seconds = _run_prepare(
            tiny_faces, tmp_path / "out", RAY_ADDRESS=f"127.0.0.1:{port}",
            FER_RAY_CONNECT_TIMEOUT_S="3",
        )
    last = _one_sentence(result)
    assert last.startswith(f"error: No Ray cluster answered at RAY_ADDRESS='127.0.0.1:{port}'")
    assert seconds < BOUND_S


def test_missing_token_is_named(tiny_faces, tmp_path) -> None:
    # Something answers (so the probe passes), token auth is on, and no token exists:
    # not in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, nor ~/.ray/auth_token of this HOME.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result, seconds = _run_prepare(
            tiny_faces, tmp_path / "out", RAY_ADDRESS=f"127.0.0.1:{port}",
            RAY_AUTH_MODE="token", HOME=str(tmp_path),
        )
    last = _one_sentence(result)
    assert last.startswith("error: Token authentication is on (RAY_AUTH_MODE=token) but no token")
    assert "~/.ray/auth_token" in last
    assert seconds < BOUND_S


def test_a_local_training_job_has_its_own_dashboard_and_sigterm_ends_it_with_143(synth_shards, tmp_path) -> None:
    """No cluster named: the job starts its own Ray, with the dashboard (Ray Train's
    placement-group cleaner asks its State API), and trains while the test session's
    cluster, dashboard and all, runs beside it. SIGTERM to the job (a batch system's stop,
    `ray job stop`) ended it in exit status 134 after a C++ stack dump ("*** SIGTERM
    received ...") from Ray's failure-signal handler; now 143 and the interrupted line.
    One job for both: each job with a Ray of its own starts every process cold (80-85 s
    apiece on a slow 2-core VM)."""
    import signal

    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "jobs/train.py", *tiny_train_args(str(synth_shards), str(run),
                                                                              "--epochs", "50")],
                           cwd=REPO, env=_no_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # (epoch 1 registered, not only its folder there: the job's line says what was saved)
        snapshot, deadline = run / "ray_train" / "checkpoint_manager_snapshot.json", time.time() + 240
        while not (snapshot.exists() and "epoch_0001" in snapshot.read_text()) and job.poll() is None \
                and time.time() < deadline:
            time.sleep(1)
        assert job.poll() is None, "the job ended before its first epoch"
        job.send_signal(signal.SIGTERM)  # the job's process only
        text, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 128 + signal.SIGTERM, text[-3000:]
    # (Ray's log monitor may still print a worker's last lines after it.)
    assert "\ninterrupted; the epochs finished so far are saved" in text, text[-3000:]
    assert "SIGTERM received" not in text
    assert "epoch 1/50" in text
    assert "without the dashboard" not in text
    assert "Cleaning up placement group" not in text and "State API" not in text
    # Ray Data's lines from the driver and from its own actors (the split coordinator's
    # two per epoch) stay in its log file (fer_ray.ray_logs).
    assert "execution finished in" not in text and "Progress bars disabled" not in text


def test_ray_datas_noise_is_hidden_from_its_console_only(monkeypatch) -> None:
    import logging

    from ray.data._internal.logging import HiddenRecordFilter

    from fer_ray import ray_logs

    ray_logs.hide_ray_noise()
    ray_logs.hide_ray_noise()  # once per process, however often called
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    parent = logging.getLogger("ray.data")
    monkeypatch.setattr(parent, "level", logging.DEBUG)
    parent.addHandler(handler)
    try:
        executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
        assert sum(isinstance(f, ray_logs._Hide) for f in executor.filters) == 1
        executor.info("✔️  Dataset train_1 execution finished in 15.05 seconds")
        executor.warning("Operator MapBatches is backpressured")  # other lines: untouched
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, ...")
        # Where stdout is no terminal: of the progress logged every 10 s, the total alone.
        progress = logging.getLogger("ray.data._internal.progress.logging_progress")
        progress.info("======= Running Dataset: dataset_7_0 =======")
        progress.info("Total Progress: 12000/28709")
        progress.info("Active & requested resources: 2/4 CPU, 1.2MiB/1.0GiB object store")
        logging.getLogger("ray.data.dataset").info("Data sink Parquet finished. 140 rows and 245.3KiB data written.")
    finally:
        parent.removeHandler(handler)
    # Every record still reaches Ray Data's handlers (its log file writes them all); its
    # console handler's filter drops the marked ones.
    assert [HiddenRecordFilter().filter(r) for r in seen] == [False, True, False, False, True, False, False]


def test_rays_resume_advice_that_contradicts_fer_rays_is_dropped(monkeypatch) -> None:
    """Every resumed run printed Ray Train's advice to delete its folder (its checkpoints)
    for a new job, and a stopped sweep Tune's "Resume experiment with: Tuner.restore(...)"
    beside fer_ray's "rerun the same command"."""
    import logging

    from fer_ray import ray_logs

    ray_logs.hide_ray_noise()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager"),
               logging.getLogger("ray.tune.tune")]
    for logger in loggers:
        monkeypatch.setattr(logger, "level", logging.DEBUG)
        logger.addHandler(handler)
    try:
        loggers[0].info("A run snapshot was found in storage folder at: '/r/ray_train'\nIf you meant to start a "
                        "brand new training job without any information ..., delete the existing folder at '/r'.")
        loggers[0].info("Checkpoint successfully created")  # other lines: untouched
        loggers[1].warning("Experiment has been interrupted, but the most recent state was saved.\n"
                           "Resume experiment with: Tuner.restore(path=\"/s/ray_tune\", trainable=...)")
        loggers[1].error("Trials did not complete: [run_trial_1]")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen == ["Checkpoint successfully created", "Trials did not complete: [run_trial_1]"]


def test_ray_init_gives_the_jobs_workers_the_hook_unless_the_job_has_one(monkeypatch) -> None:
    import json

    import ray

    from fer_ray import cli

    given = []
    monkeypatch.setattr(ray, "init", lambda **kw: given.append(kw))
    monkeypatch.setattr(cli, "_note_sigterm", lambda: None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cli._ray_init(True, address="local", runtime_env={"env_vars": {"A": "1"}})
    hook = cli.ray_logs.hide_ray_noise
    assert given[-1]["runtime_env"] == {"env_vars": {"A": "1"}, "worker_process_setup_hook": hook}
    # Shipped by value: a worker that cannot import fer_ray (not installed there) runs it.
    unpickle_and_run = ("import logging, pickle, sys; sys.modules['fer_ray'] = None; "
                        "pickle.loads(sys.stdin.buffer.read())(); "
                        "print(len(logging.getLogger('ray.data._internal.progress').filters))")
    ran = subprocess.run([sys.executable, "-c", unpickle_and_run], input=ray.cloudpickle.dumps(hook),
                         capture_output=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == b"1", ran.stderr[-2000:]
    # Prepare and scoring: no runtime env of the job's own.
    cli._ray_init(address="local")
    assert given[-1] == {"address": "local"}
    # A job submitted with a hook of its own: ray.init merges the two runtime envs and
    # refuses a field given twice.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"worker_process_setup_hook": "theirs.setup"}}))
    cli._ray_init(True, address="auto")
    assert given[-1] == {"address": "auto"}


# What the State API, asked from inside a local Ray as Ray Train's placement-group cleaner
# asks it (an actor's call with no address), says about an actor of that same Ray.
_STATE_PROBE = r"""
import sys, ray
from fer_ray.cli import init_ray
init_ray(dashboard=sys.argv[1] == "1")
@ray.remote(num_cpus=0)
class Alive:
    def ping(self):
        return 1
@ray.remote(num_cpus=0)
def ask(actor_id, seconds):
    import time
    from ray.util.state import get_actor
    deadline = time.time() + seconds  # the dashboard may still be starting
    while True:
        try:
            state = get_actor(actor_id, timeout=5)
            answer = state.state if state else "not found"
        except Exception as e:
            answer = type(e).__name__ + ": " + str(e).splitlines()[0][:100]
        if answer == "ALIVE" or time.time() > deadline:
            return answer
        time.sleep(1)
actor = Alive.remote()
ray.get(actor.ping.remote())
print("STATE", ray.get(ask.remote(actor._actor_id.hex(), float(sys.argv[2]))))
"""


@pytest.mark.parametrize("dashboard", [True, False])
def test_state_api_of_a_local_ray_answers_for_its_own_actors_only_with_the_dashboard(ray_cluster, dashboard) -> None:
    # Ray Train's cleaner removes a run's placement group when the State API says its
    # controller is not alive. A local Ray without the dashboard cannot say "alive" (it
    # advertises 127.0.0.1:8265, where nothing or another Ray's dashboard answers): that
    # is why training jobs start theirs with it. With another Ray on the machine (this test
    # session's), the cleaner's call found two and died in a "Found multiple active Ray
    # instances" traceback: init_ray tells the job's processes its own dashboard.
    # (with the dashboard, up to 45 s for it to start on a loaded machine; without, the answer
    # cannot become ALIVE: asked once)
    result = subprocess.run([sys.executable, "-c", _STATE_PROBE, str(int(dashboard)), "45" if dashboard else "0"], cwd=REPO,
                            env=_no_ray_env(), capture_output=True, text=True, timeout=180)
    states = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("STATE")]
    assert result.returncode == 0 and len(states) == 1, (result.stdout + result.stderr)[-3000:]
    assert (states[0] == "ALIVE") == dashboard, (states, (result.stdout + result.stderr)[-3000:])


def test_sigterm_during_ray_init_is_reported_as_one(capsys) -> None:
    """Ray's SIGTERM handler (sys.exit(15)) is in place from the start of ray.init, before
    the job notes SIGTERMs: one then ended the job in exit status 15 without a word."""
    import signal

    from fer_ray.cli import run_job

    assert run_job(lambda: sys.exit(signal.SIGTERM), interrupted="stopped; rerun") == 143
    assert capsys.readouterr().err.strip() == "stopped; rerun"
    with pytest.raises(SystemExit):  # any other exit goes on as it was
        run_job(lambda: sys.exit(3))


def _no_ray_env() -> dict[str, str]:
    """No Ray or fer_ray settings but RAY_ADDRESS=local: the job starts a Ray of its own, as
    with no RAY_ADDRESS, and does not join a `ray start` cluster running on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FER_RAY_"))}
    return {**env, "RAY_ADDRESS": "local"}


@pytest.mark.parametrize("nodes, head_cpus, warned", [
    (1, 0, True),  # cluster.yaml's head: no CPUs, every task runs elsewhere
    (3, 4, True),  # several nodes
    (1, 4, False),  # `ray start --head` on this machine alone
])
def test_local_paths_on_a_cluster_that_works_elsewhere_are_warned_about(monkeypatch, caplog, nodes, head_cpus,
                                                                        warned) -> None:
    import logging
    from types import SimpleNamespace

    import ray

    from fer_ray import cli

    up = [{"Alive": True, "NodeID": f"n{i}", "Resources": {"CPU": head_cpus if i == 0 else 4}}
          for i in range(nodes)]
    monkeypatch.setattr(ray, "nodes", lambda: up + [{"Alive": False, "NodeID": "gone"}])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "n0"))
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with caplog.at_level(logging.WARNING, logger="fer_ray"):
        cli.warn_local_paths(data="s3://bucket/shards", output="runs/r50", pretrained_file=None)
    assert ("--output runs/r50: local path on a cluster whose work runs on other nodes" in caplog.text) is warned
    assert "s3://bucket" not in caplog.text  # a URI reaches every node
    caplog.clear()
    monkeypatch.delenv("RAY_ADDRESS")  # a Ray the job started itself: its paths are its own
    cli.warn_local_paths(output="runs/r50")
    assert not caplog.text


@pytest.mark.parametrize("case", ["ray_start_running", "stale_address_file", "ray_address_local"])
def test_without_ray_address_a_job_joins_the_cluster_ray_start_runs_here(monkeypatch, case) -> None:
    """Ray's own `ray.init()` joins the cluster the latest `ray start` on this machine runs,
    and then refuses the num_cpus a local start passes (every job ended in a traceback);
    the job joins it as a submitted job would, unless it no longer answers or
    RAY_ADDRESS=local asks for a Ray of the job's own."""
    import socket

    import ray
    import ray._private.utils

    from fer_ray import cli

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if case == "stale_address_file":
        listener.close()  # the head is gone; its address file is not
    else:
        listener.listen(1)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda temp_dir=None: f"127.0.0.1:{port}")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(cli, "connect_ray",
                        lambda address, where=None, quiet_workers=False: calls.append(("connect", address)))
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(("init", kwargs)))
    # Recorded as it is (unset) so that teardown undoes what init_ray sets: a bare delenv of
    # an unset variable records nothing, and RAY_ADDRESS leaked into every later test.
    monkeypatch.setenv("RAY_ADDRESS", "placeholder")
    monkeypatch.delenv("RAY_ADDRESS")
    if case == "ray_address_local":
        monkeypatch.setenv("RAY_ADDRESS", "local")
    try:
        cli.init_ray()
    finally:
        listener.close()
    if case == "ray_start_running":
        assert calls == [("connect", f"127.0.0.1:{port}")]
        assert os.environ["RAY_ADDRESS"] == f"127.0.0.1:{port}"  # a cluster, for warn_local_paths
    else:
        assert len(calls) == 1 and calls[0][0] == "init", calls
        assert calls[0][1]["address"] == "local" and calls[0][1]["num_cpus"] >= 4


def test_a_connect_timeout_of_zero_sets_no_limit(monkeypatch) -> None:
    """FER_RAY_CONNECT_TIMEOUT_S=0 read as a limit of 0 s: every connection, to a healthy
    cluster too, ended at once in "No Ray cluster answered ... within 0 s"."""
    import threading

    from fer_ray import cli

    gave_up, given_up = [], threading.Event()

    def give_up(what: str) -> None:
        gave_up.append(what)
        given_up.set()

    def slow_init(quiet_workers, **options) -> None:  # a slow ray.init: 0.3 s, or till given up
        given_up.wait(0.3 if cli.INIT_TIMEOUT_S == 0 else 60)  # (the watchdog's thread may start late)

    monkeypatch.setattr(cli, "_answers", lambda host_port, timeout: None)  # something answers
    monkeypatch.setattr(cli, "_ray_init", slow_init)
    monkeypatch.setattr(cli, "_give_up", give_up)
    monkeypatch.setattr(cli, "INIT_TIMEOUT_S", 0.0)
    cli.connect_ray("127.0.0.1:6379")
    assert gave_up == []
    monkeypatch.setattr(cli, "INIT_TIMEOUT_S", 0.05)
    cli.connect_ray("127.0.0.1:6379")
    assert gave_up == ["RAY_ADDRESS='127.0.0.1:6379'"]


@pytest.mark.parametrize("job, flags, said", [
    ("predict", ["--model", "m", "--input", "i", "--output", ""], "--output is empty"),
    ("predict", ["--model", " ", "--input", "i", "--output", "o"], "--model is empty"),
    ("prepare", ["--source", "", "--output", "o"], "--source is empty"),
    ("prepare", ["--source", "s", "--output", ""], "--output is empty"),
    ("make_synthetic", ["--output", ""], "--output is empty"),
    ("train", ["--data", " ", "--output", "o"], "--data is required"),
])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(job, flags, said, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    """`--output "$OUT"` with OUT unset gave "" (the current folder): make_synthetic ended in
    a traceback, prepare would write shards into an empty current folder, and scoring
    refused the current folder with a sentence about it."""
    import importlib

    monkeypatch.chdir(tmp_path)  # an empty folder, where "" would have written
    main = importlib.import_module(f"jobs.{job}").main
    try:
        code = main(flags)
    except SystemExit as e:  # argparse's error (make_synthetic)
        code = e.code
    assert code == 2
    assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_joining_the_machines_ray_start_cluster_turns_token_auth_on_as_ray_init_would(monkeypatch) -> None:
    """Ray's own ray.init() turns token auth on for the local cluster it finds when a token
    file exists (as `ray start --head` then requires it), but not for an explicit address:
    joining with the address read from `ray start`'s note sent no token and was refused."""
    import ray
    import ray._private.authentication.authentication_token_setup as auth

    from fer_ray import cli

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "unset")  # (recorded, so that the variable init_ray sets
    monkeypatch.delenv("RAY_ADDRESS")  # is removed after the test whatever fails in it)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cli, "_ray_start_note", lambda: ("/tmp/ray/ray_current_cluster", "127.0.0.1:6379", True))
    monkeypatch.setattr(auth, "maybe_enable_token_auth_if_token_available",
                        lambda warn_if_disabled=True: calls.append("token auth"))
    monkeypatch.setattr(cli, "connect_ray", lambda address, **kwargs: calls.append(f"connect {address}"))
    cli.init_ray()
    assert calls == ["token auth", "connect 127.0.0.1:6379"]
    assert os.environ.pop("RAY_ADDRESS") == "127.0.0.1:6379"  # (set by init_ray: a cluster)


@pytest.mark.parametrize("address", ["LOCAL", " local "])
def test_ray_address_local_is_read_as_on_cluster_reads_it(monkeypatch, address) -> None:
    """on_cluster() took RAY_ADDRESS=LOCAL for a Ray of the job's own; init_ray passed it to
    Ray as an address, which failed."""
    import ray

    from fer_ray import cli

    started = []
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cli, "connect_ray", lambda *a, **k: pytest.fail("connected to an address"))
    monkeypatch.setattr(cli, "_ray_init", lambda quiet, **options: started.append(options["address"]))
    cli.init_ray()
    assert started == ["local"] and not cli.on_cluster()


def test_an_output_in_a_jobs_working_dir_copy_is_warned_about(tmp_path, monkeypatch, caplog) -> None:
    """`ray job submit --working-dir . -- python jobs/train.py --output runs/r1` wrote into
    Ray's unpacked copy of the working dir: gone with it, and a resubmitted job (another
    package after an edit) started a new run elsewhere."""
    import json

    from fer_ray.cli import warn_output_in_job_package

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}}))
    with caplog.at_level("WARNING", logger="fer_ray.cli"):
        warn_output_in_job_package("runs/r1")
        assert f"--output runs/r1 lies in Ray's copy of this job's --working-dir ({tmp_path})" in caplog.text
        caplog.clear()
        for elsewhere in ("/data/runs/r1", "s3://bucket/runs/r1", None):
            warn_output_in_job_package(elsewhere)
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # no --working-dir
        warn_output_in_job_package("runs/r1")
    assert caplog.text == ""


@pytest.mark.parametrize("job, flags, message", [
    ("train.py", ["--epochs", "0"], "--epochs must be"),
    ("tune.py", ["--lr-range", "1e-2", "1e-4"], "--lr-range must be two positive numbers"),
])
def test_a_bad_value_is_said_before_torch_loads(tmp_path, job, flags, message) -> None:
    """train.py and tune.py checked their values after importing torch and timm: 7-10 s
    before a one-sentence error that needs neither."""
    code = (f"import sys, runpy; sys.argv = ['jobs/{job}', '--data', {str(tmp_path)!r}, '--output', "
            f"{str(tmp_path / 'o')!r}, *{flags!r}]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "EXIT 2 False" in result.stdout, (result.stdout + result.stderr)[-2000:]
    assert message in result.stderr


def test_a_jobs_stdout_into_a_pipe_comes_line_by_line() -> None:
    """`python jobs/train.py ... > train.log` (or `| tee`, nohup, a batch system): Ray prints
    the workers' epoch lines to the driver's stdout without a flush, and a block-buffered
    stdout held them back until ~8 KB had come, most of a run. After setup_logging, a line
    printed reaches the pipe while the job still runs (here: waits on its stdin)."""
    import select

    child = subprocess.Popen(
        [sys.executable, "-c", "from fer_ray.cli import setup_logging; setup_logging(); "
                               "print('epoch 1 done'); import sys; sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(REPO)},
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.poll() is None, "nothing came while the job ran"
        assert child.stdout.readline() == "epoch 1 done\n"
    finally:
        child.stdin.close()
        child.wait(timeout=60)
