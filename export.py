"""Export a checkpoint as an inference model for paddle.inference (batch size dynamic).

    python export.py --ckpt runs/finetune/best.pdckpt --output exported/flowers
    python predict.py --inference-model exported/flowers photo.jpg
    python export.py --ckpt runs/cifar10 --output exported/cifar10 --format onnx
    python predict.py --onnx exported/cifar10/model.onnx photo.jpg
"""
import argparse
import os

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import checkpoint
import errors
import predictors


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint with paddle.jit.save.")
    parser.add_argument("--ckpt", required=True, help="a .pdckpt checkpoint (or a run directory: its best)")
    parser.add_argument("--output", required=True, help="directory to write model.* and meta.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --output")
    parser.add_argument("--format", choices=["paddle", "onnx"], default="paddle",
                        help="onnx: also model.onnx through paddle2onnx (pip install -r requirements-onnx.txt)")
    args = parser.parse_args(argv)
    with errors.user_errors():
        if os.path.isfile(args.output):
            raise errors.UserError(f"--output {args.output} is a file; give a directory")
        existing = [f for f in os.listdir(args.output) if f.startswith("model.") or f == predictors.META] \
            if os.path.isdir(args.output) else []
        if existing and not args.overwrite:
            raise errors.UserError(f"--output {args.output} already holds an export ({', '.join(sorted(existing))}); "
                                   "pick another directory, or add --overwrite to replace it")
        if existing and os.path.exists(os.path.join(args.output, "model.onnx")):
            os.remove(os.path.join(args.output, "model.onnx"))  # it would stay behind, from the replaced model
        with checkpoint.on_cpu():  # and back: in a notebook the next cell keeps its GPU (GPU audit 2, N10)
            predictor = predictors.CheckpointPredictor(checkpoint.resolve(args.ckpt), device="cpu")
            prefix = predictors.export(predictor, args.output)
        if args.format == "onnx":
            onnx_path = predictors.export_onnx(args.output)
            print(f"exported {onnx_path} (opset {predictors.ONNX_OPSET}, batch size dynamic)")
    print(f"exported {prefix}.* and {args.output}/meta.json")


if __name__ == "__main__":
    main()
