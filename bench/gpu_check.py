"""GPU check of the core library: CUDA training, sampling, LoRA and checkpoints, with timings.

    PYTHONPATH=. python3 bench/gpu_check.py --out results/gpu.json

Needs only torch, torchvision, safetensors, scikit-learn, tqdm, pyyaml and pillow (no Ray, MLflow, DVC).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cdiff.adapter_format import load_adapter, save_adapter
from cdiff.checkpoint import load_model, save_model
from cdiff.config import DiffusionConfig, ModelConfig, TrainConfig
from cdiff.data import load_source
from cdiff.lora import inject_lora, merge_lora, unload_lora
from cdiff.model import UNet
from cdiff.samplers import Sampler, sample
from cdiff.schedule import NoiseSchedule
from cdiff.train import train, validation_loss


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def train_rate(model, batch, steps=20):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def run():
        for _ in range(steps):
            loss = model(x, t, y).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run()
    _, seconds = timed(run)
    return batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch.manual_seed(0)
    model_cfg = ModelConfig()  # the default 28x28 model
    diffusion = DiffusionConfig()
    schedule = NoiseSchedule(diffusion)
    data = load_source("sklearn-digits", "train", 28, 1)
    test = load_source("sklearn-digits", "test", 28, 1)
    model = UNet(model_cfg, data.class_names).cuda()
    for batch in (128, 512):
        rows[f"train img/s batch {batch}"] = train_rate(model, batch)

    model = UNet(model_cfg, data.class_names).cuda()
    before = validation_loss(model, schedule, test, 256, device="cuda")
    cfg = TrainConfig(steps=400, batch_size=128, lr=2e-3, warmup_steps=50, ema_decay=0.99, log_every=50)
    state, seconds = timed(
        lambda: train(model, schedule, data, cfg, seed=0, p_uncond=0.1, device="cuda", progress=False)
    )
    after = validation_loss(model, schedule, test, 256, device="cuda")
    rows.update(
        {"train 400 steps s": seconds, "val loss before": before, "val loss after": after, "loss curve": state.losses}
    )
    assert after < 0.5 * before, (before, after)

    ids = [i % 10 for i in range(64)]
    a, ddim_s = timed(
        lambda: sample(
            model, schedule, ids, Sampler("ddim", 50, guidance_scale=2.0), seed=1, device="cuda", progress=False
        )
    )
    b, _ = timed(
        lambda: sample(
            model, schedule, ids, Sampler("ddim", 50, guidance_scale=2.0), seed=1, device="cuda", progress=False
        )
    )
    _, ddpm_s = timed(
        lambda: sample(
            model, schedule, ids, Sampler("ddpm", None, guidance_scale=2.0), seed=1, device="cuda", progress=False
        )
    )
    rows.update(
        {
            "DDIM-50 64 imgs s": ddim_s,
            "DDPM-1000 64 imgs s": ddpm_s,
            "DDPM/DDIM time": ddpm_s / ddim_s,
            "DDIM same seed max diff": (a - b).abs().max().item(),
        }
    )

    with tempfile.TemporaryDirectory() as d:
        save_model(model.cpu(), diffusion, Path(d) / "m")
        loaded, _, _ = load_model(Path(d) / "m", "cuda")
        inject_lora(loaded, r=4, alpha=4)
        with torch.no_grad():
            for p in loaded.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        x, t, y = (
            torch.randn(8, 1, 28, 28, device="cuda"),
            torch.full((8,), 500, device="cuda"),
            torch.arange(8, device="cuda"),
        )
        with torch.no_grad():
            unmerged = loaded(x, t, y)
            save_adapter(loaded, Path(d) / "a")
            unload_lora(loaded)
            load_adapter(loaded, Path(d) / "a")
            merge_lora(loaded)
            merged = loaded(x, t, y)
        rows["LoRA merged vs unmerged max diff (cuda)"] = (merged - unmerged).abs().max().item()
    for k, v in rows.items():
        if k != "loss curve":
            print(f"{k:45s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
