"""The report's Markdown: tables and the text of reports/report.md, reports/base/ and reports/DOMAIN/."""

from __future__ import annotations

import math
from dataclasses import replace

from cdiff.names import markdown_text
from cdiff.results import BaseSummary, DomainSummary, Goal, RunSummary, SweepPoint


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else markdown_text(v)

    lines = ["| " + " | ".join(markdown_text(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_table(goals: list[Goal]) -> str:
    def value(v):
        return "-" if v is None else f"{v:.4g}"

    rows = [
        f"| {markdown_text(g.goal)} | {value(g.value)} | {g.target:.4g} | {'met' if g.met else '**missed**'} |"
        for g in goals
    ]
    return "\n".join(["| goal | value | target | |", "|---|---:|---:|---|", *rows])


def _both(score) -> list[str]:
    """FID and GAN-test accuracy of a score, each with its interval where it has one ("n/a": no judge score)."""
    return ["n/a", "n/a"] if score is None else [score.shown("fid"), score.shown("gan_test")]


def _all(score) -> list:
    """FID (bias-corrected, its interval), the raw FID at this count, KID and GAN-test accuracy of a score."""
    if score is None:
        return ["n/a"] * 5
    return [score.shown("fid"), score.fid_raw, score.shown("kid"), score.shown("gan_test"), score.shown("cas")]


SCORE_COLUMNS = ["FID", "raw FID", "KID", "GAN-test accuracy", "CAS"]
ESTIMATES = (
    "FID is bias-corrected (2F - median of its bootstrap, cdiff.bootstrap) with its basic bootstrap 95% interval;"
    " raw FID is the FID as measured at this count, biased upwards by about features/images. KID (unbiased at any"
    " count): mean ± std over subsets. CAS: a classifier of the judge's architecture trained on the images alone,"
    " its accuracy on the real test split (the judge's real accuracy is its ceiling; unlike GAN-test it punishes"
    " missing diversity). Every interval resamples within each class."
)


def _raw(score) -> str:
    return "-" if score.fid_raw is None else f"{score.fid_raw:.4g}"


def _vs_full(d) -> str:
    return "" if d.full is None else f" Adapter minus full fine-tune: FID {_compared(d.adapter_vs_full_fid)}."


def _compared(c) -> str:
    return "n/a" if c is None else c.shown()


def _fid(score) -> str:
    """FID with its interval ("n/a": no judge score)."""
    return "n/a" if score is None else score.shown("fid")


def _sweep(points: list[SweepPoint], over: str) -> str:
    rows = [
        [p.setting, p.score.shown("fid"), p.score.shown("kid"), p.score.shown("gan_test"), p.seconds] for p in points
    ]
    return table([over, "FID", "KID", "GAN-test", "seconds"], rows)


def base_page(dataset: str, source: str, settings: str, base: BaseSummary, sweeps: dict, sweep_per_class: int) -> str:
    e = base.evaluation
    rows = [["real train (floor)", *_all(e.floor)], ["base model", *_all(e.base)]]
    return f"""# Base model on {dataset} ({source})

Sampling: {settings}. Judge: a CNN trained on the real train split, {e.judge_test_accuracy:.1%} real test accuracy.
FID is measured in the judge's feature space against the real test split; the floor is real train images vs that split.
{ESTIMATES}

{table(["", *SCORE_COLUMNS], rows)}

Validation loss after {base.pretrain.steps} steps: {base.pretrain.val_loss:.4f}.

## Quality goals

{goals_table(base.goals)}

## Guidance sweep ({sweep_per_class} samples per class each)

{_sweep(sweeps["guidance"], "guidance")}

![guidance](sweep_guidance.png)

## Sampler sweep

{_sweep(sweeps["sampler"], "sampler")}

![sampler](sweep_sampler.png)

## Samples, loss, accuracy per class

![samples](samples.png)
![loss](loss.png)
![per class](gan_test_per_class.png)
"""


def domain_page(name: str, source: str, transforms: list[str], settings: str, d: DomainSummary) -> str:
    e = d.evaluation
    rows = [
        ["real train (floor)", *_all(e.floor), None, None],
        ["base alone", *_all(e.base), e.test_loss_base, "0"],
        [
            f"LoRA r={e.r} alpha={e.alpha:g}",
            *_all(e.adapter),
            e.test_loss_adapter,
            str(e.trainable_params),
        ],
    ]
    if d.full is not None:
        f = d.full
        rows.append(["full fine-tune", *_all(f.score), f.test_loss, str(f.trainable_params)])
    return f"""# Domain {name} ({source}, transforms {transforms or "none"})

Sampling: {settings}. Judge: a CNN trained on this domain's real train split, {e.judge_test_accuracy:.1%} real test accuracy.
{ESTIMATES}{f" n/a: {e.judge_note}." if e.judge_note else ""}

{table(["model", *SCORE_COLUMNS, "test loss", "trainable params"], rows)}

Adapter minus base, paired on the same real split (its bootstrap 95% interval; for FID lower is better):
FID {_compared(e.adapter_vs_base_fid)}, GAN-test accuracy {_compared(e.adapter_vs_base_gan_test)}.{_vs_full(d)}

LoRA: rank {e.r}, alpha {e.alpha:g}, lr {d.lr:.3g} (chosen by Ray Tune), {e.trainable_share:.2%} of the base's parameters.

## Quality goals

{goals_table(d.goals)}

## Samples, loss, accuracy per class

![samples](samples.png)
![loss](loss.png)
![per class](gan_test_per_class.png)
"""


def index_page(dataset: str, summary: RunSummary) -> str:
    b = summary.base.evaluation
    rows = [
        [
            name,
            _fid(d.evaluation.floor),
            _fid(d.evaluation.base),
            _fid(d.evaluation.adapter),
            _compared(d.evaluation.adapter_vs_base_fid),
            d.full.score.shown("fid") if d.full else None,
            _compared(d.adapter_vs_full_fid) if d.full else None,
            "n/a" if d.evaluation.adapter is None else d.evaluation.adapter.shown("kid"),
            _both(d.evaluation.adapter)[1],
            "n/a" if d.evaluation.adapter is None else d.evaluation.adapter.shown("cas"),
            d.evaluation.judge_test_accuracy,
        ]
        for name, d in summary.domains.items()
    ]
    header = ["domain", "FID floor", "FID base", "FID adapter", "adapter - base FID", "FID full FT"]
    header += ["adapter - full FT FID", "KID adapter"]
    header += ["GAN-test adapter", "CAS adapter", "judge accuracy"]
    goals = [replace(g, goal=f"base: {g.goal}") for g in summary.base.goals]
    goals += [replace(g, goal=f"{n}: {g.goal}") for n, d in summary.domains.items() for g in d.goals]
    return f"""# cdiff results

Generated by `dvc repro` (stage `report`) from metrics/, plots/ and samples/. Sampling: {summary.settings}.

Base on {dataset}: FID {b.base.shown("fid")} (floor {b.floor.shown("fid")}; raw FID at {b.base.images} images
{_raw(b.base)}), KID {b.base.shown("kid")}, GAN-test accuracy {b.base.shown("gan_test")}, CAS {b.base.shown("cas")}
(judge {b.judge_test_accuracy:.1%}).
{ESTIMATES} Details: [base/report.md](base/report.md).

{table(header, rows)}

Per domain: {", ".join(f"[{n}]({n}/report.md)" for n in summary.domains)}.

## Quality goals

{goals_table(goals)}
"""
