"""The old training/sampling recipe vs the new one: the same budget of base pretraining on this CPU, judged.

    PYTHONPATH=. python bench/bench_quality_cpu.py [--minutes 10] [--per-class 100]

Side by side in one run, on Fashion-MNIST (the base of the default pipeline):
1. the judge: cdiff.judge.train_judge on the real train split with params.yaml's judge settings; FID is
   measured against the real test split in its features, and the floor is as many real train images;
2. fair budgets: each recipe's training step is timed in interleaved rounds (a shared machine loads them
   alike), and --minutes becomes each recipe's step count from its median step time. Recipes whose steps
   cost the same by construction (same batch, precision, layout) share one pooled time, hence equal steps;
3. each recipe trains from the same initial weights and seed, samples --per-class images per class with
   its own sampler and guidance, and is scored: judge FID and GAN-test accuracy with seeded bootstrap 95%
   intervals, and FID / floor at the same count;
4. a sweep of samplers and guidance scales on the new base at equal model calls (--sweep, "" skips it).

Prints tables with progress bars and writes JSON to --out after every part (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdiff.config import DiffusionConfig, TrainConfig
from cdiff.data import load_source
from cdiff.io import write_json
from cdiff.judge import load_judge, save_judge, train_judge
from cdiff.metrics import balanced_subset, generate, judge_images, reference_features
from cdiff.model import UNet
from cdiff.samplers import Sampler
from cdiff.schedule import NoiseSchedule
from cdiff.train import train
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Recipe:
    """Overrides of DiffusionConfig() and TrainConfig() defaults, and how the model is sampled."""

    name: str
    diffusion: dict
    train: dict
    sampler: str
    guidance: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def configs(self) -> tuple[DiffusionConfig, TrainConfig]:
        return DiffusionConfig(**self.diffusion), TrainConfig(**self.train)


RECIPES = {
    "old": Recipe(
        "old",
        {"prediction": "eps", "min_snr_gamma": 0.0},
        {"lr": 2e-3, "batch_size": 128, "warmup_steps": 100, "ema_decay": 0.999},
        "ddim-50",
        2.0,
        "params.yaml before issue 9: eps, lr 2e-3, batch 128, warm-up 100 + cosine, EMA 0.999, DDIM-50, guidance 2",
    ),
    "new": Recipe(
        "new",
        {"prediction": "v", "min_snr_gamma": 5.0},
        {"lr": 2e-3, "batch_size": 128, "warmup_steps": 100, "ema_decay": 0.999},
        "dpm++2m-20",
        3.0,
        "v-prediction, Min-SNR-5, DPM-Solver++(2M) with 20 calls, guidance 3",
    ),
}


def timed_steps(recipe: Recipe, model_cfg, data, steps: int) -> list[float]:
    """Wall time of each training step after the first (which warms up), from a fresh model."""
    diffusion, cfg = recipe.configs()
    cfg = dataclasses.replace(cfg, steps=steps, checkpoint_every=1, log_every=steps)
    stamps = []
    torch.manual_seed(0)
    model = UNet(model_cfg, data.class_names)
    train(model, NoiseSchedule(diffusion), data, cfg, seed=0, p_uncond=diffusion.p_uncond,
          on_checkpoint=lambda _: stamps.append(time.perf_counter()), progress=False)  # fmt: skip
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def step_times(recipes: list[Recipe], model_cfg, data, rounds: int, steps: int) -> dict[str, float]:
    """Median step time of each recipe, timed in interleaved rounds; equal-cost recipes pool their times."""

    def cost_key(r: Recipe):
        cfg = r.configs()[1]
        return (cfg.batch_size, cfg.precision, cfg.channels_last, cfg.compile)

    samples: dict[tuple, list[float]] = {}
    for k in range(rounds):
        for r in recipes:
            print(f"  throughput round {k + 1}/{rounds}: {r.name}", flush=True)
            samples.setdefault(cost_key(r), []).extend(timed_steps(r, model_cfg, data, steps + 1))
    return {r.name: statistics.median(samples[cost_key(r)]) for r in recipes}


def score(judge, images, labels, names, reference_labels, ref_features) -> dict:
    s = judge_images(judge, images, labels, names, ref_features, reference_labels, n_boot=1000).score
    return s.row()  # fid, its interval, fid_raw, kid, gan_test, ..., count


def model_calls(spec: str, guidance: float, timesteps: int) -> int:
    """Network evaluations per image: steps, twice with guidance (conditional and unconditional in one batch)."""
    steps = Sampler.parse(spec).steps or timesteps
    return steps * (1 if guidance == 1.0 else 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="pretraining budget per recipe")
    parser.add_argument("--steps", type=int, help="fixed steps for every recipe instead of the timed budget")
    parser.add_argument("--recipes", default="old,new", help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class (10 classes)")
    parser.add_argument("--sweep", default="ddpm:2,ddim-20:2,ddim-50:2,dpm++2m-10:2,dpm++2m-20:2,dpm++2m-20:1.5,"
                        "dpm++2m-20:3,dpm++2m-20:4,ddim-20:3,ddim-50:3", help="SAMPLER:GUIDANCE points on the new base")  # fmt: skip
    parser.add_argument("--sweep-per-class", type=int, default=20)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--judge-cache", type=Path, help="reuse (or save) the judge here: for repeated runs")
    parser.add_argument("--save-models", type=Path, help="save each trained base here (safetensors folders)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    recipes = [RECIPES[name] for name in args.recipes.split(",")]
    train_set = load_source("fashion-mnist", "train", p.model.image_size, p.model.channels, p.data.root)
    test_set = load_source("fashion-mnist", "test", p.model.image_size, p.model.channels, p.data.root)
    names = train_set.class_names
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": dataclasses.asdict(p.model),
        "judge": dataclasses.asdict(p.judge),
        "recipes": {r.name: dataclasses.asdict(r) for r in recipes},
    }

    print("1. judge (real train split, params.yaml's judge settings)", flush=True)
    start = time.perf_counter()
    if args.judge_cache and args.judge_cache.is_dir():
        judge, judge_config = load_judge(args.judge_cache)
    else:
        judge = train_judge(train_set, p.judge, seed=p.seed)
        if args.judge_cache:
            save_judge(judge, names, args.judge_cache)
    result["judge_seconds"] = time.perf_counter() - start
    ref_features = reference_features(judge, test_set)
    reference = test_set.labels  # the real split's classes: its resamples keep them
    real = balanced_subset(train_set, args.per_class, seed=p.seed)
    floor = score(judge, real.as_float(), real.labels, names, reference, ref_features)
    result["floor"] = floor
    print(f"   floor at {floor['count']} images: FID {floor['fid']:.3f}, accuracy {floor['gan_test']:.3f}")

    print("2. fair budgets", flush=True)
    if args.steps:
        steps = {r.name: args.steps for r in recipes}
        result["step_seconds"] = None
    else:
        seconds = step_times(recipes, p.model, train_set, args.timing_rounds, args.timing_steps)
        steps = {name: max(1, round(args.minutes * 60 / s)) for name, s in seconds.items()}
        result["step_seconds"] = seconds
    result["rows"] = []
    write_json(args.out, result)

    print("3. train, sample, judge each recipe", flush=True)
    models = {}
    for r in recipes:
        diffusion, cfg = r.configs()
        cfg = dataclasses.replace(cfg, steps=steps[r.name], checkpoint_every=10**9, log_every=50)
        schedule = NoiseSchedule(diffusion)
        torch.manual_seed(p.seed)
        model = UNet(p.model, names)
        start = time.perf_counter()
        state = train(model, schedule, train_set, cfg, seed=p.seed, p_uncond=diffusion.p_uncond)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        images, labels = generate(
            model,
            schedule,
            len(names),
            args.per_class,
            Sampler.parse(r.sampler, guidance_scale=r.guidance),
            seed=p.seed,
        )
        sample_seconds = time.perf_counter() - start
        scores = score(judge, images, labels, names, reference, ref_features)
        row = {
            "recipe": r.name,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "step_seconds_measured": None if result["step_seconds"] is None else result["step_seconds"][r.name],
            "train_seconds": train_seconds,
            "train_img_per_s": cfg.steps * cfg.batch_size / train_seconds,
            "final_loss": state.losses[-1][1],
            "sampler": r.sampler,
            "guidance": r.guidance,
            "model_calls_per_image": model_calls(r.sampler, r.guidance, diffusion.timesteps),
            "sample_seconds": sample_seconds,
            **scores,
            "fid_over_floor": scores["fid"] / floor["fid"],
        }
        result["rows"].append(row)
        models[r.name] = (model, schedule)
        if args.save_models:
            from cdiff.checkpoint import save_model

            save_model(model, diffusion, args.save_models / r.name, {"bench_row": row})
        write_json(args.out, result)
    print_rows(result)

    sweep = [(s.split(":")[0], float(s.split(":")[1])) for s in args.sweep.split(",") if s]
    if sweep and "new" in models:
        print(f"4. samplers on the new base, {args.sweep_per_class} images per class", flush=True)
        model, schedule = models["new"]
        real = balanced_subset(train_set, args.sweep_per_class, seed=p.seed)
        result["sweep_floor"] = score(judge, real.as_float(), real.labels, names, reference, ref_features)
        result["sweep"] = []
        for spec, guidance in sweep:
            start = time.perf_counter()
            images, labels = generate(
                model,
                schedule,
                len(names),
                args.sweep_per_class,
                Sampler.parse(spec, guidance_scale=guidance),
                seed=p.seed,
            )
            seconds = time.perf_counter() - start
            row = {"sampler": spec, "guidance": guidance, "model_calls_per_image": model_calls(spec, guidance, 1000)}
            row.update(seconds=seconds, **score(judge, images, labels, names, reference, ref_features))
            result["sweep"].append(row)
            write_json(args.out, result)
            print(f"   {spec:<12}{guidance:>5}  calls {row['model_calls_per_image']:>5}  {seconds:>7.1f} s  "
                  f"FID {row['fid']:7.2f} {_ci(row['fid_interval'])}  GAN-test {row['gan_test']:.3f}", flush=True)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _ci(interval) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def print_rows(result: dict) -> None:
    floor = result["floor"]
    print(f"\n{'recipe':<6}{'steps':>7}{'img/s':>7}{'sampler':>12}{'g':>5}{'FID':>9}{'95% interval':>18}"
          f"{'floor':>7}{'ratio':>7}{'GAN-test':>10}{'95% interval':>16}")  # fmt: skip
    for r in result["rows"]:
        print(
            f"{r['recipe']:<6}{r['steps']:>7}{r['train_img_per_s']:>7.1f}{r['sampler']:>12}{r['guidance']:>5}"
            f"{r['fid']:>9.2f}{_ci(r['fid_interval']):>18}{floor['fid']:>7.2f}{r['fid_over_floor']:>7.1f}"
            f"{r['gan_test']:>10.3f}{_ci(r['gan_test_interval']):>16}"
        )
    print(f"(judge accuracy on real train images at the same count: {floor['gan_test']:.3f})\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
