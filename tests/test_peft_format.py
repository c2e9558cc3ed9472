import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdiff.adapter_format import load_adapter, read_adapter_config, save_adapter
from cdiff.cli import main
from cdiff.errors import CdiffError
from cdiff.lora import inject_lora, lora_layers, unload_lora
from cdiff.mixing import load_adapters
from cdiff.model import UNet
from cdiff.peft_format import export_peft
from tests.conftest import tiny_config
from tests.test_lora import T, X, Y, _randomize_lora


def _adapter(model, folder, **options):
    """Save a randomised adapter of `model` at `folder`; returns (its output, its injected names, its layers'
    scalings and deltas), and leaves `model` as the base."""
    model.eval()
    names = inject_lora(model, **options)
    _randomize_lora(model)
    expected = model(X, T, Y)
    deltas = {name: layer.get_delta_weight().detach() for name, layer in zip(names, lora_layers(model), strict=True)}
    save_adapter(model, folder, class_names=["x", "y", "z"])
    unload_lora(model)
    return expected, names, deltas


def _fresh(model) -> UNet:
    fresh = UNet(tiny_config(), ["cat", "dog", "bird"])
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def test_export_writes_peft_names_shapes_and_config(tiny_model, tmp_path):
    _, names, deltas = _adapter(tiny_model, tmp_path / "a", r=2, alpha=4, use_rslora=True, extra_trainable=["prompt"])
    export_peft(tmp_path / "a", tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora")} == {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4.0,
        "target_modules": ["w_q", "w_k", "w_v"],
        "use_rslora": True,
        "use_dora": False,
    }
    assert config["modules_to_save"] == ["prompt"]
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    prompt = {f"base_model.model.prompt.{k}" for k in tiny_model.prompt.state_dict()}
    lora = {f"base_model.model.{n}.lora_{p}.weight" for n in names for p in "AB"}
    assert set(tensors) == lora | prompt
    for name in names:
        linear = tiny_model.get_submodule(name)
        A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == (2, linear.in_features) and B.shape == (linear.out_features, 2)
        # PEFT's layer computes W x + (alpha / sqrt r) * B A x: the same delta as cdiff's layer
        assert torch.allclose((4 / 2**0.5) * B @ A, deltas[name], atol=1e-6)


@pytest.mark.parametrize("options", [dict(r=2, alpha=4, extra_trainable=["prompt"]), dict(r=3, alpha=2, use_dora=True)])
def test_a_peft_folder_loads_back_as_the_original_adapter(tiny_model, tmp_path, options):
    expected, names, _ = _adapter(tiny_model, tmp_path / "a", **options)
    export_peft(tmp_path / "a", tmp_path / "peft")
    if options.get("use_dora"):
        tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        for name in names:
            magnitude = tensors[f"base_model.model.{name}.lora_magnitude_vector"]
            assert magnitude.shape == (tiny_model.get_submodule(name).out_features,)
    fresh = _fresh(tiny_model)
    assert not torch.allclose(fresh(X, T, Y), expected, atol=1e-4)
    load_adapter(fresh, tmp_path / "peft")
    assert torch.allclose(fresh(X, T, Y), expected, atol=1e-6) and fresh.class_names == ["x", "y", "z"]
    assert read_adapter_config(tmp_path / "peft") == read_adapter_config(tmp_path / "a")
    mixed = _fresh(tiny_model)
    load_adapters(mixed, [(tmp_path / "peft", 1.0)])  # and in a mix
    assert torch.allclose(mixed(X, T, Y), expected, atol=1e-5)


def test_a_peft_folder_of_another_base_is_refused(tiny_model, tmp_path):
    _adapter(tiny_model, tmp_path / "a", r=2, alpha=2)
    export_peft(tmp_path / "a", tmp_path / "peft")
    with pytest.raises(CdiffError, match="fingerprint mismatch"):
        load_adapter(UNet(tiny_config()), tmp_path / "peft")


def _edit(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _retensor(folder, edit, metadata=True):
    from safetensors import safe_open

    path = str(folder / "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        kept = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=kept if metadata else None)


def _scale_first(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2


BAD = {
    "r edited": (lambda f: _edit(f, r=3), "r is 3, but the adapter was saved with 2"),
    "lora_alpha edited": (lambda f: _edit(f, lora_alpha=8.0), "lora_alpha is 8.0"),
    "use_rslora edited": (lambda f: _edit(f, use_rslora=True), "use_rslora is True"),
    "not LoRA": (lambda f: _edit(f, peft_type="IA3"), "cdiff reads LoRA adapters only"),
    "tensor edited": (lambda f: _retensor(f, _scale_first), "does not match the fingerprint in its metadata"),
    "no cdiff metadata": (lambda f: _retensor(f, lambda t: None, metadata=False), "has no cdiff metadata"),
    "a key without PEFT's prefix": (
        lambda f: _retensor(f, lambda t: t.update(extra=torch.zeros(1))),
        "does not start with base_model.model.",
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_broken_peft_folder_is_refused_in_one_line(tiny_model, tmp_path, kind):
    _adapter(tiny_model, tmp_path / "a", r=2, alpha=2)
    export_peft(tmp_path / "a", tmp_path / "peft")
    edit, message = BAD[kind]
    edit(tmp_path / "peft")
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(CdiffError, match=message) as err:
        load_adapter(tiny_model, tmp_path / "peft")
    assert "\n" not in str(err.value) and getattr(tiny_model, "_cdiff_lora", None) is None
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


def test_cdiff_export_peft_never_replaces_what_it_was_not_asked_to(tiny_model, tmp_path, capsys):
    _adapter(tiny_model, tmp_path / "a", r=2, alpha=2)
    out = tmp_path / "peft"
    assert main(["export-peft", str(tmp_path / "a"), "-o", str(out)]) == 0
    first = load_file(str(out / "adapter_model.safetensors"))
    assert main(["export-peft", str(tmp_path / "a"), "-o", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export-peft", str(tmp_path / "a"), "-o", str(out), "--overwrite"]) == 0
    again = load_file(str(out / "adapter_model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for target in ("mine", "a"):  # a folder of other files; a cdiff adapter (its own input)
        assert main(["export-peft", str(tmp_path / "a"), "-o", str(tmp_path / target), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cdiff: error: ")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    _adapter(tiny_model, tmp_path / "b", r=2, alpha=2)
    assert main(["export-peft", str(tmp_path / "a"), "-o", str(tmp_path / "b"), "--overwrite"]) == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["format"] == "cdiff-adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "mine", "peft"]  # no temp folder left
