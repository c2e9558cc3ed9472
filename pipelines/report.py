"""Stage report: reports/ from the result records, curves and sample grids of the whole run.

reports/report.md (every domain and the quality goals), reports/summary.json (what `cdiff compare`
prints), reports/base/ (sweeps, pretraining curve, samples) and reports/DOMAIN/ (base | adapter |
full fine-tune grids, loss curves, per-class GAN-test accuracy, report.md). Each report folder is
also logged to its MLflow run.
"""

import shutil
from pathlib import Path

from cdiff import results
from cdiff.bootstrap import fid_difference
from cdiff.data import load_imageset
from cdiff.grid import real_grid
from cdiff.io import atomic_dir, atomic_write
from cdiff.metrics import JudgedFeatures
from pipelines.core import figures, goals, pages, tracking
from pipelines.core.config import Params, params
from pipelines.core.console import stage, summary
from pipelines.core.layout import paths


@stage
def main() -> None:
    p = params()
    settings = f"{p.sampler}, {p.evaluate.fid_per_class} samples per class"
    run = results.RunSummary(settings, base_summary(), {name: domain_summary(p, name) for name in p.data.domains})
    with atomic_dir(paths.reports, results.REPORT, overwrite=True) as out:
        base_folder(p, run, out / "base")
        for name, d in run.domains.items():
            domain_folder(p, name, d, settings, out / name)
        results.save(out / paths.summary.relative_to(paths.reports), run)
        with atomic_write(out / "report.md") as tmp:
            tmp.write_text(pages.index_page(p.data.base.name, run))
    with tracking.reopen(p, paths.pretrain_run):
        tracking.log_files(paths.reports / "base", "report")
    for name in p.data.domains:
        with tracking.reopen(p, paths.finetune_run(name)):
            tracking.log_files(paths.reports / name, "report")
    every = [*run.base.goals, *(g for d in run.domains.values() for g in d.goals)]
    missed = sum(not g.met for g in every)
    summary(f"report of {len(run.domains)} domains", f"{missed} of {len(every)} quality goals missed", "reports/")


def base_summary() -> results.BaseSummary:
    evaluation = results.load(paths.base_metrics, results.BaseEvaluation)
    pretrain = results.load(paths.pretrain_metrics, results.PretrainResult)
    return results.BaseSummary(pretrain, evaluation, goals.base_goals(evaluation))


def domain_summary(p: Params, name: str) -> results.DomainSummary:
    evaluation = results.load(paths.domain_metrics(name), results.DomainEvaluation)
    full = (
        results.load(paths.full_metrics(name), results.FullFinetuneResult) if name in p.evaluate.full_finetune else None
    )
    lr = results.load(paths.tune_best(name), results.TuneTrial, "tuned config").lr
    vs_full = adapter_minus_full(name, p.seed) if full is not None and evaluation.adapter is not None else None
    return results.DomainSummary(evaluation, lr, full, goals.domain_goals(evaluation, full), vs_full)


def adapter_minus_full(name: str, seed: int) -> results.Comparison | None:
    """The adapter's FID minus the full fine-tune's, paired on the real split both were judged against
    (None where they were judged under different references: another judge or split)."""
    real, adapter, full = (JudgedFeatures.load(paths.judged(name, what)) for what in ("real", "adapter", "full"))
    if not real.reference == adapter.reference == full.reference:
        return None
    pairs = [(j.features, j.labels) for j in (adapter, full, real)]
    return results.Comparison.of(fid_difference(*pairs, seed=seed))


def base_folder(p: Params, run: results.RunSummary, out: Path) -> None:
    out.mkdir()
    sweeps = {over: results.load_sweep(paths.sweep(over)) for over in ("guidance", "sampler")}
    per_class = results.load(paths.per_class(paths.base_metrics), results.PerClass).accuracy
    figures.plot_curves(out / "loss.png", {"pretrain": results.load_curve(paths.pretrain_curve)}, "base pretraining")
    figures.plot_sweep(
        out / "sweep_guidance.png", sweeps["guidance"], "guidance", f"guidance sweep ({p.sampler.label})"
    )
    figures.plot_sweep(out / "sweep_sampler.png", sweeps["sampler"], "sampler", f"sampler sweep ({p.sampler})")
    figures.plot_per_class(out / "gan_test_per_class.png", per_class, "base: GAN-test accuracy per class")
    shutil.copyfile(paths.base_grid, out / "samples.png")
    base = p.data.base
    text = pages.base_page(base.name, base.source, run.settings, run.base, sweeps, p.evaluate.sweep_per_class)
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text(text)


def domain_folder(p: Params, name: str, d: results.DomainSummary, settings: str, out: Path) -> None:
    out.mkdir()
    real_grid(out / "real.png", load_imageset(paths.prepared(name), "train"), p.sample.per_class)
    grids = {
        "real training images": out / "real.png",  # what the adapter learned from (image folders as prepared)
        "base alone": paths.domain_grid(name, "base"),
        "base + LoRA adapter": paths.domain_grid(name, "adapter"),
    }
    curves = {"LoRA adapter": results.load_curve(paths.finetune_curve(name))}
    per_class = results.load(paths.per_class(paths.domain_metrics(name)), results.PerClass).accuracy
    if d.full is not None:
        grids["full fine-tune"] = paths.full_grid(name)
        curves["full fine-tune"] = results.load_curve(paths.full_curve(name))
        per_class |= results.load(paths.per_class(paths.full_metrics(name)), results.PerClass).accuracy
    figures.side_by_side(out / "samples.png", grids, f"{name}: one row per class, same seed")
    figures.plot_curves(out / "loss.png", curves, f"{name}: fine-tuning loss")
    figures.plot_per_class(out / "gan_test_per_class.png", per_class, f"{name}: GAN-test accuracy per class")
    domain = p.domain(name)
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text(pages.domain_page(name, domain.source, domain.transforms, settings, d))


if __name__ == "__main__":
    main()
