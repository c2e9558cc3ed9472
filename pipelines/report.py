"""Stage report: reports/ from the metrics, curves and sample grids of the whole run.

reports/report.md (every domain and the quality goals), reports/base/ (sweeps, pretraining curve,
samples) and reports/DOMAIN/ (base | adapter | full fine-tune grids, loss curves, per-class
GAN-test accuracy, report.md). Each report.md is also logged to its MLflow run.
"""

import shutil

import mlflow

from cdiff import report as r
from cdiff.io import Artefact, atomic_dir, atomic_write, read_json, write_json
from pipelines import tracking
from pipelines.common import Paths, params, sampler_spec, stage

REPORT = Artefact("report folder", folder=True, marker="summary.json", format="cdiff-report")


@stage
def main() -> None:
    p = params()
    settings = f"{sampler_spec(p)}, guidance {p.sample.guidance_scale}, {p.evaluate.fid_per_class} samples per class"
    summary = {"format": REPORT.format, "settings": settings, "domains": {}}
    with atomic_dir(Paths.reports, REPORT, overwrite=True) as out:
        summary["base"] = base_report(p, out / "base", settings)
        for name in p.data.domains:
            summary["domains"][name] = domain_report(p, name, out / name, settings)
        write_json(out / "summary.json", summary)
        with atomic_write(out / "report.md") as tmp:
            tmp.write_text(index(p, summary))
    tracking.setup(p)
    log_report(tracking.read_run_file(Paths.runs / "pretrain.json")["run_id"], "base")
    for name in p.data.domains:
        log_report(tracking.read_run_file(Paths.runs / f"finetune-{name}.json")["run_id"], name)
    missed = [
        g["goal"] for part in [summary["base"], *summary["domains"].values()] for g in part["goals"] if not g["met"]
    ]
    print(f"report: {Paths.reports / 'report.md'} ({len(missed)} quality goals missed)")


def base_report(p, out, settings: str) -> dict:
    out.mkdir()
    m = read_json(Paths.metrics / "base.json", "base metrics")
    pretrain = read_json(Paths.metrics / "pretrain.json", "pretrain metrics")
    r.plot_curves(out / "loss.png", {"pretrain": r.read_csv(Paths.plots / "pretrain_loss.csv")}, "base pretraining")
    guidance, samplers = r.read_csv(Paths.plots / "sweep_guidance.csv"), r.read_csv(Paths.plots / "sweep_sampler.csv")
    r.plot_sweep(out / "sweep_guidance.png", guidance, "guidance", f"guidance sweep ({sampler_spec(p)})")
    r.plot_sweep(out / "sweep_sampler.png", samplers, "sampler", f"sampler sweep (guidance {p.sample.guidance_scale})")
    r.plot_per_class(out / "gan_test_per_class.png", m["gan_test_per_class"], "base: GAN-test accuracy per class")
    shutil.copyfile(Paths.samples / "base.png", out / "samples.png")
    goals = r.base_goals(m)
    text = f"""# Base model on {p.data.base.name} ({p.data.base.source})

Sampling: {settings}. Judge: a CNN trained on the real train split, {m["judge_test_accuracy"]:.1%} real test accuracy.
FID is measured in the judge's feature space against the real test split; the floor is real train images vs that split.

{r.table(["", "FID", "GAN-test accuracy"], [["real train (floor)", m["fid_floor"], m["gan_test_floor"]], ["base model", m["fid_base"], m["gan_test_base"]]])}

Validation loss after {pretrain["steps"]} steps: {pretrain["val_loss"]:.4f}.

## Quality goals

{r.goals_table(goals)}

## Guidance sweep ({p.evaluate.sweep_per_class} samples per class each)

{r.table(["guidance", "FID", "GAN-test", "seconds"], _sweep(guidance, "guidance"))}

![guidance](sweep_guidance.png)

## Sampler sweep

{r.table(["sampler", "FID", "GAN-test", "seconds"], _sweep(samplers, "sampler"))}

![sampler](sweep_sampler.png)

## Samples, loss, accuracy per class

![samples](samples.png)
![loss](loss.png)
![per class](gan_test_per_class.png)
"""
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text(text)
    return {"metrics": {k: v for k, v in m.items() if k != "gan_test_per_class"}, "goals": goals}


def _sweep(rows: list[dict], key: str) -> list[list]:
    return [[row[key], float(row["fid"]), float(row["gan_test"]), float(row["seconds"])] for row in rows]


def domain_report(p, name: str, out, settings: str) -> dict:
    out.mkdir()
    m = read_json(Paths.metrics / f"{name}.json", "domain metrics")
    full = (
        read_json(Paths.metrics / f"full-{name}.json", "full fine-tune metrics")
        if name in p.evaluate.full_finetune
        else None
    )
    grids = {
        "base alone": Paths.samples / name / "base.png",
        "base + LoRA adapter": Paths.samples / name / "adapter.png",
    }
    curves = {"LoRA adapter": r.read_csv(Paths.plots / f"finetune-{name}_loss.csv")}
    per_class = dict(m["gan_test_per_class"])
    rows = [
        ["real train (floor)", m["fid_floor"], m["gan_test_floor"], "", ""],
        ["base alone", m["fid_base"], m["gan_test_base"], m["test_loss_base"], "0"],
        [
            f"LoRA r={m['r']} alpha={m['alpha']:g}",
            m["fid_adapter"],
            m["gan_test_adapter"],
            m["test_loss_adapter"],
            str(m["trainable_params"]),
        ],
    ]
    if full is not None:
        grids["full fine-tune"] = Paths.samples / f"full-{name}.png"
        curves["full fine-tune"] = r.read_csv(Paths.plots / f"full-{name}_loss.csv")
        per_class["full"] = full["gan_test_per_class"]
        rows.append(["full fine-tune", full["fid"], full["gan_test"], full["test_loss"], str(full["trainable_params"])])
    r.side_by_side(out / "samples.png", grids, f"{name}: one row per class, same seed")
    r.plot_curves(out / "loss.png", curves, f"{name}: fine-tuning loss")
    r.plot_per_class(out / "gan_test_per_class.png", per_class, f"{name}: GAN-test accuracy per class")
    goals = r.domain_goals(m, full)
    text = f"""# Domain {name} ({p.domain(name).source}, transforms {p.domain(name).transforms or "none"})

Sampling: {settings}. Judge: a CNN trained on this domain's real train split, {m["judge_test_accuracy"]:.1%} real test accuracy.

{r.table(["model", "FID", "GAN-test accuracy", "test loss", "trainable params"], rows)}

LoRA: rank {m["r"]}, alpha {m["alpha"]:g}, lr {m["lr"]:.3g} (chosen by Ray Tune), {m["trainable_share"]:.2%} of the base's parameters.

## Quality goals

{r.goals_table(goals)}

## Samples, loss, accuracy per class

![samples](samples.png)
![loss](loss.png)
![per class](gan_test_per_class.png)
"""
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text(text)
    metrics = {k: v for k, v in m.items() if k != "gan_test_per_class"}
    if full is not None:
        metrics.update({f"full_{k}": v for k, v in full.items() if k != "gan_test_per_class"})
    return {"metrics": metrics, "goals": goals}


def index(p, summary: dict) -> str:
    b = summary["base"]["metrics"]
    rows = []
    for name, d in summary["domains"].items():
        m = d["metrics"]
        rows.append(
            [
                name,
                m["fid_floor"],
                m["fid_base"],
                m["fid_adapter"],
                m.get("full_fid", float("nan")),
                m["gan_test_adapter"],
                m["judge_test_accuracy"],
            ]
        )
    goals = [{**g, "goal": f"base: {g['goal']}"} for g in summary["base"]["goals"]]
    goals += [{**g, "goal": f"{n}: {g['goal']}"} for n, d in summary["domains"].items() for g in d["goals"]]
    return f"""# cdiff results

Generated by `dvc repro` (stage `report`) from metrics/, plots/ and samples/. Sampling: {summary["settings"]}.

Base on {p.data.base.name}: FID {b["fid_base"]:.3g} (floor {b["fid_floor"]:.3g}), GAN-test accuracy {b["gan_test_base"]:.1%}
(judge {b["judge_test_accuracy"]:.1%}). Details: [base/report.md](base/report.md).

{r.table(["domain", "FID floor", "FID base", "FID adapter", "FID full FT", "GAN-test adapter", "judge accuracy"], rows)}

Per domain: {", ".join(f"[{n}]({n}/report.md)" for n in summary["domains"])}.

## Quality goals

{r.goals_table(goals)}
"""


def log_report(run_id: str, name: str) -> None:
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(Paths.reports / name), "report")


if __name__ == "__main__":
    main()
