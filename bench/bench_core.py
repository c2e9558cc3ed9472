"""Core benchmark, side by side in one run: training and sampling speed, LoRA overheads, trainable share.

    .venv/bin/python bench/bench_core.py [--quick] [--variants]   # --variants: channels_last, torch.compile, batch 256

Prints a table and writes bench/results/core.json. Throughputs are also given as achieved GFLOP/s
and as a share of an SGEMM measured in the same run, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cdiff.config import DiffusionConfig, LoraConfig
from cdiff.io import write_json
from cdiff.lora import inject_lora, merge_lora, trainable_parameter_share, unmerge_lora
from cdiff.model import UNet
from cdiff.performance import maybe_compile, to_memory_format
from cdiff.samplers import Sampler, sample
from cdiff.schedule import NoiseSchedule
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's machine type where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def train_step_flops(model, batch) -> float:
    x, t, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_throughput(model, batch, steps, forward=None, channels_last=False, warmup=1) -> float:
    """Images per second of forward, backward and AdamW step on random inputs (after `warmup` steps)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, t, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    forward = forward or model
    for i in range(steps + warmup):
        if i == warmup:
            start = time.perf_counter()
        loss = forward(x, t, y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


@torch.inference_mode()
def forward_time(model, batch, reps) -> float:
    x, t, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    model(x, t, y)
    start = time.perf_counter()
    for _ in range(reps):
        model(x, t, y)
    return (time.perf_counter() - start) / reps


# --variants: (label, channels_last, torch.compile, batch)
VARIANTS = [
    ("eager b128", False, False, 128),
    ("channels_last b128", True, False, 128),
    ("compiled b128", False, True, 128),
    ("compiled channels_last b128", True, True, 128),
    ("eager b256", False, False, 256),
    ("compiled b256", False, True, 256),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    parser.add_argument("--variants", action="store_true", help="also time channels_last, torch.compile, batch 256")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core.json")
    args = parser.parse_args()
    reps = 2 if args.quick else 6
    p = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    model = UNet(p.model)
    schedule = NoiseSchedule(DiffusionConfig(timesteps=1000))
    sgemm = sgemm_gflops()
    rows = {}

    base_flops = train_step_flops(model, 128) / 128
    rows["train base img/s"] = train_throughput(model, 128, reps)
    rows["train base GFLOP/s"] = rows["train base img/s"] * base_flops / 1e9

    lora_model = UNet(p.model)
    lora_model.load_state_dict(model.state_dict())
    lora = LoraConfig()  # the default adapter: r=4 on w_q, w_k, w_v
    inject_lora(lora_model, lora.targets, lora.r, lora.alpha)
    trainable, total = trainable_parameter_share(lora_model)
    rows["default LoRA trainable share"] = trainable / sum(t.numel() for t in model.parameters())
    rows["train LoRA-only img/s"] = train_throughput(lora_model, 128, reps)

    # merged vs unmerged vs base inference, interleaved so drift hits all three alike
    times = {"base": [], "LoRA unmerged": [], "LoRA merged": []}
    for _ in range(reps):
        times["base"].append(forward_time(model, 64, 3))
        unmerge_lora(lora_model)
        times["LoRA unmerged"].append(forward_time(lora_model, 64, 3))
        merge_lora(lora_model)
        times["LoRA merged"].append(forward_time(lora_model, 64, 3))
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        rows[f"inference {k} img-steps/s"] = 64 / v
    rows["merged / base inference time"] = best["LoRA merged"] / best["base"]
    rows["unmerged / base inference time"] = best["LoRA unmerged"] / best["base"]

    n = 8 if args.quick else 16
    classes = [i % 10 for i in range(n)]
    start = time.perf_counter()
    sample(model, schedule, classes, Sampler("ddim", 50, guidance_scale=1.0), progress=False)
    ddim = time.perf_counter() - start
    start = time.perf_counter()
    sample(model, schedule, classes, Sampler("ddpm", None, guidance_scale=1.0), progress=False)
    ddpm = time.perf_counter() - start
    rows["sample DDIM-50 img/s"] = n / ddim
    rows["sample DDPM-1000 img/s"] = n / ddpm
    rows["DDIM-50 speed-up over DDPM-1000"] = ddpm / ddim
    rows["SGEMM GFLOP/s (ceiling)"] = sgemm
    rows["train base share of SGEMM"] = rows["train base GFLOP/s"] / sgemm
    if args.variants:  # cdiff's speed switches on this CPU, side by side with an SGEMM measured between them
        for name, channels_last, compiled, batch in VARIANTS:
            torch.manual_seed(0)
            net = to_memory_format(UNet(p.model), channels_last)
            forward = maybe_compile(net, compiled, dynamic=False)
            ips = train_throughput(net, batch, reps, forward, channels_last, warmup=3 if compiled else 1)
            ceiling = sgemm_gflops()
            rows[f"train {name} img/s"] = ips
            rows[f"train {name} share of SGEMM"] = ips * base_flops / 1e9 / ceiling

    targets = {
        "merged / base inference time": ("<= 1.03", rows["merged / base inference time"] <= 1.03),
        "DDIM-50 speed-up over DDPM-1000": (">= 15", rows["DDIM-50 speed-up over DDPM-1000"] >= 15),
        "default LoRA trainable share": ("<= 0.03", rows["default LoRA trainable share"] <= 0.03),
    }
    print(f"{'measure':40s} {'value':>12s}  target")
    for k, v in rows.items():
        target = f"{targets[k][0]} {'met' if targets[k][1] else 'MISSED'}" if k in targets else ""
        print(f"{k:40s} {v:12.4g}  {target}")
    result = {
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model_params": total - trainable,
        "results": rows,
        "targets": {k: {"target": t, "met": bool(m)} for k, (t, m) in targets.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
