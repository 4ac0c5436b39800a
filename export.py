"""Export a checkpoint as an inference model for paddle.inference (batch size dynamic).

    python export.py --ckpt runs/finetune/best.pdckpt --output exported/flowers
    python predict.py --inference-model exported/flowers photo.jpg
"""
import argparse

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import checkpoint
import config
import predictors


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint with paddle.jit.save.")
    parser.add_argument("--ckpt", required=True, help="a .pdckpt checkpoint (or a run directory: its best)")
    parser.add_argument("--output", required=True, help="directory to write model.* and meta.json to")
    args = parser.parse_args(argv)
    with config.user_errors():
        predictor = predictors.CheckpointPredictor(checkpoint.resolve(args.ckpt), device="cpu")
        prefix = predictors.export(predictor, args.output)
    print(f"exported {prefix}.* and {args.output}/meta.json")


if __name__ == "__main__":
    main()
