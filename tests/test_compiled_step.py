"""The compiled training step (torch.compile, mode reduce-overhead: CUDA graphs on a GPU) against the eager one."""

import warnings

import pytest
import torch

from cdiff.config import TrainConfig
from cdiff.model import UNet
from cdiff.train import train
from tests.conftest import tiny_config
from tests.test_train import _toy_data


def _run(schedule, device: str, **switches) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, data = UNet(tiny_config()).to(device), _toy_data()
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, log_every=1, **switches)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # a fallback to eager fails the test
        state = train(model, schedule, data, cfg, seed=0, p_uncond=0.1, device=device, progress=False)
    return [v for _, v in state.losses], {k: v.cpu() for k, v in model.state_dict().items()}


def _assert_same_training(eager, compiled) -> None:
    (eager_losses, eager_weights), (losses, weights) = eager, compiled
    assert losses == pytest.approx(eager_losses, rel=1e-5)  # float tolerance: a fused kernel sums in another order
    assert eager_losses[0] != eager_losses[-1]  # it trained: four different losses, not one repeated
    for name, w in eager_weights.items():  # Adam divides by sqrt(v): an ulp in a gradient moves weights ~1e-4
        assert torch.allclose(weights[name], w, atol=1e-3), name


@pytest.mark.slow
def test_the_compiled_step_trains_as_the_eager_step_on_cpu(schedule):
    """Inductor compiles forward and backward (about 40 s on 2 cores); mode reduce-overhead captures nothing on a
    CPU, so this checks the compiled graphs, and on a GPU the CUDA-graph test below checks the capture."""
    eager = _run(schedule, "cpu")
    _assert_same_training(eager, _run(schedule, "cpu", compile=True, compile_mode="reduce-overhead"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_cuda_graph_step_trains_as_the_eager_step_on_a_gpu(schedule):
    eager = _run(schedule, "cuda", noise_on_device=True)
    _assert_same_training(
        eager, _run(schedule, "cuda", noise_on_device=True, compile=True, compile_mode="reduce-overhead")
    )


def test_noise_on_a_cpu_device_is_the_default_draw(schedule):
    """noise_on_device on a CPU draws from the same generator as the default: one run, the same numbers."""
    assert _run(schedule, "cpu", noise_on_device=True)[0] == _run(schedule, "cpu")[0]
