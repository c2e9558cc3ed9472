"""`cdiff`: sample, inspect and merge models and adapters; train a quick local model."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from cdiff.errors import CdiffError

EXAMPLES = """examples:
  cdiff train --source sklearn-digits --steps 300 -o models/digits
  cdiff sample models/base --class Sneaker --class Bag --n 8 -o grid.png
  cdiff sample models/base --adapter adapters/digits --sampler ddim --steps 50 --guidance 2 -o digits.png
  cdiff info adapters/digits
  cdiff merge models/base adapters/digits -o models/base-digits
  cdiff compare                      # every domain of the last `dvc repro`: FID, GAN-test, goals

Errors are one line; set CDIFF_DEBUG=1 (or pass --debug) for the traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to read more), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cdiff",
        description="Class-conditional diffusion with cross-attention, and LoRA adapters for new image domains.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser(
        "sample",
        help="generate a labelled PNG grid from a model (optionally with an adapter)",
        description="Generate N images per class and write them as a labelled PNG grid (one row per class).",
    )
    s.add_argument("model", type=Path, help="model folder (config.json + model.safetensors)")
    s.add_argument("--adapter", type=Path, help="LoRA adapter folder to apply (merged for zero-overhead sampling)")
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_ID",
        help="class name or id; repeat for several (default: every class)",
    )
    s.add_argument("--n", type=_positive_int, default=8, help="images per class (default 8)")
    s.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "dpm++2m"],
        default="ddim",
        help="ddpm: all T steps; ddim (default) or dpm++2m (DPM-Solver++(2M)): --steps model calls",
    )
    s.add_argument("--steps", type=_positive_int, default=50, help="DDIM/DPM++ steps (default 50; ignored by ddpm)")
    s.add_argument("--eta", type=_guidance, default=0.0, help="DDIM noise: 0 deterministic (default), 1 DDPM-like")
    s.add_argument(
        "--guidance",
        type=_guidance,
        default=2.0,
        help="classifier-free guidance scale; 1 = plain conditional (default 2)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images (default 0)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    s.add_argument("-o", "--output", type=Path, required=True, help="output PNG path")

    i = sub.add_parser(
        "info",
        help="print a model's or adapter's metadata as JSON",
        description="Print the metadata of a model folder or an adapter folder as JSON.",
    )
    i.add_argument("path", type=Path, help="model or adapter folder")

    m = sub.add_parser(
        "merge",
        help="fold an adapter into its base and write a standalone model",
        description="Merge a LoRA adapter into its base model and write the result as a new model folder.",
    )
    m.add_argument("model", type=Path, help="base model folder")
    m.add_argument("adapter", type=Path, help="adapter folder trained on that base")
    m.add_argument("-o", "--output", type=Path, required=True, help="output model folder")

    t = sub.add_parser(
        "train",
        help="train a small base model locally (no Ray); the pipeline is `dvc repro`",
        description="Train a base model on one data source, in this process, and save it as a model folder.",
    )
    t.add_argument(
        "--source",
        default="sklearn-digits",
        help="data source: fashion-mnist, mnist, kmnist, emnist-letters, sklearn-digits, imagefolder:PATH",
    )
    t.add_argument(
        "--params", type=Path, default=None, help="params.yaml whose model/diffusion/train.base sections to use"
    )
    t.add_argument("--steps", type=_positive_int, default=None, help="training steps (overrides params)")
    t.add_argument("--data-root", default="data/raw", help="where torchvision-style datasets live")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-o", "--output", type=Path, required=True, help="output model folder")
    c = sub.add_parser(
        "compare",
        help="compare every domain's adapter with its base, full fine-tune and floor (from reports/summary.json)",
        description="Print one row per domain from a pipeline run's reports/summary.json: FID (judge features) of "
        "the real floor, the base alone, the adapter and the full fine-tune; GAN-test accuracy; trainable share; "
        "and which quality goals were met. For every past run, use the MLflow UI or `python -m pipelines.compare`.",
    )
    c.add_argument(
        "summary", type=Path, nargs="?", default=Path("reports/summary.json"), help="default reports/summary.json"
    )
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def cmd_compare(args) -> None:
    from cdiff.io import read_json

    summary = read_json(args.summary, "run summary (made by `dvc repro`, stage report)")
    try:
        rows = [
            {
                "domain": name,
                "fid_floor": d["metrics"]["fid_floor"],
                "fid_base": d["metrics"]["fid_base"],
                "fid_adapter": d["metrics"]["fid_adapter"],
                "fid_full": d["metrics"].get("full_fid"),
                "gan_test": d["metrics"]["gan_test_adapter"],
                "judge_acc": d["metrics"]["judge_test_accuracy"],
                "r": d["metrics"]["r"],
                "alpha": d["metrics"]["alpha"],
                "share": d["metrics"]["trainable_share"],
                "goals_met": f"{sum(g['met'] for g in d['goals'])}/{len(d['goals'])}",
            }
            for name, d in summary["domains"].items()
        ]
    except (KeyError, TypeError, AttributeError) as e:
        raise CdiffError(f"{args.summary} lacks {e}: rerun `dvc repro` to regenerate it") from e
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = list(rows[0]) if rows else ["domain"]
    cells = [[_cell(r[h]) for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    print(f"({summary.get('settings', '')}; FID: lower is better, in the judge's feature space)")


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_sample(args) -> None:
    import torch

    from cdiff.checkpoint import load_model
    from cdiff.grid import save_grid
    from cdiff.io import check_output_folder
    from cdiff.lora import load_adapter, merge_lora
    from cdiff.samplers import sample

    check_output_folder(args.output)  # before minutes of sampling, not after
    model, schedule, _ = load_model(args.model, args.device)
    if args.adapter is not None:
        load_adapter(model, args.adapter)
        merge_lora(model)
    ids = model.prompt.class_ids(args.classes) if args.classes else list(range(len(model.class_names)))
    class_ids = [c for c in ids for _ in range(args.n)]
    with torch.inference_mode():
        images = sample(
            model,
            schedule,
            class_ids,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            guidance_scale=args.guidance,
            seed=args.seed,
            device=args.device,
        )
    title = (
        f"{args.sampler}{'' if args.sampler == 'ddpm' else f'-{args.steps}'} guidance {args.guidance} seed {args.seed}"
    )
    save_grid(args.output, images, [model.class_names[c] for c in ids], args.n, title=title)
    print(f"wrote {args.output} ({len(class_ids)} images)")


def cmd_info(args) -> None:
    from cdiff.checkpoint import describe

    print(json.dumps(describe(args.path), indent=2))


def cmd_merge(args) -> None:
    from cdiff.checkpoint import load_model, save_model
    from cdiff.lora import load_adapter, merge_and_unload

    model, schedule, config = load_model(args.model)
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    fp = save_model(
        model,
        schedule.config,
        args.output,
        extra={"merged_from": {"base": config["fingerprint"], "adapter": str(args.adapter)}},
    )
    print(f"wrote {args.output} (fingerprint {fp[:12]})")


def cmd_train(args) -> None:
    import torch

    from cdiff.checkpoint import save_model
    from cdiff.config import DiffusionConfig, ModelConfig, TrainConfig, load_params
    from cdiff.data import load_source
    from cdiff.model import UNet
    from cdiff.schedule import NoiseSchedule
    from cdiff.train import train

    if args.params:
        p = load_params(args.params)
        model_cfg, diffusion, train_cfg = p.model, p.diffusion, p.train.base
    else:
        model_cfg, diffusion, train_cfg = ModelConfig(), DiffusionConfig(), TrainConfig(steps=500)
    if args.steps:
        train_cfg.steps = args.steps
    data = load_source(args.source, "train", model_cfg.image_size, model_cfg.channels, args.data_root)
    model_cfg.num_classes = len(data.class_names)
    torch.manual_seed(args.seed)
    model = UNet(model_cfg, data.class_names)
    state = train(model, NoiseSchedule(diffusion), data, train_cfg, seed=args.seed, p_uncond=diffusion.p_uncond)
    save_model(model, diffusion, args.output)
    print(f"wrote {args.output} (final loss {state.losses[-1][1]:.4f} after {state.step} steps)")


COMMANDS = {"sample": cmd_sample, "info": cmd_info, "merge": cmd_merge, "train": cmd_train, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CDIFF_DEBUG") == "1"
    try:
        COMMANDS[args.command](args)
    except CdiffError as e:
        if debug:
            raise
        print(f"cdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdiff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
