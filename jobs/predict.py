"""Score image folders with a trained model: predictions, metrics and errors as Parquet.

    python jobs/predict.py --model runs/r50/best --input photos --output preds/photos
    python jobs/predict.py --model runs/tiny/best --input data/synth/val --output preds/tiny \\
        --batch-size 64                                                        # tiny CPU run
    python jobs/predict.py --model runs/r50/best --input data/fer2013 --split val --output preds/val --tta
    python jobs/predict.py --model runs/r50/best --input ../shared/datasets/fer2013/val \\
        --output preds/val --use-gpu --num-actors 2
    ray job submit --working-dir . -- python jobs/predict.py --model s3://b/runs/r50/best \\
        --input s3://b/photos --output s3://b/preds --use-gpu --num-actors 4

INPUT is a folder of images at any depth (first-level folders named after the model's
classes give the true labels) or a shards folder written by jobs/prepare.py. Writes
OUT/predictions/*.parquet, OUT/errors.parquet (files that could not be scored, with the
reason), OUT/summary.json and, when true labels are known, OUT/metrics.parquet,
OUT/confusion_matrix.parquet and OUT/confusion_matrix.png. A rerun replaces OUT.

Exit status: 0 when scored; 1 when none of the files could be scored (OUT is still written,
the reasons in OUT/errors.parquet); 2 for bad input (one sentence, nothing written); 130
on Ctrl-C, 143 on SIGTERM (OUT untouched either way, unless the stop came once every file
was scored: then the closing line says what is where, the new OUT in place, the
predictions kept in OUT.tmp-<id>, or on S3 or GCS the finished output stopped while copied
into OUT, that copy kept in OUT.tmp-<id> and a rerun replacing OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.cli import init_ray, run_job, warn_local_paths, warn_output_in_job_package  # noqa: E402
from fer_ray.config import AMP_MODES, HelpFormatter  # noqa: E402
from fer_ray.constants import TTA_MODES  # noqa: E402


def _blur_arg(value: str) -> float | str:
    """--input-blur: 'auto', 'model' or a sigma."""
    from fer_ray.config import parse_input_blur

    if value in ("auto", "model"):
        return value
    try:
        return parse_input_blur(value)  # a number or off; 'auto' is handled above
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be auto, model, off or a sigma >= 0 in pixels, got {value!r}"
        ) from None


def _actors_arg(value: str) -> int | None:
    """--num-actors: None for 'auto', else a count (checked with the other inputs)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a number, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a training run's or a sweep's best/ folder")
    parser.add_argument("--input", required=True, help="image folder or prepared shards folder")
    parser.add_argument("--output", required=True, help="folder to write (replaced on rerun)")
    parser.add_argument("--split", default=None,
                        help="shards input only: the split to score (all splits when left out)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call")
    parser.add_argument("--num-actors", type=_actors_arg, default="auto",
                        help="model replicas: one GPU each with --use-gpu; on CPU they split the "
                        "cores and each decodes its own batches. auto: one, and one more for each "
                        "whole 10,000 images, at most the cores (the cluster's GPUs with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES,
                        help="autocast precision of the model: auto (bf16 on GPUs that have it, "
                        "else fp16; on a CPU whichever of fp32 and bf16 each scorer times faster "
                        "on a few batches), off (fp32), bf16, or fp16 (GPU only)")
    parser.add_argument("--tta", nargs="?", const="flip", default=None, choices=TTA_MODES,
                        help="test-time augmentation: flip (what --tta alone means) averages each "
                        "image with its mirror image; ten-crop adds the corners and centre at 15/16 "
                        "of the side, and their mirror images (12 model passes per image, against 2 for flip)")
    parser.add_argument("--input-blur", default="auto", type=_blur_arg,
                        help="Gaussian blur sigma in px for the images, to match a model trained "
                        "on blurrier images: auto (for such a model, measured on 1,024 of the "
                        "input images against the training images' sharpness the model "
                        "recorded: images as blurry as those are left alone), model (the sigma "
                        "the model recorded in training: measured, or given to jobs/train.py), off, "
                        "or a number")
    args = parser.parse_args(argv)

    def job() -> int:
        from fer_ray import storage
        from fer_ray.predict import ERRORS_FILE, check_inputs, cores, describe, predict

        options = {"split": args.split, "batch_size": args.batch_size, "num_actors": args.num_actors,
                   "amp": args.amp}
        check_inputs(args.model, args.input, args.output, use_gpu=args.use_gpu, **options)  # before Ray starts
        init_ray(min_cpus=(args.num_actors or cores()) + 2)  # auto: at most one actor per core
        warn_local_paths(model=args.model, input=args.input)  # OUT: the driver writes it all
        warn_output_in_job_package(args.output)
        summary = predict(args.model, args.input, args.output, use_gpu=args.use_gpu, tta=args.tta,
                          input_blur=args.input_blur, **options)
        print(describe(summary))
        if summary["total"] and not summary["scored"]:
            errors = storage.join(summary["output"], ERRORS_FILE)
            print(f"error: none of the {summary['total']} files could be scored; the reasons are in {errors}",
                  file=sys.stderr)
            return 1
        return 0

    return run_job(job, interrupted="interrupted; nothing was written (the output is complete or absent): "
                                    "run the same command again to score from the start")


if __name__ == "__main__":
    sys.exit(main())
