"""Measuring helpers shared by the benchmark scripts (Linux /proc; no extra packages)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

MiB = 2**20
REPO = Path(__file__).resolve().parents[1]
DEFAULT_FER = REPO.parent / "shared" / "datasets" / "fer2013"


def machine() -> str:
    """Cores and CPU model, for the tables."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}"


def read_all(paths) -> int:
    """Read every file once (the bytes read): the page cache then holds them, so the timed
    runs that follow all read from memory, whichever of them runs first. Without it the
    first side to touch a folder pays the disk (seen: the DataLoader over the FER2013 train
    folder at 3,655 images/s with the caches just dropped, 5,520 after this)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over this process and every descendant (Linux /proc)."""
    pss = rss = 0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss:", "Rss:")):
                        kib = int(line.split()[1]) * 1024
                        if line[0] == "P":
                            pss += kib
                        else:
                            rss += kib
        except (OSError, ValueError):
            continue  # exited meanwhile
    return pss, rss


def cpu_times() -> dict[int, int]:
    """Clock ticks of CPU per process in this tree (their own; children are in the tree)."""
    ticks = {}
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime stime
        except (OSError, ValueError):
            continue
    return ticks


class Sampler:
    """While the block runs, samples the tree's memory (keeping the peaks) and the CPU
    ticks of every process seen, so processes that exit before the end (an actor, a
    DataLoader worker) still count, to within one sampling interval."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.peak_pss = self.peak_rss = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        pss, rss = tree_memory()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        for pid, ticks in cpu_times().items():
            self._last[pid] = max(ticks, self._last.get(pid, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "Sampler":
        self._first = cpu_times()
        self._last = dict(self._first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        ticks = sum(t - self._first.get(pid, 0) for pid, t in self._last.items())
        self.cpu_seconds = ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------


