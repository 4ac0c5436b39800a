"""Evaluate a checkpoint on the CIFAR-10 test set (or the validation split it was selected on).

    python eval.py --ckpt runs/cifar10/best.pdckpt --data-file ../data/cifar-10-python.tar.gz
    python eval.py --ckpt runs/cifar10 --split val --json

Prints top-1/top-5 accuracy, loss, per-class accuracy, the confusion matrix and
images/s; saves the confusion matrix as a PNG next to the checkpoint.
"""
import argparse
import json
import os
import sys

import models  # noqa: F401  (sets OMP_NUM_THREADS before paddle loads)
import config
import data
import engine
import predictors


def plot_confusion(path, confusion, class_names, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.colorbar(im)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a CIFAR-10 checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a .pdckpt file, or a run directory (its best, else last)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--data-file", help="cifar-10-python.tar.gz (default: the one the run was trained on)")
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
    try:
        path = engine.resolve_ckpt(args.ckpt)
        state = engine.load_checkpoint(path)
        checkpoint = predictors.CheckpointPredictor(path, args.device, state=state)
        cfg, model = checkpoint.cfg, checkpoint.model
        if args.data_file:
            cfg = config.make_config({"data_file": args.data_file}, base=cfg)
        dataset = data.cifar10_splits(cfg)[args.split]
        if not len(dataset):
            raise engine.RunError(f"the run has no {args.split} split (val_size was 0); use --split test")
        loader = engine.make_loader(dataset, args.batch_size, args.num_workers)
        class_names = state["class_names"]
        if args.inference:
            import tempfile
            import paddle
            with tempfile.TemporaryDirectory() as tmp:
                predictors.export(checkpoint, tmp)
                predictor = predictors.InferenceModelPredictor(tmp, args.device, precision=args.precision,
                                                               tensorrt=args.tensorrt)

            def model(images):  # the predictor's numpy logits, as a tensor for evaluate()
                return paddle.to_tensor(predictor(images.numpy()))
        r = engine.evaluate(model, loader, len(class_names))
    except (config.ConfigError, data.DataError, engine.RunError) as e:
        sys.exit(f"error: {e}")

    png = os.path.join(os.path.dirname(os.path.abspath(path)), f"confusion_{args.split}.png")
    plot_confusion(png, r["confusion"], class_names,
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
