"""Stage evaluate@DOMAIN: the adapter vs the base alone, by test loss, judge FID and GAN-test accuracy.

Also the floor (real train vs real test, same judge and count). Metrics go to metrics/DOMAIN.json
(dvc metrics) and onto the adapter's MLflow run; the registered adapter version with the lowest
FID of its domain gets the `champion` alias.
"""

import sys

import mlflow
from mlflow.tracking import MlflowClient

from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.io import read_json, write_json
from cdiff.lora import adapter_state_dict, load_adapter, merge_lora
from cdiff.train import validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, stage
from pipelines.quality import Scorer


@stage
def main(name: str) -> None:
    p = params()
    folder = Paths.prepared / name
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    scorer = Scorer(p, name, test_set)
    model, schedule, _ = load_model(Paths.base_model)
    base_params = sum(t.numel() for t in model.parameters())
    loss_base = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    base = scorer.model(model, schedule)
    load_adapter(model, Paths.adapters / name)
    trainable = sum(t.numel() for t in adapter_state_dict(model).values())  # what the adapter trained
    loss_adapter = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    merge_lora(model)  # zero-overhead inference
    adapter = scorer.model(model, schedule)
    floor = scorer.floor(train_set)
    best = read_json(Paths.tune / name / "best.json", "tuned config")
    metrics = {
        "test_loss_base": loss_base,
        "test_loss_adapter": loss_adapter,
        "improvement": (loss_base - loss_adapter) / loss_base,
        "fid_floor": floor["fid"],
        "fid_base": base["fid"],
        "fid_adapter": adapter["fid"],
        "gan_test_floor": floor["gan_test"],
        "gan_test_base": base["gan_test"],
        "gan_test_adapter": adapter["gan_test"],
        "judge_test_accuracy": scorer.judge_accuracy,
        "trainable_params": trainable,
        "trainable_share": trainable / base_params,
        "samples_per_class": p.evaluate.fid_per_class,
        "r": best["r"],
        "alpha": best["alpha"],
        "lr": best["lr"],
        "gan_test_per_class": {"base": base["gan_test_per_class"], "adapter": adapter["gan_test_per_class"]},
    }
    mkdirs(Paths.metrics)
    write_json(Paths.metrics / f"{name}.json", metrics)
    run = tracking.read_run_file(Paths.runs / f"finetune-{name}.json")
    tracking.setup(p)
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, float | int) and k not in ("r", "alpha", "lr")}
        )
        mlflow.log_metrics({f"gan_test_adapter.{k}": v for k, v in adapter["gan_test_per_class"].items()})
    champion = set_champion(p.mlflow.adapter_model_prefix + name, run["model_version"], adapter["fid"])
    print(
        f"evaluate {name}: FID base {base['fid']:.2f} -> adapter {adapter['fid']:.2f} (floor {floor['fid']:.2f}); "
        f"GAN-test {base['gan_test']:.3f} -> {adapter['gan_test']:.3f}; champion is version {champion}"
    )


def set_champion(model_name: str, version: str, fid: float) -> str:
    """Tag this version with its FID; move `champion` to the version of the domain with the lowest FID."""
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "fid", f"{fid:.8f}")
    scored = [
        (float(mv.tags["fid"]), int(mv.version))
        for mv in client.search_model_versions(f"name = '{model_name}'")
        if "fid" in mv.tags
    ]
    best_version = str(min(scored)[1])
    client.set_registered_model_alias(model_name, "champion", best_version)
    return best_version


if __name__ == "__main__":
    main(sys.argv[1])
