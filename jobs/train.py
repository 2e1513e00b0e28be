"""Train a facial-emotion classifier with Ray Train (timm model, Ray Data ingest).

    python jobs/train.py --data data/fer2013 --output runs/r50                 # ResNet50, ImageNet weights
    python jobs/train.py --data data/synth_shards --output runs/tiny \\
        --model resnet18 --no-pretrained --epochs 2 --image-size 48           # tiny CPU run
    python jobs/train.py --config configs/fer2013-cpu.yaml --data data/fer2013 --output runs/cpu
    python jobs/train.py --data data/fer2013 --output runs/gpu --use-gpu --num-workers 1
    ray job submit --working-dir . -- python jobs/train.py --data s3://b/shards --output s3://b/runs/r50 \\
        --use-gpu --num-workers 4

Flags override --config FILE (YAML or a run's config.json), which overrides defaults.
Running again with the same --output resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.cli import init_ray, run_job, warn_local_paths, warn_output_in_job_package  # noqa: E402
from fer_ray.config import HelpFormatter, TrainConfig, parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # --time-budget counts from here: Ray's start-up is in
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )

    output: list[str] = []  # (the run's folder, once known: what a stop says depends on it)

    def job() -> None:
        cfg, _ = parse_config(TrainConfig, argv, parser)  # --help and flag errors end here, before torch loads
        output.append(cfg.run.output)
        cfg.validate()  # and bad values (torch and Ray took 7-16 s to load before they were said)
        from fer_ray.trainer import check_inputs, train

        manifest = check_inputs(cfg)  # bad input fails here, before Ray starts
        # With the dashboard: Ray Train's placement-group cleaner asks its State API.
        init_ray(min_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker + 2, dashboard=True, quiet_workers=True)
        warn_local_paths(data=cfg.data.data, output=cfg.run.output)
        warn_output_in_job_package(cfg.run.output)
        out = train(cfg, manifest, started=started)
        # (the --epochs the run trained with: a finished run rerun with another trains no more)
        planned, epochs = out["planned_epochs"], out.get("epochs") or cfg.optim.epochs
        ended = (f" (it diverged in epoch {out['epochs_run']}: the epochs before it are kept)" if out.get("diverged")
                 else " (stopped early)" if out["stopped_early"]
                 else f" (the time budget fitted {planned} of --epochs {epochs})" if 0 < planned < epochs else "")
        print(
            f"best val accuracy {out['accuracy']:.4f} (macro F1 {out['macro_f1']:.4f}) at epoch "
            f"{out['best_epoch']} of {out['epochs_run']}{ended}; model: {out['best_dir']}"
        )

    def interrupted() -> str:
        from fer_ray.run_folders import has_checkpoint  # (no torch: said at once, whenever the stop came)

        if output and not has_checkpoint(output[0]):
            return ("interrupted before an epoch was saved; rerun the same command to start the run "
                    "from the beginning")
        return "interrupted; the epochs finished so far are saved: rerun the same command to resume after the last one"

    return run_job(job, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
