import numpy as np
import pytest
import torch
from PIL import Image

from cdiff.data import (
    ImageSet,
    apply_transforms,
    load_imageset,
    load_source,
    parse_transforms,
    prepare_domain,
    save_imageset,
    source_files,
)
from cdiff.errors import CdiffError


def test_fashion_mnist_loads_offline():
    # installed by `make setup` (Debian's dataset-fashion-mnist)
    train = load_source("fashion-mnist", "train", 28, 1)
    test = load_source("fashion-mnist", "test", 28, 1)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.class_names[7] == "Sneaker" and train.images.dtype == torch.uint8


def test_sklearn_digits_are_fitted_to_size_and_channels():
    train = load_source("sklearn-digits", "train", 32, 3)
    test = load_source("sklearn-digits", "test", 32, 3)
    assert train.images.shape[1:] == (3, 32, 32) and len(train) + len(test) == 1797
    assert train.images.max() > 200 and train.class_names == [str(i) for i in range(10)]


def test_missing_torchvision_dataset_names_both_fixes(tmp_path):
    with pytest.raises(CdiffError, match="data.download: true"):
        load_source("mnist", "train", 28, 1, root=str(tmp_path))


def test_unknown_source_is_refused():
    with pytest.raises(CdiffError, match="unknown source"):
        load_source("cifar-1000", "train", 28, 1)


def _folder(tmp_path, spec):
    for cls, files in spec.items():
        (tmp_path / cls).mkdir(parents=True, exist_ok=True)
        for name, image in files.items():
            if isinstance(image, bytes):
                (tmp_path / cls / name).write_bytes(image)
            else:
                image.save(tmp_path / cls / name)
    return f"imagefolder:{tmp_path}"


def test_image_folder_mixed_modes_and_sizes_are_fitted(tmp_path):
    grey = Image.fromarray(np.full((10, 20), 200, np.uint8))
    rgb = Image.fromarray((np.zeros((40, 40, 3)) + [255, 0, 0]).astype(np.uint8))
    spec = _folder(
        tmp_path, {"a": {f"{i}.png": grey for i in range(5)}, "b": {f"{i}.jpg": rgb.convert("RGB") for i in range(5)}}
    )
    (tmp_path / "a" / "notes.txt").write_text("not an image: ignored")
    data = load_source(spec, "train", 16, 1)
    test = load_source(spec, "test", 16, 1)
    assert data.images.shape[1:] == (1, 16, 16) and len(data) + len(test) == 10
    assert data.class_names == ["a", "b"]


def test_image_folder_error_cases(tmp_path):
    with pytest.raises(CdiffError, match="not found"):
        load_source(f"imagefolder:{tmp_path / 'missing'}", "train", 16, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdiffError, match="no class sub-folders"):
        load_source(f"imagefolder:{tmp_path / 'empty'}", "train", 16, 1)
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    spec = _folder(tmp_path / "junk", {"a": {"x.png": img}, "b": {"bad.png": b"this is not a png"}})
    with pytest.raises(CdiffError, match="cannot read image .*bad.png"):
        load_source(spec, "train", 16, 1)
    spec = _folder(tmp_path / "hole", {"a": {"x.png": img}})
    (tmp_path / "hole" / "b").mkdir()
    with pytest.raises(CdiffError, match="has no PNG/JPEG images"):
        load_source(spec, "train", 16, 1)


def test_source_files_index_exactly_what_the_loader_reads(tmp_path):
    import hashlib

    dark, light = (Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 240))
    spec = _folder(tmp_path, {"a": {"0.png": dark, "1.PNG": light}, "b": {"0.jpg": light.convert("RGB")}})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._0.png").write_bytes(b"macOS resource fork")
    (tmp_path / ".hidden").mkdir()
    dark.save(tmp_path / ".hidden" / "x.png")
    files = source_files(spec)
    assert sorted(files) == ["a/0.png", "a/1.PNG", "b/0.jpg"]  # the loader's 3 images, nothing it skips
    assert len(load_source(spec, "train", 8, 1)) + len(load_source(spec, "test", 8, 1)) == len(files)
    assert files["a/0.png"] == hashlib.sha256((tmp_path / "a" / "0.png").read_bytes()).hexdigest()
    light.save(tmp_path / "a" / "0.png")  # new pixels under the same name: a new hash, the others kept
    again = source_files(spec)
    assert again["a/0.png"] != files["a/0.png"] and {k: again[k] for k in ("a/1.PNG", "b/0.jpg")} == {
        k: files[k] for k in ("a/1.PNG", "b/0.jpg")
    }
    assert source_files("sklearn-digits") == {}  # a built-in source reads nothing from the workspace
    with pytest.raises(CdiffError, match="image folder not found"):
        source_files(f"imagefolder:{tmp_path / 'missing'}")


def test_single_class_folder_is_allowed(tmp_path):
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    spec = _folder(tmp_path, {"only": {f"{i}.png": img for i in range(5)}})
    assert load_source(spec, "train", 8, 1).class_names == ["only"]


def test_transforms_compose():
    data = load_source("sklearn-digits", "train", 16, 1)
    out = apply_transforms(data, ["subset_classes:[1, 7]", "limit_per_class:5", "invert", "rotate:90"], "train")
    assert out.class_names == ["1", "7"] and out.labels.bincount().tolist() == [5, 5]
    sub = apply_transforms(data, ["subset_classes:[1, 7]", "limit_per_class:5"], "test")
    assert len(sub) > 10  # the limit applies to training data only
    first = apply_transforms(data, ["subset_classes:[1]", "limit_per_class:1"], "train").images[0]
    assert torch.equal(out.images[out.labels == 0][0], torch.rot90(255 - first, 1, dims=(1, 2)))


def test_bad_transform_names_the_key():
    with pytest.raises(CdiffError, match=r"domains\[0\].transforms\[1\]"):
        parse_transforms(["invert", "blur:3"], "domains[0].transforms")


def test_prepared_sets_round_trip_and_detect_corruption(tmp_path):
    sets = prepare_domain("sklearn-digits", ["limit_per_class:20"], 16, 1, "data/raw", False, 0.1, seed=0)
    assert len(sets["train"]) + len(sets["val"]) == 200
    save_imageset(sets["train"], tmp_path, "train")
    back = load_imageset(tmp_path, "train")
    assert torch.equal(back.images, sets["train"].images) and back.class_names == sets["train"].class_names
    save_imageset(sets["val"], tmp_path, "val")
    (tmp_path / "train.safetensors").write_bytes((tmp_path / "val.safetensors").read_bytes())
    with pytest.raises(CdiffError, match="corrupt"):
        load_imageset(tmp_path, "train")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): PIL reads the size before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in steps of 257
    Image.fromarray(ramp).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode.startswith("I;16")
    from cdiff.data import _read_image

    grey = _read_image(tmp_path / "x.png", 1, 16)[0]
    assert np.array_equal(grey, np.arange(256).reshape(16, 16))  # 65535 -> 255, 257 -> 1: scaled
    rgb = _read_image(tmp_path / "x.png", 3, 16)
    assert rgb.shape == (3, 16, 16) and np.array_equal(rgb[2], grey)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"this is not a png", "not an image file"),
        (None, "truncated file"),
        (_png_header(20000, 20000), "too large"),
        (_png_header(12000, 12000), "too large"),  # above PIL's warning limit: refused, not a warning
    ],
)
def test_image_read_errors_say_the_real_reason(tmp_path, content, reason):
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    spec = _folder(tmp_path, {"a": {"x.png": img}, "b": {"y.png": img}})
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "b" / "y.png")
        content = (tmp_path / "b" / "y.png").read_bytes()[:300]
    (tmp_path / "b" / "y.png").write_bytes(content)
    with pytest.raises(CdiffError, match=f"cannot read image .*y.png: {reason}") as err:
        load_source(spec, "train", 8, 1)
    assert "\n" not in str(err.value)


def test_dot_files_are_skipped_and_a_fifo_is_refused_without_hanging(tmp_path):
    import os
    import signal

    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    spec = _folder(tmp_path, {"a": {"A_0001.png": img, "A_0002.png": img}})
    (tmp_path / "a" / "._A_0001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (tmp_path / ".Trashes").mkdir()
    assert len(load_source(spec, "train", 8, 1)) + len(load_source(spec, "test", 8, 1)) == 2
    os.mkfifo(tmp_path / "a" / "x.png")
    signal.alarm(20)  # a hang fails the test instead of stalling the suite
    try:
        with pytest.raises(CdiffError, match="x.png is not a regular file"):
            load_source(spec, "train", 8, 1)
    finally:
        signal.alarm(0)


def test_relative_and_home_paths_are_resolved_and_reported(tmp_path, monkeypatch):
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    _folder(tmp_path / "home" / "pics", {"a": {"1.png": img, "2.png": img}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_source("imagefolder:~/pics", "train", 8, 1).class_names == ["a"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CdiffError, match=f"image folder not found: pics \\(relative to {tmp_path}\\)"):
        load_source("imagefolder:pics", "train", 8, 1)


def test_a_non_utf8_class_folder_is_refused_at_prepare_time(tmp_path):
    import os

    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    spec = _folder(tmp_path, {"a": {"1.png": img, "2.png": img}})
    os.mkdir(os.fsencode(tmp_path) + b"/caf\xe9")
    img.save(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9/1.png"))
    with pytest.raises(CdiffError, match="must be printable text") as err:
        load_source(spec, "train", 8, 1)
    str(err.value).encode("utf-8")  # the message itself is printable


@pytest.mark.parametrize("spec", ["subset_classes:[1, 1]", "subset_classes:['3', 3]", "subset_classes:[a, a]"])
def test_subset_classes_refuses_duplicates(spec):
    with pytest.raises(CdiffError, match="twice"):
        parse_transforms([spec], "t")


def test_subset_classes_refuses_one_class_by_name_and_by_id():
    data = load_source("sklearn-digits", "test", 8, 1)
    with pytest.raises(CdiffError, match="names one class twice"):
        apply_transforms(data, ["subset_classes:['3', '03']"], "test")  # the class named 3, and id 3


@pytest.mark.parametrize("spec", ["rotate:nan", "rotate:inf", "rotate:-inf", "rotate:1e308", "rotate:361"])
def test_rotate_needs_a_finite_bounded_angle(spec):
    with pytest.raises(CdiffError, match=r"rotate needs a finite angle in \[-360, 360\]"):
        parse_transforms([spec], "t")


def test_split_is_stratified_by_class_and_seeded():
    from cdiff.data import _split

    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 3 + [3] * 1)
    full = ImageSet(torch.arange(64).view(64, 1, 1, 1).to(torch.uint8), labels, ["a", "b", "c", "d"])
    train, test = _split(full, "train", seed=1), _split(full, "test", seed=1)
    assert test.labels.bincount(minlength=4).tolist() == [10, 2, 1, 0]  # round(n / 5), at least 1, at most n - 1
    assert sorted(train.images.flatten().tolist() + test.images.flatten().tolist()) == list(range(64))
    assert torch.equal(_split(full, "test", seed=1).images, test.images)
    assert not torch.equal(_split(full, "test", seed=2).images, test.images)
    digits = [load_source("sklearn-digits", "test", 8, 1, seed=s) for s in (0, 0, 5)]
    assert torch.equal(digits[0].images, digits[1].images) and not torch.equal(digits[0].images, digits[2].images)
    counts = digits[0].labels.bincount().float()
    assert counts.max() - counts.min() <= 2  # sklearn's digits are balanced: so is the stratified test split


def _icon(mode: str, ink: int, hidden: int) -> Image.Image:
    """A 16x16 disc of grey `ink` on a transparent background whose hidden colour is `hidden` (icon themes store
    black, alpha 0), in the PIL mode an icon file has: RGBA, LA, or a palette with a transparent index."""
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 25
    grey = np.where(disc, ink, hidden).astype(np.uint8)
    alpha = np.where(disc, 255, 0).astype(np.uint8)
    if mode == "P":
        p = Image.fromarray(np.where(disc, 1, 0).astype(np.uint8), "P")
        p.putpalette([hidden] * 3 + [ink] * 3)
        p.info["transparency"] = 0
        return p
    if mode == "LA":
        return Image.fromarray(np.stack([grey, alpha], -1), "LA")
    return Image.fromarray(np.stack([grey, grey, grey, alpha], -1), "RGBA")


@pytest.mark.parametrize("background, ink, hidden", [("white", 20, 0), ("black", 235, 255)])
def test_transparent_icons_are_composited_onto_the_background(tmp_path, background, ink, hidden):
    # a dark icon on transparency over white, a light one over black: each stays visible (converting to L straight
    # drops alpha: the hidden colour shows, black on black, white on white)
    modes = ("RGBA", "LA", "P")
    spec = _folder(tmp_path, {m: {f"{i}.png": _icon(m, ink, hidden) for i in range(3)} for m in modes})
    for channels in (1, 3):
        sets = [load_source(spec, split, 16, channels, background=background) for split in ("train", "test")]
        images = torch.cat([s.images for s in sets]).float()
        assert len(images) == 9 and images.shape[1] == channels
        corner, centre = images[:, :, 0, 0], images[:, :, 8, 8]
        assert (corner == (255 if background == "white" else 0)).all(), corner
        assert (centre - ink).abs().max() <= 1, centre


def test_half_transparent_pixels_blend_with_the_background_and_opaque_images_are_unchanged(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 128  # black at half opacity
    opaque = Image.fromarray(np.full((16, 16), 77, np.uint8))
    spec = _folder(
        tmp_path,
        {"a": {f"{i}.png": Image.fromarray(rgba, "RGBA") for i in range(2)}, "b": {"0.png": opaque, "1.png": opaque}},
    )
    images = torch.cat([load_source(spec, s, 16, 1).images for s in ("train", "test")])
    labels = torch.cat([load_source(spec, s, 16, 1).labels for s in ("train", "test")])
    assert ((images[labels == 0].float() - 127).abs() <= 1).all()  # white under half of black
    assert (images[labels == 1] == 77).all()


def test_prepare_domain_takes_the_background(tmp_path):
    spec = _folder(tmp_path / "icons", {c: {f"{i}.png": _icon("RGBA", 20, 0) for i in range(4)} for c in "ab"})
    for background, level in (("white", 255), ("black", 0)):
        sets = prepare_domain(spec, [], 16, 1, "data/raw", False, 0.25, 0, background)
        assert (sets["train"].images[:, 0, 0, 0] == level).all()
