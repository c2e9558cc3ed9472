"""A training step whole and in micro-batches, side by side in one run: the UNet's or the judge's.

    PYTHONPATH=. python bench/micro_batch.py [--model unet|judge] [--rounds 4] [--steps 12] [--quick]

unet: train.base of params.yaml (batch 128) through cdiff.train.train, with train.base.micro_batch 0 (the
whole batch at once) and each --micro value; the same gradient up to float rounding (checked first: the
weights after one step). judge: one step of batch judge.batch_size as cdiff.judge.train_judge takes it
(cdiff.judge.judge_backward); the judges and the CAS classifiers train it about 5,100 times in the default
run. The settings take turns for --rounds rounds of --steps steps, each from the same fresh model. Prints
img/s per setting (median over rounds) and writes JSON to --out: what train.*.micro_batch and
judge.micro_batch of params.yaml were set from.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from cdiff.data import ImageSet
from cdiff.io import write_json
from cdiff.judge import Judge, _shift, judge_backward
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import train
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]
OUT = {"unet": "micro-batch.json", "judge": "judge-microbatch.json"}


def data(p, n: int = 1024) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    s, c = p.model.image_size, p.model.channels
    images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, p.model.num_classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(p.model.num_classes)])


def unet_run(p, micro: int, steps: int, images: ImageSet) -> tuple[float, torch.nn.Module]:
    """(img/s, the trained model) of `steps` steps of train.base in micro-batches of `micro` (0: whole)."""
    torch.manual_seed(0)
    model = UNet(p.model)
    cfg = dataclasses.replace(p.train.base, steps=steps, micro_batch=micro, log_every=steps, checkpoint_every=steps)
    start = time.perf_counter()
    train(model, NoiseSchedule(p.diffusion), images, cfg, seed=p.seed, p_uncond=p.diffusion.p_uncond, progress=False)
    return steps * cfg.batch_size / (time.perf_counter() - start), model


def judge_run(p, micro: int, steps: int, images: ImageSet) -> tuple[float, torch.nn.Module]:
    """(img/s, the trained judge) of `steps` judge steps of batch judge.batch_size in micro-batches of `micro`."""
    torch.manual_seed(0)
    judge = Judge(p.model.channels, p.model.num_classes, p.judge)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=p.judge.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    n = p.judge.batch_size
    x, y = images.as_float()[:n], images.labels[:n]
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        judge_backward(judge, _shift(x, g), y, micro)
        optimizer.step()
    return steps * n / (time.perf_counter() - start), judge


def max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(OUT), default="unet", help="whose training step")
    parser.add_argument("--micro", type=int, nargs="+", default=[64, 32], help="micro-batch sizes against 0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps: a smoke test")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, help="default: bench/results/micro-batch.json (judge-microbatch.json)")
    args = parser.parse_args()
    p = load_params(args.params)
    run = unet_run if args.model == "unet" else judge_run
    batch = p.train.base.batch_size if args.model == "unet" else p.judge.batch_size
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    images = data(p)
    settings = [0, *args.micro]
    _, whole = run(p, 0, 1, images)
    gaps = {m: max_weight_gap(whole, run(p, m, 1, images)[1]) for m in args.micro}  # one step: the same update?
    rates: dict[int, list[float]] = {m: [] for m in settings}
    for _ in range(rounds):
        for m in settings:
            rates[m].append(run(p, m, steps, images)[0])
    first = statistics.median(rates[0])
    print(f"{args.model} step, batch {batch}, {torch.get_num_threads()} threads, {rounds} rounds of {steps} steps")
    print(f"{'micro-batch':>11} {'median img/s':>13} {'vs whole':>8} {'weights after 1 step, max gap':>30}")
    rows = []
    for m, r in rates.items():
        median = statistics.median(r)
        rows.append(
            {"micro_batch": m, "img_per_s": r, "median": median, "vs_whole": median / first, "gap": gaps.get(m)}
        )
        gap = "" if m == 0 else f"{gaps[m]:.2e}"
        print(f"{m or batch:>11} {median:>13.1f} {median / first:>7.2f}x {gap:>30}")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out = args.out or ROOT / "bench" / "results" / OUT[args.model]
    write_json(
        out, {"machine": machine, "torch": torch.__version__, "model": args.model, "batch_size": batch, "rows": rows}
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
