"""The PNG figures of `kdcache eval` and `kdcache compare`, drawn with matplotlib's Agg canvas (no display needed).

    plot_confusion(cm, classes, Path("reports/x/confusion-0-exported.png"), title="exported")
    plot_per_class(per_class, classes, Path("reports/x/per-class-0-exported.png"), title="exported")
    plot_training({"image": "runs/image"}, Path("compare-training.png"))
    plot_accuracy_latency([Point("teacher", 3.1, 91.0, teacher=True), ...], Path("compare-accuracy-latency.png"))

Every figure is a `matplotlib.figure.Figure` bound to an Agg canvas here: no pyplot, so no global backend or figure
state, and nothing ever tries to open a window. matplotlib is imported when a figure is drawn, not on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DPI = 110
NAMED_TICKS = 40        # class names on the confusion matrix's axes up to this many classes
ANNOTATED_CELLS = 20    # counts written in the confusion matrix's cells up to this many classes
NAMED_BARS = 60         # per-class bars with class names up to this many classes; beyond, curves sorted by F1


@dataclass(frozen=True)
class Point:
    """One model in the accuracy vs latency plot."""

    label: str
    ms_per_image: float | None  # None: not timed (left out of the plot)
    score_pct: float
    teacher: bool = False
    note: str = ""          # appended to the label, e.g. "(teacher, RANDOM)"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # binds the Agg canvas to this figure only
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------------------------------------- eval (zero-shot)

def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, *, title: str) -> Path:
    """A heatmap of the confusion matrix (rows: true class, columns: predicted), coloured by the fraction of each true
    class, with the counts written in the cells when there are few classes."""
    import numpy as np

    counts = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    support = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, support, out=np.zeros(counts.shape, dtype=np.float64), where=support > 0)
    side = min(4.0 + 0.45 * n, 14.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= NAMED_TICKS:
        ax.set_xticks(range(n), labels=list(classes), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center",
                      fontsize=8)
        ax.set_yticks(range(n), labels=list(classes), fontsize=8)
    if n <= ANNOTATED_CELLS:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class" if n <= NAMED_TICKS else "predicted class (index)",
           ylabel="true class" if n <= NAMED_TICKS else "true class (index)",
           title=f"Confusion matrix: {title}")
    return _save(fig, path)


def plot_per_class(per_class: dict, classes: Sequence[str], path: Path, *, title: str) -> Path:
    """Precision, recall and F1 of every class as grouped bars (class names on the axis); with more than NAMED_BARS
    classes, three curves over the classes sorted by F1, without names (report.md's table has them)."""
    import numpy as np

    p, r, f = (np.asarray(per_class[k], dtype=np.float64) * 100 for k in ("precision", "recall", "f1"))
    n = len(classes)
    fig = _figure(min(max(6.0, 0.55 * n + 2.5), 18.0) if n <= NAMED_BARS else 9.0, 4.2)
    ax = fig.subplots()
    if n <= NAMED_BARS:
        x, w = np.arange(n), 0.27
        for k, (vals, name) in enumerate(((p, "precision"), (r, "recall"), (f, "F1"))):
            ax.bar(x + (k - 1) * w, vals, width=w, label=name, color=f"C{k}")
        ax.set_xticks(x, labels=list(classes), rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center",
                      fontsize=8)
        ax.set_xlabel("class")
    else:
        order = np.argsort(-f, kind="stable")
        x = np.arange(n)
        for k, (vals, name) in enumerate(((p, "precision"), (r, "recall"), (f, "F1"))):
            ax.plot(x, vals[order], label=name, color=f"C{k}", linewidth=1.0 if name != "F1" else 1.8)
        ax.set_xlabel(f"classes sorted by F1 ({n}; names in report.md)")
    ax.set(ylabel="%", ylim=(0, 105), title=f"Per-class precision, recall, F1: {title}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------- compare

def plot_training(runs: dict[str, str], path: Path) -> bool:
    """Training loss and validation agreement/cosine against step, one colour per run (legend: the dict's keys).
    False, and nothing written, if no run has metrics."""
    from kdcache.train.rundir import read_metrics

    data = {label: read_metrics(d) for label, d in runs.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return False
    fig = _figure(12, 4.2)
    ax_loss, ax_val = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(data.items()):
        colour = f"C{i % 10}"
        train = [r for r in rows if r.get("kind") == "train"]
        val = [r for r in rows if r.get("kind") == "val"]
        if train:
            steps = [r["step"] for r in train]
            ax_loss.plot(steps, [r["loss"] for r in train], color=colour, label=f"{label}: loss")
            for term in sorted({k for r in train for k in r if k.endswith("_loss")}):
                ax_loss.plot(steps, [r.get(term) for r in train], color=colour, alpha=0.45, linewidth=0.8,
                             linestyle="--", label=f"{label}: {term}")
        if val:
            steps = [r["step"] for r in val]
            if any("val_top1_agreement" in r for r in val):
                ax_val.plot(steps, [r.get("val_top1_agreement") for r in val], color=colour, marker="o",
                            label=f"{label}: top-1 agreement")
            ax_val.plot(steps, [r.get("val_cosine") for r in val], color=colour, marker="s", linestyle="--",
                        label=f"{label}: cosine")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training losses")
    ax_val.set(xlabel="step", ylabel="agreement with the teacher", title="Validation (cache's held-out rows)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_accuracy_latency(points: Sequence[Point], path: Path, *, ylabel: str) -> bool:
    """One point per model: its headline score against ms per image at batch 1. False, and nothing written, if no
    model has a latency."""
    pts = [p for p in points if p.ms_per_image]
    if not pts:
        return False
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    for p in pts:
        ax.scatter([p.ms_per_image], [p.score_pct], marker="*" if p.teacher else "o", s=160 if p.teacher else 50,
                   color="C3" if p.teacher else "C0", zorder=3)
        ax.annotate(f"{p.label} {p.note}".strip(), (p.ms_per_image, p.score_pct), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    xs = [p.ms_per_image for p in pts]
    if max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)  # room for the labels written right of each point
    ax.set(xlabel="ms per image (batch 1)", ylabel=ylabel, title="Accuracy vs latency")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True
