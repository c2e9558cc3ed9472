"""Compare every domain's adapters from MLflow: `python -m pipelines.compare [--domain D]`.

One row per finetune run (rank, alpha, lr, trainable parameters, losses, judge FID and GAN-test
accuracy, each with its seeded bootstrap 95% interval), read from the result records logged on each run,
lowest FID first within each domain: two adapters whose intervals overlap are a tie. Then every registered
version of the base and the adapters with its aliases (`champion`, `adapters`), the URIs `cdiff` and
`mlflow models serve` take.
The MLflow UI's compare view shows the same runs side by side.
"""

import argparse

import pandas as pd

from cdiff.results import DomainEvaluation, FinetuneResult
from pipelines.core import tracking
from pipelines.core.config import params
from pipelines.core.console import stage

VERSION_COLUMNS = ["model", "version", "aliases", "fid", "val_loss", "r", "alpha", "run_id"]


def row(run: dict, ft: FinetuneResult | None, ev: DomainEvaluation | None) -> dict:
    """One finetune run; a run not evaluated yet (or failed) has gaps."""
    return {
        "domain": run["domain"],
        "r": ft.r if ft else None,
        "alpha": ft.alpha if ft else None,
        "lr": ft.lr if ft else None,
        "trainable": ft.trainable_params if ft else None,
        "share": ft.trainable_share if ft else None,
        "val_loss": ft.val_loss if ft else None,
        "test_loss_base": ev.test_loss_base if ev else None,
        "test_loss_adapter": ev.test_loss_adapter if ev else None,
        "fid_base": ev.base.fid if ev else None,
        "fid_adapter": ev.adapter.fid if ev else None,
        "fid_adapter_95": ev.adapter.fid_interval if ev else None,
        "gan_test": ev.adapter.gan_test if ev else None,
        "gan_test_95": ev.adapter.gan_test_interval if ev else None,
        "commit": run["commit"][:8],
        "run_id": run["run_id"],
    }


def adapters_table(runs: list[dict]) -> pd.DataFrame:
    rows = [
        row(r, tracking.load_result(r["run_id"], FinetuneResult), tracking.load_result(r["run_id"], DomainEvaluation))
        for r in runs
    ]
    table = pd.DataFrame(rows, columns=list(row({"domain": "", "commit": "", "run_id": ""}, None, None)))
    return table.sort_values(["domain", "fid_adapter", "test_loss_adapter"], na_position="last").reset_index(drop=True)


@stage
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", help="only this domain")
    args = parser.parse_args()
    p = params()
    table = adapters_table(tracking.stage_runs(p, "finetune", args.domain))
    versions = pd.DataFrame(tracking.registry_versions(p, args.domain), columns=VERSION_COLUMNS)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
        print("\nregistered versions (models:/MODEL/VERSION, or models:/MODEL@ALIAS):")
        print(versions.to_string(index=False))


if __name__ == "__main__":
    main()
