"""The figures a run writes: training curves, a confusion matrix, the degradation study.

Each function draws into a new matplotlib figure, saves it as a PNG when given a path
(written to a temporary file and renamed, so a reader never sees half a picture) and
returns the figure, so a notebook can show it inline.
"""
import files


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), unless a notebook chose one."""
    import matplotlib
    if "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi=80):
    """Save ``fig`` to ``path`` (if any; atomically, files.replacing) and close it: a closed
    figure still shows in a notebook when returned, and a loop that plots every epoch does
    not pile figures up."""
    try:
        if path:
            with files.replacing(path) as tmp:
                fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
    return fig


def plot_curves(path, history, title=""):
    """Loss and accuracy per epoch, train vs val (``history``: metrics.csv rows)."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax1), ("acc", ax2)):
        ax.plot(epochs, [float(h[f"train_{key}"]) for h in history], "o-", label="train")
        val = [h[f"val_{key}"] for h in history]
        if not all(v == "" for v in val):
            ax.plot(epochs, [float(v) for v in val], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if key == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


MAX_COUNTS_SHOWN = 20  # classes up to which each cell shows its count (CIFAR-100's 10,000 would be unreadable)


def plot_confusion(path, confusion, class_names, title=""):
    """A confusion matrix (rows: true class, columns: predicted) with its counts (up to
    MAX_COUNTS_SHOWN classes; beyond, the colours alone on a larger canvas, small labels)."""
    plt = pyplot()
    n = len(class_names)
    many = n > MAX_COUNTS_SHOWN
    fig, ax = plt.subplots(figsize=(14, 12.5) if many else (7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90 if many else 45, ha="center" if many else "right",
                  fontsize=5 if many else None)
    ax.set_yticks(range(n), class_names, fontsize=5 if many else None)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(0 if many else n):  # no counts beyond MAX_COUNTS_SHOWN classes
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.colorbar(im)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_degradation(path, histories, title):
    """He et al. Fig. 6: training error dashed, held-out error solid, plain nets left,
    ResNets right. ``histories``: {net: [metrics rows per seed]}; with several seeds the
    line is the mean and the band the min..max over seeds."""
    import numpy as np
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ("plain", "resnet")):
        for i, (net, runs) in enumerate((n, r) for n, r in histories.items() if n.startswith(kind)):
            color = f"C{i}"
            epochs = [int(r["epoch"]) for r in runs[0]]
            for key, style, what in (("train_acc", "--", "train"), ("val_acc", "-", "held-out")):
                err = 100 * (1 - np.array([[float(r[key]) for r in rows] for rows in runs]))
                label = f"{net} {what}" + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
                ax.plot(epochs, err.mean(axis=0), style, color=color, label=label)
                if len(runs) > 1:
                    ax.fill_between(epochs, err.min(axis=0), err.max(axis=0), color=color, alpha=0.15)
        ax.set_title({"plain": "plain networks", "resnet": "ResNets"}[kind])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("error (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=72)
