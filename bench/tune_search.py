"""Random search vs Optuna's TPE for a domain's LoRA (tune.search), on the same budget, side by side.

    PYTHONPATH=. python bench/tune_search.py BASE_FOLDER [--domain digits] [--samples 8] [--seeds 0 1]

Each search is the pipeline's own (pipelines.core.tuning.search: ASHA, trial 0 the domain's config,
tune.* from params.yaml but --samples trials) on the domain as params.yaml defines it, from a saved base
(models/base of a `dvc repro`). For each search kind and seed: the best validation loss reached after
1, 2, ..., N trials (in the order the trials were created), and the steps trained in all (ASHA stops
weak trials early). Prints a table; JSON to --out. A search of few trials is noisy: compare over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from cdiff.checkpoint import load_model
from cdiff.config import TrainConfig
from cdiff.data import prepare_domain
from cdiff.io import write_json
from pipelines.core import distributed, tuning
from pipelines.core.config import load_params
from pipelines.core.jobs import Weights, job_for

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a model folder (models/base of a `dvc repro`)")
    parser.add_argument("--domain", default="digits")
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tune-search-cpu.json")
    args = parser.parse_args()
    p = load_params(args.params)
    d, t = p.domain(args.domain), p.tune
    sets = prepare_domain(d.source, d.transforms, 28, 1, p.data.root, False, p.data.val_fraction, p.seed)
    base, _, _ = load_model(args.base)
    budget = TrainConfig(  # as pipelines/tune.py builds it
        steps=t.steps_per_trial,
        batch_size=t.batch_size,
        lr=t.lr_min,
        warmup_steps=min(20, t.steps_per_trial // 10),
        ema_decay=p.train.lora.ema_decay,
        log_every=t.eval_every,
        checkpoint_every=t.steps_per_trial,
    )
    job = job_for(p, "lora", sets["train"], budget, base=Weights.of(base), lora=d.lora, threads=1)
    start = {"r": d.lora.r, "alpha_ratio": d.lora.alpha / d.lora.r, "lr": p.train.lora.lr}
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            for kind in ("random", "tpe"):
                q = dataclasses.replace(
                    p,
                    seed=seed,
                    tune=dataclasses.replace(t, search=kind, num_samples=args.samples),
                    ray=dataclasses.replace(p.ray, storage_path=os.path.join(storage, f"{kind}-{seed}")),
                )
                began = time.perf_counter()
                with distributed.session(q):
                    found = tuning.search(q, job, sets["val"], start)
                trials = [f.trial for f in found]
                best = [min(x.val_loss for x in trials[: k + 1]) for k in range(len(trials))]
                rows.append(
                    {
                        "search": kind,
                        "seed": seed,
                        "best_after": best,
                        "steps_trained": sum(x.steps for x in trials),
                        "seconds": time.perf_counter() - began,
                        "trials": [dataclasses.asdict(x) for x in trials],
                    }
                )
                print(f"{kind:6} seed {seed}: best val loss after each trial {[round(b, 5) for b in best]}", flush=True)
    print(f"\n{'search':6} {'seed':>4} {'best@N/2':>9} {'best@N':>9} {'steps':>6} {'s':>5}")
    for r in rows:
        half = r["best_after"][len(r["best_after"]) // 2 - 1]
        print(
            f"{r['search']:6} {r['seed']:>4} {half:>9.5f} {r['best_after'][-1]:>9.5f} "
            f"{r['steps_trained']:>6} {r['seconds']:>5.0f}"
        )
    write_json(args.out, {"domain": args.domain, "samples": args.samples, "base": str(args.base), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
