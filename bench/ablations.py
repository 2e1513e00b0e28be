"""Run accuracy ablations one after another and append a row per run to a TSV.

    python bench/ablations.py --data runs/acc/shards --out runs/ablations --epochs 5

Each row: name, val accuracy and macro F1 of the best epoch (on val = PublicTest),
training minutes, and the command that reproduces it. The runs are the rows of
bench/ACCURACY.md. Each trains from scratch into --out/run<i>; a row whose folder exists
(from an earlier call) is passed over with a message: remove it to run it again.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (fer_ray without an install, as the other scripts)

import pandas as pd  # noqa: E402

from fer_ray import storage  # noqa: E402
from fer_ray.metrics import summary  # noqa: E402

BASE = ["--config", "configs/fer2013-cpu.yaml"]
RUNS = {
    "base (cpu preset)": [],
    "resnet18 at 32 px": ["--model", "resnet18"],
    "resnet18 at 48 px (the preset before)": ["--model", "resnet18", "--image-size", "48"],
    "no input blur (val as it is)": ["--input-blur", "off"],
    "+ class weights": ["--class-weights"],
    "augment medium": ["--augment", "medium"],
    "augment strong + dropout 0.2": ["--augment", "strong", "--drop-rate", "0.2"],
    "lr 1e-3": ["--lr", "0.001"],
    "3-channel stem": ["--model-kwargs", "{in_chans: 3}"],
    "fp32 (no bf16 autocast)": ["--amp", "off"],
    # (the preset has both: these rows take them away)
    "no EMA of weights": ["--ema-decay", "0"],
    "no mixup / cutmix": ["--mixup", "0", "--cutmix", "0"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prepared FER2013 shards")
    parser.add_argument("--out", required=True, help="folder for the runs and results.tsv")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(RUNS))
    if unknown:  # (a name of an older list ran nothing, silently)
        parser.error(f"no row named {', '.join(map(repr, unknown))}; the rows: {', '.join(map(repr, RUNS))}")
    # Absolute: train.py runs in the repository, this script wherever it was started.
    out, data = Path(args.out).resolve(), storage.normalize(args.data)  # (a bucket's URI kept as it is)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.tsv"
    for i, (name, extra) in enumerate(RUNS.items()):
        if args.only and name not in args.only:
            continue
        run = out / f"run{i}"
        if run.exists():  # train.py would resume it, or rewrite a finished run's outputs in seconds
            print(f"{name}: {run} exists, from a run before; remove it or give another --out", file=sys.stderr)
            continue
        cmd = [sys.executable, "jobs/train.py", *BASE, "--data", data, "--output", str(run),
               "--epochs", str(args.epochs), *extra]
        start = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        minutes = (time.time() - start) / 60
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        found = summary(pd.read_parquet(run / "val_metrics.parquet"))
        row = [name, f"{found['accuracy']:.4f}", f"{found['macro_f1']:.4f}",
               f"{minutes:.1f}", shlex.join(["python", *cmd[1:]])]
        with open(table, "a") as f:
            f.write("\t".join(row) + "\n")
        print("\t".join(row[:4]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
