"""Compare every domain's adapters from MLflow: `python -m pipelines.compare [--domain D]`.

One row per finetune run (rank, alpha, lr, trainable parameters, losses, judge FID and GAN-test
accuracy), lowest FID first within each domain. The MLflow UI's compare view shows the same runs side by side.
"""

import argparse

import mlflow
import pandas as pd

from pipelines import tracking
from pipelines.common import params, stage

COLUMNS = {
    "tags.domain": "domain",
    "params.lora_r": "r",
    "params.lora_alpha": "alpha",
    "params.lora_lr": "lr",
    "metrics.trainable_params": "trainable",
    "metrics.trainable_share": "share",
    "metrics.val_loss": "val_loss",
    "metrics.test_loss_base": "test_loss_base",
    "metrics.test_loss_adapter": "test_loss_adapter",
    "metrics.fid_base": "fid_base",
    "metrics.fid_adapter": "fid_adapter",
    "metrics.gan_test_adapter": "gan_test",
    "tags.git_commit": "commit",
    "run_id": "run_id",
}


def adapters_table(experiment: str, domain: str | None = None) -> pd.DataFrame:
    query = "tags.stage = 'finetune'" + (f" and tags.domain = '{domain}'" if domain else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query)
    if runs.empty:
        return pd.DataFrame(columns=list(COLUMNS.values()))
    table = runs.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS)
    table["commit"] = table["commit"].str[:8]
    return table.sort_values(["domain", "fid_adapter", "test_loss_adapter"], na_position="last").reset_index(drop=True)


@stage
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", help="only this domain")
    args = parser.parse_args()
    p = params()
    tracking.setup(p)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(adapters_table(p.mlflow.experiment, args.domain).to_string(index=False))


if __name__ == "__main__":
    main()
