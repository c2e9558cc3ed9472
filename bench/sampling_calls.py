"""Sampling speed against rows per network call (sample.call_batch), side by side in one run.

    PYTHONPATH=. python bench/sampling_calls.py [--model models/base] [--rounds 2] [--quick]

Generates what one scored set of the default run holds (evaluate.fid_per_class images of each class, in
sample.batch_size batches with sample's sampler and guidance) once per call_batch, the settings taking
turns for --rounds rounds (the machine's noise then falls on each alike). Every setting's images are
compared with those of call_batch 0: the split must not change them. A trained model is used where
--model names one, else an untrained UNet of params.yaml's size (the time does not depend on the weights).
Prints a table; JSON to --out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from cdiff.checkpoint import load_model
from cdiff.io import write_json
from cdiff.metrics import generate
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model folder (models/base of a `dvc repro`)")
    parser.add_argument("--calls", type=int, nargs="+", default=[0, 32, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 images per class, 1 round: a smoke test")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampling-calls.json")
    args = parser.parse_args()
    p = load_params(args.params)
    if args.model:
        model, schedule, _ = load_model(args.model)
    else:
        torch.manual_seed(p.seed)
        model, schedule = UNet(p.model).eval(), NoiseSchedule(p.diffusion)
    per_class, rounds = (3, 1) if args.quick else (p.evaluate.fid_per_class, args.rounds)
    seconds: dict[int, list[float]] = {c: [] for c in args.calls}
    reference = None
    same: dict[int, bool] = {}
    for _ in range(rounds):
        for calls in args.calls:
            start = time.perf_counter()
            images, _ = generate(
                model,
                schedule,
                p.model.num_classes,
                per_class,
                p.sampler,
                seed=p.seed,
                batch_size=p.sample.batch_size,
                call_batch=calls,
                progress=False,
            )
            seconds[calls].append(time.perf_counter() - start)
            reference = images if reference is None else reference
            same[calls] = bool(torch.equal(images, reference)) and same.get(calls, True)
    images_made = per_class * p.model.num_classes
    whole = statistics.median(seconds[args.calls[0]])
    rows = []
    print(f"{images_made} images, {p.sampler}, batches of {p.sample.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'call_batch':>10} {'median s':>9} {'img/s':>7} {'vs first':>8}  same images")
    for calls, times in seconds.items():
        median = statistics.median(times)
        row = {"call_batch": calls, "seconds": times, "median_s": median, "img_per_s": images_made / median}
        row |= {"speedup_vs_first": whole / median, "same_images_as_first": same[calls]}
        rows.append(row)
        print(f"{calls:>10} {median:>9.1f} {row['img_per_s']:>7.1f} {row['speedup_vs_first']:>7.2f}x  {same[calls]}")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "model": str(args.model) if args.model else "untrained UNet of params.yaml's model",
        "images": images_made,
        "sampler": str(p.sampler),
        "batch_size": p.sample.batch_size,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
