"""The commands of `cdiff`: one function per subcommand, taking its parsed arguments; COMMANDS maps names to them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cdiff.errors import CdiffError
from cdiff.sources import is_uri


def cmd_compare(args) -> None:
    from cdiff.results import RunSummary, load

    run = load(args.summary, RunSummary, "run summary (made by `dvc repro`, stage report)")

    def of(score, field: str):  # None where a judge cannot score the domain (one class)
        return None if score is None else getattr(score, field)

    rows = [
        {
            "domain": name,
            "fid_floor": of(d.evaluation.floor, "fid"),
            "fid_floor_95": of(d.evaluation.floor, "fid_interval"),
            "fid_base": of(d.evaluation.base, "fid"),
            "fid_base_95": of(d.evaluation.base, "fid_interval"),
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
