"""Stage full_finetune@DOMAIN: the reference a LoRA adapter should approach, all weights trained.

Only for the domains listed in evaluate.full_finetune. Trains a copy of the base on the domain
with Ray Train (train.full), then scores it as evaluate@DOMAIN scores the adapter.
"""

import sys

from cdiff import results
from cdiff.checkpoint import load_model, save_model
from cdiff.data import load_imageset
from cdiff.grid import sample_grid
from cdiff.train import validation_loss
from pipelines.core import distributed, tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.jobs import Weights, job_for
from pipelines.core.layout import make_parents, paths
from pipelines.core.scoring import Scorer


@stage
def main(name: str) -> None:
    p = params()
    p.domain(name)
    train_set, test_set = (load_imageset(paths.prepared(name), split) for split in ("train", "test"))
    base, schedule, base_config = load_model(paths.base_model)
    metrics, grid = paths.full_metrics(name), paths.full_grid(name)
    make_parents(paths.full_model(name), metrics, paths.per_class(metrics), paths.full_curve(name), grid)
    make_parents(paths.judged(name, "full"))
    with tracking.stage_run(p, "full_finetune", name) as run_id:
        tracking.log_params({"base_fingerprint": base_config.fingerprint})
        with distributed.session(p):
            job = job_for(p, "full", train_set, p.train.full, base=Weights.of(base), grid=p.sampler)
            model, curve = distributed.fit(p, job, mlflow_run_id=run_id)
        extra = {"base_fingerprint": base_config.fingerprint}
        save_model(model, p.diffusion, paths.full_model(name), extra=extra, overwrite=True)
        scorer = Scorer(
            paths.judge(name), test_set, p.evaluate.fid_per_class, p.seed, p.sample, p.evaluate.cas(p.judge)
        )
        judged = scorer.model(model, schedule, p.sampler)
        result = results.FullFinetuneResult(
            judged.score,
            validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed),
            sum(t.numel() for t in model.parameters()),
        )
        per_class = results.PerClass({"full": judged.per_class})
        results.save(metrics, result)
        results.save(paths.per_class(metrics), per_class)
        results.save_curve(paths.full_curve(name), curve)
        judged.judgement.kept(scorer.reference).save(paths.judged(name, "full"))  # for the report's comparison
        classes = list(range(len(train_set.class_names)))
        sample_grid(grid, model, schedule, p.sampler, classes, p.sample.per_class, seed=p.seed, title=f"{name}: full")
        tracking.log_result(result)
        tracking.log_result(per_class)
        tracking.log_files(paths.full_model(name), "model")
        tracking.log_files(grid, "samples")
    score = f"FID {result.score.fid:.2f}, GAN-test {result.score.gan_test:.3f}"
    summary(f"full fine-tune of {result.trainable_params} params", score, paths.show(paths.full_model(name)))


if __name__ == "__main__":
    main(sys.argv[1])
