"""Results reports: quality goals checked against the metrics, Markdown tables and matplotlib figures.

Everything here is generated from metrics files; no number is typed by hand.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cdiff.io import atomic_write
from cdiff.names import markdown_text


def base_goals(m: dict) -> list[dict]:
    """The base model on its own dataset."""
    return [
        _goal(
            "GAN-test accuracy >= 80% of the judge's real test accuracy",
            m["gan_test_base"],
            0.8 * m["judge_test_accuracy"],
            m["gan_test_base"] >= 0.8 * m["judge_test_accuracy"],
        ),
        _goal(
            "FID within 10x of the real-vs-real floor",
            m["fid_base"],
            10 * m["fid_floor"],
            m["fid_base"] <= 10 * m["fid_floor"],
        ),
    ]


def domain_goals(m: dict, full: dict | None) -> list[dict]:
    """A domain adapter, against the base alone and (when there is one) the full fine-tune."""
    goals = [
        _goal(
            "FID better than the base without adapter",
            m["fid_adapter"],
            m["fid_base"],
            m["fid_adapter"] < m["fid_base"],
        ),
        _goal("GAN-test accuracy >= 70%", m["gan_test_adapter"], 0.7, m["gan_test_adapter"] >= 0.7),
        _goal("trainable parameters <= 3% of the base", m["trainable_share"], 0.03, m["trainable_share"] <= 0.03),
    ]
    if full is not None:
        gap = m["fid_base"] - full["fid"]
        share = (m["fid_base"] - m["fid_adapter"]) / gap if gap > 0 else None  # None: the full fine-tune is no better
        goals.append(
            _goal(
                "at least 50% of the way from the base's FID to the full fine-tune's",
                share,
                0.5,
                share is not None and share >= 0.5,
            )
        )
    return goals


def _goal(name: str, value: float | None, target: float, met: bool) -> dict:
    return {"goal": name, "value": None if value is None else float(value), "target": float(target), "met": bool(met)}


def goals_table(goals: list[dict]) -> str:
    rows = [
        f"| {markdown_text(g['goal'])} | {'-' if g['value'] is None else format(g['value'], '.4g')} | {g['target']:.4g} "
        f"| {'met' if g['met'] else '**missed**'} |"
        for g in goals
    ]
    return "\n".join(["| goal | value | target | |", "|---|---:|---:|---|", *rows])


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return markdown_text(v)

    lines = ["| " + " | ".join(markdown_text(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)


def plot_curves(path: Path, curves: dict[str, list[dict]], title: str) -> None:
    """Loss curves (CSV rows with step, loss) on one log-scale axis."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rows in curves.items():
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label=label)
    ax.set(xlabel="step", ylabel="training loss (eps MSE)", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_sweep(path: Path, rows: list[dict], x: str, title: str) -> None:
    """FID and GAN-test accuracy (and time) per sweep point."""
    plt = _figure()
    labels = [r[x] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, name in zip(
        axes,
        ("fid", "gan_test", "seconds"),
        ("judge FID (lower is better)", "GAN-test accuracy", "seconds"),
        strict=True,
    ):
        ax.plot(labels, [float(r[key]) for r in rows], marker="o")
        ax.set(xlabel=x, title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.06)
    _save(fig, path)


def plot_per_class(path: Path, per_class: dict[str, dict[str, float]], title: str) -> None:
    """GAN-test accuracy per class, one bar group per model."""
    plt = _figure()
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

    plt = _figure()
    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 5.5))
    for ax, (label, file) in zip(list(getattr(axes, "flat", [axes])), images.items(), strict=True):
        ax.imshow(Image.open(file))
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    _save(fig, path)
