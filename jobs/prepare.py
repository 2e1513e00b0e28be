"""Prepare image folders or the FER2013 CSV as Parquet shards for training.

    python jobs/prepare.py --source ../shared/datasets/fer2013 --output data/fer2013
    python jobs/prepare.py --source data/synth --output data/synth_shards      # tiny demo data
    python jobs/prepare.py --source fer2013.csv --output data/fer2013_csv
    ray job submit --working-dir . -- python jobs/prepare.py --source s3://b/faces --output s3://b/shards

--source: split folders (train/ or training/, val/, valid/ or validation/, optional test/, each with class
folders), one folder of class folders (split by --val-fraction), or the FER2013 CSV.
Writes OUTPUT/<split>/*.parquet (image, label, path) and OUTPUT/manifest.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.cli import init_ray, run_job, warn_local_paths, warn_output_in_job_package  # noqa: E402
from fer_ray.config import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--source", required=True, help="image folder(s) or FER2013 CSV")
    parser.add_argument("--output", required=True, help="shards folder to write")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="val share carved out of train (stratified) when the source has no val split "
                             "(default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--shard-rows", type=int, default=5000, help="rows per Parquet file")
    args = parser.parse_args(argv)
    given_fraction, args.val_fraction = args.val_fraction, 0.1 if args.val_fraction is None else args.val_fraction
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")

    def job() -> None:
        from fer_ray import storage
        from fer_ray.prepare import check_inputs, prepare

        # Bad input fails here, before Ray starts.
        listing = check_inputs(args.source, args.output, val_fraction=args.val_fraction,
                               seed=args.seed, shard_rows=args.shard_rows)
        if given_fraction is not None and listing.val_fraction is None:  # (it ran as if carved anew)
            logging.getLogger("fer_ray.prepare").warning(
                "--val-fraction %s is not used: %s has a val split of its own (%s)", given_fraction, args.source,
                "the CSV's PublicTest rows" if listing.kind == "csv" else "its val folder")
        init_ray()
        warn_local_paths(source=args.source, output=args.output)
        warn_output_in_job_package(args.output)

        manifest = prepare(args.source, args.output, val_fraction=args.val_fraction,
                           seed=args.seed, shard_rows=args.shard_rows, listing=listing)
        for split, c in manifest["splits"].items():
            per = ", ".join(f"{k} {v}" for k, v in c["per_class"].items())
            print(f"{split}: {c['total']} images ({per})")
        skipped, noun = len(manifest["skipped"]), "row" if manifest["source_kind"] == "csv" else "file"
        print(f"skipped {skipped} {noun}{'' if skipped == 1 else 's'}; manifest: "
              f"{storage.join(args.output, 'manifest.json')} ({manifest['seconds']} s)")

    # (A stop while the new splits replace an old output's leaves neither: the manifest,
    # written last, is what makes a shards folder.)
    return run_job(job, interrupted="interrupted; the output is a complete shards folder or none (the old one "
                                    "is gone if the stop came while the new splits replaced it): run the same "
                                    "command again to prepare from the start")


if __name__ == "__main__":
    sys.exit(main())
