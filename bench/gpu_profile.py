"""The GPU profile on a lent card, in one run: speed against the card's peak and the seed design, and quality.

    PYTHONPATH=. python bench/gpu_profile.py --out bench/results/gpu-profile-h100.json   # ~8 minutes, one H100
    PYTHONPATH=. python bench/gpu_profile.py --smoke                                     # CPU, tiny sizes: the code paths

The profile is params.yaml with params-gpu.yaml over it (what `make repro-gpu` runs). Needs Fashion-MNIST
where cdiff.data looks (data/raw/FashionMNIST/raw/*-ubyte.gz, or Debian's dataset-fashion-mnist) and
scikit-learn (digits). Parts (--parts), each written to --out as soon as it is done:

  fixed       what every pipeline stage pays before its work: importing torch + cdiff, CUDA start, ray.init
  throughput  training img/s at the profile's base batch: cdiff's UNet per mode (fp32 eager; bf16 +
              channels_last eager; the same compiled, with its compile time) and the seed design
              (bench/seed_reference.py, same parameter count, fp32 and bf16 eager); model TFLOP/s from
              FlopCounterMode and its share of the card's dense bf16 peak
  quality     the profile's base recipe trained with cdiff.train.train for train.base.steps, the judge on
              the real train split, evaluate.fid_per_class samples per class with the profile's sampler vs
              the real floor at that count: FID (95% interval), GAN-test vs the judge's accuracy
  adapter     digits from that base: LoRA (train.lora, untuned lr) vs full fine-tune (train.full), the same
              count of samples each: the share of the way from the base's FID to the full fine-tune's
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from seed_reference import seed_unet_like  # noqa: E402

from cdiff.data import load_source  # noqa: E402
from cdiff.io import write_json  # noqa: E402
from cdiff.judge import predict, train_judge  # noqa: E402
from cdiff.lora import inject_lora, merge_lora, trainable_parameter_share  # noqa: E402
from cdiff.metrics import balanced_subset, generate, judge_images, reference_features  # noqa: E402
from cdiff.model import UNet  # noqa: E402
from cdiff.performance import autocast, make_optimizer, maybe_compile  # noqa: E402
from cdiff.schedule import NoiseSchedule, diffusion_loss  # noqa: E402
from cdiff.train import train  # noqa: E402
from pipelines.core.config import Params, load_params  # noqa: E402
from pipelines.core.overlay import merge, read_overlay  # noqa: E402

# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s
BF16_PEAK = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312, "L4": 121}


def profile_params(overlay: Path) -> Params:
    """params.yaml with the overlay merged in, validated like the pipeline's params."""
    merged = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), read_overlay(overlay))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(merged, sort_keys=False))
        return load_params(path)


def smoke_params(p: Params) -> Params:
    """Tiny sizes for a CPU check of every code path."""
    small = {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 10**9, "precision": "fp32"}
    p.model = dataclasses.replace(p.model, base_channels=[8, 16, 32])
    p.train.base = dataclasses.replace(p.train.base, **small)
    p.train.lora = dataclasses.replace(p.train.lora, **small)
    p.train.full = dataclasses.replace(p.train.full, **small)
    p.judge = dataclasses.replace(p.judge, steps=5)
    p.sample = dataclasses.replace(p.sample, steps=3, batch_size=20, precision="fp32", compile=False)
    p.evaluate = dataclasses.replace(p.evaluate, fid_per_class=3)
    return p


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_image(model, null_id: int) -> float:
    """Training FLOPs (forward + backward) per image, counted on the CPU with batch 2."""
    import copy

    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format)
    schedule = NoiseSchedule(dataclasses.replace(PARAMS.diffusion))
    x = torch.randn(2, model_channels(model), 28, 28)
    t, y, u = torch.tensor([10, 900]), torch.tensor([0, 1]), torch.ones(2)
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, schedule, x, y, t, torch.randn_like(x), u, 0.1, null_id).backward()
    return counter.get_total_flops() / 2


def model_channels(model) -> int:
    return model.config.channels if hasattr(model, "config") else 1


def train_rate(model, batch: int, device: str, precision: str, channels_last: bool, compile, steps: int):
    """(img/s, compile seconds or None) of full training steps (loss, backward, AdamW) on synthetic data.

    compile: False, True (torch.compile's default mode) or a mode name ("reduce-overhead": CUDA graphs)."""
    model = model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = NoiseSchedule(PARAMS.diffusion)
    optimizer = make_optimizer([q for q in model.parameters() if q.requires_grad], 1e-4, 0.0)
    network = maybe_compile(model, bool(compile), compile if isinstance(compile, str) else "default")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, device=device, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)
    noise, u = torch.randn_like(x), torch.rand(batch, device=device, generator=g)

    def step():
        with autocast(device, precision):
            loss = diffusion_loss(network, schedule, x, y, t, noise, u, 0.1, 10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync(device)
    start = time.perf_counter()
    step()  # compiles here when compiling
    sync(device)
    compile_seconds = time.perf_counter() - start if compile else None
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start), compile_seconds


def part_fixed(args) -> dict:
    code = (
        "import time; t = time.perf_counter(); import torch, cdiff.train, cdiff.metrics; a = time.perf_counter() - t; "
    )
    code += "t = time.perf_counter(); torch.zeros(1, device='cuda') if torch.cuda.is_available() else None; "
    code += "print(a, time.perf_counter() - t)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    total = time.perf_counter() - start
    imports, cuda = (float(v) for v in out.stdout.split())
    result = {"process_s": total, "import_torch_cdiff_s": imports, "cuda_init_s": cuda}
    try:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        ray.shutdown()
        result["ray_init_shutdown_s"] = time.perf_counter() - start
    except ImportError:
        result["ray_init_shutdown_s"] = None
    return result


def part_throughput(args, p: Params) -> dict:
    batch, device = p.train.base.batch_size, args.device
    torch.manual_seed(0)
    cdiff_model = UNet(p.model)
    n_params = sum(q.numel() for q in cdiff_model.parameters())
    seed_model = seed_unet_like(n_params)
    flops = {"cdiff": flops_per_image(cdiff_model, p.model.num_classes), "seed": flops_per_image(seed_model, 10)}
    modes = [("cdiff", "fp32", False, False), ("cdiff", "bf16", True, False), ("seed", "fp32", False, False)]
    modes += [("seed", "bf16", True, False)]
    if not args.smoke or args.smoke_compile:
        modes += [("cdiff", "bf16", True, True), ("cdiff", "bf16", True, "reduce-overhead")]
    modes = [(*m, batch) for m in modes]
    if not args.smoke or args.smoke_compile:  # bigger batches, CUDA graphs: what fills the card (issue 16)
        modes += [("cdiff", "bf16", True, "reduce-overhead", b) for b in args.big_batches]
        modes += [("seed", "bf16", True, False, max(args.big_batches))]  # the seed design at the same batch
    rows = []
    for name, precision, channels_last, compile, batch in modes:
        torch.manual_seed(0)
        model = UNet(p.model) if name == "cdiff" else seed_unet_like(n_params)
        rate, compile_s = train_rate(model, batch, device, precision, channels_last, compile, args.timing_steps)
        tflops = rate * flops[name] / 1e12
        rows.append(
            {
                "model": name,
                "precision": precision,
                "channels_last": channels_last,
                "compile": compile,
                "batch": batch,
                "img_per_s": rate,
                "compile_s": compile_s,
                "gflop_per_img": flops[name] / 1e9,
                "tflops": tflops,
                "share_of_bf16_peak": tflops / args.peak_tflops if args.peak_tflops else None,
            }
        )
        print(f"  {name:<6}{precision:<5} cl={channels_last!s:<5} compile={compile!s:<15} b={batch:<5} {rate:>9.0f} img/s "
              f"{tflops:7.2f} TFLOP/s" + (f"  compile {compile_s:.0f} s" if compile_s else ""), flush=True)  # fmt: skip
    best = {m: max(r["img_per_s"] for r in rows if r["model"] == m) for m in ("cdiff", "seed")}
    big = max(r["batch"] for r in rows)
    same = {m: max(r["img_per_s"] for r in rows if r["model"] == m and r["batch"] == big) for m in ("cdiff", "seed")}
    return {
        "params": n_params,
        "rows": rows,
        "best_cdiff_over_best_seed": best["cdiff"] / best["seed"],
        f"cdiff_over_seed_at_batch_{big}": same["cdiff"] / same["seed"],
        "loop": loop_rate(p, device, args),
    }


def loop_rate(p: Params, device: str, args) -> dict:
    """img/s of cdiff.train.train itself (its host work, draws and syncs included) with the profile's base
    recipe, eager with its noise drawn on the CPU, and with the GPU switches (compile reduce-overhead, noise on
    the device): two runs of n and 3n steps after a warm-up run, the difference between them over 2n steps
    (compile and set-up cancel out)."""
    from cdiff.data import ImageSet

    n = max(2, args.timing_steps)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8, generator=g),
                    torch.arange(60_000) % 10, [str(i) for i in range(10)])  # fmt: skip
    schedule = NoiseSchedule(p.diffusion)
    out = {}
    for label, switches in (("base recipe", {"noise_on_device": False}), ("gpu switches", {"compile": True, "compile_mode": "reduce-overhead",
                                                                   "noise_on_device": True})):  # fmt: skip
        if args.smoke and not args.smoke_compile:
            switches = {k: v for k, v in switches.items() if k == "noise_on_device"}
        seconds = []
        for steps in (n, n, 3 * n):
            cfg = dataclasses.replace(p.train.base, steps=steps, log_every=n, checkpoint_every=10**8, **switches)
            torch.manual_seed(0)
            model = UNet(p.model, data.class_names).to(device)
            sync(device)
            start = time.perf_counter()
            train(model, schedule, data, cfg, seed=0, p_uncond=0.1, device=device, progress=False)
            sync(device)
            seconds.append(time.perf_counter() - start)
        rate = 2 * n * p.train.base.batch_size / max(seconds[2] - seconds[1], 1e-9)
        out[label] = {"img_per_s": rate, "first_run_s": seconds[0], **switches}
        print(f"  train() {label:<13} {rate:>9.0f} img/s (first run {seconds[0]:.0f} s)", flush=True)
    return out


def sampler_spec(p: Params) -> str:
    return p.sampler.label


def judged(judge, images, labels, data_test, ref_features) -> dict:
    s = judge_images(judge, images, labels, data_test.class_names, ref_features, data_test.labels,
                     n_boot=args_n_boot()).score  # fmt: skip
    return s.row()  # fid, its interval, fid_raw, kid, gan_test, ..., count


def args_n_boot() -> int:
    return 100 if ARGS.smoke else 1000


def sample_set(model, schedule, p: Params, n_classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    sync(device)
    start = time.perf_counter()
    images, labels = generate(model, schedule, n_classes, p.evaluate.fid_per_class, p.sampler, seed=p.seed, batch_size=p.sample.batch_size,
                              precision=p.sample.precision, compile=p.sample.compile, progress=False)  # fmt: skip
    sync(device)
    return images, labels, time.perf_counter() - start


def judge_for(train_set, test_set, p: Params):
    judge = train_judge(train_set, p.judge, seed=p.seed, progress=False)
    accuracy = float((predict(judge, test_set.as_float())[1] == test_set.labels).double().mean())
    return judge, accuracy, reference_features(judge, test_set)


def part_quality(args, p: Params, state: dict) -> dict:
    device, cfg = args.device, p.train.base
    train_set = load_source(p.data.base.source, "train", 28, 1, p.data.root)
    test_set = load_source(p.data.base.source, "test", 28, 1, p.data.root)
    schedule = NoiseSchedule(p.diffusion)
    torch.manual_seed(p.seed)
    model = UNet(p.model, train_set.class_names).to(device)
    sync(device)
    start = time.perf_counter()
    run = train(model, schedule, train_set, cfg, seed=p.seed, p_uncond=p.diffusion.p_uncond, device=device)
    sync(device)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    judge, judge_accuracy, ref = judge_for(train_set, test_set, p)
    judge_s = time.perf_counter() - start
    images, labels, sample_s = sample_set(model.eval(), schedule, p, len(train_set.class_names), device)
    real = balanced_subset(train_set, p.evaluate.fid_per_class, seed=p.seed)
    floor = judged(judge, real.as_float(), real.labels, test_set, ref)
    base = judged(judge, images, labels, test_set, ref)
    state["base"] = (model, schedule)
    return {
        "steps": cfg.steps,
        "batch": cfg.batch_size,
        "train_s": train_s,
        "train_img_per_s": cfg.steps * cfg.batch_size / train_s,
        "final_loss": run.losses[-1][1],
        "judge_s": judge_s,
        "judge_test_accuracy": judge_accuracy,
        "sampler": sampler_spec(p),
        "guidance": p.sample.guidance_scale,
        "sample_s": sample_s,
        "floor": floor,
        "base": base,
        "fid_over_floor": base["fid"] / floor["fid"],
        "targets": {
            "fid_within_3x_floor": base["fid"] <= 3 * floor["fid"],
            "gan_test_95pct_of_judge": base["gan_test"] >= 0.95 * judge_accuracy,
        },
    }


def part_adapter(args, p: Params, state: dict) -> dict:
    device, name = args.device, "digits"
    domain = p.domain(name)
    train_set = load_source(domain.source, "train", 28, 1, p.data.root)
    test_set = load_source(domain.source, "test", 28, 1, p.data.root)
    judge, judge_accuracy, ref = judge_for(train_set, test_set, p)
    base, schedule = state["base"]
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    result = {"domain": name, "judge_test_accuracy": judge_accuracy}
    for kind in ("base", "lora", "full"):
        torch.manual_seed(p.seed)
        model = UNet(p.model, train_set.class_names).to(device)
        model.load_state_dict(base_state)
        model.prompt.class_names = list(train_set.class_names)
        start = time.perf_counter()
        if kind == "lora":
            lora = domain.lora
            inject_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.extra_trainable)
            result["trainable_share"] = trainable_parameter_share(model)[0] / sum(
                base_state[k].numel() for k in base_state
            )
        if kind != "base":
            cfg = p.train.lora if kind == "lora" else p.train.full
            train(model, schedule, train_set, cfg, seed=p.seed, p_uncond=p.diffusion.p_uncond, device=device,
                  progress=False)  # fmt: skip
        if kind == "lora":
            merge_lora(model)
        train_s = time.perf_counter() - start
        images, labels, sample_s = sample_set(model.eval(), schedule, p, len(train_set.class_names), device)
        result[kind] = {**judged(judge, images, labels, test_set, ref), "train_s": train_s, "sample_s": sample_s}
        print(f"  {kind:<5} FID {result[kind]['fid']:.2f}, GAN-test {result[kind]['gan_test']:.3f}", flush=True)
    gap = result["base"]["fid"] - result["full"]["fid"]
    result["share_of_the_way"] = (result["base"]["fid"] - result["lora"]["fid"]) / gap if gap > 0 else None
    return result


def main() -> int:
    global ARGS, PARAMS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", type=Path, default=ROOT / "params-gpu.yaml")
    parser.add_argument("--parts", default="fixed,throughput,quality,adapter")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--big-batches", type=lambda v: [int(b) for b in v.split(",")], default=[2048, 8192],
                        help="batches of the CUDA-graph rows (comma-separated)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code paths only")
    parser.add_argument("--smoke-compile", action="store_true", help="with --smoke: compile too (minutes on a CPU)")
    parser.add_argument("--out", type=Path)
    ARGS = args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = args.out or (Path(tempfile.gettempdir()) / "gpu-profile-smoke.json" if args.smoke else
                            ROOT / "bench" / "results" / "gpu-profile.json")  # fmt: skip
    torch.set_num_threads(os.cpu_count() or 1)
    PARAMS = p = profile_params(args.overlay)
    if args.smoke:
        p = PARAMS = smoke_params(p)
        args.timing_steps = 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in BF16_PEAK.items() if k in name), None)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"device": name, "torch": torch.__version__, "bf16_peak_tflops": args.peak_tflops,
              "overlay": str(args.overlay.name), "smoke": args.smoke}  # fmt: skip
    state: dict = {}
    for part in args.parts.split(","):
        print(f"{part} ...", flush=True)
        start = time.perf_counter()
        if part == "fixed":
            result[part] = part_fixed(args)
        elif part == "throughput":
            result[part] = part_throughput(args, p)
        elif part == "quality":
            result[part] = part_quality(args, p, state)
        elif part == "adapter":
            result[part] = part_adapter(args, p, state)
        else:
            parser.error(f"unknown part {part!r}")
        result[part]["part_seconds"] = time.perf_counter() - start
        print(f"{part}: {_summary(result[part])}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def _summary(part: dict) -> str:
    keys = ("fid_over_floor", "targets", "share_of_the_way", "best_cdiff_over_best_seed", "part_seconds")
    return ", ".join(f"{k} {part[k]}" for k in keys if k in part) or str(part)


ARGS: argparse.Namespace
PARAMS: Params

if __name__ == "__main__":
    sys.exit(main())
