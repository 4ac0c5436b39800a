"""Predict the class of one image or of every image in a folder.

    python predict.py --ckpt runs/finetune/best.pdckpt photo.jpg --topk 3
    python predict.py --ckpt runs/finetune photos/ --json
    python predict.py --inference-model exported/flowers photos/     # paddle.inference, faster

Images of any mode (grayscale, palette, RGBA, CMYK) are converted to RGB. In folder
mode an unreadable file is reported and skipped; a single unreadable image is an error.
"""
import json
import os
import sys

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import numpy as np

import checkpoint
import data
import errors
import predictors


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict_files(predictor, files, topk=5, batch_size=32, on_error=None):
    """Yield (file, [(class, probability), ...]) per readable file, in batches."""
    transform = data.eval_transform(predictor.preprocess)
    k = min(topk, len(predictor.class_names))
    for start in range(0, len(files), batch_size):
        batch, names = [], []
        for path in files[start:start + batch_size]:
            try:
                batch.append(np.asarray(transform(predictors.load_image(path))))
                names.append(path)
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a bad file
                if on_error is None:
                    raise errors.UserError(f"cannot read image {path} ({type(e).__name__}: {e})")
                on_error(path, e)
        if not batch:
            continue
        probs = softmax(predictor(np.stack(batch)))
        for path, p in zip(names, probs):
            order = np.argsort(-p)[:k]
            yield path, [(predictor.class_names[i], float(p[i])) for i in order]


def positive(flag, value):
    if value < 1:
        raise errors.UserError(f"{flag} must be at least 1, got {value}")


def main(argv=None):
    parser = errors.ArgumentParser(description="Predict image classes with a trained ResNet.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a .pdckpt checkpoint, or a run directory (its best)")
    source.add_argument("--inference-model", metavar="DIR", help="a directory written by export.py")
    source.add_argument("--onnx", metavar="FILE", help="a model.onnx written by export.py --format onnx (onnxruntime)")
    parser.add_argument("path", help="an image file or a folder of images")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="--inference-model on a GPU")
    parser.add_argument("--tensorrt", action="store_true", help="--inference-model on a GPU: through TensorRT")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)

    def skipped(path, error):
        print(f"skipped {path}: cannot read image ({type(error).__name__})", file=sys.stderr)

    with errors.user_errors():
        positive("--topk", args.topk)
        positive("--batch-size", args.batch_size)
        if os.path.isdir(args.path):
            files, on_error = predictors.list_images(args.path), skipped
            if not files:
                raise errors.UserError(f"{args.path} holds no image files ({', '.join(predictors.IMAGE_EXTENSIONS)})")
        elif os.path.isfile(args.path):
            files, on_error = [args.path], None
        else:
            raise errors.UserError(f"{args.path}: no such file or folder")
        if args.ckpt:
            predictor = predictors.CheckpointPredictor(checkpoint.resolve(args.ckpt), args.device)
        elif args.onnx:
            predictor = predictors.OnnxPredictor(args.onnx)
        else:
            predictor = predictors.InferenceModelPredictor(args.inference_model, args.device,
                                                           precision=args.precision, tensorrt=args.tensorrt)
        results = []
        for path, top in predict_files(predictor, files, args.topk, args.batch_size, on_error):
            results.append((path, top))
            if args.json:
                print(json.dumps(dict(file=path, top=[dict(label=c, prob=p) for c, p in top])), flush=True)
            else:
                print(f"{path}: " + ", ".join(f"{c} {p:.4f}" for c, p in top), flush=True)
        if not results:
            raise errors.UserError(f"none of the {len(files)} image files in {args.path} could be read as an image")
    return results


if __name__ == "__main__":
    main()
