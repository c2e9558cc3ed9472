"""Stage evaluate@DOMAIN: deterministic test loss of the base alone vs base + adapter; metrics for DVC and MLflow.

The registered adapter version with the lowest test loss of its domain gets the `champion` alias.
"""

import sys

import mlflow
from mlflow.tracking import MlflowClient

from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.io import read_json, write_json
from cdiff.lora import load_adapter
from cdiff.train import validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, stage


@stage
def main(name: str) -> None:
    p = params()
    test_set = load_imageset(Paths.prepared / name, "test")
    model, schedule, _ = load_model(Paths.base_model)
    base_loss = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    load_adapter(model, Paths.adapters / name)
    adapter_loss = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    best = read_json(Paths.tune / name / "best.json", "tuned config")
    metrics = {
        "test_loss_base": base_loss,
        "test_loss_adapter": adapter_loss,
        "improvement": (base_loss - adapter_loss) / base_loss,
        "r": best["r"],
        "alpha": best["alpha"],
        "lr": best["lr"],
    }
    mkdirs(Paths.metrics)
    write_json(Paths.metrics / f"{name}.json", metrics)
    run = tracking.read_run_file(Paths.runs / f"finetune-{name}.json")
    tracking.setup(p)
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics({k: metrics[k] for k in ("test_loss_base", "test_loss_adapter", "improvement")})
    champion = set_champion(p.mlflow.adapter_model_prefix + name, run["model_version"], adapter_loss)
    print(
        f"evaluate {name}: test loss base {base_loss:.4f} -> adapter {adapter_loss:.4f}; champion is version {champion}"
    )


def set_champion(model_name: str, version: str, test_loss: float) -> str:
    """Tag this version with its test loss; move `champion` to the best version of the domain."""
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "test_loss", f"{test_loss:.8f}")
    scored = [
        (float(mv.tags["test_loss"]), int(mv.version))
        for mv in client.search_model_versions(f"name = '{model_name}'")
        if "test_loss" in mv.tags
    ]
    best_version = str(min(scored)[1])
    client.set_registered_model_alias(model_name, "champion", best_version)
    return best_version


if __name__ == "__main__":
    main(sys.argv[1])
