"""Load bench: sample without pause for N minutes, loading and merging a different adapter for every batch.

Each batch: load_adapter (from disk: unmerge and unload the previous one, fingerprint check, inject),
merge_lora, then DDIM-sample one batch. Reports per-minute throughput and resident memory (RSS).
Targets: RSS growth under 5% after the first minute (warm-up), and a steady throughput.

    python bench/load_swaps.py --minutes 10            # needs models/base and adapters/* from `dvc repro`
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

from cdiff.adapter_format import load_adapter
from cdiff.checkpoint import load_model
from cdiff.errors import CdiffError
from cdiff.io import write_json
from cdiff.lora import merge_lora
from cdiff.samplers import Sampler, sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapters", type=Path, nargs="+", help="adapter folders (default: every adapters/*)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16, help="images per batch (one adapter per batch)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapters = args.adapters or sorted(p for p in Path("adapters").iterdir() if p.is_dir())
    try:
        model, schedule, _ = load_model(args.base)
        if not adapters:
            raise CdiffError("no adapter folders: run `dvc repro` first or pass --adapters")
    except (CdiffError, FileNotFoundError) as e:
        print(f"load_swaps: error: {e}", file=sys.stderr)
        return 2
    proc = psutil.Process()
    start = time.perf_counter()
    minute_marks, rows = 60.0, []
    images = batches = 0
    window_images, window_start = 0, start
    while (now := time.perf_counter()) - start < args.minutes * 60:
        load_adapter(model, adapters[batches % len(adapters)])
        merge_lora(model)
        ids = [i % len(model.class_names) for i in range(args.batch)]
        sample(model, schedule, ids, Sampler("ddim", args.steps, guidance_scale=2.0), seed=batches, progress=False)
        batches += 1
        images += args.batch
        window_images += args.batch
        now = time.perf_counter()
        if now - start >= minute_marks:
            rows.append(
                {
                    "minute": int(minute_marks // 60),
                    "batches": batches,
                    "images_per_s": window_images / (now - window_start),
                    "rss_mb": proc.memory_info().rss / 2**20,
                }
            )
            print(
                f"minute {rows[-1]['minute']:>3}: {rows[-1]['images_per_s']:.1f} img/s, RSS {rows[-1]['rss_mb']:.1f} MB"
            )
            window_images, window_start = 0, now
            minute_marks += 60.0
    if len(rows) < 2:
        print("load_swaps: error: run at least 2 minutes (the first is warm-up)", file=sys.stderr)
        return 2
    steady = rows[1:]
    rss_growth = (rows[-1]["rss_mb"] - rows[0]["rss_mb"]) / rows[0]["rss_mb"]
    speeds = [r["images_per_s"] for r in steady]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}",
        "minutes": args.minutes,
        "adapters": [str(a) for a in adapters],
        "batch": args.batch,
        "ddim_steps": args.steps,
        "swaps": batches,
        "images": images,
        "rss_after_warmup_mb": rows[0]["rss_mb"],
        "rss_final_mb": rows[-1]["rss_mb"],
        "rss_growth": rss_growth,
        "throughput_min": min(speeds),
        "throughput_max": max(speeds),
        "throughput_spread": (max(speeds) - min(speeds)) / max(speeds),
        "per_minute": rows,
        "targets": {"rss_growth_under_5pct": rss_growth < 0.05},
    }
    print(
        f"\n{'swaps':>8} {'images':>8} {'RSS after warm-up':>18} {'RSS final':>10} {'growth':>8} {'img/s min..max':>16}"
    )
    print(
        f"{batches:>8} {images:>8} {rows[0]['rss_mb']:>15.1f} MB {rows[-1]['rss_mb']:>7.1f} MB "
        f"{rss_growth:>8.2%} {min(speeds):>7.1f}..{max(speeds):.1f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)  # atomic: a killed run leaves the last complete file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
