"""Measuring helpers shared by the benchmark scripts (Linux /proc; no extra packages)."""

from __future__ import annotations

import os
import re
import threading
import time
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


def _ticks(pid: int) -> int:
    """A process's own CPU clock ticks, utime + stime (raises OSError once it has exited)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_times() -> dict[int, int]:
    """Clock ticks of CPU per process in this tree (their own; children are in the tree)."""
    ticks = {}
    for pid in _descendants(os.getpid()):
        try:
            ticks[pid] = _ticks(pid)
        except (OSError, ValueError, IndexError):
            continue
    return ticks


class _Periodic:
    """Calls `_sample` every `every` seconds in a thread between `_start` and `_finish`,
    and once more at the finish."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._stop = threading.Event()

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class Sampler(_Periodic):
    """While the block runs, samples the tree's memory (keeping the peaks) and the CPU
    ticks of every process seen, so processes that exit before the end (an actor, a
    DataLoader worker) still count, to within one sampling interval."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(every)
        self.peak_pss = self.peak_rss = 0
        self.cpu_seconds = 0.0

    def _sample(self) -> None:
        pss, rss = tree_memory()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        for pid, ticks in cpu_times().items():
            self._last[pid] = max(ticks, self._last.get(pid, 0))

    def __enter__(self) -> "Sampler":
        self._first = cpu_times()
        self._last = dict(self._first)
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        ticks = sum(t - self._first.get(pid, 0) for pid, t in self._last.items())
        self.cpu_seconds = ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores (/proc/stat):
    busy is user, nice, system, irq and softirq; steal is time the hypervisor gave away."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, v[7] / tick


def _names_and_ticks() -> dict[int, tuple[str, int]]:
    out = {}
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
            out[pid] = (name, _ticks(pid))
        except (OSError, ValueError, IndexError):
            continue
    return out


class CpuTimeline(_Periodic):
    """Where the CPU time goes, by process, between two moments.

    A thread samples, every `every` seconds, the CPU ticks and the name (command line,
    which Ray sets to the task or actor a worker runs) of every process in this tree, and
    the machine's busy and steal seconds; `marks()` (optional) returns names whose first
    sighting is timed (a checkpoint folder appearing ends an epoch). `window(t0, t1)`
    gives each process's CPU seconds between the samples at or before t0 and t1 (a process
    that exits loses at most one interval), its names, and the machine's busy and steal
    seconds: what the tree did not use went to the rest of the machine.
    """

    def __init__(self, every: float = 1.0, marks=None) -> None:
        super().__init__(every)
        self.marks_fn = marks
        self.samples: list[tuple[float, dict[int, tuple[str, int]], tuple[float, float]]] = []
        self.marks: dict[str, float] = {}

    def _sample(self) -> None:
        now = time.time()
        self.samples.append((now, _names_and_ticks(), machine_cpu()))
        if self.marks_fn is not None:
            for mark in self.marks_fn():
                self.marks.setdefault(mark, now)

    def __enter__(self) -> "CpuTimeline":
        self._sample()
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()

    def window(self, t0: float, t1: float) -> tuple[float, dict[int, tuple[set[str], float]], float, float]:
        """(seconds, {pid: (names, CPU seconds)}, machine busy s, machine steal s) between
        the last samples at or before t0 and t1."""
        tick = os.sysconf("SC_CLK_TCK")
        inside = [s for s in self.samples if s[0] <= t1]
        before = [s for s in inside if s[0] <= t0] or inside[:1]
        start, end = before[-1], inside[-1]
        names: dict[int, set[str]] = {}
        last: dict[int, int] = {}
        for when, procs, _machine in self.samples:
            if start[0] <= when <= end[0]:
                for pid, (name, ticks) in procs.items():
                    names.setdefault(pid, set()).add(name)
                    last[pid] = ticks
        per = {pid: (names[pid], (ticks - start[1].get(pid, ("", 0))[1]) / tick)
               for pid, ticks in last.items()}
        return (end[0] - start[0], per, end[2][0] - start[2][0], end[2][1] - start[2][1])


# Ray Data's stats text: an operator's header, and its output totals.
_OPERATOR = re.compile(r"^Operator \d+ (.+?):", re.M)
_TOTAL = re.compile(r"\* Output (num rows|size bytes) per block: .*?(\d+) total")


def operator_outputs(stats: str) -> list[tuple[str, int, int]]:
    """(operator, rows, bytes) it output, from a Dataset.stats() text."""
    found = []
    starts = list(_OPERATOR.finditer(stats))
    for m, end in zip(starts, [n.start() for n in starts[1:]] + [len(stats)]):
        totals = dict(_TOTAL.findall(stats[m.end():end]))
        if "size bytes" in totals:
            found.append((m.group(1), int(totals.get("num rows", 0)), int(totals["size bytes"])))
    return found


def split_folders(data: str) -> tuple[str, str] | None:
    """FOLDER's train and val folders, named as jobs/prepare.py takes them (any case;
    training/, valid/, validation/), or None after a line saying the benchmark is skipped:
    the plain scripts read these two folders, so fer_ray's side must not carve val out of
    train (jobs/prepare.py does where there is no val folder)."""
    from fer_ray.constants import SPLIT_ALIASES, TRAIN, VAL

    names = sorted(os.listdir(data)) if os.path.isdir(data) else []
    found = {SPLIT_ALIASES[name.lower()]: os.path.join(data, name) for name in names
             if name.lower() in SPLIT_ALIASES and os.path.isdir(os.path.join(data, name))}
    if TRAIN not in found or VAL not in found:
        print(f"skipped: {data} needs train/ and val/ folders of class folders (FER2013: val is PublicTest)")
        return None
    return found[TRAIN], found[VAL]
