"""The MLflow pyfunc model of the base, or of an adapter with its base: what `mlflow models serve` runs.

Logged as code (MLflow's models from code: registry.log_servable copies this file into the model and
MLflow runs it to build the model; nothing is pickled). The model's artefacts are cdiff folders, read
with cdiff's checked safetensors loaders: `base` (the base model) and, for an adapter, `adapter`. The
cdiff package that wrote them is bundled too (code_paths), so a registered version is whole: serving it
needs the pinned requirements (torch, ...), not the registry or this repository. It imports cdiff and
MLflow only (not the pipelines package), since it runs wherever the model is served.

A request is a table, one row per call: `class` (a class name or id, as text), `n` (images) and
`seed`; its params `guidance` and `steps` (DDIM) default to the sampler the model was logged with. Each
row of the response holds `class` (its name), `class_id` and `images`: n PNGs in base64, exactly the
images `cdiff sample URI --class C --n N --seed S` draws with the same sampler settings.
"""

from __future__ import annotations

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

BASE, ADAPTER = "base", "adapter"  # the keys of the model's artefacts
NAME = "pyfunc"  # the logged model's name on its run: runs:/RUN_ID/pyfunc
MAX_IMAGES = 256  # per row, as `cdiff sample --n`

INPUTS = Schema([ColSpec("string", "class"), ColSpec("long", "n"), ColSpec("long", "seed")])
OUTPUTS = Schema([ColSpec("string", "class"), ColSpec("long", "class_id"), ColSpec(Array("string"), "images")])


def signature(sampler) -> ModelSignature:
    """Rows of (class, n, seed); the sampler's guidance (and DDIM steps) as params that default to its own."""
    params = [ParamSpec("guidance", "double", sampler.guidance_scale)]
    if sampler.steps is not None:
        params.append(ParamSpec("steps", "long", sampler.steps))
    return ModelSignature(inputs=INPUTS, outputs=OUTPUTS, params=ParamSchema(params))


def input_example(class_name: str, sampler) -> tuple[pd.DataFrame, dict]:
    params = {"guidance": sampler.guidance_scale} | ({"steps": sampler.steps} if sampler.steps is not None else {})
    return pd.DataFrame([{"class": class_name, "n": 1, "seed": 0}]), params


class CdiffPyfunc(PythonModel):
    """Loads the base (and adapter, merged) once; `predict` samples each row with its own seed."""

    def load_context(self, context) -> None:
        from cdiff.adapter_format import load_adapter
        from cdiff.checkpoint import load_model
        from cdiff.lora import merge_lora
        from cdiff.samplers import Sampler

        self.model, self.schedule, _ = load_model(context.artifacts[BASE])
        if ADAPTER in context.artifacts:
            load_adapter(self.model, context.artifacts[ADAPTER])  # refuses an adapter of other base weights
            merge_lora(self.model)  # as `cdiff sample` does: the same pixels
        self.sampler = Sampler(**context.model_config["sampler"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cdiff.errors import CdiffError
        from cdiff.samplers import Sampler

        s, params = self.sampler, params or {}
        try:
            steps = int(params.get("steps", s.steps)) if s.steps is not None else None
            sampler = Sampler.of(s.kind, steps, s.eta, float(params.get("guidance", s.guidance_scale)), "params")
        except CdiffError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from e
        rows = []
        for i, row in enumerate(model_input.to_dict("records")):
            try:
                rows.append(self._draw(row, sampler))
            except CdiffError as e:
                raise MlflowException.invalid_parameter_value(f"row {i}: {e}") from e
        return pd.DataFrame(rows, columns=["class", "class_id", "images"])

    def _draw(self, row: dict, sampler) -> dict:
        import torch

        from cdiff.errors import CdiffError
        from cdiff.grid import to_uint8
        from cdiff.samplers import sample
        from cdiff.serve import png_base64

        n, seed = int(row["n"]), int(row["seed"])
        if not 1 <= n <= MAX_IMAGES:
            raise CdiffError(f"n must be in [1, {MAX_IMAGES}], got {n}")
        if not 0 <= seed < 2**32:
            raise CdiffError(f"seed must be in [0, 2**32 - 1], got {seed}")
        [class_id] = self.model.prompt.class_ids([str(row["class"])])
        with torch.inference_mode():
            images = sample(self.model, self.schedule, [class_id] * n, sampler, seed=seed, progress=False)
        pixels = to_uint8(images)
        return {
            "class": self.model.class_names[class_id],
            "class_id": class_id,
            "images": [png_base64(p) for p in pixels],
        }


set_model(CdiffPyfunc())
