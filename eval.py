"""Evaluate a checkpoint on the CIFAR-10 test set (or the validation split it was selected on).

    python eval.py --ckpt runs/cifar10/best.pdckpt --data-file ../data/cifar-10-python.tar.gz
    python eval.py --ckpt runs/cifar10 --split val --json
    python eval.py --ckpt runs/finetune          # a fine-tuning run: its image folder's val split

Prints top-1/top-5 accuracy, loss, per-class accuracy, the confusion matrix and
images/s; saves the confusion matrix as a PNG next to the checkpoint.
"""
import argparse
import json
import os
import sys

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import checkpoint
import config
import data
import engine
import plots
import predictors


def eval_split(cfg, args, class_names):
    """The dataset ``args.split`` of the run ``cfg`` was trained on (or of --data-file / --data-dir)."""
    if isinstance(cfg, config.FinetuneConfig):
        if args.split == "test":
            raise config.UserError("a fine-tuning run has no test split (an image folder is split into train and "
                                   "val only); use --split val")
        if args.data_file:
            raise config.UserError("--data-file is for CIFAR-10 checkpoints; a fine-tuning run takes --data-dir")
        if args.data_dir:
            cfg = config.make_config({"data_dir": args.data_dir}, base=cfg)
        splits, classes, _ = data.image_folder_splits(cfg)
        if classes != list(class_names):
            raise config.UserError(f"--data-dir {cfg.data_dir} has the classes {', '.join(classes)}; the checkpoint "
                                   f"was trained on {', '.join(class_names)}: evaluate it on a folder of those classes")
        return splits["val"]
    if args.data_dir:
        raise config.UserError("--data-dir is for fine-tuning checkpoints; a CIFAR-10 checkpoint takes --data-file")
    if args.data_file:
        cfg = config.make_config({"data_file": args.data_file}, base=cfg)
    dataset = data.cifar10_splits(cfg)[args.split]
    if not len(dataset):
        raise config.UserError(f"the run has no {args.split} split (val_size was 0); use --split test")
    return dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint (CIFAR-10, or a fine-tuning run's images).")
    parser.add_argument("--ckpt", required=True, help="a .pdckpt file, or a run directory (its best, else last)")
    parser.add_argument("--split", choices=["test", "val"],
                        help="default: test for CIFAR-10, val for a fine-tuning run (an image folder has no test split)")
    parser.add_argument("--data-file", help="cifar-10-python.tar.gz (default: the one the run was trained on)")
    parser.add_argument("--data-dir", help="a fine-tuning run: its image folder (default: the one it was trained on)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--inference", action="store_true",
                        help="the fast path: export the model and run it through paddle.inference "
                             "(oneDNN and conv+BN fusion on the CPU)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="--inference on a GPU")
    parser.add_argument("--tensorrt", action="store_true", help="--inference on a GPU: through TensorRT")
    parser.add_argument("--json", action="store_true", help="print one machine-readable line only")
    args = parser.parse_args(argv)
    with config.user_errors():
        if args.batch_size < 1 or args.num_workers < 0:
            raise config.UserError(f"--batch-size must be at least 1 and --num-workers at least 0, "
                                   f"got {args.batch_size} and {args.num_workers}")
        path = checkpoint.resolve(args.ckpt)
        state = checkpoint.load(path)
        predictor = predictors.CheckpointPredictor(path, args.device, state=state)
        cfg, model = predictor.cfg, predictor.model
        args.split = args.split or ("val" if isinstance(cfg, config.FinetuneConfig) else "test")
        class_names = state["class_names"]
        dataset = eval_split(cfg, args, class_names)
        if args.inference:
            import tempfile
            import paddle
            with tempfile.TemporaryDirectory() as tmp:
                predictors.export(predictor, tmp)
                predictor = predictors.InferenceModelPredictor(tmp, args.device, precision=args.precision,
                                                               tensorrt=args.tensorrt)
            # the predictor takes and returns host arrays: keep the loader's batches on the
            # CPU, not GPU -> CPU -> GPU for every batch (GPU audit #15)
            paddle.set_device("cpu")

            def model(images):  # the predictor's numpy logits, as a tensor for evaluate()
                return paddle.to_tensor(predictor(images.numpy()))
        loader = data.make_loader(dataset, args.batch_size, args.num_workers)
        r = engine.evaluate(model, loader, len(class_names))

    png = os.path.join(os.path.dirname(os.path.abspath(path)), f"confusion_{args.split}.png")
    result = dict(ckpt=path, model=cfg.model, epoch=state["epoch"], split=args.split, n=r["n"],
                  path="paddle.inference" if args.inference else "dygraph",
                  top1=r["top1"], top5=r["top5"], loss=r["loss"], images_per_s=r["images_per_s"],
                  per_class=dict(zip(class_names, r["per_class"])), confusion=r["confusion"].tolist(),
                  confusion_png=png)
    with config.user_errors():  # the figures first, then the picture: a failed save loses nothing printed
        print_result(result, args.json)
        try:
            plots.plot_confusion(png, r["confusion"], class_names,
                                 f"{cfg.model} epoch {state['epoch']}, {args.split}: top-1 {r['top1']:.4f}")
            if not args.json:
                print(f"saved {png}")
        except config.UserError as e:
            result["confusion_png"] = None
            print(f"warning: {e}; the results above are complete", file=sys.stderr)
    return result


def print_result(result, as_json):
    if as_json:
        print(json.dumps(result), flush=True)
        return
    names, confusion = list(result["per_class"]), result["confusion"]
    print(f"{result['model']} (epoch {result['epoch']}) on {result['split']}: {result['n']} images")
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  "
          f"{result['images_per_s']:.1f} img/s")
    print("per-class accuracy:")
    for name, acc in result["per_class"].items():
        print(f"  {name:<12} {acc:.4f}")
    width = max(6, max(len(str(v)) for row in confusion for v in row) + 1)
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * 12 + "".join(f"{name[:width - 1]:>{width}}" for name in names))
    for name, row in zip(names, confusion):
        print(f"  {name:<10}" + "".join(f"{v:>{width}}" for v in row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
