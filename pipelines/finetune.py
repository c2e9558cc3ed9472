"""Stage finetune@DOMAIN: train the domain's LoRA adapter with the tuned config via Ray Train; register it."""

import dataclasses
import sys

import mlflow

from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.io import read_json
from cdiff.lora import save_adapter, trainable_parameter_share
from cdiff.train import validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, ray_session, stage
from pipelines.distributed import fit
from pipelines.outputs import write_curve


@stage
def main(name: str) -> None:
    p = params()
    domain = p.domain(name)
    best = read_json(Paths.tune / name / "best.json", "tuned config")
    lora = dataclasses.replace(domain.lora, r=int(best["r"]), alpha=float(best["alpha"]))
    cfg = dataclasses.replace(p.train.lora, lr=float(best["lr"]))
    base, schedule, base_config = load_model(Paths.base_model)
    folder = Paths.prepared / name
    train_set, val_set = load_imageset(folder, "train"), load_imageset(folder, "val")
    mkdirs(Paths.adapters, Paths.runs, Paths.plots)
    with tracking.stage_run(p, "finetune", name) as run, ray_session(p):
        mlflow.log_params(
            {
                "lora_r": lora.r,
                "lora_alpha": lora.alpha,
                "lora_lr": cfg.lr,
                "lora_targets": ",".join(lora.targets),
                "lora_extra_trainable": ",".join(lora.extra_trainable),
                "base_fingerprint": base_config["fingerprint"],
            }
        )
        model, curve = fit(
            p,
            f"finetune-{name}",
            base.config,
            train_set,
            cfg,
            base_state=base.state_dict(),
            lora=lora,
            mlflow_run_id=run.info.run_id,
        )
        val = validation_loss(model, schedule, val_set, p.evaluate.val_images, seed=p.seed)
        trainable, _ = trainable_parameter_share(model)
        share = trainable / sum(t.numel() for t in base.parameters())
        save_adapter(model, Paths.adapters / name, class_names=train_set.class_names, overwrite=True)
        mlflow.log_metrics({"val_loss": val, "trainable_params": trainable, "trainable_share": share})
        mlflow.log_artifacts(str(Paths.adapters / name), "adapter")
        write_curve(Paths.plots / f"finetune-{name}_loss.csv", curve)
        version = tracking.register(
            p.mlflow.adapter_model_prefix + name,
            run.info.run_id,
            "adapter",
            {"r": lora.r, "alpha": lora.alpha, "val_loss": val, "base_fingerprint": base_config["fingerprint"]},
        )
        tracking.set_base_alias(p, base_config["fingerprint"])
        tracking.write_run_file(Paths.runs / f"finetune-{name}.json", run_id=run.info.run_id, model_version=version)
    print(
        f"adapter {name}: r={lora.r} alpha={lora.alpha} val loss {val:.4f}, {trainable} trainable params, version {version}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
