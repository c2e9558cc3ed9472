"""Data: one registry of image sources, domain transforms, and prepared datasets on disk.

Every source yields uint8 images (N, C, H, W), int64 labels and class names, fitted to the model's
size and channels. See SOURCES for each source's origin and license.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from cdiff.errors import CdiffError, shown
from cdiff.io import (
    Artefact,
    display_path,
    file_sha256,
    fingerprint,
    load_safetensors,
    read_json,
    save_safetensors,
    write_json,
)
from cdiff.names import check_class_names

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DATASET = Artefact("prepared dataset folder", folder=True, marker="summary.json", format="cdiff-dataset")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self) -> torch.Tensor:
        return self.images.float() / 127.5 - 1  # [-1, 1], the range the diffusion works in

    def subset(self, index) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)


@dataclass
class Source:
    origin: str
    license: str
    load: Callable[..., ImageSet]  # load(split, root, download, size, channels, seed)


# ---- sources -----------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if dtype != 0x08:
        raise CdiffError(f"{path} is not a uint8 IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _fashion_mnist(split, root, download, size, channels, seed) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    for folder in (Path(root) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST):
        for suffix in ("", ".gz"):
            paths = [folder / (n + suffix) for n in names]
            if all(p.is_file() for p in paths):
                images, labels = (_read_idx(p) for p in paths)
                return _fit(
                    ImageSet(
                        torch.from_numpy(images.copy())[:, None],
                        torch.from_numpy(labels.astype(np.int64)),
                        FASHION_CLASSES,
                    ),
                    size,
                    channels,
                )
    if download:
        return _torchvision("FashionMNIST")(split, root, download, size, channels, seed)
    raise CdiffError(
        f"Fashion-MNIST not found in {Path(root) / 'FashionMNIST' / 'raw'} or {DEBIAN_FASHION_MNIST}: "
        "run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set data.download: true to fetch it"
    )


def _torchvision(cls_name: str, **kwargs):
    def load(split, root, download, size, channels, seed) -> ImageSet:
        import torchvision.datasets as tvd

        try:
            ds = getattr(tvd, cls_name)(root, train=split == "train", download=download, **kwargs)
        except RuntimeError as e:
            raise CdiffError(
                f"{cls_name} not found under {root} ({str(e).splitlines()[0]}): set data.download: true "
                f"to fetch it, or copy torchvision's {cls_name} files into {root}"
            ) from e
        images, labels, classes = ds.data, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
        if cls_name == "EMNIST":  # letters: stored transposed, labels 1..26 with class 0 'N/A'
            images, labels, classes = images.transpose(1, 2), labels - 1, classes[1:]
        return _fit(ImageSet(images[:, None].contiguous(), labels, classes), size, channels)

    return load


def _sklearn_digits(split, root, download, size, channels, seed) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images * 255.0 / 16.0).round().astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
    full = ImageSet(images, torch.from_numpy(digits.target.astype(np.int64)), [str(i) for i in range(10)])
    return _fit(_split(full, split, seed), size, channels)


def _image_folder(path: str, background: str = "white"):
    def load(split, root, download, size, channels, seed) -> ImageSet:
        folder = Path(path).expanduser()
        classes = _class_folders(folder)
        images, labels = [], []
        for label, name in enumerate(classes):
            files = _image_files(folder / name)
            if not files:
                raise CdiffError(
                    f"class folder {display_path(folder / name)} has no PNG/JPEG images: add some or remove it"
                )
            for file in files:
                image = _read_image(file, channels, size, BACKGROUNDS[background])
                images.append(_fit_one(torch.from_numpy(image), size))  # sizes are fitted
                labels.append(label)
        full = ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), classes)
        return _split(full, split, seed)

    return load


def _class_folders(folder: Path) -> list[str]:
    """The class sub-folders of an image folder, sorted: their order gives the labels."""
    if not folder.is_dir():
        raise CdiffError(f"image folder not found: {display_path(folder)}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        shown_folder = display_path(folder)
        raise CdiffError(f"image folder {shown_folder} has no class sub-folders: put images in <class>/ folders")
    check_class_names(classes, f"image folder {display_path(folder)}")
    return classes


def source_files(spec: str) -> dict[str, str]:
    """What a source reads from the workspace, as {path inside its folder: sha256}: an image folder's images,
    exactly the files `load_source` reads; nothing for a built-in source (its files come from torchvision or
    scikit-learn). The pipeline's prepare stages depend on this index of their own source alone."""
    check_source(spec)
    if not spec.startswith("imagefolder:"):
        return {}
    folder = Path(spec.split(":", 1)[1]).expanduser()
    return {
        f"{name}/{file.name}": file_sha256(file)
        for name in _class_folders(folder)
        for file in _image_files(folder / name)
    }


def _image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files of a class folder. Dot-files (macOS `._x.png`, `.DS_Store`) are skipped; a FIFO,
    device or broken link named like an image is refused (reading a FIFO would hang)."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            raise CdiffError(f"cannot read image {display_path(p)} ({e.strerror}): fix or remove it") from e
        if not stat.S_ISREG(mode):
            raise CdiffError(f"{display_path(p)} is not a regular file (a folder, FIFO or device): remove it")
        files.append(p)
    return files


BACKGROUNDS = {"white": 255, "black": 0}  # data.background: the grey level transparent pixels become


def _read_image(file: Path, channels: int, size: int, background: int = 255) -> np.ndarray:
    """(C, h, w) uint8 of one image file; 16-bit greys scaled to 8 bits (not clipped); errors say why.

    An image with transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour) is composited onto the grey
    level `background` first: converting it to L or RGB straight would drop alpha, and turn a dark icon on a
    transparent background (stored as black, alpha 0) into black on black."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's pixel limit: refuse, do not warn
            with Image.open(file) as im:
                im.draft("L" if channels == 1 else "RGB", (size, size))  # JPEG: decode at a reduced scale
                if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) greys
                    grey = (np.asarray(im).astype(np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8)
                    arr = grey if channels == 1 else np.stack([grey] * 3, axis=-1)
                else:
                    im = _composited(im, background)
                    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # modes converted
    except UnidentifiedImageError as e:
        raise CdiffError(f"cannot read image {display_path(file)}: not an image file: fix or remove it") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = str(e).split(",")[0]
        raise CdiffError(f"cannot read image {display_path(file)}: too large ({reason}): shrink or remove it") from e
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, TypeError, IndexError) as e:
        reason = "truncated file" if "truncated" in str(e) else (str(e).splitlines() or [e.__class__.__name__])[0]
        raise CdiffError(f"cannot read image {display_path(file)}: {reason[:120]}: fix or remove it") from e
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy()  # writable, for torch.from_numpy


def _composited(im, background: int):
    """The image over an opaque background where it has transparency; itself otherwise."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba).convert("RGB")


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        "Zalando Research; local root, Debian's dataset-fashion-mnist, or torchvision download", "MIT", _fashion_mnist
    ),
    "mnist": Source("Y. LeCun et al.; torchvision (local root or download)", "CC BY-SA 3.0", _torchvision("MNIST")),
    "kmnist": Source("ROIS-DS CODH; torchvision (local root or download)", "CC BY-SA 4.0", _torchvision("KMNIST")),
    "emnist-letters": Source(
        "NIST / G. Cohen et al.; torchvision (local root or download)",
        "NIST public domain-like terms",
        _torchvision("EMNIST", split="letters"),
    ),
    "sklearn-digits": Source(
        "UCI optical digits, shipped with scikit-learn (1,797 8x8 images)", "CC BY 4.0", _sklearn_digits
    ),
}


def check_source(spec: str, key: str = "source") -> None:
    if spec.startswith("imagefolder:") and len(spec) > len("imagefolder:"):
        return
    if spec not in SOURCES:
        raise CdiffError(f"{key}: unknown source {spec!r} (known: {', '.join(SOURCES)}, imagefolder:PATH)")


def load_source(
    spec: str,
    split: str,
    size: int,
    channels: int,
    root="data/raw",
    download=False,
    seed: int = 0,
    background: str = "white",
) -> ImageSet:
    """Load split 'train' or 'test' of a source, fitted to (channels, size, size).

    Sources without their own split (sklearn-digits, image folders) are split by class with `seed`.
    """
    check_source(spec)
    folder = spec.startswith("imagefolder:")
    loader = _image_folder(spec.split(":", 1)[1], background) if folder else SOURCES[spec].load
    return loader(split, str(Path(root).expanduser()), download, size, channels, seed)


def _split(full: ImageSet, split: str, seed: int, test_fraction=0.2) -> ImageSet:
    """A seeded train/test split, stratified by class, for sources that ship without one.

    A class of n >= 2 images gives round(n * test_fraction) of them (at least 1, at most n - 1) to test.
    """
    g = torch.Generator().manual_seed(seed)
    test = []
    for c in range(len(full.class_names)):
        index = torch.nonzero(full.labels == c).flatten()
        n = len(index)
        k = min(n - 1, max(1, round(n * test_fraction))) if n >= 2 else 0
        test.append(index[torch.randperm(n, generator=g)[:k]])
    in_test = torch.zeros(len(full), dtype=torch.bool)
    in_test[torch.cat(test)] = True
    return full.subset(torch.nonzero(in_test if split == "test" else ~in_test).flatten())


# ---- fitting to the model's size and channels ------------------------------------------------


def _fit_one(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) uint8 -> (C, size, size): scale the longer side to `size`, pad the other (centred)."""
    c, h, w = image.shape
    if (h, w) != (size, size):
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = F.pad(x, ((size - nw) // 2, size - nw - (size - nw) // 2, (size - nh) // 2, size - nh - (size - nh) // 2))
        image = x[0].round().clamp(0, 255).to(torch.uint8)
    return image


def _fit(data: ImageSet, size: int, channels: int) -> ImageSet:
    images = data.images
    if images.shape[1] != channels:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1)
        else:  # ITU-R 601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().to(torch.uint8)
    if images.shape[-2:] != (size, size):
        images = torch.stack([_fit_one(im, size) for im in images]) if len(images) else images
    return ImageSet(images.contiguous(), data.labels, data.class_names)


# ---- domain transforms -----------------------------------------------------------------------

TRANSFORMS = ("rotate:DEG", "invert", "limit_per_class:N", "subset_classes:[...]")


def parse_transforms(specs: list[str], key: str = "transforms") -> list[tuple[str, object]]:
    out = []
    for i, spec in enumerate(specs):
        name, _, arg = str(spec).partition(":")
        try:
            if name == "rotate":
                degrees = float(arg)
                if not (math.isfinite(degrees) and abs(degrees) <= 360):
                    raise CdiffError(
                        f"{key}[{i}]: rotate needs a finite angle in [-360, 360] degrees, got {shown(arg)}"
                    )
                out.append((name, degrees))
            elif name == "invert" and not arg:
                out.append((name, None))
            elif name == "limit_per_class" and int(arg) >= 1:
                out.append((name, int(arg)))
            elif name == "subset_classes":
                out.append((name, _class_list(yaml.safe_load(arg), f"{key}[{i}]")))
            else:
                raise ValueError
        except (ValueError, yaml.YAMLError, RecursionError):
            raise CdiffError(f"{key}[{i}]: bad transform {shown(spec)} (known: {', '.join(TRANSFORMS)})") from None
    return out


def _class_list(items, key: str) -> list[str]:
    """subset_classes' argument: a non-empty list of distinct class names or ids."""
    if not isinstance(items, list) or not items:
        raise ValueError
    if not all(isinstance(c, str | int) and not isinstance(c, bool) for c in items):
        raise ValueError
    names = [str(c) for c in items]
    if len(set(names)) != len(names):
        raise CdiffError(f"{key}: subset_classes names a class twice ({shown(items)}): list each class once")
    return names


def apply_transforms(data: ImageSet, specs: list[str], split: str) -> ImageSet:
    """Apply domain transforms in order. limit_per_class limits training data only; test stays whole."""
    from torchvision.transforms.v2.functional import rotate

    for name, arg in parse_transforms(specs):
        if name == "rotate":  # degrees counter-clockwise; multiples of 90 are exact
            turned = (
                torch.rot90(data.images, int(arg // 90), dims=(-2, -1)) if arg % 90 == 0 else rotate(data.images, arg)
            )
            data = ImageSet(turned.contiguous(), data.labels, data.class_names)
        elif name == "invert":
            data = ImageSet(255 - data.images, data.labels, data.class_names)
        elif name == "limit_per_class" and split == "train":
            keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:arg] for c in range(len(data.class_names))])
            data = data.subset(keep.sort().values)
        elif name == "subset_classes":
            ids = [_class_id(data.class_names, c) for c in arg]
            if len(set(ids)) != len(ids):
                raise CdiffError(f"subset_classes: {shown(arg)} names one class twice (by name and by id)")
            mask = torch.isin(data.labels, torch.tensor(ids))
            remap = torch.full((len(data.class_names),), -1, dtype=torch.long)
            remap[torch.tensor(ids)] = torch.arange(len(ids))
            data = ImageSet(data.images[mask], remap[data.labels[mask]], [data.class_names[i] for i in ids])
    return data


def _class_id(names: list[str], item: str) -> int:
    if item in names:
        return names.index(item)
    if item.isdigit() and int(item) < len(names):
        return int(item)
    raise CdiffError(f"subset_classes: unknown class {shown(item)} (known: {', '.join(names)})")


# ---- prepared datasets on disk ---------------------------------------------------------------


def prepare_domain(
    source, transforms, size, channels, root, download, val_fraction, seed, background: str = "white"
) -> dict[str, ImageSet]:
    """train / val / test sets of one domain: val is a seeded hold-out of the training split. Image folders'
    transparent pixels become `background` (BACKGROUNDS)."""
    sets = {s: load_source(source, s, size, channels, root, download, seed, background) for s in ("train", "test")}
    train, test = (apply_transforms(sets[s], transforms, s) for s in ("train", "test"))
    if len(train) < 2:
        raise CdiffError(f"source {source} gives {len(train)} training image(s) after transforms: need at least 2")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(train) * val_fraction))
    return {
        "train": train.subset(order[n_val:].sort().values),
        "val": train.subset(order[:n_val].sort().values),
        "test": test,
    }


def save_imageset(data: ImageSet, folder: Path, split: str) -> str:
    """Write <split>.safetensors and <split>.json (class names, count, fingerprint); returns the fingerprint."""
    tensors = {"images": data.images, "labels": data.labels}
    fp = fingerprint(tensors)
    save_safetensors(tensors, folder / f"{split}.safetensors")
    write_json(folder / f"{split}.json", {"class_names": data.class_names, "count": len(data), "fingerprint": fp})
    return fp


def load_imageset(folder, split: str) -> ImageSet:
    folder = Path(folder)
    meta = read_json(folder / f"{split}.json", "prepared dataset metadata")
    tensors = load_safetensors(folder / f"{split}.safetensors", "prepared dataset")
    if set(tensors) != {"images", "labels"} or fingerprint(tensors) != meta.get("fingerprint"):
        raise CdiffError(f"prepared dataset {display_path(folder)}/{split} is corrupt: rerun the prepare stage")
    names = check_class_names(meta.get("class_names"), f"prepared dataset {display_path(folder)}/{split}.json")
    return ImageSet(tensors["images"], tensors["labels"], names)
