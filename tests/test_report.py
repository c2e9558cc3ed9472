import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cdiff import report
from cdiff.cli import main as cdiff_main

HOSTILE = ["../../x", "<script>alert(1)</script>", "a|b", "T-shirt/top"]


def _domain_metrics(**overrides):
    m = {"fid_base": 10.0, "fid_adapter": 4.0, "gan_test_adapter": 0.75, "trainable_share": 0.01}
    return {**m, **overrides}


def test_domain_goals_met_and_missed():
    goals = {g["goal"]: g["met"] for g in report.domain_goals(_domain_metrics(), {"fid": 2.0})}
    assert all(goals.values()) and len(goals) == 4  # 6 of the 8 FID points from base to full: 75% of the way
    goals = report.domain_goals(_domain_metrics(fid_adapter=12.0, gan_test_adapter=0.5, trainable_share=0.05), None)
    assert [g["met"] for g in goals] == [False, False, False]
    halfway = report.domain_goals(_domain_metrics(fid_adapter=7.0), {"fid": 2.0})[-1]  # 3 of 8: 37.5%
    assert halfway["value"] == pytest.approx(0.375) and not halfway["met"]


def test_base_goals_use_the_judge_and_the_floor():
    m = {"gan_test_base": 0.7, "judge_test_accuracy": 0.9, "fid_base": 5.0, "fid_floor": 0.4}
    assert [g["met"] for g in report.base_goals(m)] == [False, False]  # 0.7 < 0.72; 5 > 4
    m.update(gan_test_base=0.8, fid_base=3.9)
    assert [g["met"] for g in report.base_goals(m)] == [True, True]


def test_hostile_class_names_stay_text_in_reports_and_write_only_the_given_file(tmp_path):
    table = report.table(["class", "accuracy"], [[n, 0.5] for n in HOSTILE])
    assert "<script>" not in table and "a\\|b" in table and len(table.splitlines()) == 2 + len(HOSTILE)
    out = tmp_path / "out"
    out.mkdir()
    report.plot_per_class(out / "per_class.png", {"adapter": dict.fromkeys(HOSTILE, 0.5)}, "hostile")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["per_class.png"]


def test_scorer_keys_for_mlflow_and_files_are_safe():
    from cdiff.names import safe_names

    keys = safe_names(HOSTILE)
    assert all("/" not in k and ".." not in k and "<" not in k for k in keys) and len(set(keys)) == len(keys)


def _summary(tmp_path) -> Path:
    goals = report.domain_goals(_domain_metrics(), None)
    metrics = {
        **_domain_metrics(),
        "fid_floor": 1.0,
        "judge_test_accuracy": 0.9,
        "r": 4,
        "alpha": 4.0,
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"settings": "ddim-50", "domains": {"digits": {"metrics": metrics, "goals": goals}}}))
    return path


def test_cdiff_compare_prints_one_row_per_domain(tmp_path, capsys):
    assert cdiff_main(["compare", str(_summary(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["domain", "fid_floor", "fid_base", "fid_adapter"]
    assert lines[1].split()[0] == "digits" and lines[1].split()[-1] == "3/3"
    assert cdiff_main(["compare", str(_summary(tmp_path)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fid_full"] is None


def test_cdiff_compare_without_a_run_is_one_line(tmp_path, capsys):
    assert cdiff_main(["compare", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dvc repro" in err[0]


def test_read_only_output_folder_is_refused_in_one_line():
    """Run as an unprivileged user (root writes anywhere), with a real read-only folder."""
    from cdiff.checkpoint import save_model
    from cdiff.config import DiffusionConfig
    from cdiff.model import UNet
    from tests.conftest import tiny_config

    work = Path(tempfile.mkdtemp(prefix="cdiff-ro-"))
    try:
        os.chmod(work, 0o755)
        save_model(UNet(tiny_config(), ["a", "b", "c"]), DiffusionConfig(timesteps=10), work / "model")
        for p in [work / "model", *(work / "model").iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        (work / "ro").mkdir(mode=0o555)
        os.chmod(work / "ro", 0o555)
        cmd = [
            sys.executable,
            "-m",
            "cdiff",
            "sample",
            str(work / "model"),
            "--n",
            "1",
            "-o",
            str(work / "ro" / "x.png"),
        ]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        assert out.returncode == 2, out.stderr
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and "is not writable" in err[0], out.stderr
        assert list((work / "ro").iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_a_full_fine_tune_no_better_than_the_base_gives_no_nan(tmp_path):
    """The share of the way to the full fine-tune has no meaning then: None (written as null, shown '-'), not NaN."""
    from cdiff.io import write_json

    goal = report.domain_goals(_domain_metrics(), {"fid": 50.0})[-1]
    assert goal["value"] is None and goal["met"] is False
    assert "| - | 0.5 |" in report.goals_table([goal])
    write_json(tmp_path / "summary.json", {"goals": [goal]})  # refused if it held NaN
