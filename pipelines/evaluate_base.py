"""Stage evaluate_base: the base model on its own dataset, and the guidance and sampler sweeps.

Judge FID and GAN-test accuracy at the pipeline's sampling settings, against the real floor;
then FID, accuracy and time for each guidance scale (evaluate.guidance_sweep) and each sampler
(evaluate.sampler_sweep), written as CSVs for `dvc plots` and the report. A setting that both
sweeps hold (the pipeline's own sampler and guidance) is sampled once.
"""

from dataclasses import replace

from cdiff import results
from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.samplers import Sampler
from pipelines.core import tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths
from pipelines.core.scoring import Judged, Scorer


@stage
def main() -> None:
    p = params()
    e, dataset = p.evaluate, p.data.base.name
    train_set, test_set = (load_imageset(paths.prepared(dataset), split) for split in ("train", "test"))
    judge = results.load(paths.judge_metrics(dataset), results.JudgeResult)
    scorer = Scorer(paths.judge(dataset), test_set, e.fid_per_class, p.seed, p.sample, e.cas(p.judge))
    model, schedule, _ = load_model(paths.base_model)
    floor, base = scorer.floor(train_set), scorer.model(model, schedule, p.sampler)
    swept: dict[Sampler, Judged] = {}

    def point(setting: str, sampler: Sampler) -> results.SweepPoint:
        if sampler not in swept:
            swept[sampler] = scorer.model(model, schedule, sampler, e.sweep_per_class, cas=False)  # FID, KID, GAN-test
        return results.SweepPoint(setting, swept[sampler].score, swept[sampler].seconds)

    sweeps = {
        "guidance": [point(f"{g:g}", replace(p.sampler, guidance_scale=g)) for g in e.guidance_sweep],
        "sampler": [point(s, Sampler.parse(s, p.sampler.eta, p.sampler.guidance_scale)) for s in e.sampler_sweep],
    }
    evaluation = results.BaseEvaluation(
        floor.score, base.score, judge.test_accuracy, p.sampler.label, p.sampler.guidance_scale
    )
    per_class = results.PerClass({"base": base.per_class})
    make_parents(paths.base_metrics, paths.per_class(paths.base_metrics), *map(paths.sweep, sweeps))
    results.save(paths.base_metrics, evaluation)
    results.save(paths.per_class(paths.base_metrics), per_class)
    for over, points in sweeps.items():
        results.save_sweep(paths.sweep(over), over, points)
    with tracking.reopen(p, paths.pretrain_run):
        tracking.log_result(evaluation)
        tracking.log_result(per_class)
        for over, points in sweeps.items():
            tracking.log_sweep(over, points)
    metric = f"FID {base.score.fid:.2f} (floor {floor.score.fid:.2f}), GAN-test {base.score.gan_test:.3f}"
    summary(f"base scored, {len(swept)} sweep points", metric, paths.show(paths.base_metrics))


if __name__ == "__main__":
    main()
