"""Write a synthetic face-expression image folder for tests and the CPU demo.

    python jobs/make_synthetic.py --output data/synth --train-per-class 200 --val-per-class 50
    python jobs/make_synthetic.py --output data/synth_jpg --test-per-class 50 --format jpg

Writes OUTPUT/<split>/<class>/<class>_<index>.<ext> (OUTPUT new or empty) for the seven FER2013 classes:
cartoon faces whose brows, eyes and mouth take each expression's shape, under random
pose, lighting and noise. The same --seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.config import ConfigError, HelpFormatter  # noqa: E402
from fer_ray.constants import TEST, TRAIN, VAL  # noqa: E402
from fer_ray.storage import check_creatable, local_here, missing_folders, remove_empty  # noqa: E402
from fer_ray.synthetic import IMAGE_FORMATS, generate_dataset  # noqa: E402


MAX_SIZE = 1024  # a face drawn at 100,000 px would take hours and gigabytes
PARTIAL = ".partial-"  # a run's hidden folder of images not yet moved into place
LOCK = ".lock"  # in that folder: locked (flock) while its run writes, released when it ends or dies


_TERMINATED = []  # SIGTERM came: exit 143 as the other jobs do (Ctrl-C: 130)


def _stopped(signum: int, frame: object) -> None:
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the splits into")
    parser.add_argument("--train-per-class", type=_count, default=200,
                        help="train images per class")
    parser.add_argument("--val-per-class", type=_count, default=50, help="val images per class")
    parser.add_argument("--test-per-class", type=_count, default=0,
                        help="test images per class; 0 writes no test split")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--seed", type=_count, default=0, help="seed of every image's randomness")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="image file format")
    args = parser.parse_args(argv)
    per_split = {TRAIN: args.train_per_class, VAL: args.val_per_class, TEST: args.test_per_class}
    if not 8 <= args.size <= MAX_SIZE:
        parser.error(f"--size must be 8 to {MAX_SIZE} pixels, got {args.size}")
    if not any(per_split.values()):
        parser.error("every split has 0 images per class; nothing to write")
    if not args.output.strip():  # (an unset shell variable: it would name the current folder)
        parser.error("--output is empty (an unset shell variable?); give a folder")
    try:
        # The path the other jobs read it as: "~/synth" (as bash leaves `--output=~/synth`)
        # made a folder "~" here, and "file:/tmp/x" a folder "file:".
        out = local_here(args.output)
    except ConfigError as e:
        parser.error(str(e).rstrip("."))
    if out is None:  # (written with the local filesystem: s3:// made a folder "s3:")
        parser.error(f"--output {args.output!r}: the generator writes local folders only; "
                     "write one here and copy it (e.g. `aws s3 sync`)")
    args.output = out
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output!r} is a file; choose a folder")
    if os.path.isdir(args.output) and [e for e in os.listdir(args.output) if not e.startswith(PARTIAL)]:
        # Files of another run (other counts, size or format) would mix with the new ones.
        parser.error(f"--output {args.output!r} is not empty; choose a new folder or remove it first")
    try:
        check_creatable(args.output, "--output")
    except ConfigError as e:
        parser.error(str(e).rstrip("."))

    start = time.perf_counter()
    # Written into a hidden folder in OUTPUT, each split moved up when every image is
    # written; a run that stops removes it (and the folders it made), a killed run's is
    # removed by the next.
    made = missing_folders(args.output)
    os.makedirs(args.output, exist_ok=True)
    # A hidden folder's lock is held while its run writes: a killed run's folder is removed,
    # a running one's refused (a second run on the same --output deleted the first's images
    # as it wrote them). Its name says the run's process, for the message.
    for stale in glob.glob(os.path.join(glob.escape(args.output), PARTIAL + "*")):
        pid = _writer(stale)
        if pid is not None:
            parser.error(f"--output {args.output!r} is being written by another run (process {pid}); "
                         f"wait for it, or choose another folder (or remove {stale} if no such run is going)")
        shutil.rmtree(stale)
    partial = tempfile.mkdtemp(prefix=f"{PARTIAL}{os.getpid()}-", dir=args.output)
    lock = open(os.path.join(partial, LOCK), "wb")  # (held until this process ends)
    fcntl.flock(lock, fcntl.LOCK_EX)
    signal.signal(signal.SIGTERM, _stopped)  # a job scheduler's stop: the same clean-up
    done, moved, renaming = False, [], None
    try:
        counts = generate_dataset(partial, per_split, size=args.size, seed=args.seed,
                                  image_format=args.format)
        for split in counts:
            renaming = (os.path.join(partial, split), os.path.join(args.output, split))
            os.rename(*renaming)  # (refused onto a folder that is there: not this run's to remove)
            moved.append(renaming[1])
            renaming = None
        done = True
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 128 + signal.SIGTERM if _TERMINATED else 130
    finally:
        if renaming and not os.path.exists(renaming[0]) and os.path.exists(renaming[1]):
            moved.append(renaming[1])  # (a stop landed just after the move)
        shutil.rmtree(partial, ignore_errors=True)
        lock.close()
        if not done:
            for split in moved:  # (a stop between two splits' moves: "nothing was written" holds)
                shutil.rmtree(split, ignore_errors=True)
            remove_empty(made)
    splits = ", ".join(
        f"{split} {sum(c.values())} ({next(iter(c.values()))}/class)" for split, c in counts.items()
    )
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} {args.size}px {args.format} images ({splits}) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _writer(partial: str) -> str | None:
    """The process writing a hidden folder of images while it runs (it holds the folder's
    lock); None for a killed run's folder, or one from before the lock."""
    try:
        f = open(os.path.join(partial, LOCK), "rb")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.path.basename(partial)[len(PARTIAL):].partition("-")[0] or "?"
    return None


if __name__ == "__main__":
    sys.exit(main())
