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

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import checkpoint
import config
import data
import engine
import plots
import predictors


def eval_split(cfg, args):
    """The dataset ``args.split`` of the run ``cfg`` was trained on (or of --data-file / --data-dir)."""
    if isinstance(cfg, config.FinetuneConfig):
        if args.split == "test":
            raise config.UserError("a fine-tuning run has no test split (an image folder is split into train and "
                                   "val only); use --split val")
        if args.data_file:
            raise config.UserError("--data-file is for CIFAR-10 checkpoints; a fine-tuning run takes --data-dir")
        if args.data_dir:
            cfg = config.make_config({"data_dir": args.data_dir}, base=cfg)
        return data.image_folder_splits(cfg)[0]["val"]
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
        dataset = eval_split(cfg, args)
        class_names = state["class_names"]
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
    plots.plot_confusion(png, r["confusion"], class_names,
                         f"{cfg.model} epoch {state['epoch']}, {args.split}: top-1 {r['top1']:.4f}")
    result = dict(ckpt=path, model=cfg.model, epoch=state["epoch"], split=args.split, n=r["n"],
                  path="paddle.inference" if args.inference else "dygraph",
                  top1=r["top1"], top5=r["top5"], loss=r["loss"], images_per_s=r["images_per_s"],
                  per_class=dict(zip(class_names, r["per_class"])), confusion=r["confusion"].tolist(),
                  confusion_png=png)
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{cfg.model} (epoch {state['epoch']}) on {args.split}: {r['n']} images")
    print(f"top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  loss {r['loss']:.4f}  {r['images_per_s']:.1f} img/s")
    print("per-class accuracy:")
    for name, acc in zip(class_names, r["per_class"]):
        print(f"  {name:<12} {acc:.4f}")
    width = max(6, max(len(str(v)) for v in r["confusion"].ravel()) + 1)
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * 12 + "".join(f"{name[:width - 1]:>{width}}" for name in class_names))
    for name, row in zip(class_names, r["confusion"]):
        print(f"  {name:<10}" + "".join(f"{v:>{width}}" for v in row))
    print(f"saved {png}")
    return result


if __name__ == "__main__":
    main()
