"""Every benchmark in one run, one table, and the five ratios on the last line (`make bench`).

    python bench/run_all.py                                   # ../shared/datasets/fer2013
    python bench/run_all.py --data /path/to/fer2013           # a folder with train/ and val/

Runs bench_ingest.py, bench_train.py and bench_scoring.py one after another (each in its
own process, so one's Ray cluster and memory do not weigh on the next), prints their
output, a summary table, and last:
`ingest_vs_dataloader=X ingest_vs_ceiling=X train_overhead=X scoring_vs_plain=X memory_growth=X`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import DEFAULT_FER, machine, split_folders  # noqa: E402

SCRIPTS = ("bench_ingest.py", "bench_train.py", "bench_scoring.py")
RATIOS = ("ingest_vs_dataloader", "ingest_vs_ceiling", "train_overhead", "scoring_vs_plain", "memory_growth")
TARGETS = {
    "ingest_vs_dataloader": ">= 1.0", "ingest_vs_ceiling": ">= 0.70", "train_overhead": "<= 1.05",
    "scoring_vs_plain": ">= 1.0", "memory_growth": "<= 1.3",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_FER), help="folder with train/ and val/ of class folders")
    args = parser.parse_args(argv)
    args.data = os.path.abspath(args.data)  # the scripts run from the repository root
    if split_folders(args.data) is None:
        return 0

    found: dict[str, str] = {}
    minutes: dict[str, float] = {}
    failed = []
    for script in SCRIPTS:
        print(f"\n===== {script} =====", flush=True)
        start = time.time()
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / script), "--data", args.data],
            # RAY_ADDRESS=local: a Ray of the benchmark's own, never a cluster `ray start` runs
            # here (its processes would be outside the memory and CPU samples).
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "RAY_ADDRESS": "local"},
        )
        minutes[script] = (time.time() - start) / 60
        # Ray's own log lines go to stderr; the scripts' tables go to stdout.
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"{script} failed with exit status {proc.returncode}", file=sys.stderr)
            failed.append(script)
        found.update(dict(re.findall(r"(\w+)=([0-9.]+|nan)", proc.stdout.strip().splitlines()[-1]))
                     if proc.stdout.strip() else {})

    print(f"\n===== summary ({machine()}) =====")
    print(f"{'ratio':<24}{'value':>8}  target")
    for name in RATIOS:
        print(f"{name:<24}{found.get(name, 'n/a'):>8}  {TARGETS[name]}")
    print("minutes: " + ", ".join(f"{s} {m:.1f}" for s, m in minutes.items()))
    print(" ".join(f"{name}={found.get(name, 'nan')}" for name in RATIOS))
    return 1 if failed else 0  # (the table and ratios are printed either way; n/a: that script failed)


if __name__ == "__main__":
    sys.exit(main())
