"""One training step and one loop for base pretraining, LoRA and full fine-tuning: only what trains differs.

All randomness of a step (which images, t, noise, label dropout) comes from (seed, step) for the
*global* batch; each worker takes its slice. So 1 worker and N workers see the same numbers, and a
run resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cdiff.batches import NOISE, BatchPlan, derive_seed
from cdiff.config import TrainConfig
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.io import check_finite
from cdiff.performance import autocast, make_optimizer, maybe_compile, to_memory_format
from cdiff.schedule import NoiseSchedule, diffusion_loss


class EMA:
    """Exponential moving average of the trainable parameters; its weights are the ones saved."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages follow the model
        params = dict(model.named_parameters())
        names = list(self.shadow)
        # one fused kernel per group of tensors, not one launch per parameter
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names], 1 - decay)

    def copy_to(self, model) -> None:
        apply_ema(model, self.shadow)


@torch.no_grad()
def apply_ema(model, shadow: dict[str, torch.Tensor]) -> None:
    """Copy EMA weights (by parameter name) into the model."""
    params = dict(model.named_parameters())
    for n, v in shadow.items():
        params[n].copy_(v.to(params[n].device))


def step_noise(step: int, seed: int, batch_size: int, image_shape, timesteps: int, device="cpu"):
    """(t, noise, u) for the global batch of `step`, drawn on `device`: u decides label dropout.

    Drawn on the CPU (the default), the numbers are the same on any training device; drawn on a GPU
    they come from its own generator (the same on every run of that kind of device), with no host work.
    """
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, step + 1, NOISE))
    t = torch.randint(0, timesteps, (batch_size,), generator=g, device=device)
    noise = torch.randn((batch_size, *image_shape), generator=g, device=device)
    u = torch.rand(batch_size, generator=g, device=device)
    return t, noise, u


@dataclass
class TrainState:
    step: int
    ema: EMA
    optimizer: torch.optim.Optimizer
    losses: list[tuple[int, float]]  # (step, loss) as logged

    def state_dict(self, model) -> dict:
        core = getattr(model, "module", model)
        return {
            "step": self.step,
            "model": core.state_dict(),
            "ema": self.ema.shadow,
            "optimizer": self.optimizer.state_dict(),
            "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
        }


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def new_state(model, cfg: TrainConfig, resume: dict | None = None) -> TrainState:
    core = getattr(model, "module", model)
    params = [p for p in core.parameters() if p.requires_grad]
    if not params:
        raise CdiffError("nothing to train: every parameter is frozen")
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    state = TrainState(0, EMA(core, cfg.ema_decay), optimizer, [])
    if resume is not None:
        core.load_state_dict(resume["model"])
        state.ema.shadow = {k: v.clone() for k, v in resume["ema"].items()}
        optimizer.load_state_dict(resume["optimizer"])
        state.step = int(resume["step"])
        state.losses = [(int(s), float(v)) for s, v in resume.get("losses", torch.empty(0, 2)).tolist()]
    return state


def train(
    model,
    schedule: NoiseSchedule,
    data: ImageSet,
    cfg: TrainConfig,
    *,
    seed: int,
    p_uncond: float,
    state: TrainState | None = None,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
    on_log: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train `model` (plain or DDP-wrapped) for cfg.steps global steps; returns the final state.

    The EMA weights are copied into the model at the end: those are the weights to save.
    """
    if cfg.batch_size % world_size:
        raise CdiffError(f"batch_size {cfg.batch_size} must be divisible by the number of workers {world_size}")
    core = getattr(model, "module", model)
    if cfg.channels_last:
        to_memory_format(model, True)
    state = state or new_state(model, cfg)
    plan = BatchPlan(len(data), cfg.batch_size, seed)
    images, labels = data.as_float().to(device), data.labels.to(device)  # the data lives on the device
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    # static shapes: every step has the same batch, and CUDA graphs (mode reduce-overhead) need them
    network = maybe_compile(model, cfg.compile, mode=cfg.compile_mode, dynamic=False)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    trainable = [p for p in core.parameters() if p.requires_grad]
    draw_on = device if cfg.noise_on_device else "cpu"
    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad norm]) on the device, read at the next sync
    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not progress or rank != 0, leave=False)
    while state.step < cfg.steps:
        step = state.step
        torch.manual_seed(derive_seed(seed, step * 1_009 + rank))  # dropout masks: a function of (seed, step, rank)
        mine = slice(rank, None, world_size)  # this worker's share of the global batch
        index = plan.global_batch(step)[mine].to(device, non_blocking=True)
        t, noise, u = (
            v[mine].to(device, non_blocking=True)
            for v in step_noise(step, seed, cfg.batch_size, images.shape[1:], schedule.timesteps, draw_on)
        )
        x0, y = images[index], labels[index]
        if graphs:  # a new step: the graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        state.optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(network, model, schedule, (x0, y, t, noise, u), cfg, device, p_uncond, core.prompt.null_id)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        pending.append((step, torch.stack([loss.detach().float(), grad_norm.detach().float()])))
        logs = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        saves = on_checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
        if logs or saves or len(pending) == 1_000:  # the only host sync: before this step's update
            _stop_if_diverged(pending)
            pending.clear()
        state.optimizer.step()
        state.ema.update(core, step)
        state.step += 1
        bar.update(1)
        if logs:
            value = loss.detach()
            if world_size > 1 and dist.is_initialized():
                dist.all_reduce(value)
                value = value / world_size
            state.losses.append((state.step, value.item()))
            bar.set_postfix(loss=f"{value.item():.4f}")
            if on_log:
                on_log(state.step, {"loss": value.item(), "lr": learning_rate(cfg, step)})
        if saves:
            on_checkpoint(state)
    bar.close()
    state.ema.copy_to(core)
    check_finite(dict(core.named_parameters()), f"training ended at step {state.step} with broken weights")
    if cfg.channels_last:
        to_memory_format(model, False)  # saved weights are contiguous (safetensors needs that)
    return state


def _accumulate(network, model, schedule, batch, cfg: TrainConfig, device, p_uncond: float, null_id: int):
    """Backward of this worker's batch, whole or in micro-batches of cfg.micro_batch rows; returns its loss.

    The loss is a mean over the batch's rows, so the micro-batches' losses, each weighted by its share of
    the rows, sum to the whole batch's: the gradient is the same up to float rounding, from less memory at
    once (on a CPU a smaller working set runs faster: bench/micro_batch.py). DDP all-reduces the gradients
    once, at the last micro-batch.
    """
    rows = len(batch[0])
    size = cfg.micro_batch if 0 < cfg.micro_batch < rows else rows
    chunks = list(zip(*(v.split(size) for v in batch), strict=True))
    total = torch.zeros((), device=device)
    for i, (x0, y, t, noise, u) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, cfg.precision):
                loss = diffusion_loss(network, schedule, x0, y, t, noise, u, p_uncond, null_id)
            share = len(x0) / rows
            (loss * share if share < 1 else loss).backward()
        total = total + loss.detach().float() * share
    return total


def _stop_if_diverged(pending: list[tuple[int, torch.Tensor]]) -> None:
    """One line naming the first step whose loss or gradients went NaN/inf since the last sync.

    Steps between syncs (log and checkpoint steps) are checked there, with one read of the device: a NaN
    may reach the weights in memory for a few steps, never a checkpoint, a logged loss or a result. The
    gradients are all-reduced, so every DDP worker sees the same norm and stops at the same step.
    """
    if not pending:
        return
    values = torch.stack([v for _, v in pending]).cpu()
    bad = (~torch.isfinite(values).all(dim=1)).nonzero()
    if len(bad):
        i = int(bad[0])
        loss, norm = values[i].tolist()
        raise CdiffError(
            f"training diverged at step {pending[i][0] + 1} (loss {loss:.4g}, gradient norm {norm:.4g}): "
            "lower the learning rate (or LoRA alpha); nothing was saved"
        )


@torch.no_grad()
def validation_loss(
    model, schedule: NoiseSchedule, data: ImageSet, n: int = 512, seed: int = 0, batch_size: int = 256, device="cpu"
) -> float:
    """A deterministic epsilon loss on held-out images: fixed images, evenly spaced t and fixed noise.

    Whatever the model predicts (eps, v, x0), its output is turned into eps first, so the numbers
    compare across prediction types and loss weightings.
    """
    was_training = model.training
    model.eval()
    n = min(n, len(data))
    images, labels = data.as_float()[:n], data.labels[:n]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g)
    t = torch.linspace(0, schedule.timesteps - 1, n).round().long()[torch.randperm(n, generator=g)]
    total = 0.0
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        x_t = schedule.q_sample(images[sl], t[sl], noise[sl]).to(device)
        t_dev = t[sl].to(device)
        _, eps = schedule.predict_start_and_noise(x_t, t_dev, model(x_t, t_dev, labels[sl].to(device)))
        total += torch.nn.functional.mse_loss(eps.cpu(), noise[sl], reduction="sum").item()
    model.train(was_training)
    return total / noise.numel()
