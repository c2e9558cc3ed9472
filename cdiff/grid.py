"""Labelled sample grids: one row per class, its name on the left; `sample_grid` samples one and writes it."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from cdiff.io import PNG, atomic_write, check_finite, display_path
from cdiff.samplers import Sampler, sample


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8: the pixels of every grid and served image."""
    return (((images.detach().cpu() + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def tile(images: torch.Tensor, per_row: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """images (N, C, H, W) -> (3, H', W'): `per_row` to a row, `padding` pixels of `pad_value` around each;
    the picture torchvision's make_grid draws (one image alone: that image, unpadded), without importing
    torchvision (2.5 s of every stage that draws a grid)."""
    if images.size(1) == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.size(0) == 1:
        return images[0].clone()
    n, c, h, w = images.shape
    cols = min(per_row, n)
    rows = -(-n // cols)
    grid = images.new_full((c, (h + padding) * rows + padding, (w + padding) * cols + padding), pad_value)
    for k in range(n):
        y, x = (k // cols) * (h + padding) + padding, (k % cols) * (w + padding) + padding
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def grid_image(
    images: torch.Tensor, row_labels: list[str], per_row: int, scale: int = 2, title: str | None = None
) -> Image.Image:
    """images (N, C, H, W) in [-1, 1], N = len(row_labels) * per_row -> a PIL image with a label column."""
    grid = tile(to_uint8(images).permute(0, 3, 1, 2), per_row)  # (3, H', W')
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    label_width = 8 + max((int(font.getlength(s)) for s in row_labels), default=0)
    top = 18 if title else 0
    canvas = Image.new("RGB", (picture.width + label_width, picture.height + top), "white")
    canvas.paste(picture, (label_width, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    row_height = picture.height / max(1, len(row_labels))
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * row_height + row_height / 2 - 5), label, fill="black", font=font)
    return canvas


def save_grid(path, images: torch.Tensor, row_labels: list[str], per_row: int, title: str | None = None) -> None:
    """Write the grid as a PNG (replacing only a PNG); images holding NaN/inf are refused, not drawn black."""
    check_finite({"images": images}, f"refusing to write {display_path(path)}")
    save_picture(path, grid_image(images, row_labels, per_row, title=title))


def real_grid(path, data, per_class: int, title: str = "real training images") -> None:
    """The first `per_class` images of each class of an ImageSet, one row per class, as the sample grids draw
    them: what a model learned from, beside what it makes (a class with fewer images gets white cells)."""
    rows = []
    for c in range(len(data.class_names)):
        images = data.images[data.labels == c][:per_class].float() / 127.5 - 1
        rows += [images, torch.ones((per_class - len(images), *data.images.shape[1:]))]
    save_grid(path, torch.cat(rows), data.class_names, per_class, title=title)


def sample_picture(
    model,
    schedule,
    sampler: Sampler,
    class_ids: list[int],
    per_class: int,
    *,
    seed: int,
    row_labels: list[str] | None = None,
    title: str = "",
    device="cpu",
    what: str = "refusing to draw the samples",
) -> Image.Image:
    """Sample `per_class` images of each class in `class_ids` (one seeded batch) and draw the labelled grid;
    images holding NaN/inf are refused (`what` says where), not drawn black."""
    ids = [c for c in class_ids for _ in range(per_class)]
    with torch.inference_mode():
        images = sample(model, schedule, ids, sampler, seed=seed, device=device)
    check_finite({"images": images}, what)
    labels = row_labels if row_labels is not None else [model.class_names[c] for c in class_ids]
    settings = f"{sampler}, seed {seed}"
    return grid_image(images, labels, per_class, title=f"{title} ({settings})" if title else settings)


def sample_grid(path, model, schedule, sampler: Sampler, class_ids: list[int], per_class: int, **kwargs) -> None:
    """`sample_picture`, written to `path` as a PNG."""
    picture = sample_picture(
        model, schedule, sampler, class_ids, per_class, what=f"refusing to write {display_path(path)}", **kwargs
    )
    save_picture(path, picture)


def side_by_side(pictures: dict[str, Image.Image]) -> Image.Image:
    """Pictures left to right, each under its label, on white: one panel per model, as drawn on its own.
    A panel takes the width of its picture, or of its label where that is wider."""
    font = ImageFont.load_default()
    top, gap = 18, 12
    slots = [max(p.width, panel_label_width(label)) for label, p in pictures.items()]
    width = sum(slots) + gap * max(0, len(pictures) - 1)
    canvas = Image.new("RGB", (width, top + max((p.height for p in pictures.values()), default=0)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for (label, picture), slot in zip(pictures.items(), slots, strict=True):
        draw.text((x + 4, 3), label, fill="black", font=font)
        canvas.paste(picture, (x, top))
        x += slot + gap
    return canvas


def panel_label_width(label: str) -> int:
    """The width a panel's label takes in `side_by_side`."""
    return 8 + int(ImageFont.load_default().getlength(label))


def save_picture(path, picture: Image.Image) -> None:
    """Write a PIL picture as a PNG (replacing only a PNG), atomically."""
    with atomic_write(path, PNG) as tmp:
        picture.save(tmp, format="PNG")
