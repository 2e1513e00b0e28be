"""The benchmark scripts: CI does not run them, so it checks here that they compile on this
Python and that the bytes figure reads Ray Data's stats as printed."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STATS = """Operator 0 FromBlocks: 
* Output num rows per block: 5 min, 256 max, 239 mean, 3589 total
* Output size bytes per block: 390 min, 19937 max, 17969 mean, 269538 total

Operator 1 MapBatches(load_batch)->MapBatches(Scorer): 15 tasks executed, 15 blocks produced in 6.55s
* Remote wall time: 49.94ms min, 838.65ms max, 427.71ms mean, 6.42s total
* Output num rows per block: 5 min, 256 max, 239 mean, 3589 total
* Output size bytes per block: 712 min, 36192 max, 32012 mean, 480183 total
* Output rows per task: 5 min, 256 max, 239 mean, 15 tasks used

Operator 2 Write: 15 tasks executed, 15 blocks produced in 3.4s
* Output num rows per block: 1 min, 1 max, 1 mean, 15 total
* Output size bytes per block: 172 min, 172 max, 172 mean, 2580 total

Dataset throughput:
\t* Ray Data throughput: 2.27 rows/s
"""


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for p in
                                          [*REPO.glob("bench/*.py"), *REPO.glob("jobs/*.py")]))
def test_script_compiles(script: str) -> None:
    py_compile.compile(str(REPO / script), doraise=True)


def test_operator_outputs_reads_the_stats_text() -> None:
    from bench.common import operator_outputs

    assert operator_outputs(STATS) == [
        ("FromBlocks", 3589, 269538),
        ("MapBatches(load_batch)->MapBatches(Scorer)", 3589, 480183),
        ("Write", 15, 2580),
    ]
    assert operator_outputs("Dataset throughput: nothing") == []


def test_read_all_reads_every_file(tmp_path: Path) -> None:
    from bench.common import read_all

    (tmp_path / "a.png").write_bytes(b"x" * 10)
    (tmp_path / "b.jpg").write_bytes(b"")
    assert read_all(str(p) for p in sorted(tmp_path.iterdir())) == 10
    with pytest.raises(FileNotFoundError):
        read_all([str(tmp_path / "missing.jpg")])


def test_cpu_timeline_gives_each_process_its_cpu_between_two_moments(tmp_path: Path) -> None:
    """A child that spins for a second and one that sleeps: the window holds the spinner's
    CPU (to within a sampling interval), not the sleeper's; a mark is timed when it appears."""
    import os
    import subprocess
    import sys
    import time

    from bench.common import CpuTimeline

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(1.5)"
    with CpuTimeline(every=0.2, marks=lambda: os.listdir(tmp_path)) as timeline:
        t0 = time.time()
        busy = subprocess.Popen([sys.executable, "-c", spin])
        idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2.5)"])
        time.sleep(0.5)
        (tmp_path / "epoch_0001").mkdir()
        busy.wait(), idle.wait()
        t1 = time.time()
    seconds, per, busy_s, _steal = timeline.window(t0, t1)
    assert 2.0 < seconds < 30.0  # 2.5 s of sleep, plus two interpreters starting
    assert per[busy.pid][1] >= 0.8, per[busy.pid]
    assert per[idle.pid][1] < 0.5, per[idle.pid]
    assert any("time.sleep(2.5)" in n for n in per[idle.pid][0])
    assert busy_s >= per[busy.pid][1] - 0.2  # the machine's busy time holds the tree's
    assert t0 < timeline.marks["epoch_0001"] < t1


def test_the_training_benchmark_sorts_ray_processes() -> None:
    from bench.bench_train import fer_ray_kind, short_name

    kind = fer_ray_kind(driver_pid=1)
    assert kind(1, {"python bench/bench_train.py"}) == "driver (this script, sampling included)"
    assert kind(2, {"ray::IDLE", "ray::RayTrainWorker"}) == "model process"
    assert kind(3, {"ray::IDLE", "ray::MapBatches(transform_batch)"}) == "Ray Data tasks, idle workers"
    assert kind(4, {"ray::SplitCoordinator"}) == "Ray's other processes"
    assert kind(5, {"/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x"}) == "Ray's other processes"
    assert short_name("/venv/bin/python -u /venv/lib/ray/_private/log_monitor.py --x") == "log_monitor.py"
    assert short_name("ray::SplitCoordinator ") == "ray::SplitCoordinator"
    assert short_name("/venv/lib/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp") == "gcs_server"


def test_benchmarks_read_the_folders_as_prepare_does(tmp_path, capsys) -> None:
    """The plain side listed val/'s class folders by their exact names after fer_ray's side had
    trained (a val/Happy, or a val without disgust/, failed it then), and with no val/ folder
    fer_ray validated on a share of train/ it had not trained on while the plain loop trained
    on all of train/ and validated on nothing."""
    from bench.bench_ingest import folder_items
    from bench.common import split_folders

    for split, names in (("train", ["happy", "sad"]), ("test", ["happy"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "1.png").write_bytes(b"x")
    assert split_folders(str(tmp_path)) is None
    assert "needs train/ and val/ folders" in capsys.readouterr().out
    assert split_folders(str(tmp_path / "missing")) is None  # (skipped in one line, not a traceback)
    assert "needs train/ and val/ folders" in capsys.readouterr().out
    (tmp_path / "Validation" / "Happy").mkdir(parents=True)
    (tmp_path / "Validation" / "Happy" / "2.PNG").write_bytes(b"x")
    train, val = split_folders(str(tmp_path))
    assert val == str(tmp_path / "Validation")
    assert folder_items(val) == [(str(tmp_path / "Validation" / "Happy" / "2.PNG"), 3)]  # happy: 3
    assert [label for _, label in folder_items(train)] == [3, 5]


def _accuracy_sh(env: dict[str, str]):
    import os
    import subprocess
    import sys

    return subprocess.run(["bash", str(REPO / "bench" / "accuracy.sh")], capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, **env}, timeout=120)


def test_accuracy_script_trains_from_scratch_or_not_at_all(tmp_path) -> None:
    """A rerun into the same OUT resumed the run there, or rewrote a finished one's outputs
    in seconds, and printed its figures with train_minutes=0.1; shards of another dataset
    in OUT were trained on."""
    import json

    fer = tmp_path / "fer"
    for split in ("Training", "Validation"):  # (names prepare takes: the script found only train/, val/)
        (fer / split / "happy").mkdir(parents=True)
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)

    done = _accuracy_sh({"FER": str(fer), "OUT": str(out)})
    assert done.returncode == 1, done
    assert f"error: {out}/run exists, from a run before; remove it (or set OUT=...) to train again" in done.stderr
    assert "val_acc=" not in done.stdout

    (out / "run").rmdir()
    (out / "shards").mkdir()
    (out / "shards" / "manifest.json").write_text(json.dumps({"source": str(tmp_path / "other")}))
    done = _accuracy_sh({"FER": str(fer), "OUT": str(out)})
    assert done.returncode == 1, done
    assert f"{out}/shards was prepared from {tmp_path / 'other'}, not {fer}; remove it" in done.stderr
    assert not (out / "run").exists()

    (fer / "Validation").rename(fer / "test")
    skipped = _accuracy_sh({"FER": str(fer), "OUT": str(out)})
    assert skipped.returncode == 0 and skipped.stdout.startswith(f"skipped: {fer} needs train/ and val/"), skipped
