"""`cdiff`: sample, inspect and merge models and adapters; train a quick local model."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import threading
from pathlib import Path

from cdiff.errors import CdiffError
from cdiff.samplers import KINDS
from cdiff.sources import is_uri

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


def _bounded(kind: type, least: float, most: float):
    """An argparse type: an int or a float, finite and in [least, most], else one line naming the bound."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {text}")
        return value

    return parse


def _path(text: str) -> Path:
    if "\x00" in text or not text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text).expanduser()


def _source(text: str) -> str | Path:
    """A model or adapter: a URI (models:/..., kept as text for its resolver) or a folder path."""
    return text if is_uri(text) else _path(text)


def _named_source(text: str) -> tuple[str, str | Path]:
    """NAME=ADAPTER: the name requests use, and the adapter's folder or URI."""
    name, sep, source = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or not source:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=ADAPTER (a name of letters, digits, '.', '-', '_')")
    return name, _source(source)


_WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def _weighted_source(text: str) -> tuple[str | Path, float]:
    """An adapter with its mix weight: DIR:WEIGHT (any finite number) or DIR alone (weight 1). Only a number
    after the last ':' is a weight, so `models:/name@alias` or `a:b` stay whole; for a folder named `x:2`,
    write `x:2:1`."""
    head, colon, tail = text.rpartition(":")
    if not colon or not head or not _WEIGHT.fullmatch(tail):
        return _source(text), 1.0
    weight = float(tail)
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"the weight of {head!r} must be a finite number, got {tail}")
    return _source(head), weight


_positive_int = _bounded(int, 1, 10**9)
_seed = _bounded(int, 0, 2**32 - 1)


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
    s.add_argument(
        "model",
        type=_source,
        help="model folder (config.json + model.safetensors) or model URI; an adapter's URI alone brings its base",
    )
    s.add_argument(
        "--adapter",
        dest="adapters",
        type=_weighted_source,
        action="append",
        metavar="ADAPTER[:WEIGHT]",
        help="LoRA adapter folder or URI to apply (merged for zero-overhead sampling); repeat with :WEIGHT "
        "(any finite number, default 1) to apply the weighted sum of several adapters' deltas",
    )
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_ID",
        help="class name or id; repeat for several (default: every class)",
    )
    s.add_argument("--n", type=_bounded(int, 1, 256), default=8, help="images per class, at most 256 (default 8)")
    s.add_argument(
        "--sampler",
        choices=list(KINDS),
        default="dpm++2m",
        help="ddpm: all T steps; ddim or dpm++2m (DPM-Solver++(2M), the default): --steps model calls",
    )
    s.add_argument("--steps", type=_positive_int, default=20, help="DDIM/DPM++ steps (default 20; ignored by ddpm)")
    s.add_argument(
        "--eta",
        type=_bounded(float, 0, 1),
        default=0.0,
        help="DDIM noise in [0, 1]: 0 deterministic (default), 1 DDPM-like",
    )
    s.add_argument(
        "--guidance",
        type=_bounded(float, 0, 100),
        default=2.0,
        help="classifier-free guidance scale in [0, 100]; 1 = plain conditional (default 2)",
    )
    s.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed gives the same images (default 0)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    s.add_argument("-o", "--output", type=_path, required=True, help="output PNG path (replaces only a PNG file)")

    i = sub.add_parser(
        "info",
        help="print a model's or adapter's metadata as JSON",
        description="Print the metadata of a model folder or an adapter folder as JSON.",
    )
    i.add_argument("path", type=_source, help="model or adapter folder, or its URI (models:/NAME@ALIAS, ...)")

    m = sub.add_parser(
        "merge",
        help="fold an adapter (or a weighted mix of adapters) into its base and write a standalone model",
        description="Merge a LoRA adapter, or the weighted sum of several adapters' deltas, into their base model "
        "and write the result as a new model folder.",
    )
    m.add_argument("model", type=_source, help="base model folder or URI")
    m.add_argument(
        "adapter", type=_weighted_source, nargs="?", help="adapter folder or URI, trained on that base (or --adapter)"
    )
    m.add_argument(
        "--adapter",
        dest="adapters",
        type=_weighted_source,
        action="append",
        metavar="ADAPTER[:WEIGHT]",
        help="an adapter of a weighted mix, with its weight (any finite number, default 1); repeat for several",
    )
    m.add_argument("-o", "--output", type=_path, required=True, help="output model folder (new, or see --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing model folder at the output path")

    e = sub.add_parser(
        "export-peft",
        help="write an adapter in PEFT's layout (adapter_model.safetensors + adapter_config.json)",
        description="Write a LoRA adapter as a PEFT LoRA folder: tensors named base_model.model.<module>.lora_A.weight "
        "(r, in) and .lora_B.weight (out, r), and PEFT's adapter_config.json (peft_type LORA). cdiff's own settings "
        "and base fingerprint travel in the safetensors metadata, so load_adapter (and --adapter) read it back.",
    )
    e.add_argument("adapter", type=_source, help="cdiff adapter folder or URI")
    e.add_argument("-o", "--output", type=_path, required=True, help="output folder (new, or see --overwrite)")
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
        "--params", type=_path, default=None, help="params.yaml whose model/diffusion/train.base sections to use"
    )
    t.add_argument("--steps", type=_bounded(int, 1, 10**8), default=None, help="training steps (overrides params)")
    t.add_argument("--data-root", type=_path, default=Path("data/raw"), help="where torchvision-style datasets live")
    t.add_argument("--seed", type=_seed, default=0, help="random seed (also of the train/test split)")
    t.add_argument("-o", "--output", type=_path, required=True, help="output model folder (new, or see --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model folder at the output path")
    v = sub.add_parser(
        "serve",
        help="serve a base and all its adapters over HTTP on loopback: any adapter, or a mix, per request",
        description="Load the base once and answer POST /sample {adapter, class, n, seed} with n PNGs in base64, the "
        "adapter named per request (a name, a {name: weight} mix, or null for the base): each adapter or mix is "
        "merged into a copy of the base once and kept in an LRU cache; the base is never reloaded. See cdiff.serve.",
    )
    v.add_argument("model", type=_source, help="base model folder or URI")
    v.add_argument(
        "--adapter",
        dest="adapters",
        type=_named_source,
        action="append",
        required=True,
        metavar="NAME=ADAPTER",
        help="an adapter folder or URI under the name requests use; repeat for each",
    )
    v.add_argument("--sampler", choices=list(KINDS), default="dpm++2m", help="the sampler (default dpm++2m)")
    v.add_argument("--steps", type=_positive_int, default=20, help="DDIM/DPM++ steps (default 20)")
    v.add_argument("--guidance", type=_bounded(float, 0, 100), default=2.0, help="guidance scale (default 2)")
    v.add_argument("--cache", type=_bounded(int, 1, 1024), default=16, help="merged models kept (default 16)")
    v.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=_bounded(int, 1, 65535), default=8000, help="port (default 8000)")

    c = sub.add_parser(
        "compare",
        help="compare every domain's adapter with its base, full fine-tune and floor (from reports/summary.json)",
        description="Print one row per domain from a pipeline run's reports/summary.json: FID (judge features) of "
        "the real floor, the base alone, the adapter and the full fine-tune; GAN-test accuracy; trainable share; "
        "and which quality goals were met. For every past run, use the MLflow UI or `python -m pipelines.compare`.",
    )
    c.add_argument(
        "summary", type=_path, nargs="?", default=Path("reports/summary.json"), help="default reports/summary.json"
    )
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def cmd_compare(args) -> None:
    from cdiff.results import RunSummary, load

    run = load(args.summary, RunSummary, "run summary (made by `dvc repro`, stage report)")

    def of(score, field: str):  # None where a judge cannot score the domain (one class)
        return None if score is None else getattr(score, field)

    rows = [
        {
            "domain": name,
            "fid_floor": of(d.evaluation.floor, "fid"),
            "fid_base": of(d.evaluation.base, "fid"),
            "fid_adapter": of(d.evaluation.adapter, "fid"),
            "fid_adapter_95": of(d.evaluation.adapter, "fid_interval"),
            "adapter_minus_base_fid": d.evaluation.adapter_vs_base_fid.shown()
            if d.evaluation.adapter_vs_base_fid
            else None,
            "kid_adapter": of(d.evaluation.adapter, "kid"),
            "cas_adapter": of(d.evaluation.adapter, "cas"),
            "fid_full": d.full.score.fid if d.full else None,
            "fid_full_95": d.full.score.fid_interval if d.full else None,
            "gan_test": of(d.evaluation.adapter, "gan_test"),
            "gan_test_95": of(d.evaluation.adapter, "gan_test_interval"),
            "judge_acc": d.evaluation.judge_test_accuracy,
            "r": d.evaluation.r,
            "alpha": d.evaluation.alpha,
            "share": d.evaluation.trainable_share,
            "goals_met": f"{sum(g.met for g in d.goals)}/{len(d.goals)}",
        }
        for name, d in run.domains.items()
    ]
    if args.json:
        _say(json.dumps(rows, indent=2))
        return
    header = list(rows[0]) if rows else ["domain"]
    cells = [[_cell(r[h]) for h in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    _say("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for c in cells:
        _say("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    _say(f"({run.settings}; FID: lower is better, in the judge's feature space; _95: seeded bootstrap 95% interval)")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else " ".join(str(v).split())


def _say(text: str) -> None:
    """print, with undecodable bytes of file and class names escaped instead of crashing the command."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def _apply(model, adapters: list[Path], weights: list[float]) -> None:
    """Merge the adapters into the model: one at weight 1 as `load_adapter` does (the same pixels as serving),
    else their weighted mix (cdiff.mixing)."""
    from cdiff.adapter_format import load_adapter
    from cdiff.lora import merge_lora
    from cdiff.mixing import load_adapters

    if weights == [1.0]:
        load_adapter(model, adapters[0])
        merge_lora(model)
    elif adapters:
        load_adapters(model, list(zip(adapters, weights, strict=True)))


def cmd_sample(args) -> None:
    from cdiff.checkpoint import load_model
    from cdiff.grid import sample_grid
    from cdiff.io import PNG
    from cdiff.samplers import Sampler

    sampler = Sampler.of(args.sampler, args.steps, args.eta, args.guidance)
    sources, weights = _mix(args.adapters)
    model_dir, adapter_dirs = _resolved(args.output, PNG, args.model, sources)  # before minutes of sampling
    model, schedule, _ = load_model(model_dir, args.device)
    _apply(model, adapter_dirs, weights or [1.0] * len(adapter_dirs))
    ids = model.prompt.class_ids(args.classes) if args.classes else list(range(len(model.class_names)))
    sample_grid(args.output, model, schedule, sampler, ids, args.n, seed=args.seed, device=args.device)
    _say(f"wrote {args.output} ({len(ids) * args.n} images, {sampler})")


def _mix(adapters) -> tuple[list, list[float]]:
    """(sources, weights) of the repeated ADAPTER[:WEIGHT] arguments."""
    return [source for source, _ in adapters or []], [weight for _, weight in adapters or []]


def _resolved(output, artefact, model, adapters, *, overwrite=False) -> tuple[Path, list[Path]]:
    """The local folders of a model and its adapters (URIs resolved: downloaded, for MLflow's), with the output
    path checked before any download and again after: never onto, into or above an input or a downloaded folder."""
    from cdiff.adapter_format import ADAPTER_CONFIG
    from cdiff.io import check_output
    from cdiff.sources import resolve

    check_output(output, artefact, overwrite=overwrite, inputs=[s for s in (model, *adapters) if not is_uri(s)])
    held = resolve(model) if not adapters and is_uri(model) else None  # kind None: the adapter, if it is one
    if held is not None and (held / ADAPTER_CONFIG).is_file():
        model_dir, adapter_dirs = resolve(model, "base"), [held]  # an adapter with its base
    else:
        model_dir = resolve(model, "model")
        adapter_dirs = [resolve(adapter, "adapter") for adapter in adapters]
    check_output(output, artefact, overwrite=overwrite, inputs=[model_dir, *adapter_dirs])
    return model_dir, adapter_dirs


def cmd_info(args) -> None:
    from cdiff.checkpoint import describe

    _say(json.dumps(describe(args.path), indent=2))


def cmd_merge(args) -> None:
    from cdiff.checkpoint import MODEL, load_model, save_model
    from cdiff.lora import merge_and_unload

    sources, weights = _mix(([args.adapter] if args.adapter else []) + (args.adapters or []))
    if not sources:
        raise CdiffError("cdiff merge needs an adapter: give ADAPTER, or --adapter ADAPTER[:WEIGHT] for each of a mix")
    model_dir, adapter_dirs = _resolved(args.output, MODEL, args.model, sources, overwrite=args.overwrite)
    model, schedule, config = load_model(model_dir)
    _apply(model, adapter_dirs, weights)
    merge_and_unload(model)
    merged_from = (
        {"adapter": str(sources[0])}
        if weights == [1.0]
        else {"adapters": [{"adapter": str(s), "weight": w} for s, w in zip(sources, weights, strict=True)]}
    )
    fp = save_model(
        model,
        schedule.config,
        args.output,
        extra={"merged_from": {"base": config.fingerprint, **merged_from}},
        overwrite=args.overwrite,
    )
    _say(f"wrote {args.output} (fingerprint {fp[:12]})")


def cmd_export_peft(args) -> None:
    from cdiff.io import check_output
    from cdiff.peft_format import PEFT_ADAPTER, export_peft
    from cdiff.sources import resolve

    given = [] if is_uri(args.adapter) else [args.adapter]
    check_output(args.output, PEFT_ADAPTER, overwrite=args.overwrite, inputs=given)  # before any download
    adapter_dir = resolve(args.adapter, "adapter")
    check_output(args.output, PEFT_ADAPTER, overwrite=args.overwrite, inputs=[adapter_dir])
    export_peft(adapter_dir, args.output, overwrite=args.overwrite)
    _say(f"wrote {args.output} (PEFT LoRA adapter)")


def cmd_train(args) -> None:
    import torch

    from cdiff.checkpoint import MODEL, save_model
    from cdiff.config import DiffusionConfig, ModelConfig, TrainConfig, load_sections
    from cdiff.data import check_source, load_source
    from cdiff.io import check_output
    from cdiff.model import UNet
    from cdiff.schedule import NoiseSchedule
    from cdiff.train import train

    check_source(args.source, "--source")
    folder = args.source.split(":", 1)[1] if args.source.startswith("imagefolder:") else None
    check_output(args.output, MODEL, overwrite=args.overwrite, inputs=[args.params, folder])  # before training
    if args.params:
        sections = {"model": ModelConfig, "diffusion": DiffusionConfig, "train.base": TrainConfig}
        model_cfg, diffusion, train_cfg = load_sections(args.params, sections).values()
    else:
        model_cfg, diffusion, train_cfg = ModelConfig(), DiffusionConfig(), TrainConfig(steps=500)
    if args.steps:
        train_cfg.steps = args.steps
    data = load_source(args.source, "train", model_cfg.image_size, model_cfg.channels, args.data_root, seed=args.seed)
    model_cfg.num_classes = len(data.class_names)
    torch.manual_seed(args.seed)
    model = UNet(model_cfg, data.class_names)
    state = train(model, NoiseSchedule(diffusion), data, train_cfg, seed=args.seed, p_uncond=diffusion.p_uncond)
    save_model(model, diffusion, args.output, overwrite=args.overwrite)
    _say(f"wrote {args.output} (final loss {state.losses[-1][1]:.4f} after {state.step} steps)")


def cmd_serve(args) -> None:
    from cdiff.samplers import Sampler
    from cdiff.serve import AdapterServer, http_server
    from cdiff.sources import resolve

    names = [name for name, _ in args.adapters]
    if len(set(names)) != len(names):
        raise CdiffError(
            f"an adapter name is given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
        )
    sampler = Sampler.of(args.sampler, args.steps, 0.0, args.guidance)
    server = AdapterServer(resolve(args.model, "model"), dict(args.adapters), sampler, args.cache)
    try:
        httpd = http_server(server, args.host, args.port)
    except OSError as e:
        raise CdiffError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from e
    _say(f"serving {len(names)} adapters ({', '.join(names)}) on http://{args.host}:{args.port} ({sampler})")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


COMMANDS = {
    "sample": cmd_sample,
    "serve": cmd_serve,
    "info": cmd_info,
    "merge": cmd_merge,
    "export-peft": cmd_export_peft,
    "train": cmd_train,
    "compare": cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code: 0, 2 for a bad input (one line on stderr), 128+N on signal N."""
    from cdiff.io import Interrupted, all_or_nothing, interrupts_unwind

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed in one line (2)
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("CDIFF_DEBUG") == "1"
    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        # SIGTERM, like Ctrl-C, unwinds the stack: `finally` blocks remove temp files before the exit, and a
        # command that fails after writing one of its outputs puts it back as it was
        with interrupts_unwind() if in_main_thread else contextlib.nullcontext(), all_or_nothing():
            COMMANDS[args.command](args)
    except CdiffError as e:
        if debug:
            raise
        _last_line(f"cdiff: error: {' '.join(str(e).splitlines())}")
        return 2
    except Interrupted as e:
        _last_line(f"cdiff: interrupted ({e}): nothing half-written was left behind", mid_work=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        _last_line("cdiff: interrupted", mid_work=True)
        return 130
    return 0


def _last_line(message: str, mid_work: bool = False) -> None:
    """A command stopped: close its progress bars, then print its message as a line of its own.

    A bar that a signal cut mid-draw may have left the cursor after its text: then (`mid_work`, or a bar still
    open) the message starts with a carriage return (and, on a terminal, clears that line), so that what the
    user sees is the message alone.
    """
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        with contextlib.suppress(Exception):  # a bar interrupted while it was being drawn: never a traceback
            bar.close()
    clear = ("\r\033[K" if sys.stderr.isatty() else "\r") if bars or mid_work else ""
    print(clear + message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
