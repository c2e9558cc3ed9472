import pytest
import torch

from cdiff.config import DiffusionConfig, ModelConfig
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule

torch.set_num_threads(2)


# `make test` runs the suite on two pytest-xdist workers (-n 2): the modules whose tests start Ray (a local
# session, a stage, a cluster) on one worker, one after another in file order, as they would run alone
# (test_pipeline's last test depends on its order, test_faults looks for Ray's workers machine-wide); every
# other test (the unit tests, and the slow ones of DVC and MLflow alone) beside them on the other.
END_TO_END = frozenset(f"tests/test_{name}.py" for name in ("distributed", "faults", "multinode", "pipeline", "tune"))


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndOnOneWorker(LoadScopeScheduling):
        """One unit of work for all Ray modules (the largest, so the first handed out), one per other test."""

        def _split_scope(self, nodeid: str) -> str:
            return "end-to-end" if nodeid.split("::", 1)[0] in END_TO_END else nodeid

    return EndToEndOnOneWorker(config, log)


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
