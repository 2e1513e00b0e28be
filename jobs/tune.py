"""Sweep learning rate and label smoothing with Ray Tune (ASHA stops weak trials).

    python jobs/tune.py --data data/synth_shards --output runs/sweep --num-samples 3 \\
        --model test_resnet --no-pretrained --epochs 3 --image-size 32      # tiny CPU sweep
    python jobs/tune.py --data data/fer2013 --output runs/sweep --num-samples 16 \\
        --lr-range 1e-4 3e-3 --smoothing-range 0 0.3 --epochs 20
    ray job submit --working-dir . -- python jobs/tune.py --data s3://b/shards \\
        --output s3://b/sweeps/s1 --num-samples 32 --use-gpu --num-workers 1

Every training flag of jobs/train.py works here too and applies to each trial, but --lr and
--label-smoothing: each trial samples them from --lr-range and --smoothing-range.
Running again with the same --output resumes an interrupted sweep; a finished one is
not retrained. TUNE_DIR: results.parquet, best/, best_config.json, tune_summary.png,
trials/<id>/ (each a complete run folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.cli import init_ray, run_job, warn_local_paths, warn_output_in_job_package  # noqa: E402
from fer_ray.config import HelpFormatter, SweepConfig, parse_config  # noqa: E402
from fer_ray.constants import DIVERGED  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )

    output: list[str] = []  # (the sweep's folder, once known: what a stop says depends on it)

    def job() -> None:
        cfg, _ = parse_config(SweepConfig, argv, parser)  # --help and flag errors end here, before torch loads
        output.append(cfg.run.output)
        cfg.validate()  # and bad values (torch and Ray took 7-16 s to load before they were said)
        from fer_ray import storage
        from fer_ray.trainer import check_inputs

        manifest = check_inputs(cfg)  # bad input fails here, before any trial starts
        # With the dashboard: Ray Train's placement-group cleaner asks its State API.
        init_ray(min_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker + 2, dashboard=True, quiet_workers=True)
        warn_local_paths(data=cfg.data.data, output=cfg.run.output)
        warn_output_in_job_package(cfg.run.output)
        from fer_ray.tuning import sweep

        results, best = sweep(cfg, manifest)
        failed = int((results["status"] == "ERROR").sum())
        print(f"{len(results)} trials ({failed} failed) in {cfg.run.output}")
        if best:
            print(f"best: trial {best['trial_id']} lr {best['lr']:.2e} label smoothing "
                  f"{best['label_smoothing']:.3f} val acc {best['best_val_acc']:.4f}; "
                  f"model: {storage.join(cfg.run.output, 'best')}")
            return 0
        where = storage.join(cfg.run.output, "results.parquet")
        # A trial that diverged before an epoch to keep is an error whose text says so
        # (fer_ray.trainer.TrainingDiverged); one that ended with none and no error is rarer.
        diverged = int(results["error"].fillna("").str.startswith(DIVERGED).sum())
        ended = len(results) - failed
        if not diverged and not ended:
            print(f"error: no trial finished; each trial's error is in {where}", file=sys.stderr)
        else:
            why = [f"{diverged} diverged in their first epoch (a lower --lr-range?)" if diverged else "",
                   f"{failed - diverged} failed" if failed - diverged else "",
                   f"{ended} ended without one" if ended else ""]
            print(f"error: no trial kept an epoch: {' and '.join(w for w in why if w)}; the trials are in {where}",
                  file=sys.stderr)
        return 1

    def interrupted() -> str:
        from fer_ray.run_folders import saved_nothing  # (no torch: said at once, whenever the stop came)

        if output and saved_nothing(output[0]):
            return ("interrupted before any trial saved an epoch; rerun the same command to start the "
                    "sweep from the beginning")
        return "interrupted; each trial's finished epochs are saved: rerun the same command to resume the sweep"

    return run_job(job, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
