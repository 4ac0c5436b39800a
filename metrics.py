"""What a training run records besides its checkpoints: metrics.csv (one row per epoch),
curves.png, and, with --visualdl, VisualDL scalars (AI Studio's visualisation panel and
``visualdl --logdir RUN/visualdl`` read them).
"""
import csv
import os

import files
import plots
from errors import UserError


def visualdl_writer(cfg, me=0):
    """A VisualDL LogWriter into OUTPUT_DIR/visualdl on rank 0 when cfg.visualdl, else None."""
    if not cfg.visualdl or me != 0:
        return None
    try:
        from visualdl import LogWriter
    except ImportError:
        raise UserError("--visualdl needs VisualDL: pip install visualdl (or drop --visualdl)")
    return LogWriter(logdir=os.path.join(cfg.output_dir, "visualdl"))


def write_scalars(board, prefix, values, step):
    """``values`` (name -> number, "" for none) as ``prefix/name`` scalars at ``step``."""
    if board is not None:
        for name, value in values.items():
            if value != "":
                board.add_scalar(f"{prefix}/{name}", float(value), step)



FIELDS = ["epoch", "iteration", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "train_img_per_s"]


def write_metrics(path, history):
    with files.replacing(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(history)


def write_record(cfg, history):
    """metrics.csv and curves.png of ``history`` (every finished epoch), both written anew."""
    write_metrics(os.path.join(cfg.output_dir, "metrics.csv"), history)
    plots.plot_curves(os.path.join(cfg.output_dir, "curves.png"), history, title=cfg.model)


def record_epoch(cfg, history, board):
    """metrics.csv, curves.png and the VisualDL epoch scalars after an epoch (rank 0)."""
    write_record(cfg, history)
    row = history[-1]
    write_scalars(board, "epoch", {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")},
                  row["epoch"])
