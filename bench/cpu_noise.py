"""How much a little CPU noise beside it costs a training step that uses every core.

    python bench/cpu_noise.py                     # resnet18, 48 px, batch 64, 3 rounds
    python bench/cpu_noise.py --rounds 5 --noise 0.1

`bench/bench_train.py`'s CPU table shows Ray's other processes (raylet, GCS, dashboard,
log monitor, Ray Train's and Ray Data's helper actors) taking a tenth to a fifth of a core
beside the Train worker, which loses more than that. This script measures the mechanism
without Ray: one process trains the model with as many torch threads as cores (as the
Train worker does) on a batch held in memory, while a second process wakes every 10 ms
and spins for a share `--noise` of each 10 ms, at the same priority as the training (nice
0) or at the lowest (nice 19). Every round runs the three cases in turn; the table gives
each case's milliseconds and CPU milliseconds per step, median over the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from fer_ray.model import create_model, fastest_format, format_name, time_cpu_formats  # noqa: E402

NOISE = """import sys, time
busy, period = float(sys.argv[1]) * 0.01, 0.01
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(period - busy)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.1, help="share of one core the noise process spins")
    args = parser.parse_args(argv)
    if not 0 < args.noise < 1:
        parser.error("--noise must be between 0 and 1")

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    model = create_model(args.model, 7)
    amp_dtype, channels_last = fastest_format(time_cpu_formats(model, args.batch_size, 3, args.image_size))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=layout)
    y = torch.randint(0, 7, (args.batch_size,))
    print(f"{machine()}; {args.model}, {args.image_size} px, batch {args.batch_size}, "
          f"{format_name(amp_dtype, channels_last)}, {cores} torch threads; noise {args.noise:.0%} of a core")

    def step() -> None:
        with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(nice: int | None) -> tuple[float, float]:
        noise = None
        if nice is not None:
            noise = subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", NOISE, str(args.noise)])
            time.sleep(0.5)
        try:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.steps):
                step()
            wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        finally:
            if noise is not None:
                noise.kill()
                noise.wait()
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        return 1000 * wall / args.steps, 1000 * cpu / args.steps

    for _ in range(20):
        step()  # warm-up
    cases = {"no noise": None, "noise at nice 0 (as the training)": 0, "noise at nice 19": 19}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name, nice in cases.items():
            results[name].append(timed(nice))
            print(f"round {r + 1} {name}: {results[name][-1][0]:.1f} ms/step", flush=True)

    base = statistics.median([ms for ms, _ in results["no noise"]])
    print(f"\n{'case':<36}{'ms/step':>9}{'CPU ms/step':>13}{'vs no noise':>13}")
    for name, rows in results.items():
        ms, cpu = statistics.median([m for m, _ in rows]), statistics.median([c for _, c in rows])
        print(f"{name:<36}{ms:>9.1f}{cpu:>13.1f}{ms / base:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
