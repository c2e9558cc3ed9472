"""Result records: one JSON form, read back typed; NaN refused; the run summary `cdiff compare` reads."""

import dataclasses
import json
import math

import pytest

from cdiff import results
from cdiff.cli import main as cdiff_main
from cdiff.errors import CdiffError
from tests.test_report import domain_evaluation, full


def run_summary(with_full: bool = False) -> results.RunSummary:
    base = results.BaseSummary(
        results.PretrainResult(0.2, 0.25, 700),
        results.BaseEvaluation(results.Score(4.0, 0.85, 300), results.Score(60.0, 0.8, 300), 0.85, "ddim-50", 2.0),
        [results.Goal("FID within 10x of the real-vs-real floor", 60.0, 40.0, False)],
    )
    goals = [results.Goal("GAN-test accuracy >= 70%", 0.75, 0.7, True), results.Goal("x", None, 0.5, False)]
    domain = results.DomainSummary(domain_evaluation(), 3e-3, full(2.0) if with_full else None, goals)
    return results.RunSummary("ddim-50, guidance 2, 30 samples per class", base, {"digits": domain})


def test_records_round_trip_typed(tmp_path):
    for record in (
        run_summary(),
        run_summary(with_full=True),
        domain_evaluation(),
        results.PerClass({"a": {"0": 1.0}}),
    ):
        results.save(tmp_path / "r.json", record)
        assert results.load(tmp_path / "r.json", type(record)) == record


def test_a_nan_result_is_not_written(tmp_path):
    bad = results.PretrainResult(math.nan, 0.1, 3)
    with pytest.raises(CdiffError, match="pretrain.json: a result is nan"):
        results.save(tmp_path / "pretrain.json", bad)
    assert not (tmp_path / "pretrain.json").exists()


def test_an_outdated_or_foreign_record_is_one_line(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"fid_base": 3.0, "fid_adapter": 2.0}))
    with pytest.raises(CdiffError, match="^old.json") as err:
        results.load(tmp_path / "old.json", results.DomainEvaluation)
    assert "\n" not in str(err.value)


def test_scalars_are_dotted_numbers():
    flat = results.scalars(domain_evaluation())
    assert flat["adapter.fid"] == 4.0 and flat["floor.images"] == 40.0 and flat["r"] == 4.0
    assert all(isinstance(v, float) for v in flat.values())


def test_sweeps_and_curves_round_trip(tmp_path):
    full = results.Score(3.0, 0.9, 20, [2.5, 3.5], [0.8, 0.95], fid_raw=4.0, kid=0.01)
    points = [results.SweepPoint("ddpm", full, 12.5), results.SweepPoint("ddim-5", results.Score(5.0, 0.7, 20), 1.0)]
    results.save_sweep(tmp_path / "sweep.csv", "sampler", points)
    assert (tmp_path / "sweep.csv").read_text().splitlines() == [
        "sampler,fid,fid_low,fid_high,fid_raw,kid,gan_test,gan_test_low,gan_test_high,seconds,images",
        "ddpm,3.000000,2.500000,3.500000,4.000000,0.010000,0.900000,0.800000,0.950000,12.500,20",
        "ddim-5,5.000000,,,,,0.700000,,,1.000,20",  # no interval: empty cells
    ]
    assert results.load_sweep(tmp_path / "sweep.csv") == points
    (tmp_path / "old.csv").write_text("sampler,fid,gan_test,seconds,images\nddpm,3.0,0.9,12.5,20\n")
    with pytest.raises(CdiffError, match="is not a sweep CSV"):
        results.load_sweep(tmp_path / "old.csv")
    results.save_curve(tmp_path / "loss.csv", [(5, 0.5), (10, 0.25)])
    assert results.load_curve(tmp_path / "loss.csv") == [(5, 0.5), (10, 0.25)]


def test_cdiff_compare_prints_one_row_per_domain(tmp_path, capsys):
    results.save(tmp_path / "summary.json", run_summary())
    assert cdiff_main(["compare", str(tmp_path / "summary.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["domain", "fid_floor", "fid_floor_95", "fid_base", "fid_base_95"]
    assert lines[1].split()[0] == "digits" and lines[1].split()[-1] == "1/2"
    assert cdiff_main(["compare", str(tmp_path / "summary.json"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fid_full"] is None and rows[0]["fid_adapter"] == 4.0
    results.save(tmp_path / "summary.json", run_summary(with_full=True))
    assert cdiff_main(["compare", str(tmp_path / "summary.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fid_full"] == 2.0


def test_cdiff_compare_gives_every_fid_its_interval(tmp_path, capsys):
    run = run_summary()
    domain = run.domains["digits"]
    ev = dataclasses.replace(
        domain.evaluation,
        floor=results.Score(1.0, 0.9, 40, [0.0, 2.5]),
        base=results.Score(10.0, 0.3, 40, [8.5, 11.5]),
        adapter=results.Score(4.0, 0.75, 40, [3.5, 4.5]),
    )
    run = dataclasses.replace(run, domains={"digits": dataclasses.replace(domain, evaluation=ev)})
    results.save(tmp_path / "summary.json", run)
    assert cdiff_main(["compare", str(tmp_path / "summary.json"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["fid_floor_95"], row["fid_base_95"], row["fid_adapter_95"]) == ([0.0, 2.5], [8.5, 11.5], [3.5, 4.5])
    assert cdiff_main(["compare", str(tmp_path / "summary.json")]) == 0
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:5] == ["domain", "fid_floor", "fid_floor_95", "fid_base", "fid_base_95"]
    assert "[8.5, 11.5]" in line


def test_cdiff_compare_without_a_run_or_with_an_old_summary_is_one_line(tmp_path, capsys):
    assert cdiff_main(["compare", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "old.json").write_text(json.dumps({"settings": "x", "domains": {"d": {"metrics": {}, "goals": []}}}))
    assert cdiff_main(["compare", str(tmp_path / "old.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "dvc repro" in err[0] and err[1].startswith("cdiff: error: old.json")


def test_a_score_shows_its_intervals_and_compares_only_beyond_them():
    a = results.Score(40.0, 0.8, 300, [35.0, 45.0], [0.75, 0.85])
    assert a.shown("fid") == "40 [35, 45]" and a.shown("gan_test") == "80.0% [75.0%, 85.0%]"
    assert results.Score(40.0, 0.8, 300).shown("fid") == "40"
    better, tie = results.Score(30.0, 0.9, 300, [27.0, 34.0]), results.Score(38.0, 0.8, 300, [33.0, 44.0])
    assert better.fid_beats(a) is True and a.fid_beats(better) is False
    assert tie.fid_beats(a) is None and a.fid_beats(tie) is None  # overlapping intervals: a tie
    assert results.scalars(a) == pytest.approx(
        {
            "fid": 40,
            "gan_test": 0.8,
            "images": 300,
            "fid_low": 35,
            "fid_high": 45,
            "gan_test_low": 0.75,
            "gan_test_high": 0.85,
        }
    )


def test_without_kept_images_the_champion_moves_only_beyond_both_intervals(tmp_path, monkeypatch):
    # the fallback for versions whose judged images were not kept: the two intervals are compared
    from mlflow.tracking import MlflowClient

    from pipelines.core import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)  # explicit: an earlier test's mlflow.set_tracking_uri outranks the variable
    client.create_registered_model("cdiff-adapter-x")
    versions = [str(client.create_model_version("cdiff-adapter-x", str(tmp_path / f"m{i}")).version) for i in range(4)]
    scores = [(50.0, [45.0, 55.0]), (48.0, [44.0, 53.0]), (60.0, [57.0, 64.0]), (30.0, [27.0, 34.0])]
    crowned = [
        registry.set_champion("cdiff-adapter-x", v, results.Score(fid, 0.8, 300, ci))
        for v, (fid, ci) in zip(versions, scores, strict=True)
    ]
    first, tie, worse, better = versions
    assert [(c.champion, c.why) for c in crowned] == [
        (first, "first"),
        (first, "tie"),
        (first, "worse"),
        (better, "better"),
    ]
    assert crowned[1].comparison == results.Comparison(-2.0, None, "tie", paired=False)
    champion = client.get_model_version_by_alias("cdiff-adapter-x", "champion")
    assert str(champion.version) == better
    tags = registry.VersionTags.read(champion.tags)
    assert (tags.fid, tags.fid_low, tags.fid_high) == (30.0, 27.0, 34.0)
