"""The report's matplotlib figures, drawn from result records (no number typed by hand)."""

from __future__ import annotations

from pathlib import Path

from cdiff.io import atomic_write
from cdiff.results import SweepPoint


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_curves(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Loss curves on one log-scale axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=label)
    ax.set(
        xlabel="step",
        ylabel="training loss (MSE of the prediction, Min-SNR-weighted if set)",
        yscale="log",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_sweep(path: Path, points: list[SweepPoint], x: str, title: str) -> None:
    """FID, GAN-test accuracy and time per sweep point."""
    plt = _pyplot()
    labels = [p.setting for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    columns = (
        ("judge FID (lower is better)", [p.score.fid for p in points]),
        ("GAN-test accuracy", [p.score.gan_test for p in points]),
        ("seconds", [p.seconds for p in points]),
    )
    for ax, (name, values) in zip(axes, columns, strict=True):
        ax.plot(labels, values, marker="o")
        ax.set(xlabel=x, title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.06)
    _save(fig, path)


def plot_per_class(path: Path, per_class: dict[str, dict[str, float]], title: str) -> None:
    """GAN-test accuracy per class, one bar group per model (a figure saying so where there are no scores)."""
    plt = _pyplot()
    if not per_class:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no judge scores: a judge cannot score a domain of one class", ha="center", va="center")
        ax.set(title=title)
        _save(fig, path)
        return
    classes = list(next(iter(per_class.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes)), 3.5))
    width = 0.8 / len(per_class)
    for i, (model, values) in enumerate(per_class.items()):
        ax.bar([j + i * width for j in range(len(classes))], [values.get(c, 0.0) for c in classes], width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, rotation=45, ha="right")
    ax.set(ylabel="classified as its class", ylim=(0, 1), title=title)
    ax.legend()
    _save(fig, path)


def side_by_side(path: Path, images: dict[str, Path], title: str) -> None:
    """Sample grids next to each other (base | adapter | full fine-tune), one row per class in each."""
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 5.5))
    for ax, (label, file) in zip(list(getattr(axes, "flat", [axes])), images.items(), strict=True):
        ax.imshow(Image.open(file))
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    _save(fig, path)
