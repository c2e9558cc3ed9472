from pathlib import Path

import pytest
import yaml

from cdiff.config import load_params, parse_sampler
from cdiff.errors import CdiffError

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
        (lambda r: r["diffusion"].update(prediction="score"), "diffusion.prediction"),
        (lambda r: r["diffusion"].update(min_snr_gamma=-1.0), "diffusion.min_snr_gamma"),
        (lambda r: r["train"]["base"].update(precision="fp16"), "train.base.precision"),
        (lambda r: r["train"]["lora"].update(compile="yes"), "train.lora.compile"),
        (lambda r: r["sample"].update(sampler="euler"), "sample.sampler"),
        (lambda r: r["sample"].update(precision="half"), "sample.precision"),
        (lambda r: r["evaluate"].update(sampler_sweep=["dpm++2m"]), "evaluate.sampler_sweep"),
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


def test_new_sampler_and_recipe_values_load(tmp_path):
    def edit(raw):
        raw["diffusion"].update(prediction="v", min_snr_gamma=5.0)
        raw["sample"].update(sampler="dpm++2m", steps=20, precision="bf16", compile=True, batch_size=1000)
        raw["evaluate"].update(sampler_sweep=["ddpm", "ddim-20", "dpm++2m-10"])
        raw["train"]["base"].update(precision="bf16", channels_last=True, compile=True)

    p = load_params(_write(tmp_path, edit))
    assert (p.diffusion.prediction, p.diffusion.min_snr_gamma, p.sample.sampler) == ("v", 5.0, "dpm++2m")
    assert p.train.base.precision == "bf16" and p.train.base.channels_last and p.train.base.compile
    assert parse_sampler("dpm++2m-20") == ("dpm++2m", 20) and parse_sampler("ddpm") == ("ddpm", None)
