"""Evaluate a checkpoint on its dataset's test set (or the validation split it was selected on).

    python eval.py --ckpt runs/cifar10/best.pdckpt --data-file cifar-10-python.tar.gz
    python eval.py --ckpt runs/cifar10 --split val --json
    python eval.py --ckpt runs/cifar10 --inference --precision bf16   # a CPU with bf16 units
    python eval.py --ckpt runs/cifar10 --precision bf16   # on our CPU kernels in bf16, as --amp-eval
    python eval.py --ckpt runs/finetune          # an image-folder run: its val split

Prints top-1/top-5 accuracy, loss, per-class accuracy, the confusion matrix and
images/s; saves the confusion matrix as a PNG next to the checkpoint.
"""
import contextlib
import json
import os
import sys
import tempfile

import cpu_settings  # noqa: F401  (first: the CPU settings, before paddle loads)
import paddle
import checkpoint
import config
import cpu_kernels
import data
import device as devices
import engine
import errors
import plots
import predictors
import tta


def eval_split(cfg, args, class_names):
    """The dataset ``args.split`` of the run ``cfg`` was trained on (or of --data-file / --data-dir)."""
    folder = cfg.dataset == "folder"
    if folder and args.split == "test":
        raise errors.UserError("an image-folder run has no test split (the folder is split into train and val "
                               "only); use --split val")
    flag, wrong = ("--data-dir", "--data-file") if folder else ("--data-file", "--data-dir")
    given, other = (args.data_dir, args.data_file) if folder else (args.data_file, args.data_dir)
    if other:
        raise errors.UserError(f"{wrong} is not for this checkpoint (--dataset {cfg.dataset}); it takes {flag}")
    if given:
        cfg = config.make_config({"data_dir" if folder else "data_file": given}, base=cfg)
    recorded = cfg.data_dir if folder else cfg.data_file
    if not given and recorded and not os.path.exists(recorded):
        raise errors.UserError(f"the data the run was trained on, {recorded} (recorded in the checkpoint), is not "
                               f"there; pass {flag} PATH")
    loaded = data.load(cfg)
    if loaded.classes != list(class_names):
        where = f"--data-dir {cfg.data_dir}" if folder else f"the {cfg.dataset} data"
        raise errors.UserError(f"{where} has the classes {', '.join(loaded.classes[:12])}; the checkpoint "
                               f"was trained on {', '.join(class_names[:12])}: evaluate it on data of those classes")
    dataset = loaded.splits[args.split]
    if not len(dataset):
        raise errors.UserError(f"the run has no {args.split} split (val_size was 0); use --split test")
    return dataset


def on_cpu_kernels(model, bf16, ours=True):
    """``model`` evaluated as training evaluates it on the CPU: on our kernels (cpu_kernels/)
    where they build (unless the run chose Paddle's, ``ours`` False), in fp32, or with
    ``bf16`` in bf16 as a run with --amp-eval does; else in fp32 on Paddle's kernels, the
    same figures to rounding, slower."""
    on_cpu = paddle.get_device().startswith("cpu")
    if bf16 and not on_cpu:
        raise errors.UserError("--precision bf16 without --inference runs on our CPU kernels: add --device cpu, "
                               "or --inference for paddle.inference on this GPU")
    if bf16 and devices.cpu_bf16_units(devices.cpu_flags()) is None:
        raise errors.UserError("--precision bf16 needs a CPU with avx512_bf16 or amx_bf16; this one has neither: "
                               "drop --precision")
    if not on_cpu or not (ours or bf16):
        return
    op, why_not = cpu_kernels.load()
    if op is None and bf16:
        raise errors.UserError(f"--precision bf16 without --inference runs on our CPU kernels, which cannot be used "
                               f"here ({why_not}): add --inference")
    if op is None:
        return
    try:
        cpu_kernels.use_in(model, dtype="bfloat16" if bf16 else "float32", bf16_eval=bf16)
    except ValueError as e:  # bf16 needs a network whose layers our kernels all cover
        raise errors.UserError(f"{e}: add --inference for paddle.inference in bf16") from None


def main(argv=None):
    parser = errors.ArgumentParser(description="Evaluate a checkpoint (CIFAR-10, CIFAR-100, or an image-folder run's images).")
    parser.add_argument("--ckpt", required=True, help="a .pdckpt file, or a run directory (its best, else last)")
    parser.add_argument("--split", choices=["test", "val"],
                        help="default: test for CIFAR, val for an image-folder run (a folder has no test split)")
    parser.add_argument("--data-file", help="a CIFAR run: its archive (default: the one the run was trained on)")
    parser.add_argument("--data-dir", help="an image-folder run: its folder (default: the one it was trained on)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--inference", action="store_true",
                        help="the fast path: export the model and run it through paddle.inference "
                             "(oneDNN and conv+BN fusion on the CPU)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="--inference: fp16 on a GPU, bf16 on a CPU with avx512_bf16 or amx_bf16; bf16 "
                             "without --inference: our CPU kernels in bf16, as training's --amp-eval")
    parser.add_argument("--tensorrt", action="store_true", help="--inference on a GPU: through TensorRT")
    parser.add_argument("--tta", choices=tta.LEVELS, default="none",
                        help="test-time augmentation (tta.py): flip, or flip_translate (configs/fast94.yaml's)")
    parser.add_argument("--json", action="store_true", help="print one machine-readable line only")
    args = parser.parse_args(argv)
    with errors.user_errors():
        if args.batch_size < 1 or args.num_workers < 0:
            raise errors.UserError(f"--batch-size must be at least 1 and --num-workers at least 0, "
                                   f"got {args.batch_size} and {args.num_workers}")
        if (args.precision == "fp16" or args.tensorrt) and not args.inference:
            raise errors.UserError("--precision fp16 and --tensorrt choose how paddle.inference runs the model: "
                                   "add --inference")
        path = checkpoint.resolve(args.ckpt)
        state = checkpoint.load(path)
        predictor = predictors.CheckpointPredictor(path, args.device, state=state)
        cfg, model = predictor.cfg, predictor.model
        args.split = args.split or ("val" if cfg.dataset == "folder" else "test")
        class_names = state["class_names"]
        dataset = eval_split(cfg, args, class_names)
        if not args.inference:
            on_cpu_kernels(model, bf16=args.precision == "bf16", ours=cfg.cpu_kernels == "ours")
        if args.inference:
            # the export may go once the predictor is made: create_predictor reads the model
            # and its weights into memory
            with tempfile.TemporaryDirectory() as tmp:
                predictors.export(predictor, tmp, program=args.precision == "bf16")
                predictor = predictors.InferenceModelPredictor(tmp, args.device, precision=args.precision,
                                                               tensorrt=args.tensorrt)

            def predict_logits(images):  # the predictor's numpy logits, as a tensor for evaluate()
                return paddle.to_tensor(predictor(images.numpy()))
            model = predict_logits
        loader = data.make_loader(dataset, args.batch_size, args.num_workers)
        # the predictor takes and returns host arrays: its batches stay on the CPU, not GPU -> CPU
        # -> GPU for every batch (GPU audit #15), and the process's device comes back after
        with checkpoint.on_cpu() if args.inference else contextlib.nullcontext():
            r = engine.evaluate(tta.with_tta(model, args.tta), loader, len(class_names))

    png = os.path.join(os.path.dirname(os.path.abspath(path)), f"confusion_{args.split}.png")
    result = dict(ckpt=path, model=cfg.model, epoch=state["epoch"], split=args.split, n=r["n"],
                  path="paddle.inference" if args.inference else "dygraph", precision=args.precision, tta=args.tta,
                  top1=r["top1"], top5=r["top5"], loss=r["loss"], images_per_s=r["images_per_s"],
                  per_class=dict(zip(class_names, r["per_class"])), confusion=r["confusion"].tolist(),
                  confusion_png=png)
    with errors.user_errors():  # the figures first, then the picture: a failed save loses nothing printed
        print_result(result, args.json)
        try:
            plots.plot_confusion(png, r["confusion"], class_names,
                                 f"{cfg.model} epoch {state['epoch']}, {args.split}: top-1 {r['top1']:.4f}")
            if not args.json:
                print(f"saved {png}")
        except errors.UserError as e:
            result["confusion_png"] = None
            print(f"warning: {e}; the results above are complete", file=sys.stderr)
    return result


def print_result(result, as_json):
    if as_json:
        print(json.dumps(result), flush=True)
        return
    names, confusion = list(result["per_class"]), result["confusion"]
    print(f"{result['model']} (epoch {result['epoch']}) on {result['split']}: {result['n']} images")
    views = "" if result["tta"] == "none" else f"  (test-time augmentation {result['tta']})"
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  "
          f"{result['images_per_s']:.1f} img/s{views}")
    if len(names) > MAX_TABLE_CLASSES:
        print_many_classes(result)
        return
    print("per-class accuracy:")
    for name, acc in result["per_class"].items():
        print(f"  {name:<12} {acc:.4f}")
    width = max(6, max(len(str(v)) for row in confusion for v in row) + 1)
    print("confusion matrix (rows: true, columns: predicted):")
    print(" " * 12 + "".join(f"{name[:width - 1]:>{width}}" for name in names))
    for name, row in zip(names, confusion):
        print(f"  {name:<10}" + "".join(f"{v:>{width}}" for v in row))
    sys.stdout.flush()


MAX_TABLE_CLASSES = 20  # beyond, a table of every class and cell would not fit a screen


def print_many_classes(result, shown=10):
    """For many classes (CIFAR-100): the best and worst classes and the most confused pairs;
    the whole matrix is in the PNG and in --json."""
    ranked = sorted(result["per_class"].items(), key=lambda kv: kv[1])
    print(f"per-class accuracy, the {shown} lowest: " + ", ".join(f"{n} {a:.3f}" for n, a in ranked[:shown]))
    print(f"per-class accuracy, the {shown} highest: " + ", ".join(f"{n} {a:.3f}" for n, a in ranked[::-1][:shown]))
    names, confusion = list(result["per_class"]), result["confusion"]
    pairs = sorted(((confusion[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names))
                    if i != j and confusion[i][j]), reverse=True)[:shown]
    print("most confused (true -> predicted: images): " + ", ".join(f"{t} -> {p}: {c}" for c, t, p in pairs))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
