"""Stage evaluate_base: the base model on its own dataset, and the guidance and sampler sweeps.

Judge FID and GAN-test accuracy at the pipeline's sampling settings, against the real floor;
then FID, accuracy and time for each guidance scale (evaluate.guidance_sweep) and each sampler
(evaluate.sampler_sweep), written as CSVs for `dvc plots` and the report.
"""

import mlflow

from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.io import atomic_write, write_json
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, sampler_spec, stage
from pipelines.quality import Scorer


@stage
def main() -> None:
    p = params()
    e = p.evaluate
    folder = Paths.prepared / p.data.base.name
    train_set, test_set = load_imageset(folder, "train"), load_imageset(folder, "test")
    scorer = Scorer(p, p.data.base.name, test_set)
    model, schedule, _ = load_model(Paths.base_model)
    floor = scorer.floor(train_set)
    base = scorer.model(model, schedule)
    guidance = [(g, scorer.model(model, schedule, per_class=e.sweep_per_class, guidance=g)) for g in e.guidance_sweep]
    samplers = [(s, scorer.model(model, schedule, per_class=e.sweep_per_class, sampler=s)) for s in e.sampler_sweep]
    mkdirs(Paths.metrics, Paths.plots)
    write_json(
        Paths.metrics / "base.json",
        {
            "fid_floor": floor["fid"],
            "fid_base": base["fid"],
            "gan_test_floor": floor["gan_test"],
            "gan_test_base": base["gan_test"],
            "judge_test_accuracy": scorer.judge_accuracy,
            "samples_per_class": e.fid_per_class,
            "sampler": sampler_spec(p),
            "guidance_scale": p.sample.guidance_scale,
            "gan_test_per_class": {"base": base["gan_test_per_class"]},
        },
    )
    rows = [f"{g},{r['fid']:.6f},{r['gan_test']:.6f},{r['seconds']:.3f}\n" for g, r in guidance]
    with atomic_write(Paths.plots / "sweep_guidance.csv") as tmp:
        tmp.write_text("guidance,fid,gan_test,seconds\n" + "".join(rows))
    rows = [f"{s},{r['fid']:.6f},{r['gan_test']:.6f},{r['seconds']:.3f}\n" for s, r in samplers]
    with atomic_write(Paths.plots / "sweep_sampler.csv") as tmp:
        tmp.write_text("sampler,fid,gan_test,seconds\n" + "".join(rows))
    run = tracking.read_run_file(Paths.runs / "pretrain.json")
    tracking.setup(p)
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics(
            {
                "fid_floor": floor["fid"],
                "fid_base": base["fid"],
                "gan_test_floor": floor["gan_test"],
                "gan_test_base": base["gan_test"],
                "judge_test_accuracy": scorer.judge_accuracy,
                **{f"gan_test_base.{k}": v for k, v in base["gan_test_per_class"].items()},
            }
        )
        for g, r in guidance:
            mlflow.log_metrics({f"sweep_guidance_{g:g}.fid": r["fid"], f"sweep_guidance_{g:g}.gan_test": r["gan_test"]})
        for s, r in samplers:
            mlflow.log_metrics(
                {f"sweep_{s}.fid": r["fid"], f"sweep_{s}.gan_test": r["gan_test"], f"sweep_{s}.seconds": r["seconds"]}
            )
    print(
        f"evaluate base: FID {base['fid']:.2f} (floor {floor['fid']:.2f}), GAN-test {base['gan_test']:.3f} "
        f"(judge's real test accuracy {scorer.judge_accuracy:.3f})"
    )


if __name__ == "__main__":
    main()
