import pytest
import torch

from cdiff.config import DiffusionConfig, ModelConfig
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule

torch.set_num_threads(2)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        image_size=12,
        channels=1,
        num_classes=3,
        base_channels=[8, 16],
        n_ctx=4,
        ctx_dim=16,
        attn_dim=16,
        n_heads=2,
        ff_mult=2,
        time_dim=16,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(tiny_config(), ["cat", "dog", "bird"])


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig(timesteps=50))
