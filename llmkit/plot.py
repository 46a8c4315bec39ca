"""Training curves: training and validation loss (and a classifier's metric) against step, from each run's
metrics.jsonl, one figure for one run or several. `llmkit plot` draws it, and the training loop calls
`save_curves` at the end of every run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import LlmkitError, UsageError

FORMATS = ("png", "svg", "pdf")


@dataclass
class Curves:
    """One run's logged points: (step, value) pairs per series."""

    name: str
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    metric: str | None = None  # eval_accuracy, eval_f1_macro, ... for classifiers
    eval_metric: list[tuple[int, float]] = field(default_factory=list)


def read_curves(run_dir: Path, name: str | None = None) -> Curves:
    """The curves in RUN_DIR/metrics.jsonl: lines with "loss" are training logs, lines with eval_* evaluations."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise LlmkitError(f"{run_dir} {what}: give a run directory, the --output of `llmkit pretrain` or "
                          "`llmkit finetune` (not its best/ or checkpoints/)")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a run killed while writing leaves a partial last line; every other line is whole
    curves = Curves(name or run_dir.name, metric=_metric_of(run_dir, entries))
    for entry in entries:
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        if "loss" in entry:
            curves.train_loss.append((entry["step"], entry["loss"]))
        if "eval_loss" in entry:
            curves.eval_loss.append((entry["step"], entry["eval_loss"]))
        if curves.metric in entry:
            curves.eval_metric.append((entry["step"], entry[curves.metric]))
    if not (curves.train_loss or curves.eval_loss):
        raise LlmkitError(f"{path} holds no logged step yet: plot the run once it has logged (every --log-every "
                          "steps)")
    return curves


def _metric_of(run_dir: Path, entries: list) -> str | None:
    """The metric the run chose its best model by (llmkit_run.json), else accuracy; None for language models,
    whose only other figure, perplexity, is the exponential of the loss."""
    try:
        chosen = json.loads((run_dir / "llmkit_run.json").read_text()).get("config", {}).get("metric")
    except (OSError, ValueError):
        chosen = None
    for key in (f"eval_{chosen}" if chosen and chosen != "loss" else None, "eval_accuracy"):
        if key and any(isinstance(e, dict) and key in e for e in entries):
            return key
    return None


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name (runs/a/lm, runs/b/lm)."""
    names = [p.name or str(p) for p in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs)]


def save_curves(run_dirs: list[Path], output: Path) -> Path:
    """Draw the runs' curves into one image (.png, .svg or .pdf, written atomically); return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise UsageError("give the run directories to plot: llmkit plot RUN_DIR [RUN_DIR ...] --output FILE.png")
    output = Path(output)
    kind = output.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise UsageError(f"--output {output}: give a file name ending in {', '.join('.' + f for f in FORMATS)}")
    paths = [Path(d) for d in run_dirs]
    runs = [read_curves(path, name) for path, name in zip(paths, run_names(paths))]
    with_metric = [r for r in runs if r.eval_metric]
    # Figure (not pyplot) with the Agg canvas: no global state and no display, safe inside a training process.
    fig = Figure(figsize=(12 if with_metric else 7.5, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_metric else 1, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    loss_ax = axes[0]
    for run, color in zip(runs, colors):
        label = f"{run.name} " if len(runs) > 1 else ""
        _line(loss_ax, run.train_loss, color, f"{label}training", "-")
        _line(loss_ax, run.eval_loss, color, f"{label}validation", "--", marker="o")
    _finish(loss_ax, "loss", "loss (lower is better)")
    if with_metric:
        metric_ax = axes[1]
        for run, color in zip(runs, colors):
            if run.eval_metric:
                name = run.metric.removeprefix("eval_")
                _line(metric_ax, run.eval_metric, color, f"{run.name} {name}" if len(runs) > 1 else name, "--",
                      marker="o")
        names = sorted({r.metric.removeprefix("eval_") for r in with_metric})
        _finish(metric_ax, "validation " + " / ".join(names), " / ".join(names) + " (higher is better)")
    fig.suptitle(f"training curves of {runs[0].name}" if len(runs) == 1 else "training curves")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    fig.savefig(tmp, format=kind)
    os.replace(tmp, output)
    return output


def _line(ax, points: list[tuple[int, float]], color: str, label: str, style: str, marker: str | None = None):
    if not points:
        return
    steps, values = zip(*points)
    # A single point draws no line: give it a marker so that a run logged once still shows.
    ax.plot(steps, values, style, color=color, label=label, marker=marker or ("o" if len(points) == 1 else None),
            markersize=4, linewidth=1.6)


def _finish(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
