"""The judge's training step (judge.* of params.yaml) in micro-batches, side by side in one run.

    PYTHONPATH=. python bench/judge_microbatch.py [--rounds 3] [--quick]

One step of batch judge.batch_size, as cdiff.judge.train_judge takes it, against the same step with its
gradient summed over micro-batches of 64 and 32 (the same gradient up to float rounding). The settings take
turns for --rounds rounds. The judges and the CAS classifiers train this step about 5,100 times in the
default run. Prints steps/s per setting and writes JSON to --out. What judge.micro_batch of params.yaml
(cdiff.judge.judge_backward) was set from.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cdiff.io import write_json
from cdiff.judge import Judge, _shift
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def steps_per_s(p, micro: int, reps: int) -> float:
    torch.manual_seed(0)
    judge = Judge(p.model.channels, p.model.num_classes, p.judge)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=p.judge.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    s, n = p.model.image_size, p.judge.batch_size
    x = torch.rand(n, p.model.channels, s, s, generator=g) * 2 - 1
    y = torch.randint(0, p.model.num_classes, (n,), generator=g)

    def step():
        xs = _shift(x, g)
        optimizer.zero_grad(set_to_none=True)
        for xc, yc in zip(xs.split(micro), y.split(micro), strict=True):
            (F.cross_entropy(judge(xc), yc, reduction="sum") / n).backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return reps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 64, 32], help="0: the whole batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps: a smoke test")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge-microbatch.json")
    args = parser.parse_args()
    p = load_params(args.params)
    rounds, reps = (1, 3) if args.quick else (args.rounds, args.steps)
    rates: dict[int, list[float]] = {m: [] for m in args.micro}
    for _ in range(rounds):
        for m in args.micro:
            rates[m].append(steps_per_s(p, m or p.judge.batch_size, reps))
    first = statistics.median(rates[args.micro[0]])
    print(f"judge step, batch {p.judge.batch_size}, width {p.judge.width}, {torch.get_num_threads()} threads")
    print(f"{'micro-batch':>11} {'median steps/s':>15} {'vs first':>8}")
    rows = []
    for m, r in rates.items():
        median = statistics.median(r)
        rows.append(
            {"micro_batch": m or p.judge.batch_size, "steps_per_s": r, "median": median, "vs_first": median / first}
        )
        print(f"{m or p.judge.batch_size:>11} {median:>15.1f} {median / first:>7.2f}x")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    write_json(
        args.out, {"machine": machine, "torch": torch.__version__, "batch_size": p.judge.batch_size, "rows": rows}
    )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
