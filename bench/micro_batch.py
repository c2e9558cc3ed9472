"""The UNet's training step (cdiff.train.train) whole and in micro-batches, side by side in one run.

    PYTHONPATH=. python bench/micro_batch.py [--rounds 4] [--steps 12] [--quick]

train.base of params.yaml (batch 128) through cdiff.train.train, with train.base.micro_batch 0 (the whole
batch at once) and each --micro value: the same gradient up to float rounding (checked first, on one step),
a smaller working set per forward/backward. The settings take turns for --rounds rounds of --steps steps,
each from the same fresh model. Prints img/s per setting (median over rounds) and writes JSON to --out.
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
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import train
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def data(p, n: int = 1024) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    s, c = p.model.image_size, p.model.channels
    images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, p.model.num_classes, (n,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(p.model.num_classes)])


def run(p, micro: int, steps: int, images: ImageSet) -> tuple[float, UNet]:
    torch.manual_seed(0)
    model = UNet(p.model)
    cfg = dataclasses.replace(p.train.base, steps=steps, micro_batch=micro, log_every=steps, checkpoint_every=steps)
    start = time.perf_counter()
    train(model, NoiseSchedule(p.diffusion), images, cfg, seed=p.seed, p_uncond=p.diffusion.p_uncond, progress=False)
    return steps * cfg.batch_size / (time.perf_counter() - start), model


def max_weight_gap(a: UNet, b: UNet) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, nargs="+", default=[64, 32], help="micro-batch sizes against 0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps: a smoke test")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "micro-batch.json")
    args = parser.parse_args()
    p = load_params(args.params)
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
    b = p.train.base.batch_size
    print(f"train.base step, batch {b}, {torch.get_num_threads()} threads, {rounds} rounds of {steps} steps")
    print(f"{'micro-batch':>11} {'median img/s':>13} {'vs whole':>8} {'weights after 1 step, max gap':>30}")
    rows = []
    for m, r in rates.items():
        median = statistics.median(r)
        rows.append(
            {"micro_batch": m, "img_per_s": r, "median": median, "vs_whole": median / first, "gap": gaps.get(m)}
        )
        gap = "" if m == 0 else f"{gaps[m]:.2e}"
        print(f"{m or b:>11} {median:>13.1f} {median / first:>7.2f}x {gap:>30}")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    write_json(args.out, {"machine": machine, "torch": torch.__version__, "batch_size": b, "rows": rows})
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
