"""cdiff's command line: the top-level parser and one subparser per command, with their help texts."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdiff.cli.arguments import bounded, named_source, path, positive_int, seed, source, weighted_source
from cdiff.samplers import KINDS

EXAMPLES = """examples:
  cdiff train --source sklearn-digits --steps 300 -o models/digits
  cdiff sample models/base --class Sneaker --class Bag --n 8 -o grid.png
  cdiff sample models/base --adapter adapters/digits --sampler ddim --steps 50 --guidance 2 -o digits.png
  cdiff info adapters/digits
  cdiff merge models/base adapters/digits -o models/base-digits
  cdiff sample models/base --adapter adapters/a:0.7 --adapter adapters/b:0.5 -o mix.png   # a weighted mix
  cdiff merge models/base --adapter adapters/a:0.7 --adapter adapters/b:-0.2 -o models/base-mix
  cdiff export-peft adapters/digits -o peft/digits   # PEFT's layout; load_adapter reads it back
  cdiff serve models/base --adapter digits=adapters/digits --adapter rot=adapters/fashion-rot90 --port 8000
  cdiff sample models:/cdiff-base@adapters --adapter models:/cdiff-adapter-digits@champion -o champion.png
  cdiff compare                      # every domain of the last `dvc repro`: FID, GAN-test, goals

A model or adapter is a folder or an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION,
runs:/RUN_ID/PATH), read from MLFLOW_TRACKING_URI (else the project's mlflow.db) and checked as a folder is.

Outputs never replace what they are not: a model folder replaces a model folder only with --overwrite,
and no command writes onto its own inputs, a folder of other files, a device or a link.
Errors are one line; set CDIFF_DEBUG=1 (or pass --debug) for the traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to read more), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _adapter_option(parser: argparse.ArgumentParser, parse, metavar: str, help: str, required: bool = False) -> None:
    """The repeatable --adapter of sample, merge and serve: each use appends parse(ADAPTER) to args.adapters."""
    parser.add_argument(
        "--adapter", dest="adapters", type=parse, action="append", required=required, metavar=metavar, help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cdiff",
        description="Class-conditional diffusion with cross-attention, and LoRA adapters for new image domains.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    s = sub.add_parser(
        "sample",
        help="generate a labelled PNG grid from a model (optionally with an adapter)",
        description="Generate N images per class and write them as a labelled PNG grid (one row per class).",
    )
    s.add_argument(
        "model",
        type=source,
        help="model folder (config.json + model.safetensors) or model URI; an adapter's URI alone brings its base",
    )
    _adapter_option(
        s,
        weighted_source,
        "ADAPTER[:WEIGHT]",
        "LoRA adapter folder or URI to apply (merged for zero-overhead sampling); repeat with :WEIGHT "
        "(any finite number, default 1) to apply the weighted sum of several adapters' deltas",
    )
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_ID",
        help="class name or id; repeat for several (default: every class)",
    )
    s.add_argument("--n", type=bounded(int, 1, 256), default=8, help="images per class, at most 256 (default 8)")
    s.add_argument(
        "--sampler",
        choices=list(KINDS),
        default="dpm++2m",
        help="ddpm: all T steps; ddim or dpm++2m (DPM-Solver++(2M), the default): --steps model calls",
    )
    s.add_argument("--steps", type=positive_int, default=20, help="DDIM/DPM++ steps (default 20; ignored by ddpm)")
    s.add_argument(
        "--eta",
        type=bounded(float, 0, 1),
        default=0.0,
        help="DDIM noise in [0, 1]: 0 deterministic (default), 1 DDPM-like",
    )
    s.add_argument(
        "--guidance",
        type=bounded(float, 0, 100),
        default=2.0,
        help="classifier-free guidance scale in [0, 100]; 1 = plain conditional (default 2)",
    )
    s.add_argument("--seed", type=seed, default=0, help="random seed; the same seed gives the same images (default 0)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    s.add_argument("-o", "--output", type=path, required=True, help="output PNG path (replaces only a PNG file)")

    i = sub.add_parser(
        "info",
        help="print a model's or adapter's metadata as JSON",
        description="Print the metadata of a model folder or an adapter folder as JSON.",
    )
    i.add_argument("path", type=source, help="model or adapter folder, or its URI (models:/NAME@ALIAS, ...)")

    m = sub.add_parser(
        "merge",
        help="fold an adapter (or a weighted mix of adapters) into its base and write a standalone model",
        description="Merge a LoRA adapter, or the weighted sum of several adapters' deltas, into their base model "
        "and write the result as a new model folder.",
    )
    m.add_argument("model", type=source, help="base model folder or URI")
    m.add_argument(
        "adapter", type=weighted_source, nargs="?", help="adapter folder or URI, trained on that base (or --adapter)"
    )
    _adapter_option(
        m,
        weighted_source,
        "ADAPTER[:WEIGHT]",
        "an adapter of a weighted mix, with its weight (any finite number, default 1); repeat for several",
    )
    m.add_argument("-o", "--output", type=path, required=True, help="output model folder (new, or see --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing model folder at the output path")

    e = sub.add_parser(
        "export-peft",
        help="write an adapter in PEFT's layout (adapter_model.safetensors + adapter_config.json)",
        description="Write a LoRA adapter as a PEFT LoRA folder: tensors named base_model.model.<module>.lora_A.weight "
        "(r, in) and .lora_B.weight (out, r), and PEFT's adapter_config.json (peft_type LORA). cdiff's own settings "
        "and base fingerprint travel in the safetensors metadata, so load_adapter (and --adapter) read it back.",
    )
    e.add_argument("adapter", type=source, help="cdiff adapter folder or URI")
    e.add_argument("-o", "--output", type=path, required=True, help="output folder (new, or see --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing PEFT adapter folder at the output")

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
        "--params", type=path, default=None, help="params.yaml whose model/diffusion/train.base sections to use"
    )
    t.add_argument("--steps", type=bounded(int, 1, 10**8), default=None, help="training steps (overrides params)")
    t.add_argument("--data-root", type=path, default=Path("data/raw"), help="where torchvision-style datasets live")
    t.add_argument("--seed", type=seed, default=0, help="random seed (also of the train/test split)")
    t.add_argument("-o", "--output", type=path, required=True, help="output model folder (new, or see --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model folder at the output path")
    v = sub.add_parser(
        "serve",
        help="serve a base and all its adapters over HTTP on loopback: any adapter, or a mix, per request",
        description="Load the base once and answer POST /sample {adapter, class, n, seed} with n PNGs in base64, the "
        "adapter named per request (a name, a {name: weight} mix, or null for the base): each adapter or mix is "
        "merged into a copy of the base once and kept in an LRU cache; the base is never reloaded. See cdiff.serve.",
    )
    v.add_argument("model", type=source, help="base model folder or URI")
    _adapter_option(
        v,
        named_source,
        "NAME=ADAPTER",
        "an adapter folder or URI under the name requests use; repeat for each",
        required=True,
    )
    v.add_argument("--sampler", choices=list(KINDS), default="dpm++2m", help="the sampler (default dpm++2m)")
    v.add_argument("--steps", type=positive_int, default=20, help="DDIM/DPM++ steps (default 20)")
    v.add_argument("--guidance", type=bounded(float, 0, 100), default=2.0, help="guidance scale (default 2)")
    v.add_argument("--cache", type=bounded(int, 1, 1024), default=16, help="merged models kept (default 16)")
    v.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port (default 8000)")

    c = sub.add_parser(
        "compare",
        help="compare every domain's adapter with its base, full fine-tune and floor (from reports/summary.json)",
        description="Print one row per domain from a pipeline run's reports/summary.json: FID (judge features) of "
        "the real floor, the base alone, the adapter and the full fine-tune; GAN-test accuracy; trainable share; "
        "and which quality goals were met. For every past run, use the MLflow UI or `python -m pipelines.compare`.",
    )
    c.add_argument(
        "summary", type=path, nargs="?", default=Path("reports/summary.json"), help="default reports/summary.json"
    )
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser
