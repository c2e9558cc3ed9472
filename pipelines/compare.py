"""Compare every domain's adapters from MLflow: `python -m pipelines.compare [--domain D]`.

One row per finetune run (rank, alpha, lr, trainable parameters, losses, judge FID and GAN-test
accuracy, each with its seeded bootstrap 95% interval), read from the result records logged on each run,
lowest FID first within each domain: two adapters whose intervals overlap are a tie. Then every registered
version of the base and the adapters with its aliases (`champion`, `adapters`), the URIs `cdiff` and
`mlflow models serve` take.
With --grid OUT.png: the champions of every domain, downloaded from the registry (each with the base it was
trained on), sampled with params.yaml's `sample:` settings and seed and drawn side by side, one panel per
domain, each panel the pixels `cdiff sample` gives for that adapter.
The MLflow UI's compare view shows the same runs side by side.
"""

import argparse

import pandas as pd
from tqdm import tqdm

from cdiff.adapter_format import load_adapter
from cdiff.checkpoint import load_model
from cdiff.errors import CdiffError
from cdiff.grid import sample_picture, save_picture, side_by_side
from cdiff.io import PNG, check_output, display_path
from cdiff.lora import merge_lora
from cdiff.results import DomainEvaluation, FinetuneResult
from pipelines.core import registry, serving, tracking
from pipelines.core.config import Params, params
from pipelines.core.console import stage

VERSION_COLUMNS = ["model", "version", "aliases", "fid", "val_loss", "r", "alpha", "run_id"]


def row(run: tracking.StageRun | None, ft: FinetuneResult | None, ev: DomainEvaluation | None) -> dict:
    """One finetune run; a run not evaluated yet (or failed) has gaps, as has a domain no judge can score."""
    adapter = ev.adapter if ev else None
    vs_base = ev.adapter_vs_base_fid if ev else None
    return {
        "domain": run.domain if run else "",
        "r": ft.r if ft else None,
        "alpha": ft.alpha if ft else None,
        "lr": ft.lr if ft else None,
        "trainable": ft.trainable_params if ft else None,
        "share": ft.trainable_share if ft else None,
        "val_loss": ft.val_loss if ft else None,
        "test_loss_base": ev.test_loss_base if ev else None,
        "test_loss_adapter": ev.test_loss_adapter if ev else None,
        "fid_base": ev.base.fid if ev and ev.base else None,
        "fid_base_95": ev.base.fid_interval if ev and ev.base else None,
        "fid_adapter": adapter.fid if adapter else None,
        "fid_adapter_95": adapter.fid_interval if adapter else None,
        "adapter_minus_base_fid": vs_base.shown() if vs_base else None,  # paired: its interval and verdict
        "kid_adapter": adapter.kid if adapter else None,
        "cas_adapter": adapter.cas if adapter else None,
        "gan_test": adapter.gan_test if adapter else None,
        "gan_test_95": adapter.gan_test_interval if adapter else None,
        "commit": run.commit[:8] if run else "",
        "run_id": run.run_id if run else "",
    }


def adapters_table(runs: list[tracking.StageRun]) -> pd.DataFrame:
    rows = [
        row(r, tracking.load_result(r.run_id, FinetuneResult), tracking.load_result(r.run_id, DomainEvaluation))
        for r in runs
    ]
    table = pd.DataFrame(rows, columns=list(row(None, None, None)))
    return table.sort_values(["domain", "fid_adapter", "test_loss_adapter"], na_position="last").reset_index(drop=True)


def version_row(v: registry.Version) -> list:
    t = v.tags
    return [v.model, v.version, ",".join(v.aliases), t.fid, t.val_loss, t.r, t.alpha, v.run_id]


def aliased_grid(p: Params, out, versions: list[registry.Version], alias: str, per_class: int) -> list[str]:
    """Draw the adapters among `versions` (registry.versions) that hold `alias` side by side into `out`;
    returns their URIs."""
    check_output(out, PNG)  # before any download
    uris = registry.aliased(p, versions, alias)
    if not uris:
        raise CdiffError(
            f"no adapter in the registry has the alias {alias!r}: run the pipeline's evaluate stages first"
        )
    pictures = {}
    for domain, uri in tqdm(uris.items(), desc=f"sampling the {alias}s", unit="adapter", leave=False):
        folders = tracking.bundle(uri)  # the adapter and the base it was trained on
        model, schedule, _ = load_model(folders[serving.BASE])
        load_adapter(model, folders[serving.ADAPTER])
        merge_lora(model)
        classes = list(range(len(model.class_names)))
        what = f"{uri}: refusing to draw its samples"
        pictures[domain] = sample_picture(model, schedule, p.sampler, classes, per_class, seed=p.seed, what=what)
    save_picture(out, side_by_side(pictures))
    return list(uris.values())


@stage
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", help="only this domain")
    parser.add_argument("--grid", metavar="PNG", help="also draw the adapters with --alias side by side into PNG")
    parser.add_argument("--alias", default="champion", help="the alias --grid draws (default: champion)")
    parser.add_argument(
        "--per-class", type=int, default=None, help="images per class in --grid (default: sample.per_class)"
    )
    args = parser.parse_args()
    p = params()
    per_class = p.sample.per_class if args.per_class is None else args.per_class
    if not 1 <= per_class <= 64:
        raise CdiffError(f"--per-class must be between 1 and 64, not {per_class}")
    if args.grid:
        check_output(args.grid, PNG)  # before the tables and the downloads
    table = adapters_table(tracking.stage_runs(p, "finetune", args.domain))
    rows = registry.versions(p, args.domain)
    versions = pd.DataFrame([version_row(v) for v in rows], columns=VERSION_COLUMNS)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
        print("\nregistered versions (models:/MODEL/VERSION, or models:/MODEL@ALIAS):")
        print(versions.to_string(index=False))
    if args.grid:
        drawn = aliased_grid(p, args.grid, rows, args.alias, per_class)
        print(f"compare: {len(drawn)} {args.alias}s side by side ({', '.join(drawn)}) -> {display_path(args.grid)}")


if __name__ == "__main__":
    main()
