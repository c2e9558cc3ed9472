import json
import pickle

import pytest
import torch

from cdiff.checkpoint import describe, load_model, save_model
from cdiff.config import DiffusionConfig
from cdiff.errors import CdiffError


def test_model_folder_round_trip(tiny_model, tmp_path):
    fp = save_model(tiny_model, DiffusionConfig(timesteps=50), tmp_path / "m")
    model, schedule, config = load_model(tmp_path / "m")
    assert config["fingerprint"] == fp and schedule.timesteps == 50 and model.class_names == ["cat", "dog", "bird"]
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
    save_model(tiny_model, DiffusionConfig(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"format": "cdiff-mod')
    with pytest.raises(CdiffError, match="not valid JSON"):
        load_model(tmp_path / "m")


def test_foreign_folder_is_not_taken_for_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CdiffError, match="not a cdiff model folder"):
        load_model(tmp_path / "m")
