"""Small writers shared by stages: loss-curve CSVs for `dvc plots` and sample grids."""

from pathlib import Path

from cdiff.grid import save_grid
from cdiff.io import atomic_write
from pipelines.common import mkdirs


def write_curve(path: Path, curve: list[tuple[int, float]]) -> None:
    mkdirs(path.parent)
    with atomic_write(path) as tmp:
        tmp.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in curve))


def write_grid(path: Path, images, class_names: list[str], per_class: int, title: str) -> None:
    mkdirs(path.parent)
    save_grid(path, images, class_names, per_class, title=title)
