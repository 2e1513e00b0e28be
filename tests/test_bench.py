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
    from bench.bench_scoring import operator_outputs

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
