"""The one weights-folder pair (cdiff/weights.py) that models, adapters and judges are saved and read with."""

import json

import pytest
import torch

from cdiff.errors import CdiffError
from cdiff.io import Artefact, fingerprint
from cdiff.weights import check_fits, load_weights_folder, save_weights_folder

KIND = Artefact(
    "test folder", folder=True, marker="config.json", format="cdiff-test", weights="w.safetensors", version=2
)


def _tensors():
    return {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.float16), "n": torch.tensor([1, 2])}


def test_round_trip_carries_format_version_and_fingerprint(tmp_path):
    fp = save_weights_folder(KIND, tmp_path / "f", _tensors(), {"note": "x"})
    tensors, config = load_weights_folder(KIND, tmp_path / "f")
    assert config == {"note": "x", "format": "cdiff-test", "version": 2, "fingerprint": fp}
    assert fp == fingerprint(_tensors()) and all(torch.equal(tensors[k], v) for k, v in _tensors().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_never_saved(tmp_path, bad):
    tensors = _tensors()
    tensors["a"][1, 2] = bad
    with pytest.raises(CdiffError, match="tensor a holds NaN or infinite"):
        save_weights_folder(KIND, tmp_path / "f", tensors, {})
    assert not list(tmp_path.iterdir())


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del config[k]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"fingerprint": None}, "has no fingerprint"),
        ({"fingerprint": "0" * 64}, "does not match the fingerprint"),
        ({"version": 3}, "version 3 is not one this cdiff reads"),
        ({"version": "2"}, "version '2' is not one"),
        ({"format": "cdiff-model"}, "is not a cdiff test folder"),
    ],
)
def test_config_tampering_is_refused_in_one_line(tmp_path, changes, message):
    save_weights_folder(KIND, tmp_path / "f", _tensors(), {})
    _edit_config(tmp_path / "f", **changes)
    with pytest.raises(CdiffError, match=message) as err:
        load_weights_folder(KIND, tmp_path / "f")
    assert "\n" not in str(err.value)


def test_nan_written_behind_its_back_with_a_matching_fingerprint_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_weights_folder(KIND, tmp_path / "f", _tensors(), {})
    poisoned = {**_tensors(), "a": torch.full((2, 3), float("nan"))}
    save_file(poisoned, str(tmp_path / "f" / "w.safetensors"))
    _edit_config(tmp_path / "f", fingerprint=fingerprint(poisoned))
    with pytest.raises(CdiffError, match="tensor a holds NaN"):
        load_weights_folder(KIND, tmp_path / "f")


def test_check_fits_names_the_first_difference():
    expected = {"a": torch.empty(2, 3, device="meta"), "b": torch.empty(4, device="meta")}
    check_fits(expected, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, "f")
    for tensors, message in [
        ({"a": torch.zeros(2, 3)}, "missing b"),
        ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "unexpected c"),
        ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, r"a has shape \(3, 2\), expected \(2, 3\)"),
    ]:
        with pytest.raises(CdiffError, match=message):
            check_fits(expected, tensors, "f")
