"""Stage scripts: a bad params.yaml stops a stage at once with one line naming the key, exit code 2."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_bad_params_stop_a_stage_with_one_line(tmp_path):
    raw = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    raw["data"]["domains"]["inverted"]["lora"]["r"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {"PYTHONPATH": str(ROOT), "DVC_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "inverted"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "prepare: error: data.domains.inverted.lora.r: LoRA rank must be at least 1"
    assert not (tmp_path / "data").exists()
