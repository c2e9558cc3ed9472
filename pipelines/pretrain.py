"""Stage pretrain: train the base UNet with Ray Train, save models/base, log and register it in MLflow."""

from cdiff import results
from cdiff.checkpoint import save_model
from cdiff.data import load_imageset
from cdiff.grid import sample_grid
from cdiff.schedule import NoiseSchedule
from cdiff.train import validation_loss
from pipelines.core import distributed, registry, tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.jobs import job_for
from pipelines.core.layout import make_parents, paths


@stage
def main() -> None:
    p = params()
    folder = paths.prepared(p.data.base.name)
    train_set, val_set = load_imageset(folder, "train"), load_imageset(folder, "val")
    make_parents(paths.base_model, paths.base_grid, paths.pretrain_metrics, paths.pretrain_curve, paths.pretrain_run)
    with tracking.stage_run(p, "pretrain", p.data.base.name) as run_id:
        with distributed.session(p):
            model, curve = distributed.fit(
                p, job_for(p, "base", train_set, p.train.base, grid=p.sampler), mlflow_run_id=run_id
            )
        schedule = NoiseSchedule(p.diffusion)
        result = results.PretrainResult(
            validation_loss(model, schedule, val_set, p.evaluate.val_images, seed=p.seed), curve[-1][1], curve[-1][0]
        )
        fp = save_model(model, p.diffusion, paths.base_model, overwrite=True)
        results.save(paths.pretrain_metrics, result)
        results.save_curve(paths.pretrain_curve, curve)
        classes = list(range(len(model.class_names)))
        sample_grid(
            paths.base_grid, model, schedule, p.sampler, classes, p.sample.per_class, seed=p.seed, title="base model"
        )
        tracking.log_result(result)
        tracking.log_files(paths.base_model, "model")
        tracking.log_files(paths.base_grid, "samples")
        tags = registry.VersionTags(fingerprint=fp)
        version = registry.log_servable(p.mlflow.base_model_name, paths.base_model, None, p.sampler, tags)
        tracking.save_run_record(paths.pretrain_run, run_id, version, fp)
    where = f"{paths.show(paths.base_model)}, MLflow {p.mlflow.base_model_name} v{version}"
    summary(f"base model, {result.steps} steps", f"val loss {result.val_loss:.4f}", where)


if __name__ == "__main__":
    main()
