"""Stage full_finetune@DOMAIN: the reference a LoRA adapter should approach, all weights trained.

Only for the domains listed in evaluate.full_finetune. Trains a copy of the base on the domain
with Ray Train (train.full), then scores it like evaluate@DOMAIN scores the adapter.
"""

import sys

import mlflow

from cdiff.checkpoint import load_model, save_model
from cdiff.data import load_imageset
from cdiff.io import write_json
from cdiff.samplers import sample
from cdiff.train import validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, ray_session, stage
from pipelines.distributed import fit
from pipelines.outputs import write_curve, write_grid
from pipelines.quality import Scorer


@stage
def main(name: str) -> None:
    p = params()
    p.domain(name)
    folder = Paths.prepared / name
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    base, schedule, base_config = load_model(Paths.base_model)
    mkdirs(Paths.full, Paths.metrics, Paths.plots)
    with tracking.stage_run(p, "full_finetune", name) as run, ray_session(p):
        mlflow.log_param("base_fingerprint", base_config["fingerprint"])
        model, curve = fit(
            p,
            f"full-{name}",
            base.config,
            train_set,
            p.train.full,
            base_state=base.state_dict(),
            mlflow_run_id=run.info.run_id,
        )
        extra = {"base_fingerprint": base_config["fingerprint"]}
        save_model(model, p.diffusion, Paths.full / name, extra=extra, overwrite=True)
        scores = Scorer(p, name, test_set).model(model, schedule)
        metrics = {
            "test_loss": validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed),
            "fid": scores["fid"],
            "gan_test": scores["gan_test"],
            "trainable_params": sum(t.numel() for t in model.parameters()),
            "samples_per_class": p.evaluate.fid_per_class,
            "gan_test_per_class": scores["gan_test_per_class"],
        }
        write_json(Paths.metrics / f"full-{name}.json", metrics)
        write_curve(Paths.plots / f"full-{name}_loss.csv", curve)
        s = p.sample
        ids = [c for c in range(len(train_set.class_names)) for _ in range(s.per_class)]
        images = sample(
            model,
            schedule,
            ids,
            sampler=s.sampler,
            steps=s.steps,
            eta=s.eta,
            guidance_scale=s.guidance_scale,
            seed=p.seed,
        )
        grid = Paths.samples / f"full-{name}.png"
        write_grid(grid, images, train_set.class_names, s.per_class, f"{name}: full fine-tune (seed {p.seed})")
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float | int)})
        mlflow.log_artifacts(str(Paths.full / name), "model")
        mlflow.log_artifact(str(grid), "samples")
    print(f"full fine-tune {name}: FID {scores['fid']:.2f}, GAN-test {scores['gan_test']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
