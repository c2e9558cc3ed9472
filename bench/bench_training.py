"""Training benchmark, side by side in one run, on this machine's CPU (or CUDA with --device cuda):

1. training throughput: the cdiff UNet vs the original design's network of the same parameter count
   (single-token attention, bench/seed_reference.py), and cdiff with unmerged LoRA (only A, B train);
2. 1000-step DDPM sampling of both networks (guidance 2);
3. LoRA fine-tune vs full fine-tune: step time and peak memory (each in its own process);
4. Ray Train overhead: the same steps in a plain loop vs through TorchTrainer with 1 worker,
   split into a fixed start-up cost and a per-step overhead (target: at most 15%).

    .venv/bin/python bench/bench_training.py [--quick]

Prints a table and writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_reference import seed_unet_like  # noqa: E402

from cdiff.config import DiffusionConfig  # noqa: E402
from cdiff.io import write_json  # noqa: E402
from cdiff.lora import inject_lora  # noqa: E402
from cdiff.model import UNet  # noqa: E402
from cdiff.samplers import ddpm_sample  # noqa: E402
from cdiff.schedule import NoiseSchedule  # noqa: E402
from pipelines.core.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(kind: str):
    p = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    model = UNet(p.model)
    if kind == "seed":
        n = sum(t.numel() for t in model.parameters())
        model = seed_unet_like(n)
        model.prompt = type("Prompt", (), {"null_id": 10})()
    elif kind == "lora":
        inject_lora(model, ["w_q", "w_k", "w_v"], r=4, alpha=4.0)
    return model


def one_mode(kind: str, batch: int, steps: int, device: str) -> dict:
    """Runs in its own process, so that its peak memory is its own."""
    torch.set_num_threads(2)
    model = build(kind).to(device).train()
    params = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        loss = model(x, t, y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "mode": kind,
        "params": sum(t.numel() for t in model.parameters()),
        "trainable": sum(t.numel() for t in params),
        "step_ms": seconds * 1000,
        "img_per_s": batch / seconds,
        "peak_mb": peak,
        "peak_kind": "CUDA max allocated" if device == "cuda" else "process peak RSS",
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def sampling(kind: str, batch: int, device: str) -> dict:
    model = build(kind).to(device).eval()
    schedule = NoiseSchedule(DiffusionConfig(timesteps=1000))
    y = torch.arange(batch, device=device) % 10
    sync(device)
    start = time.perf_counter()
    ddpm_sample(model, schedule, y, (batch, 1, 28, 28), torch.Generator().manual_seed(0), 2.0, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    return {"mode": kind, "batch": batch, "seconds": seconds, "img_steps_per_s": batch * 1000 / seconds}


def ray_overhead(steps: int, batch: int) -> dict:
    """Plain cdiff.train vs pipelines.core.distributed.fit (TorchTrainer, 1 worker), 1 step and 1 + `steps` steps."""
    import tempfile

    from cdiff.data import load_source
    from cdiff.train import train
    from pipelines.core import distributed
    from pipelines.core.jobs import job_for

    p = load_params(ROOT / "params.yaml")
    data = load_source("sklearn-digits", "train", p.model.image_size, p.model.channels)
    times = {}
    for n in (1, 1 + steps):
        cfg = dataclasses.replace(p.train.base, steps=n, batch_size=batch, checkpoint_every=10_000, log_every=50)
        torch.manual_seed(0)
        model = UNet(p.model, data.class_names)
        start = time.perf_counter()
        train(model, NoiseSchedule(p.diffusion), data, cfg, seed=0, p_uncond=0.1, progress=False)
        times[f"plain_{n}"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as d:
        p.ray = dataclasses.replace(p.ray, storage_path=d)
        start = time.perf_counter()
        with distributed.session(p):
            times["ray_init"] = time.perf_counter() - start
            for n in (1, 1 + steps):
                cfg = dataclasses.replace(
                    p.train.base, steps=n, batch_size=batch, checkpoint_every=10_000, log_every=50
                )
                start = time.perf_counter()
                distributed.fit(p, job_for(p, "base", data, cfg))
                times[f"ray_{n}"] = time.perf_counter() - start
    plain_steps = times[f"plain_{1 + steps}"] - times["plain_1"]
    ray_steps = times[f"ray_{1 + steps}"] - times["ray_1"]
    return {
        **times,
        "steps": steps,
        "batch": batch,
        "startup_s": times["ray_1"] - times["plain_1"],
        "per_step_overhead": (ray_steps - plain_steps) / plain_steps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, noisy numbers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray overhead part")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one training mode, JSON on stdout
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "training.json")
    args = parser.parse_args()
    batch, steps = 64, (5 if args.quick else 20)
    if args.mode:
        print(json.dumps(one_mode(args.mode, batch, steps, args.device)))
        return 0
    torch.set_num_threads(2)
    train_rows = []
    for kind in ("cdiff", "seed", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, "--mode", kind, "--device", args.device] + (["--quick"] if args.quick else []),
            capture_output=True,
            text=True,
            check=True,
        )
        train_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sample_rows = [sampling(kind, 4 if args.quick else 16, args.device) for kind in ("cdiff", "seed")]
    ray = None if args.no_ray else ray_overhead(20 if args.quick else 200, 32)
    by = {r["mode"]: r for r in train_rows}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}",
        "train": train_rows,
        "sampling_ddpm_1000": sample_rows,
        "lora_vs_full": {
            "lora_step_ms": by["lora"]["step_ms"],
            "full_step_ms": by["cdiff"]["step_ms"],
            "step_time_ratio": by["lora"]["step_ms"] / by["cdiff"]["step_ms"],
            "lora_peak_mb": by["lora"]["peak_mb"],
            "full_peak_mb": by["cdiff"]["peak_mb"],
        },
        "ray_overhead": ray,
    }
    print(f"\ntraining, batch {batch}, {steps} timed steps ({result['machine']})")
    print(f"{'model':<8}{'params':>10}{'trainable':>11}{'ms/step':>9}{'img/s':>8}{'peak MB':>9}")
    for r in train_rows:
        print(
            f"{r['mode']:<8}{r['params']:>10}{r['trainable']:>11}{r['step_ms']:>9.1f}{r['img_per_s']:>8.1f}{r['peak_mb']:>9.0f}"
        )
    print(
        f"cdiff/seed training throughput: {by['cdiff']['img_per_s'] / by['seed']['img_per_s']:.2f}x; "
        f"LoRA/full step time {result['lora_vs_full']['step_time_ratio']:.2f}x ('cdiff' row = full fine-tune step)"
    )
    print("\nDDPM-1000 sampling, guidance 2")
    for r in sample_rows:
        print(f"{r['mode']:<8} batch {r['batch']}: {r['seconds']:.1f} s, {r['img_steps_per_s']:.0f} img-steps/s")
    if ray:
        plain_total, ray_total = ray[f"plain_{1 + ray['steps']}"], ray[f"ray_{1 + ray['steps']}"]
        print(
            f"\nRay Train overhead ({ray['steps']} steps, batch {ray['batch']}): plain {plain_total:.1f} s, "
            f"TorchTrainer {ray_total:.1f} s; start-up {ray['startup_s']:.1f} s (+ ray.init "
            f"{ray['ray_init']:.1f} s), per-step overhead {ray['per_step_overhead']:+.1%} (target <= 15%)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)  # atomic: a killed run leaves the last complete file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
