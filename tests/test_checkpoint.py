import json
import pickle

import pytest
import torch

from cdiff.checkpoint import describe, load_model, read_model_config, save_model
from cdiff.config import DiffusionConfig
from cdiff.errors import CdiffError


def test_model_folder_round_trip(tiny_model, tmp_path):
    fp = save_model(tiny_model, DiffusionConfig(timesteps=50), tmp_path / "m", extra={"merged_from": {"base": "x"}})
    model, schedule, config = load_model(tmp_path / "m")
    assert config.fingerprint == fp and schedule.timesteps == 50 and model.class_names == ["cat", "dog", "bird"]
    assert config.model == tiny_model.config and config.diffusion == DiffusionConfig(timesteps=50)
    assert config.class_names == ["cat", "dog", "bird"] and config.extra["merged_from"] == {"base": "x"}
    assert read_model_config(tmp_path / "m") == config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    assert describe(tmp_path / "m")["kind"] == "model"


def test_model_folder_keeps_the_prediction_type_and_older_folders_load_as_eps(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(timesteps=50, prediction="v", min_snr_gamma=5.0), tmp_path / "v")
    _, schedule, _ = load_model(tmp_path / "v")
    assert schedule.prediction == "v" and schedule.config.min_snr_gamma == 5.0
    save_model(tiny_model, DiffusionConfig(timesteps=50), tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("prediction", "min_snr_gamma"):  # a model folder written before these fields existed
        del config["diffusion"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    _, schedule, _ = load_model(tmp_path / "old")
    assert schedule.prediction == "eps" and schedule.config.min_snr_gamma == 0.0


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/cdiff-pwned", "w"))


def test_crafted_pickle_is_refused_without_running(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")
    import os

    assert not os.path.exists("/tmp/cdiff-pwned")


def test_corrupt_weights_fail_the_fingerprint(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1)
    other = tmp_path / "other"
    save_model(tiny_model, DiffusionConfig(), other)
    (tmp_path / "m" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CdiffError, match="fingerprint"):
        load_model(tmp_path / "m")


def test_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(CdiffError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_truncated_weights_and_config_are_refused(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "config.json").write_text('{"format": "cdiff-mod')
    with pytest.raises(CdiffError, match="not valid JSON"):
        load_model(tmp_path / "m")


def test_foreign_folder_is_not_taken_for_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CdiffError, match="not a cdiff model folder"):
        load_model(tmp_path / "m")


def _edit(folder, edit):
    import json

    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, allow_nan=True))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(class_names=["a", "b", "c", "d"]), "4 class names, but the model has room for 3"),
        (lambda c: c.update(class_names="cat"), "expected a non-empty list of class names"),
        (lambda c: c.update(class_names=["a", "a", "b"]), "appears twice"),
        (lambda c: c.update(class_names=["a", "b\x00", "c"]), "must be printable"),
        (lambda c: c["diffusion"].update(beta_start=float("nan")), "not valid JSON"),
        (lambda c: c["diffusion"].update(beta_end=2.0), "beta_start"),
        (lambda c: c["model"].update(num_classes="3"), "model.num_classes: expected an integer"),
        (lambda c: c["model"].update(image_size=10**6), "model.image_size: must be at most 1024"),
        (lambda c: c["model"].update(num_classes=100_000), r"do not fit its config \(prompt.embedding.weight"),
        (lambda c: c["model"].update(colour=1), "model.colour: unknown key"),
        (lambda c: c.pop("diffusion"), "misses 'diffusion'"),
    ],
)
def test_bad_config_fields_are_refused_in_one_line(tiny_model, tmp_path, edit, message):
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    _edit(tmp_path / "m", edit)
    for read in (load_model, describe):
        with pytest.raises(CdiffError, match=message) as err:
            read(tmp_path / "m")
        assert "\n" not in str(err.value)


def test_nan_weights_are_never_saved(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.head.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CdiffError, match="head.weight holds NaN"):
        save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    assert not list(tmp_path.iterdir())


def test_a_model_folder_is_replaced_only_with_overwrite(tiny_model, tmp_path):
    save_model(tiny_model, DiffusionConfig(timesteps=10), tmp_path / "m")
    with pytest.raises(CdiffError, match="pass --overwrite"):
        save_model(tiny_model, DiffusionConfig(timesteps=20), tmp_path / "m")
    save_model(tiny_model, DiffusionConfig(timesteps=20), tmp_path / "m", overwrite=True)
    assert load_model(tmp_path / "m")[1].timesteps == 20
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CdiffError, match="is not a model folder"):
        save_model(tiny_model, DiffusionConfig(), tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "device,message",
    [("cuda", "CUDA is not available"), ("cuda:7", "CUDA"), ("meta", "runs on cpu, cuda or mps"), ("gpu0", "unknown")],
)
def test_unavailable_devices_are_one_line_errors(tiny_model, tmp_path, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    with pytest.raises(CdiffError, match=message):
        load_model(tmp_path / "m", device)
