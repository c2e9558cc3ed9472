"""Sample quality at GPU scale: judge FID and GAN-test accuracy of the base from 10k samples per setting.

Needs the default run's models/base, models/judge/<base> and data/prepared/<base> (`dvc repro`).
Each setting generates `--per-class` images per class (default 1000: 10k for 10 classes); the floor
is as many real train images against the same real test split. Results are written after every
setting, so a run cut short keeps what it measured.

    python bench/gpu_quality.py --device cuda --out bench/results/gpu-quality.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.io import write_json
from cdiff.judge import load_judge
from cdiff.metrics import balanced_subset, generate, judge_images, reference_features
from cdiff.samplers import Sampler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2500)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--settings",
        default="ddim-50:2,ddim-50:1,ddim-50:4,ddim-20:2,ddim-100:2,ddpm:2",
        help="comma-separated SAMPLER:GUIDANCE points",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-quality.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    model, schedule, _ = load_model("models/base", args.device)
    judge, judge_config = load_judge(Path("models/judge") / args.dataset)
    folder = Path("data/prepared") / args.dataset
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    reference = reference_features(judge, test_set)
    names = test_set.class_names
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "per_class": args.per_class,
        "judge_test_accuracy": judge_config["test_accuracy"],
        "rows": [],
    }
    real = balanced_subset(train_set, args.per_class, seed=0)
    floor = judge_images(judge, real.as_float(), real.labels, names, reference, test_set.labels).score
    result["floor"] = {"fid": floor.fid, "fid_raw": floor.fid_raw, "gan_test": floor.gan_test, "count": floor.images}
    print(f"floor (real train vs real test, {floor.images} images): FID {floor.fid:.3f}, accuracy {floor.gan_test:.3f}")
    settings = [(spec.split(":")[0], float(spec.split(":")[1])) for spec in args.settings.split(",")]
    print(f"{'sampler':<10}{'guidance':>9}{'images':>8}{'seconds':>9}{'FID':>9}{'GAN-test':>10}")
    for sampler, guidance in settings:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        images, labels = generate(
            model,
            schedule,
            len(names),
            args.per_class,
            Sampler.parse(sampler, guidance_scale=guidance),
            seed=0,
            batch_size=args.batch,
            progress=False,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        scores = judge_images(judge, images, labels, names, reference, test_set.labels).score
        row = {
            "sampler": sampler,
            "guidance": guidance,
            "images": len(images),
            "seconds": seconds,
            "fid": scores.fid,
            "fid_raw": scores.fid_raw,
            "kid": scores.kid,
            "gan_test": scores.gan_test,
        }
        result["rows"].append(row)
        print(
            f"{sampler:<10}{guidance:>9}{len(images):>8}{seconds:>9.1f}{scores['fid']:>9.3f}{scores['gan_test']:>10.3f}",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)  # atomic: a killed run leaves the last complete file
    return 0


if __name__ == "__main__":
    sys.exit(main())
