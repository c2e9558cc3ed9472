import pytest
import torch
from safetensors.torch import load_file

from cdiff.adapter_format import load_adapter, save_adapter
from cdiff.errors import CdiffError
from cdiff.lora import inject_lora, lora_layers, merge_and_unload, merge_lora, unload_lora
from cdiff.mixing import load_adapters
from cdiff.model import UNet
from cdiff.samplers import Sampler, sample
from tests.conftest import tiny_config
from tests.test_lora import T, X, Y, _randomize_lora, _same, _snapshot

ADAPTERS = {  # name: inject_lora options; different ranks, scalings and targets
    "a": dict(r=2, alpha=4, extra_trainable=["prompt"]),
    "b": dict(targets=("w_q", "w_o"), r=3, alpha=3, use_rslora=True, extra_trainable=["prompt"]),
    "c": dict(r=2, alpha=2),
}


@pytest.fixture
def adapters(tiny_model, tmp_path):
    """Three adapters of tiny_model saved under tmp_path, and a copy of its base weights."""
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        inject_lora(tiny_model, **options)
        _randomize_lora(tiny_model, seed=i)
        save_adapter(tiny_model, tmp_path / name, class_names=[f"{name}{k}" for k in range(3)])
        unload_lora(tiny_model)
    return tmp_path, base


def _fresh(base) -> UNet:
    model = UNet(tiny_config(), ["cat", "dog", "bird"])
    model.load_state_dict(base)
    return model.eval()


def test_one_adapter_at_weight_1_gives_exactly_its_pixels(adapters, schedule):
    folder, base = adapters
    sampler, ids = Sampler("ddim", 4, guidance_scale=2.0), [0, 1, 2]
    single = _fresh(base)
    load_adapter(single, folder / "a")
    merge_lora(single)  # the existing single-adapter path, as `cdiff sample --adapter a`
    expected = sample(single, schedule, ids, sampler, seed=3, progress=False)
    mixed = _fresh(base)
    assert load_adapters(mixed, [(folder / "a", 1.0)])
    assert mixed.class_names == ["a0", "a1", "a2"]
    assert torch.equal(sample(mixed, schedule, ids, sampler, seed=3, progress=False), expected)
    half = _fresh(base)
    load_adapters(half, [(folder / "a", 0.5)])
    assert (sample(half, schedule, ids, sampler, seed=3, progress=False) - expected).abs().max() > 1e-3


def _delta(tensors, name, r, alpha, rslora=False):
    """s·B A in PEFT's orientation, from cdiff's lora_A (in, r) and lora_B (r, out)."""
    scaling = alpha / (r**0.5 if rslora else r)
    return scaling * tensors[f"{name}.lora_B"].T @ tensors[f"{name}.lora_A"].T


def test_a_mix_equals_the_hand_summed_deltas(adapters):
    folder, base = adapters
    ta, tb = (load_file(str(folder / n / "adapter.safetensors")) for n in "ab")
    model = _fresh(base)
    changed = load_adapters(model, [(folder / "a", 0.7), (folder / "b", -0.4)])
    names_a = {k.removesuffix(".lora_A") for k in ta if k.endswith(".lora_A")}
    names_b = {k.removesuffix(".lora_A") for k in tb if k.endswith(".lora_A")}
    assert set(changed) == names_a | names_b and names_a != names_b
    state = model.state_dict()
    for key, weight in base.items():
        name = key.removesuffix(".weight")
        expected = weight.clone()
        if name in names_a:
            expected += 0.7 * _delta(ta, name, r=2, alpha=4)
        if name in names_b:
            expected -= 0.4 * _delta(tb, name, r=3, alpha=3, rslora=True)
        if key.startswith("prompt."):
            expected = weight + 0.7 * (ta[key] - weight) - 0.4 * (tb[key] - weight)
        assert torch.allclose(state[key], expected, atol=1e-6), key
        if name not in names_a | names_b and not key.startswith("prompt."):
            assert torch.equal(state[key], weight), key
    assert not lora_layers(model) and model.class_names == ["a0", "a1", "a2"]  # the first adapter's classes


def test_a_mix_unloads_to_the_exact_base_and_swaps(adapters):
    folder, base = adapters
    model = _fresh(base)
    load_adapter(model, folder / "c")
    load_adapters(model, [(folder / "a", 0.5), (folder / "b", 0.5)])  # onto a model carrying an adapter
    with pytest.raises(CdiffError, match="weighted mix of adapters"):
        save_adapter(model, folder / "mix")
    load_adapter(model, folder / "c")  # swap back to one adapter
    fresh = _fresh(base)
    load_adapter(fresh, folder / "c")
    assert torch.equal(model(X, T, Y), fresh(X, T, Y))
    unload_lora(model)
    assert _same(dict(model.state_dict()), base) and model.class_names == ["cat", "dog", "bird"]


def test_merge_and_unload_keeps_the_mix(adapters):
    folder, base = adapters
    model = _fresh(base)
    load_adapters(model, [(folder / "a", 0.3), (folder / "c", 2.0)])
    expected = model(X, T, Y)
    merge_and_unload(model)
    assert model._cdiff_lora is None and torch.equal(model(X, T, Y), expected)
    assert not torch.allclose(expected, _fresh(base)(X, T, Y), atol=1e-4)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), True, "0.5"])
def test_a_non_finite_weight_is_refused_and_the_model_untouched(adapters, weight):
    folder, base = adapters
    model = _fresh(base)
    before = _snapshot(model)
    with pytest.raises(CdiffError, match="is not a finite number") as err:
        load_adapters(model, [(folder / "a", 1.0), (folder / "b", weight)])
    assert "\n" not in str(err.value) and _same(_snapshot(model), before)


def test_negative_and_zero_weights_are_allowed(adapters):
    folder, base = adapters
    model = _fresh(base)
    load_adapters(model, [(folder / "a", 0.0)])  # the adapter's prompt at weight 0 is the base's
    assert _same(dict(model.state_dict()), base)
    load_adapters(model, [(folder / "c", 1.0), (folder / "c", -1.0)])
    assert torch.allclose(model(X, T, Y), _fresh(base)(X, T, Y), atol=1e-5)


def test_an_adapter_of_another_base_is_refused_and_the_model_untouched(adapters, tmp_path):
    folder, base = adapters
    torch.manual_seed(1)
    other = UNet(tiny_config(), ["cat", "dog", "bird"])  # same architecture, other weights
    inject_lora(other, r=2, alpha=2)
    save_adapter(other, tmp_path / "foreign")
    model = _fresh(base)
    load_adapter(model, folder / "c")
    merge_lora(model)
    before = _snapshot(model)
    with pytest.raises(CdiffError, match="trained on other base weights \\(fingerprint mismatch\\)") as err:
        load_adapters(model, [(folder / "a", 0.5), (tmp_path / "foreign", 0.5)])
    assert "\n" not in str(err.value) and _same(_snapshot(model), before)
    with pytest.raises(CdiffError, match="another model architecture"):
        load_adapters(UNet(tiny_config(n_ctx=2)), [(folder / "a", 1.0)])
    with pytest.raises(CdiffError, match="at least one"):
        load_adapters(model, [])


def test_dora_adapters_mix_by_their_merged_delta(tiny_model, tmp_path):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    inject_lora(tiny_model, r=2, alpha=4, use_dora=True)
    _randomize_lora(tiny_model)
    save_adapter(tiny_model, tmp_path / "d")
    merge_lora(tiny_model)
    merged = {layer: layer.base_layer.weight.clone() for layer in lora_layers(tiny_model)}
    names = [n for n, m in tiny_model.named_modules() if m in merged]
    model = _fresh(base)
    load_adapters(model, [(tmp_path / "d", 0.5)])
    for name, weight in zip(names, merged.values(), strict=True):
        expected = base[f"{name}.weight"] + 0.5 * (weight - base[f"{name}.weight"])
        assert torch.allclose(model.get_submodule(name).weight, expected, atol=1e-6)
