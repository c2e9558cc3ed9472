import numpy as np
import pytest
import torch
from PIL import Image

from cdiff.data import apply_transforms, load_imageset, load_source, parse_transforms, prepare_domain, save_imageset
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
