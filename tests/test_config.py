from pathlib import Path

import pytest
import yaml

from cdiff.config import DiffusionConfig, ModelConfig, TrainConfig, load_sections
from cdiff.errors import CdiffError
from pipelines.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, edit):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.data.base.source == "fashion-mnist" and len(p.data.domains) >= 2


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda r: r["data"]["domains"]["digits"]["lora"].update(r=0), "data.domains.digits.lora.r"),
        (lambda r: r["data"]["domains"]["digits"].update(source="nope"), "data.domains.digits.source"),
        (lambda r: r["train"]["base"].update(lr=-1.0), "train.base.lr"),
        (lambda r: r["data"]["domains"]["digits"].update(transforms=["blur"]), "data.domains.digits.transforms[0]"),
        (lambda r: r["model"].update(n_ctx="four"), "model.n_ctx"),
        (lambda r: r["model"].update(colour=3), "model.colour"),
        (lambda r: r["sample"].update(guidance_scale=float("nan")), "sample.guidance_scale"),
        (lambda r: r["ray"].update(num_workers=0), "ray.num_workers"),
        (lambda r: r["evaluate"].update(sampler_sweep=["ddim-0"]), "evaluate.sampler_sweep"),
        (lambda r: r["evaluate"].update(full_finetune=["cifar"]), "evaluate.full_finetune"),
        (lambda r: r["data"]["domains"].update(base=r["data"]["domains"]["digits"]), "data.domains.base"),
        (lambda r: r["judge"].update(features=0), "judge.features"),
        (lambda r: r["sample"].update(sampler="euler"), "sample.sampler"),
        (lambda r: r["data"]["domains"]["digits"].update(source="imagefolder:/tmp/pets"), "data.domains.digits.source"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, edit, key):
    with pytest.raises(CdiffError) as err:
        load_params(_write(tmp_path, edit))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_duplicate_domain_is_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    block = text[text.index("    digits:") : text.index("    fashion-rot90:")]
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(block, block + block))
    with pytest.raises(CdiffError, match="duplicate key 'digits'"):
        load_params(path)


def test_broken_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(CdiffError, match="not valid YAML"):
        load_params(path)


def test_image_folders_must_live_where_dvc_tracks_them(tmp_path):
    def edit(raw):
        raw["data"]["domains"]["digits"]["source"] = "imagefolder:data/images/pets"

    assert load_params(_write(tmp_path, edit)).domain("digits").source == "imagefolder:data/images/pets"


def test_library_sections_load_without_the_pipeline_sections(tmp_path):
    path = _write(tmp_path, lambda r: r.update(ray="not even a mapping", tune=None))
    sections = load_sections(path, {"model": ModelConfig, "diffusion": DiffusionConfig, "train.base": TrainConfig})
    assert sections["model"].base_channels == [24, 48, 96] and sections["train.base"].steps == 700
    with pytest.raises(CdiffError, match="^train.base.lr"):
        load_sections(_write(tmp_path, lambda r: r["train"]["base"].update(lr=-1.0)), {"train.base": TrainConfig})
    with pytest.raises(CdiffError, match="^judge.missing: missing from"):
        load_sections(path, {"judge.missing": TrainConfig})
