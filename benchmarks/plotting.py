"""Plot helpers shared by the benchmark scripts. matplotlib is optional there: without it the
scripts print their tables and write their JSON, and skip the PNG."""

from __future__ import annotations

from pathlib import Path


def pyplot_or_none():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss_curves(series: dict[str, list[dict]], path: Path, title: str, *, xlabel: str = "step",
                     ylabel: str = "training loss", window: int = 0, log_scale: bool = False) -> None:
    """One line per entry of ``series`` (legend label -> points with "step" and "loss"), each
    loss the mean of itself and up to ``window`` points before it; written to ``path``."""
    plt = pyplot_or_none()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, curve in series.items():
        losses = [point["loss"] for point in curve]
        smooth = [sum(losses[max(0, i - window):i + 1]) / len(losses[max(0, i - window):i + 1])
                  for i in range(len(losses))]
        axis.plot([point["step"] for point in curve], smooth, label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if log_scale:
        axis.set_yscale("log")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
