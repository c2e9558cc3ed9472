"""The report's pieces: quality goals from result records, Markdown tables and figures with hostile class names."""

from dataclasses import replace
from itertools import takewhile

import pytest

from cdiff.names import safe_names
from cdiff.results import (
    BaseEvaluation,
    BaseSummary,
    DomainEvaluation,
    DomainSummary,
    FullFinetuneResult,
    Goal,
    PretrainResult,
    RunSummary,
    Score,
)
from pipelines.core import figures, goals, pages

HOSTILE = ["../../x", "<script>alert(1)</script>", "a|b", "T-shirt/top"]


def domain_evaluation(fid_base=10.0, fid_adapter=4.0, gan_test=0.75, share=0.01) -> DomainEvaluation:
    return DomainEvaluation(
        floor=Score(1.0, 0.9, 40),
        base=Score(fid_base, 0.3, 40),
        adapter=Score(fid_adapter, gan_test, 40),
        test_loss_base=0.5,
        test_loss_adapter=0.4,
        judge_test_accuracy=0.9,
        r=4,
        alpha=4.0,
        trainable_params=100,
        trainable_share=share,
    )


def full(fid: float) -> FullFinetuneResult:
    return FullFinetuneResult(Score(fid, 0.8, 40), 0.3, 10_000)


def test_domain_goals_met_and_missed():
    met = goals.domain_goals(domain_evaluation(), full(2.0))
    assert all(g.met for g in met) and len(met) == 4  # 6 of the 8 FID points from base to full: 75% of the way
    missed = goals.domain_goals(domain_evaluation(fid_adapter=12.0, gan_test=0.5, share=0.05), None)
    assert [g.met for g in missed] == [False, False, False]
    halfway = goals.domain_goals(domain_evaluation(fid_adapter=7.0), full(2.0))[-1]  # 3 of 8: 37.5%
    assert halfway.value == pytest.approx(0.375) and not halfway.met


def test_a_full_fine_tune_no_better_than_the_base_leaves_the_share_undefined():
    share = goals.domain_goals(domain_evaluation(), full(11.0))[-1]
    assert share.value is None and not share.met
    assert "| - |" in pages.goals_table([share])


def test_base_goals_use_the_judge_and_the_raw_floor():
    def evaluation(gan_test, fid_raw):
        # bias-corrected, real vs real is about 0 (here -0.1): the floor goal compares the raw FIDs at one count
        floor = Score(-0.1, 0.9, 40, fid_raw=0.4)
        return BaseEvaluation(floor, Score(1.5, gan_test, 40, fid_raw=fid_raw), 0.9, "ddim-50", 2.0)

    assert [g.met for g in goals.base_goals(evaluation(0.7, 2.5))] == [False, False]  # 0.7 < 0.72; 2.5 > 6 x 0.4
    met = goals.base_goals(evaluation(0.8, 2.3))
    assert [g.met for g in met] == [True, True] and (met[1].value, met[1].target) == (2.3, pytest.approx(2.4))
    unmeasured = BaseEvaluation(Score(-0.1, 0.9, 40), Score(1.5, 0.8, 40), 0.9, "ddim-50", 2.0)
    assert not goals.base_goals(unmeasured)[1].met


def summary_rows(page: str) -> dict[str, dict[str, str]]:
    """The summary table of reports/report.md: domain -> column -> cell, as written (Markdown escapes kept)."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| domain |"))
    header = lines[start].strip("| ").split(" | ")
    rows = [line.strip("| ").split(" | ") for line in takewhile(lambda line: line.startswith("|"), lines[start + 2 :])]
    assert all(len(r) == len(header) for r in rows)
    return {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def test_the_summary_table_gives_the_floor_and_base_fids_with_their_intervals():
    scored = replace(
        domain_evaluation(),
        floor=Score(1.0, 0.9, 40, fid_interval=[0.25, 2.5]),
        base=Score(10.0, 0.3, 40, fid_interval=[8.5, 11.5]),
        adapter=Score(4.0, 0.75, 40, fid_interval=[3.5, 4.5]),
    )
    unscored = replace(domain_evaluation(), floor=None, base=None, adapter=None, judge_note="one class")
    base = BaseEvaluation(Score(0.1, 0.9, 40), Score(1.5, 0.8, 40), 0.9, "ddim-50", 2.0)
    run = RunSummary(
        "ddim-50, 4 samples per class",
        BaseSummary(PretrainResult(0.1, 0.1, 10), base, []),
        {"scored": DomainSummary(scored, 1e-3, None, []), "unscored": DomainSummary(unscored, 1e-3, None, [])},
    )
    rows = summary_rows(pages.index_page("fashion", run))
    assert rows["scored"]["FID floor"] == "1 \\[0.25, 2.5\\]"
    assert rows["scored"]["FID base"] == "10 \\[8.5, 11.5\\]"
    assert rows["scored"]["FID adapter"] == "4 \\[3.5, 4.5\\]"
    assert [rows["unscored"][c] for c in ("FID floor", "FID base", "FID adapter")] == ["n/a"] * 3


def test_hostile_class_names_stay_text_in_reports_and_write_only_the_given_file(tmp_path):
    table = pages.table(["class", "accuracy"], [[n, 0.5] for n in HOSTILE])
    assert "<script>" not in table and "a\\|b" in table and len(table.splitlines()) == 2 + len(HOSTILE)
    assert "<script>" not in pages.goals_table([Goal("<script>", 1.0, 2.0, False)])
    out = tmp_path / "out"
    out.mkdir()
    figures.plot_per_class(out / "per_class.png", {"adapter": dict.fromkeys(HOSTILE, 0.5)}, "hostile")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["per_class.png"]


def test_class_keys_for_mlflow_and_files_are_safe():
    keys = safe_names(HOSTILE)
    assert all("/" not in k and ".." not in k and "<" not in k for k in keys) and len(set(keys)) == len(keys)
