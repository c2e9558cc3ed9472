import dataclasses
import math

import pytest
import torch

from cdiff.batches import BatchPlan
from cdiff.config import TrainConfig
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.lora import inject_lora
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import new_state, train, validation_loss
from tests.conftest import tiny_config


def _toy_data(n=64):
    # three classes of distinct, easy patterns: a quick overfit target
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = torch.zeros(n, 1, 12, 12, dtype=torch.uint8)
    for c in range(3):
        images[labels == c, :, c * 4 : c * 4 + 4, :] = 255
    images = (images.float() + torch.randint(0, 20, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, ["top", "middle", "bottom"])


def test_tiny_overfit_loss_falls_clearly(schedule):
    torch.manual_seed(0)
    model, data = UNet(tiny_config()), _toy_data()
    before = validation_loss(model, schedule, data, n=64)
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10, ema_decay=0.9)
    state = train(model, schedule, data, cfg, seed=0, p_uncond=0.1, progress=False)
    after = validation_loss(model, schedule, data, n=64)
    assert state.step == 150 and len(state.losses) == 15
    assert after < 0.5 * before, (before, after)


def test_lora_training_changes_only_the_adapter(schedule):
    torch.manual_seed(0)
    model, data = UNet(tiny_config()), _toy_data()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, r=2, alpha=2)
    train(
        model, schedule, data, TrainConfig(steps=5, batch_size=8, warmup_steps=0), seed=0, p_uncond=0.1, progress=False
    )
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), k


def test_resume_from_checkpoint_equals_uninterrupted_run(schedule):
    cfg = TrainConfig(steps=12, batch_size=8, warmup_steps=2, checkpoint_every=5, log_every=1)
    data = _toy_data()
    torch.manual_seed(0)
    straight = UNet(tiny_config())
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, schedule, data, cfg, seed=1, p_uncond=0.1, progress=False)

    saved = []
    first = UNet(tiny_config())
    first.load_state_dict(init)
    cfg_short = TrainConfig(**{**cfg.__dict__, "steps": 12})
    try:
        train(
            first,
            schedule,
            data,
            cfg_short,
            seed=1,
            p_uncond=0.1,
            progress=False,
            on_checkpoint=lambda s: (saved.append({k: v for k, v in _copy(s.state_dict(first)).items()}), _stop(s)),
        )
    except KeyboardInterrupt:
        pass
    assert saved[0]["step"] == 5
    resumed = UNet(tiny_config())
    state = new_state(resumed, cfg, resume=saved[0])
    train(resumed, schedule, data, cfg, seed=1, p_uncond=0.1, state=state, progress=False)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def _copy(obj):
    import copy

    return copy.deepcopy(obj)


def _stop(state):
    raise KeyboardInterrupt  # simulate a crash right after the first checkpoint


def test_batch_plan_shards_union_to_the_global_batch():
    plan = BatchPlan(10, 4, seed=0)
    seen = torch.cat([plan.global_batch(s) for s in range(5)])  # two full epochs
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)
    g = plan.global_batch(3)
    assert torch.equal(torch.cat([g[0::2], g[1::2]]).sort().values, g.sort().values)


def test_lora_dropout_training_is_reproducible(schedule):
    data, cfg = _toy_data(), TrainConfig(steps=4, batch_size=8, warmup_steps=0)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = UNet(tiny_config())
        inject_lora(model, r=2, alpha=2, dropout=0.5)
        torch.manual_seed(123 + len(weights))  # whatever the global RNG held before training
        train(model, schedule, data, cfg, seed=0, p_uncond=0.1, progress=False)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _diverging_run(schedule, cfg, bad: float, match: str):
    """Train a model whose third forward pass is multiplied by `bad` (inf or nan), as a diverging run would be;
    returns (model, forward calls, checkpointed steps, logged steps, the error)."""
    torch.manual_seed(0)
    model, data = UNet(tiny_config()), _toy_data()
    calls, checkpoints, logs = [], [], []

    def blow_up(module, args, output):
        calls.append(1)
        return output * bad if len(calls) == 3 else output

    model.head.register_forward_hook(blow_up)
    with pytest.raises(CdiffError, match=match) as err:
        train(
            model,
            schedule,
            data,
            cfg,
            seed=0,
            p_uncond=0.1,
            progress=False,
            on_checkpoint=lambda s: checkpoints.append(s.step),
            on_log=lambda step, m: logs.append(step),
        )
    return model, calls, checkpoints, logs, err.value


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_loss_stops_training_naming_the_step(schedule, grad_clip):
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=0, checkpoint_every=1, log_every=1, grad_clip=grad_clip)
    model, _, checkpoints, _, err = _diverging_run(
        schedule, cfg, float("inf"), r"training diverged at step 3 \(loss inf"
    )
    assert "\n" not in str(err) and checkpoints == [1, 2]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # checked before its update: weights intact


def test_a_non_finite_step_between_syncs_is_named_and_never_saved(schedule):
    """The host reads the losses only at log and checkpoint steps: a NaN at step 3 is found at step 4, named
    as step 3, and stops the run before step 4's checkpoint, log or update."""
    cfg = TrainConfig(steps=8, batch_size=8, warmup_steps=0, checkpoint_every=4, log_every=4)
    _, calls, checkpoints, logs, _ = _diverging_run(
        schedule, cfg, float("nan"), r"training diverged at step 3 \(loss nan"
    )
    assert checkpoints == [] and logs == [] and len(calls) == 4  # it ran step 4's forward, then stopped


def test_v_prediction_with_min_snr_learns(schedule):
    """The same overfit as above, predicting v with Min-SNR-5 weights: the (eps) validation loss falls too."""
    v_schedule = NoiseSchedule(dataclasses.replace(schedule.config, prediction="v", min_snr_gamma=5.0))
    torch.manual_seed(0)
    model, data = UNet(tiny_config()), _toy_data()
    before = validation_loss(model, v_schedule, data, n=64)
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10, ema_decay=0.9)
    train(model, v_schedule, data, cfg, seed=0, p_uncond=0.1, progress=False)
    assert validation_loss(model, v_schedule, data, n=64) < 0.5 * before


def test_bf16_autocast_steps_run_and_stay_finite(schedule):
    torch.manual_seed(0)
    model, data = UNet(tiny_config()), _toy_data()
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, log_every=1, precision="bf16")
    state = train(model, schedule, data, cfg, seed=0, p_uncond=0.1, progress=False)
    assert len(state.losses) == 4 and all(math.isfinite(v) for _, v in state.losses)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def test_channels_last_training_matches_the_default_layout(schedule):
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=0, log_every=1)
    losses, weights = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = UNet(tiny_config())
        run = dataclasses.replace(cfg, channels_last=channels_last)
        losses.append([v for _, v in train(model, schedule, _toy_data(), run, seed=0, p_uncond=0.1).losses])
        weights.append(model.state_dict())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert all(v.is_contiguous() for v in weights[1].values())  # saved as safetensors: contiguous
    # other conv kernels round differently, and Adam turns a tiny gradient's sign into a full lr step:
    # the weights agree to within what 3 steps can move them (each at most about lr)
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=3 * cfg.lr) for k in weights[0])


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_a_tenth():
    from cdiff.train import learning_rate

    cfg = TrainConfig(steps=1100, lr=1.0, warmup_steps=100)
    assert learning_rate(cfg, 0) == pytest.approx(0.01) and learning_rate(cfg, 99) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(1.0)  # the cosine starts at the top
    assert learning_rate(cfg, 600) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi / 2) = 0
    assert learning_rate(cfg, 1100) == pytest.approx(0.1) and learning_rate(cfg, 5000) == pytest.approx(0.1)


@pytest.mark.parametrize("micro", [4, 3])  # 3 does not divide 8: micro-batches of 3, 3, 2
def test_micro_batches_give_the_whole_batch_gradient_and_loss(schedule, micro):
    # grad_clip off and one step: the gradients train() leaves are the step's own, unscaled (Adam would hide a
    # wrongly weighted micro-batch: it divides each gradient by its own size)
    cfg = TrainConfig(steps=1, batch_size=8, warmup_steps=0, log_every=1, grad_clip=0)
    grads, losses = [], []
    for m in (0, micro):
        torch.manual_seed(0)
        model = UNet(tiny_config())
        state = train(model, schedule, _toy_data(), dataclasses.replace(cfg, micro_batch=m), seed=0, p_uncond=0.1)
        losses.append(state.losses[0][1])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert sum(g.abs().sum() > 0 for g in grads[0].values()) > 0.9 * len(grads[0])
    for name, whole in grads[0].items():
        torch.testing.assert_close(grads[1][name], whole, rtol=1e-4, atol=1e-7, msg=name)


def test_micro_batch_must_not_be_negative():
    with pytest.raises(CdiffError, match="train.base.micro_batch: must be at least 0"):
        TrainConfig(micro_batch=-1).validate("train.base")
