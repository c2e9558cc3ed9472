"""A domain's adapter targets on this CPU, without the pipeline: LoRA vs full fine-tune from a saved base.

    PYTHONPATH=. python bench/adapter_cpu.py BASE_FOLDER [--domain fashion-rot90] [--lr 0.009]

The domain as params.yaml defines it (source, transforms, LoRA targets and rank), train.lora and
train.full from params.yaml (--lr: the lr Tune would pick; default train.lora.lr), the judge on the
domain's real train split, and evaluate.fid_per_class samples per class with the pipeline's sampler:
the base alone, the adapter (merged) and the full fine-tune, against the real floor. Targets: GAN-test
>= 70% and >= 60% of the way from the base's FID to the full fine-tune's. JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from cdiff.checkpoint import load_model
from cdiff.data import prepare_domain
from cdiff.io import write_json
from cdiff.judge import predict, train_judge
from cdiff.lora import inject_lora, merge_lora, trainable_parameter_share
from cdiff.metrics import balanced_subset, generate, judge_images, reference_features
from cdiff.train import train
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="a model folder (e.g. from bench_quality_cpu.py --save-models)")
    parser.add_argument("--domain", default="fashion-rot90")
    parser.add_argument("--lr", type=float, help="LoRA lr (default: params.yaml train.lora.lr)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    d = p.domain(args.domain)
    s = p.sample
    spec = p.sampler.label
    out = args.out or ROOT / "bench" / "results" / f"adapter-cpu-{args.domain}.json"
    sets = prepare_domain(d.source, d.transforms, 28, 1, p.data.root, False, p.data.val_fraction, p.seed)
    train_set, test_set = sets["train"], sets["test"]
    names = train_set.class_names
    start = time.perf_counter()
    judge = train_judge(train_set, p.judge, seed=p.seed)
    judge_accuracy = float((predict(judge, test_set.as_float())[1] == test_set.labels).double().mean())
    ref = reference_features(judge, test_set)
    result = {"domain": args.domain, "sampler": spec, "guidance": s.guidance_scale, "judge_seconds": time.perf_counter() - start,
              "judge_test_accuracy": judge_accuracy, "per_class": p.evaluate.fid_per_class}  # fmt: skip

    def scored(images, labels) -> dict:
        s = judge_images(judge, images, labels, names, ref, test_set.labels).score
        return s.row()  # fid, its interval, fid_raw, kid, gan_test, ..., count

    real = balanced_subset(train_set, p.evaluate.fid_per_class, seed=p.seed)
    result["floor"] = scored(real.as_float(), real.labels)
    for kind in ("base", "lora", "full"):
        model, schedule, _ = load_model(args.base)
        model.prompt.class_names = list(names)
        start = time.perf_counter()
        if kind == "lora":
            torch.manual_seed(p.seed)
            lora = d.lora
            inject_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.extra_trainable)
            result["trainable_share"] = trainable_parameter_share(model)[0] / sum(
                v.numel() for k, v in model.state_dict().items() if "lora_" not in k
            )
            cfg = dataclasses.replace(p.train.lora, lr=args.lr or p.train.lora.lr)
        else:
            cfg = p.train.full
        if kind != "base":
            model.train()
            train(model, schedule, train_set, cfg, seed=p.seed, p_uncond=schedule.config.p_uncond)
        if kind == "lora":
            merge_lora(model)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        images, labels = generate(model.eval(), schedule, len(names), p.evaluate.fid_per_class, p.sampler,
                                  seed=p.seed)  # fmt: skip
        result[kind] = {**scored(images, labels), "train_seconds": train_seconds,
                        "sample_seconds": time.perf_counter() - start}  # fmt: skip
        print(f"{kind:<5} FID {result[kind]['fid']:8.2f}  GAN-test {result[kind]['gan_test']:.3f}", flush=True)
        write_json(out, result)
    gap = result["base"]["fid"] - result["full"]["fid"]
    result["share_of_the_way"] = (result["base"]["fid"] - result["lora"]["fid"]) / gap if gap > 0 else None
    result["targets"] = {
        "gan_test_at_least_70pct": result["lora"]["gan_test"] >= 0.7,
        "at_least_60pct_of_the_way": result["share_of_the_way"] is not None and result["share_of_the_way"] >= 0.6,
    }
    write_json(out, result)
    print(f"floor FID {result['floor']['fid']:.2f}; share of the way {result['share_of_the_way']}; {result['targets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
