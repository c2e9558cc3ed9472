import pytest
import torch

from cdiff.performance import CompiledOrEager, InferenceModel, autocast, make_optimizer, maybe_compile
from cdiff.samplers import Sampler, sample


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 12, 12, generator=g), torch.tensor([1, 5, 10, 40]), torch.tensor([0, 1, 2, 3])


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny_model, monkeypatch):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = maybe_compile(tiny_model, True)
    assert isinstance(wrapped, CompiledOrEager) and wrapped.prompt is tiny_model.prompt
    x, t, y = _inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="torch.compile failed, running eager: RuntimeError"):
        out = wrapped(x, t, y)
    assert torch.equal(out, tiny_model(x, t, y).detach())
    assert maybe_compile(tiny_model, False) is tiny_model


def test_bf16_inference_model_returns_float32_close_to_fp32(tiny_model):
    tiny_model.eval()
    x, t, y = _inputs()
    with torch.no_grad():
        fast, exact = InferenceModel(tiny_model, "bf16")(x, t, y), tiny_model(x, t, y)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # it did run in bf16
    assert torch.allclose(fast, exact, atol=0.1)  # bf16 keeps about 3 significant digits
    images = sample(InferenceModel(tiny_model, "bf16"), _schedule(), [0, 1], Sampler("dpm++2m", 4), progress=False)
    assert torch.isfinite(images).all() and images.shape == (2, 1, 12, 12)


def _schedule():
    from cdiff.config import DiffusionConfig
    from cdiff.schedule import NoiseSchedule

    return NoiseSchedule(DiffusionConfig(timesteps=50))


def test_fp32_autocast_is_a_no_op_and_cpu_adamw_is_not_fused(tiny_model):
    x, t, y = _inputs()
    with torch.no_grad(), autocast("cpu", "fp32"):
        assert tiny_model(x, t, y).dtype == torch.float32
    assert not make_optimizer(list(tiny_model.parameters()), 1e-3, 0.0).defaults.get("fused")


@pytest.mark.slow
def test_compiled_model_equals_eager_on_cpu(tiny_model):
    """Inductor on 2 CPU cores: a minute or more for this tiny UNet, hence slow."""
    tiny_model.eval()
    x, t, y = _inputs()
    with torch.no_grad():
        compiled = InferenceModel(tiny_model, "fp32", compile=True)
        out = compiled(x, t, y)
        assert compiled._forward._checked  # compiled, not fallen back to eager
        assert torch.allclose(out, tiny_model(x, t, y), atol=1e-5)


def test_call_batch_splits_each_network_call_and_keeps_every_row(tiny_model):
    """The rows go through in calls of at most call_batch, in order: the output is the whole-batch call's."""
    tiny_model.eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(7, 1, 12, 12, generator=g), torch.randint(0, 50, (7,), generator=g), torch.arange(7) % 3
    seen = []
    tiny_model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    with torch.no_grad():
        whole = tiny_model(x, t, y)
        split = InferenceModel(tiny_model, call_batch=3)(x, t, y)
    assert seen == [7, 3, 3, 1]
    assert torch.allclose(split, whole, atol=1e-5) and not torch.equal(split[:3], split[3:6])
    with pytest.raises(ValueError, match="call_batch"):
        InferenceModel(tiny_model, call_batch=-1)


def test_generate_with_call_batch_gives_the_same_images_in_smaller_calls(tiny_model, schedule):
    from cdiff.metrics import generate

    seen = []
    tiny_model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    sampler = Sampler("dpm++2m", 3)
    whole, labels = generate(tiny_model, schedule, 3, 2, sampler, batch_size=6, progress=False)
    assert set(seen) == {12}  # guided: 6 images, 12 rows per call
    seen.clear()
    split, split_labels = generate(tiny_model, schedule, 3, 2, sampler, batch_size=6, call_batch=5, progress=False)
    assert set(seen) == {5, 2} and torch.equal(labels, split_labels)
    assert torch.allclose(split, whole, atol=1e-4)
