"""Tune's LoRA trials trained side by side: one process per trial (packing) against one vmapped step.

    PYTHONPATH=. python bench/tune_vmap.py [--trials 4] [--rounds 3] [--device cpu|cuda] [--quick]

Issue 16 asks Tune to fill the card, either with several trials per GPU (tune.trials_per_gpu, each trial a
process of its own) or with the trials' LoRA configs trained in one process through torch.func's
`vmap`, whichever measures faster. This bench times, side by side in one run, K trials of tune.* (batch
tune.batch_size each, the base model of params.yaml, the domain's LoRA targets) trained

- `sequential`: one after another in one process, a step of each in turn (the trials of one Ray worker);
- `packed`: K processes at once, each stepping its own trial (what K trials on one GPU or CPU amount to),
  the CPU's threads split between them;
- `vmap`: one step of all K at once, `torch.func.vmap` over their stacked LoRA weights and batches.

Different ranks stack exactly: every trial's A and B are zero-padded to the largest rank, and the padded
rows and columns get zero gradients, so they stay zero under AdamW. Each trial's alpha/r and lr are its own.
Before timing, the bench checks that 3 vmapped steps give each trial the weights that 3 steps of plain
torch AdamW give it alone (to float tolerance): the comparison is of the same training.

Prints img/s per variant (K x batch images a step) and writes JSON to --out. A finding, not in the
pipeline: Tune's trials are Ray trials, stopped at different times by ASHA.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.func import functional_call, grad_and_value, vmap

from cdiff.io import write_json
from cdiff.lora import inject_lora, lora_scaling
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule, diffusion_loss

ROOT = Path(__file__).resolve().parents[1]
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as cdiff.performance.make_optimizer uses


@dataclass(frozen=True)
class Trial:
    r: int
    alpha: float
    lr: float


@dataclass
class Setup:
    """What the trials share: the base model's config, the diffusion, the LoRA targets, the batch."""

    model: object  # ModelConfig
    diffusion: object  # DiffusionConfig
    targets: tuple[str, ...]
    batch_size: int
    weight_decay: float
    grad_clip: float
    p_uncond: float
    device: str = "cpu"


def base_model(s: Setup) -> UNet:
    torch.manual_seed(0)
    return UNet(s.model, [str(i) for i in range(s.model.num_classes)]).to(s.device)


def trial_model(s: Setup, trial: Trial, k: int) -> UNet:
    """The base with trial k's own adapter (its own rank, alpha and initial A)."""
    model = base_model(s)
    torch.manual_seed(1_000 + k)
    inject_lora(model, s.targets, r=trial.r, alpha=trial.alpha)
    return model


def batches(s: Setup, k: int, steps: int):
    """Trial k's batches: (x0, y, t, noise, u) per step, random images (the cost does not depend on them)."""
    g = torch.Generator().manual_seed(k)
    m, n = s.model, s.batch_size
    out = []
    for _ in range(steps):
        x0 = torch.rand(n, m.channels, m.image_size, m.image_size, generator=g) * 2 - 1
        y = torch.randint(0, m.num_classes, (n,), generator=g)
        t = torch.randint(0, s.diffusion.timesteps, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        u = torch.rand(n, generator=g)
        out.append(tuple(v.to(s.device) for v in (x0, y, t, noise, u)))
    return out


class Single:
    """One trial alone: the model with its adapter and torch's AdamW, a step as cdiff.train.train takes it."""

    def __init__(self, s: Setup, trial: Trial, k: int):
        self.s, self.model = s, trial_model(s, trial, k)
        self.schedule = NoiseSchedule(s.diffusion)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=trial.lr, weight_decay=s.weight_decay)

    def step(self, batch) -> None:
        x0, y, t, noise, u = batch
        loss = diffusion_loss(self.model, self.schedule, x0, y, t, noise, u, self.s.p_uncond, self.model.prompt.null_id)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.optimizer.step()


class Stacked:
    """K trials in one model: their LoRA weights stacked (padded to the largest rank), one vmapped step."""

    def __init__(self, s: Setup, trials: list[Trial]):
        self.s, self.k = s, len(trials)
        r_max = max(t.r for t in trials)
        self.model = base_model(s)
        inject_lora(self.model, s.targets, r=r_max, alpha=float(r_max))  # scaling 1: each trial's is applied below
        self.schedule = NoiseSchedule(s.diffusion)
        self.frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        self.frozen.update(dict(self.model.named_buffers()))
        stacked: dict[str, list[torch.Tensor]] = {}
        for k, trial in enumerate(trials):
            own = dict(trial_model(s, trial, k).named_parameters())
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    w = own[name].detach()
                    pad = [0, r_max - trial.r] if name.endswith("lora_A") else [0, 0, 0, r_max - trial.r]
                    stacked.setdefault(name, []).append(torch.nn.functional.pad(w, pad) if "lora_" in name else w)
        self.params = {n: torch.stack(v) for n, v in stacked.items()}
        self.m = {n: torch.zeros_like(v) for n, v in self.params.items()}
        self.v = {n: torch.zeros_like(v) for n, v in self.params.items()}
        self.scale = torch.tensor([lora_scaling(t.r, t.alpha) for t in trials], device=s.device)
        self.lr = torch.tensor([t.lr for t in trials], device=s.device)
        self.steps = 0
        null_id = self.model.prompt.null_id

        def loss(params, scale, x0, y, t, noise, u):
            weights = {n: v * scale if n.endswith("lora_B") else v for n, v in params.items()}  # B·(alpha/r)

            def network(*args):
                return functional_call(self.model, {**self.frozen, **weights}, args)

            return diffusion_loss(network, self.schedule, x0, y, t, noise, u, s.p_uncond, null_id)

        self.grads = vmap(grad_and_value(loss), randomness="different")

    def step(self, batch) -> None:
        """batch: (x0, y, t, noise, u), each with the trials stacked first."""
        grads, _ = self.grads(self.params, self.scale, *batch)
        names = list(self.params)
        norms = torch.stack([grads[n].flatten(1).pow(2).sum(1) for n in names]).sum(0).sqrt()  # (K,)
        clip = (self.s.grad_clip / (norms + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_, per trial
        self.steps += 1
        (b1, b2), n = BETAS, self.steps
        with torch.no_grad():
            for name in names:
                p, m, v = self.params[name], self.m[name], self.v[name]
                shape = (self.k,) + (1,) * (p.dim() - 1)
                g = grads[name] * clip.view(shape)
                lr = self.lr.view(shape)
                p.mul_(1 - lr * self.s.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**n)).add_(EPS)
                p.sub_(lr / (1 - b1**n) * m / denom)

    def trial_weights(self, k: int, r: int) -> dict[str, torch.Tensor]:
        """Trial k's weights, unpadded to its rank r."""
        out = {}
        for name, w in self.params.items():
            w = w[k]
            out[name] = w[:, :r] if name.endswith("lora_A") else w[:r] if name.endswith("lora_B") else w
        return out


def stack_batches(per_trial: list[list[tuple]]) -> list[tuple]:
    return [tuple(torch.stack(parts) for parts in zip(*step, strict=True)) for step in zip(*per_trial, strict=True)]


def check_same_training(s: Setup, trials: list[Trial], steps: int = 3, tol: float = 1e-4) -> float:
    """The largest difference, over every trial's weights, of `steps` vmapped steps against the same steps of
    each trial alone with torch's AdamW; raises when it is above `tol` (relative to the weight's scale)."""
    per_trial = [batches(s, k, steps) for k in range(len(trials))]
    stacked = Stacked(s, trials)
    for batch in stack_batches(per_trial):
        stacked.step(batch)
    worst = 0.0
    for k, trial in enumerate(trials):
        single = Single(s, trial, k)
        for batch in per_trial[k]:
            single.step(batch)
        mine = stacked.trial_weights(k, trial.r)
        for name, p in single.model.named_parameters():
            if p.requires_grad:
                diff = (mine[name] - p.detach()).abs().max().item() / max(1.0, p.detach().abs().max().item())
                worst = max(worst, diff)
    if not worst <= tol:
        raise AssertionError(f"the vmapped trials train unlike the trials alone: {worst:.2e} > {tol}")
    return worst


def _time(step, batches_, reps: int) -> float:
    for b in batches_[:2]:  # warm-up
        step(b)
    sync()
    start = time.perf_counter()
    for i in range(reps):
        step(batches_[i % len(batches_)])
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sequential_rate(s: Setup, trials: list[Trial], reps: int) -> float:
    singles = [Single(s, t, k) for k, t in enumerate(trials)]
    per_trial = [batches(s, k, 4) for k in range(len(trials))]

    def step(i):
        for single, b in zip(singles, per_trial, strict=True):
            single.step(b[i])

    seconds = _time(step, list(range(4)), reps)
    return len(trials) * s.batch_size * reps / seconds


def vmap_rate(s: Setup, trials: list[Trial], reps: int) -> float:
    stacked = Stacked(s, trials)
    seconds = _time(stacked.step, stack_batches([batches(s, k, 4) for k in range(len(trials))]), reps)
    return len(trials) * s.batch_size * reps / seconds


def _packed_worker(k, s, trial, reps, threads, barrier, results) -> None:
    torch.set_num_threads(threads)
    single = Single(s, trial, k)
    b = batches(s, k, 4)
    for x in b[:2]:
        single.step(x)
    sync()
    barrier.wait()
    start = time.perf_counter()
    for i in range(reps):
        single.step(b[i % len(b)])
    sync()
    results[k] = time.perf_counter() - start


def packed_rate(s: Setup, trials: list[Trial], reps: int) -> float:
    """K processes stepping their own trial at once: images of all over the slowest one's time."""
    ctx = mp.get_context("spawn")
    threads = max(1, torch.get_num_threads() // len(trials))
    barrier, results = ctx.Barrier(len(trials)), ctx.Manager().dict()
    procs = [
        ctx.Process(target=_packed_worker, args=(k, s, t, reps, threads, barrier, results))
        for k, t in enumerate(trials)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.exitcode != 0:
            raise RuntimeError(f"a packed trial's process failed (exit {p.exitcode})")
    return len(trials) * s.batch_size * reps / max(results.values())


def setup_from(params_file: Path, device: str) -> tuple[Setup, list[Trial]]:
    from pipelines.core.config import load_params

    p = load_params(params_file)
    domain = p.data.domains.get("fashion-rot90") or next(iter(p.data.domains.values()))
    t = p.tune
    s = Setup(
        p.model,
        p.diffusion,
        tuple(domain.lora.targets),
        t.batch_size,
        p.train.lora.weight_decay,
        p.train.lora.grad_clip,
        p.diffusion.p_uncond,
        device,
    )
    return s, t


def trials_for(tune, n: int) -> list[Trial]:
    """n trials spread over tune's ranks, alpha ratios and lr range (a grid of what a search samples)."""
    out = []
    for k in range(n):
        r = tune.ranks[k % len(tune.ranks)]
        ratio = tune.alpha_ratios[k % len(tune.alpha_ratios)]
        lr = tune.lr_min * (tune.lr_max / tune.lr_min) ** (k / max(1, n - 1))
        out.append(Trial(r, r * ratio, lr))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="K trials trained side by side")
    parser.add_argument("--rounds", type=int, default=3, help="the variants take turns this many times")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each variant per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps: a smoke test")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune-vmap-cpu.json")
    args = parser.parse_args()
    # torch has no vmap batching rule for the CPU's SDPA kernel and falls back to a loop over the trials: a
    # cost this bench measures, so its warning is said once in the table's header, not per call
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    s, tune = setup_from(args.params, args.device)
    trials = trials_for(tune, args.trials)
    worst = check_same_training(s, trials)
    rounds, reps = (1, 3) if args.quick else (args.rounds, args.steps)
    variants = {"sequential": sequential_rate, "packed": packed_rate, "vmap": vmap_rate}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for name, rate in variants.items():
            rates[name].append(rate(s, trials, reps))
    first = statistics.median(rates["sequential"])
    print(f"{len(trials)} LoRA trials {[(t.r, t.alpha) for t in trials]}, batch {s.batch_size} each, on {args.device}")
    print(f"vmapped against alone after 3 steps: largest weight difference {worst:.1e}")
    if not args.device.startswith("cuda"):
        print("(torch has no vmap rule for the CPU's attention kernel: it loops over the trials there)")
    print(f"{'variant':>10} {'median img/s':>13} {'vs sequential':>14}")
    rows = []
    for name, r in rates.items():
        median = statistics.median(r)
        rows.append({"variant": name, "img_per_s": r, "median": median, "vs_sequential": median / first})
        print(f"{name:>10} {median:>13.1f} {median / first:>13.2f}x")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    record = {
        "machine": machine,
        "torch": torch.__version__,
        "trials": [vars(t) for t in trials],
        "batch_size": s.batch_size,
        "rounds": rounds,
        "steps_per_round": reps,
        "vmap_vs_alone_max_diff": worst,
        "rows": rows,
    }
    write_json(args.out, record)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
