import json

import pytest
import torch
from torch import nn

from cdiff.adapter_format import load_adapter, save_adapter
from cdiff.errors import CdiffError
from cdiff.lora import (
    LoRALinear,
    inject_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    trainable_parameter_share,
    unload_lora,
    unmerge_lora,
)
from cdiff.model import UNet
from tests.conftest import tiny_config

X, T, Y = torch.randn(2, 1, 12, 12), torch.tensor([3, 30]), torch.tensor([0, 2])


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), r=0, lora_alpha=1)


def test_fresh_lora_reproduces_base_exactly(tiny_model):
    tiny_model.eval()
    before = tiny_model(X, T, Y)
    names = inject_lora(tiny_model, r=2, alpha=4)
    assert len(names) == 3 * 5 and all(n.split(".")[-1] in ("w_q", "w_k", "w_v") for n in names)
    assert torch.equal(tiny_model(X, T, Y), before)


def test_only_lora_trains_and_share_is_small(tiny_model):
    inject_lora(tiny_model, r=2, alpha=2)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    n_train, n_total = trainable_parameter_share(tiny_model)
    assert 0 < n_train / n_total < 0.1


def test_merge_unmerge_round_trip(tiny_model):
    tiny_model.eval()
    base = tiny_model(X, T, Y)
    inject_lora(tiny_model, r=2, alpha=4)
    _randomize_lora(tiny_model)
    unmerged = tiny_model(X, T, Y)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(tiny_model)
    assert (tiny_model(X, T, Y) - unmerged).abs().max() < 1e-5
    unmerge_lora(tiny_model)
    assert (tiny_model(X, T, Y) - unmerged).abs().max() < 1e-5
    unload_lora(tiny_model)
    assert torch.equal(tiny_model(X, T, Y), base)


def test_adapter_save_load_round_trip_with_extra_module(tiny_model, tmp_path):
    tiny_model.eval()
    inject_lora(tiny_model, r=2, alpha=4, extra_trainable=["prompt"])
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    save_adapter(tiny_model, tmp_path / "a", class_names=["x", "y", "z"])
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    unload_lora(tiny_model)
    assert tiny_model.class_names == ["cat", "dog", "bird"]
    load_adapter(tiny_model, tmp_path / "a")
    assert torch.equal(tiny_model(X, T, Y), expected)
    assert tiny_model.class_names == ["x", "y", "z"]


def test_swapping_adapters_is_bit_identical_to_a_fresh_load(tiny_model, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for i, name in enumerate("ab"):
        inject_lora(tiny_model, r=2, alpha=2, extra_trainable=["prompt"])
        _randomize_lora(tiny_model, seed=i)
        save_adapter(tiny_model, tmp_path / name)
        unload_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "a")
    merge_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "b")  # swap: unloads a (merged) first
    swapped = tiny_model.eval()(X, T, Y)
    fresh = UNet(tiny_config(), ["cat", "dog", "bird"])
    fresh.load_state_dict(state)
    load_adapter(fresh, tmp_path / "b")
    assert torch.equal(swapped, fresh.eval()(X, T, Y))


def test_adapter_for_other_base_or_architecture_is_refused(tiny_model, tmp_path):
    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "a")
    other = UNet(tiny_config())  # same architecture, other weights
    with pytest.raises(CdiffError, match="fingerprint mismatch"):
        load_adapter(other, tmp_path / "a")
    wider = UNet(tiny_config(n_ctx=2))
    with pytest.raises(CdiffError, match="another model architecture"):
        load_adapter(wider, tmp_path / "a")


def test_merge_and_unload_gives_plain_model(tiny_model):
    tiny_model.eval()
    inject_lora(tiny_model, r=2, alpha=4)
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    merge_and_unload(tiny_model)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert (tiny_model(X, T, Y) - expected).abs().max() < 1e-5


def test_lora_follows_the_base_layers_device_and_dtype():
    layer = LoRALinear(nn.Linear(4, 3).double(), r=2, lora_alpha=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.device == layer.base_layer.weight.device
    assert layer(torch.randn(5, 4, dtype=torch.float64)).shape == (5, 3)


def test_targets_match_module_name_suffixes(tiny_model):
    names = inject_lora(tiny_model, targets=("w_o", "attn.feedforward.0"), r=1, alpha=1)
    assert len(names) == 2 * 5
    assert all(n.endswith(("attn.w_o", "attn.feedforward.0")) for n in names)


def test_corrupt_or_pickled_adapter_files_are_refused(tiny_model, tmp_path):
    import pickle

    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "a")
    unload_lora(tiny_model)
    weights = tmp_path / "a" / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_adapter(tiny_model, tmp_path / "a")
    weights.write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    with pytest.raises(CdiffError, match="not a valid safetensors file"):
        load_adapter(tiny_model, tmp_path / "a")
    assert getattr(tiny_model, "_cdiff_lora", None) is None  # nothing half-loaded


# ---- refused adapters: one line, and the model exactly as it was ------------------------------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))


def _repoint(folder, tensors):
    """Replace the adapter's tensors and fix up its fingerprint: a consistent but broken adapter."""
    from safetensors.torch import save_file

    from cdiff.io import fingerprint

    save_file(tensors, str(folder / "adapter.safetensors"))
    _edit_config(folder, fingerprint=fingerprint(tensors))


def _nan_tensors(folder):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    _repoint(folder, tensors)


def _other_tensors(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter.safetensors"))
    save_file({k: v + 1 for k, v in tensors.items()}, str(folder / "adapter.safetensors"))


def _other_base(folder):
    _edit_config(folder, base_fingerprint="0" * 64)


BAD_ADAPTERS = {
    "missing extra module": (lambda f: _edit_config(f, extra_trainable=["nope"]), "has no module 'nope'"),
    "target matching nothing": (lambda f: _edit_config(f, target_modules=["nope"]), "no nn.Linear named nope"),
    "rank changed (shape mismatch)": (lambda f: _edit_config(f, r=3), "do not fit its config"),
    "tensors of another adapter": (_other_tensors, "does not match the fingerprint"),
    "truncated tensors": (
        lambda f: (f / "adapter.safetensors").write_bytes((f / "adapter.safetensors").read_bytes()[:99]),
        "not a valid safetensors file",
    ),
    "NaN tensors, fingerprint fixed up": (_nan_tensors, "holds NaN or infinite values"),
    "lora_alpha NaN": (lambda f: _edit_config(f, lora_alpha=float("nan")), "not valid JSON"),
    "lora_alpha text": (lambda f: _edit_config(f, lora_alpha="4"), "lora_alpha: expected a number"),
    "lora_alpha huge": (lambda f: _edit_config(f, lora_alpha=1e300), r"lora.alpha: must be in \(0, 4096\]"),
    "r not an integer": (lambda f: _edit_config(f, r=2.5), "r: expected an integer"),
    "r negative": (lambda f: _edit_config(f, r=-1), "LoRA rank must be at least 1"),
    "too many class names": (lambda f: _edit_config(f, class_names=list("abcd")), "room for 3 classes"),
    "no fingerprint (an older cdiff)": (lambda f: _edit_config(f, fingerprint=None, version=1), "has no fingerprint"),
    "trained on another base": (_other_base, "trained on other base weights"),
    "another architecture": (
        lambda f: _edit_config(f, base_model={**tiny_config().__dict__, "image_size": 16}),
        "another",
    ),
    "injected list edited": (lambda f: _edit_config(f, injected=["prompt.norm"]), "'injected' does not match"),
    "unknown key": (lambda f: _edit_config(f, scale=2.0), "scale: unknown key"),
}


def _snapshot(model):
    state = getattr(model, "_cdiff_lora", None)
    lora = None
    if state is not None:
        lora = {k: v for k, v in vars(state).items() if k != "saved_modules"}
        lora["saved"] = {m: {k: v.clone() for k, v in t.items()} for m, t in state.saved_modules.items()}
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "merged": [layer.merged for layer in lora_layers(model)],
        "class_names": list(model.class_names),
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "lora": lora,
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("carrying", ["no adapter", "a merged adapter"])
@pytest.mark.parametrize("kind", list(BAD_ADAPTERS))
def test_a_refused_adapter_leaves_the_model_exactly_as_it_was(tmp_path, kind, carrying):
    torch.manual_seed(0)
    model = UNet(tiny_config(), ["cat", "dog", "bird"])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(["good", "other", "bad"]):
        inject_lora(model, r=2, alpha=2, extra_trainable=["prompt"])
        _randomize_lora(model, seed=i)
        save_adapter(model, tmp_path / name, class_names=[f"{name}{c}" for c in range(3)])
        unload_lora(model)
    edit, message = BAD_ADAPTERS[kind]
    edit(tmp_path / "bad")
    if carrying == "a merged adapter":
        load_adapter(model, tmp_path / "other")
        merge_lora(model)
    before = _snapshot(model)
    with pytest.raises(CdiffError, match=message) as err:
        load_adapter(model, tmp_path / "bad")
    assert "\n" not in str(err.value)
    assert _same(_snapshot(model), before)
    load_adapter(model, tmp_path / "good")  # and the next, good adapter loads as onto a fresh base
    fresh = UNet(tiny_config(), ["cat", "dog", "bird"])
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "good")
    assert torch.equal(model.eval()(X, T, Y), fresh.eval()(X, T, Y)) and model.class_names == [
        "good0",
        "good1",
        "good2",
    ]


def test_inject_lora_checks_before_it_changes_the_model(tiny_model):
    before = _snapshot(tiny_model)
    with pytest.raises(CdiffError, match="has no module 'nope'"):
        inject_lora(tiny_model, r=2, alpha=2, extra_trainable=["nope"])
    with pytest.raises(CdiffError, match="alpha"):
        inject_lora(tiny_model, r=2, alpha=float("inf"))
    assert _same(_snapshot(tiny_model), before)


def test_adapters_carry_their_own_fingerprint_and_refuse_nan(tiny_model, tmp_path):
    inject_lora(tiny_model, r=2, alpha=2)
    save_adapter(tiny_model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["version"] == 2 and len(config["fingerprint"]) == 64
    with torch.no_grad():
        lora_layers(tiny_model)[0].lora_B[0, 0] = float("inf")
    with pytest.raises(CdiffError, match="holds NaN or infinite"):
        save_adapter(tiny_model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---- rsLoRA: scaling alpha / sqrt(r) ----------------------------------------------------------------


def _hand_layer(**options) -> LoRALinear:
    """in 3, out 2, r 4, alpha 6: rsLoRA scales by 6 / sqrt(4) = 3 (plain LoRA by 6 / 4 = 1.5)."""
    base = nn.Linear(3, 2)
    layer = LoRALinear(base, r=4, lora_alpha=6, **options)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]))  # W (out, in)
        base.bias.copy_(torch.tensor([0.5, -1.0]))
        # PEFT's orientation: A (r, in), B (out, r); cdiff stores their transposes (x @ lora_A @ lora_B)
        layer.lora_A.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]).T)
        layer.lora_B.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]).T)
    return layer


def test_rslora_scales_by_alpha_over_sqrt_r():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # W x + b = [1, 2] + [0.5, -1]; A x = [1, 2, 3, 6]; B A x = [1, 6]
    assert torch.equal(_hand_layer(use_rslora=True)(x), torch.tensor([[1.5 + 3 * 1, 1 + 3 * 6.0]]))
    assert torch.equal(_hand_layer()(x), torch.tensor([[1.5 + 1.5 * 1, 1 + 1.5 * 6.0]]))


def test_rslora_merge_and_unmerge_are_exact():
    layer, x = _hand_layer(use_rslora=True), torch.randn(5, 3)
    unmerged, weight = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, torch.tensor([[1.0 + 3, 0, 0], [3, 4, 3]]))  # W + 3 B A
    assert torch.allclose(layer(x), unmerged, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer(x), unmerged)


def test_rslora_adapter_round_trip_keeps_it(tiny_model, tmp_path):
    tiny_model.eval()
    inject_lora(tiny_model, r=4, alpha=4, use_rslora=True)
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    save_adapter(tiny_model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_rslora"] is True
    unload_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "a")
    assert all(layer.use_rslora and layer.scaling == 2.0 for layer in lora_layers(tiny_model))
    assert torch.equal(tiny_model(X, T, Y), expected)


def test_an_adapter_config_without_use_rslora_loads_as_plain_lora(tiny_model, tmp_path):
    tiny_model.eval()
    for name, rslora in (("plain", False), ("rs", True)):
        inject_lora(tiny_model, r=4, alpha=4, use_rslora=rslora)
        _randomize_lora(tiny_model)
        save_adapter(tiny_model, tmp_path / name)
        unload_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "rs")
    rs_output = tiny_model(X, T, Y)
    load_adapter(tiny_model, tmp_path / "plain")
    plain_output = tiny_model(X, T, Y)
    for name in ("plain", "rs"):  # as an older cdiff wrote them
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        del config["use_rslora"]
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(tiny_model, tmp_path / "plain")
    assert torch.equal(tiny_model(X, T, Y), plain_output)
    load_adapter(tiny_model, tmp_path / "rs")  # the same tensors, now read as plain LoRA: alpha / r
    assert all(not layer.use_rslora and layer.scaling == 1.0 for layer in lora_layers(tiny_model))
    assert not torch.allclose(tiny_model(X, T, Y), rs_output, atol=1e-4)


# ---- DoRA: a magnitude per output row times the direction of W + s·ΔW ---------------------------------


def _dora_by_hand(W, b, A, B, m, s, x):
    """PEFT's shapes: W (out, in), A (r, in), B (out, r), m (out,); the norm over the input dim."""
    adapted = W + s * B @ A
    return (m / torch.linalg.vector_norm(adapted, dim=1))[:, None].mul(adapted).matmul(x.T).T + b


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_forward_matches_the_formula(use_rslora):
    layer, x = _hand_layer(use_dora=True, use_rslora=use_rslora), torch.randn(5, 3)
    with torch.no_grad():
        layer.lora_magnitude_vector.copy_(torch.tensor([2.0, 3.0]))
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    A, B, m = layer.lora_A.detach().T, layer.lora_B.detach().T, torch.tensor([2.0, 3.0])
    expected = _dora_by_hand(W, b, A, B, m, 3.0 if use_rslora else 1.5, x)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert not torch.allclose(_hand_layer(use_rslora=use_rslora)(x), expected, atol=1e-2)  # not plain LoRA
    layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W)


def test_a_fresh_dora_layer_is_exactly_the_base():
    torch.manual_seed(0)
    base, x = nn.Linear(6, 5), torch.randn(4, 6)
    expected = base(x)
    layer = LoRALinear(base, r=2, lora_alpha=4, use_dora=True)
    assert torch.equal(layer.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1))
    assert torch.equal(layer(x), expected)


def test_dora_on_a_model_fresh_merged_and_unmerged(tiny_model):
    tiny_model.eval()
    base = tiny_model(X, T, Y)
    inject_lora(tiny_model, r=2, alpha=4, use_dora=True)
    assert torch.equal(tiny_model(X, T, Y), base)
    trainable = {n.rpartition(".")[2] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    _randomize_lora(tiny_model)
    weights = [layer.base_layer.weight.clone() for layer in lora_layers(tiny_model)]
    unmerged = tiny_model(X, T, Y)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(tiny_model)
    assert (tiny_model(X, T, Y) - unmerged).abs().max() < 1e-5
    unmerge_lora(tiny_model)
    assert all(
        torch.equal(layer.base_layer.weight, w) for layer, w in zip(lora_layers(tiny_model), weights, strict=True)
    )
    assert torch.equal(tiny_model(X, T, Y), unmerged)


def test_dora_magnitude_trains():
    layer = LoRALinear(nn.Linear(4, 3), r=2, lora_alpha=2, use_dora=True)
    layer(torch.randn(5, 4)).square().sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.abs().sum() > 0


def test_dora_adapter_round_trip(tiny_model, tmp_path):
    from safetensors.torch import load_file

    tiny_model.eval()
    names = inject_lora(tiny_model, r=2, alpha=4, use_dora=True)
    _randomize_lora(tiny_model)
    expected = tiny_model(X, T, Y)
    save_adapter(tiny_model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    for name in names:
        out = tiny_model.get_submodule(name).base_layer.out_features
        assert tensors[f"{name}.lora_magnitude_vector"].shape == (out,)
    unload_lora(tiny_model)
    load_adapter(tiny_model, tmp_path / "a")
    assert all(layer.use_dora for layer in lora_layers(tiny_model))
    assert torch.equal(tiny_model(X, T, Y), expected)
    merge_and_unload(tiny_model)
    assert (tiny_model(X, T, Y) - expected).abs().max() < 1e-5
