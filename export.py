"""Export a checkpoint as an inference model for paddle.inference (batch size dynamic).

    python export.py --ckpt runs/finetune/best.pdckpt --output exported/flowers
    python predict.py --inference-model exported/flowers photo.jpg
    python export.py --ckpt runs/cifar10 --output exported/cifar10 --format onnx
    python predict.py --onnx exported/cifar10/model.onnx photo.jpg
"""
import os

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import checkpoint
import errors
import files
import predictors


def main(argv=None):
    parser = errors.ArgumentParser(description="Export a checkpoint with paddle.jit.save.")
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
        if args.format == "onnx":
            predictors.onnx_converter()  # before any work: a missing converter is one line, and no folder made
        with checkpoint.on_cpu():  # and back: in a notebook the next cell keeps its GPU (GPU audit 2, N10)
            predictor = predictors.CheckpointPredictor(checkpoint.resolve(args.ckpt), device="cpu")
        # written aside and moved in at the end: a stop or a failure leaves --output as it was
        with files.writing_into(args.output) as tmp:
            with checkpoint.on_cpu():
                predictors.export(predictor, tmp, shipped_to=args.output)
            if args.format == "onnx":
                predictors.export_onnx(tmp)
        stale_onnx = os.path.join(args.output, "model.onnx")
        if args.format != "onnx" and existing and os.path.exists(stale_onnx):
            os.remove(stale_onnx)  # from the replaced model
    if args.format == "onnx":
        print(f"exported {os.path.join(args.output, 'model.onnx')} (opset {predictors.ONNX_OPSET}, batch size dynamic)")
    print(f"exported {os.path.join(args.output, 'model')}.* and {args.output}/meta.json")


if __name__ == "__main__":
    main()
