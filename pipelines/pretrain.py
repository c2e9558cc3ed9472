"""Stage pretrain: train the base UNet with Ray Train, save models/base, log and register it in MLflow."""

import dataclasses

import mlflow

from cdiff.checkpoint import save_model
from cdiff.data import load_imageset
from cdiff.samplers import sample
from cdiff.schedule import NoiseSchedule
from cdiff.train import validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, ray_session, stage
from pipelines.distributed import fit
from pipelines.outputs import write_curve, write_grid


@stage
def main() -> None:
    p = params()
    folder = Paths.prepared / p.data.base.name
    train_set, val_set = load_imageset(folder, "train"), load_imageset(folder, "val")
    model_cfg = dataclasses.replace(p.model)
    mkdirs(Paths.metrics, Paths.plots, Paths.runs, Paths.base_model.parent)
    with tracking.stage_run(p, "pretrain", p.data.base.name) as run, ray_session(p):
        model, curve = fit(p, "pretrain", model_cfg, train_set, p.train.base, mlflow_run_id=run.info.run_id)
        schedule = NoiseSchedule(p.diffusion)
        val = validation_loss(model, schedule, val_set, p.evaluate.val_images, seed=p.seed)
        fp = save_model(model, p.diffusion, Paths.base_model, overwrite=True)
        mlflow.log_metrics({"val_loss": val, "final_train_loss": curve[-1][1]})
        write_curve(Paths.plots / "pretrain_loss.csv", curve)
        ids = [c for c in range(len(model.class_names)) for _ in range(p.sample.per_class)]
        images = sample(
            model,
            schedule,
            ids,
            sampler=p.sample.sampler,
            steps=p.sample.steps,
            eta=p.sample.eta,
            guidance_scale=p.sample.guidance_scale,
            seed=p.seed,
        )
        write_grid(Paths.samples / "base.png", images, model.class_names, p.sample.per_class, "base model")
        mlflow.log_artifacts(str(Paths.base_model), "model")
        mlflow.log_artifact(str(Paths.samples / "base.png"), "samples")
        version = tracking.register(p.mlflow.base_model_name, run.info.run_id, "model", {"fingerprint": fp})
        tracking.write_run_file(
            Paths.runs / "pretrain.json", run_id=run.info.run_id, model_version=version, fingerprint=fp
        )
        tracking.write_run_file(
            Paths.metrics / "pretrain.json", val_loss=val, final_train_loss=curve[-1][1], steps=curve[-1][0]
        )
    print(f"base model: {Paths.base_model} (val loss {val:.4f}, version {version} of {p.mlflow.base_model_name})")


if __name__ == "__main__":
    main()
