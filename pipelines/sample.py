"""Stage sample@DOMAIN: sample grids per domain, the base alone vs base + adapter (merged), same seed."""

import sys

import mlflow

from cdiff.checkpoint import load_model
from cdiff.lora import load_adapter, merge_lora, read_adapter_config
from cdiff.samplers import sample
from pipelines import tracking
from pipelines.common import Paths, params, stage
from pipelines.outputs import write_grid


@stage
def main(name: str) -> None:
    p = params()
    s = p.sample
    model, schedule, _ = load_model(Paths.base_model)
    class_names = read_adapter_config(Paths.adapters / name)["class_names"]
    ids = [c for c in range(len(class_names)) for _ in range(s.per_class)]
    out = Paths.samples / name
    settings = f"{s.sampler}{'' if s.sampler == 'ddpm' else f'-{s.steps}'}, guidance {s.guidance_scale}, seed {p.seed}"
    grids = {}
    for kind in ("base", "adapter"):
        if kind == "adapter":
            load_adapter(model, Paths.adapters / name)
            merge_lora(model)  # zero-overhead inference
        images = sample(
            model,
            schedule,
            ids,
            sampler=s.sampler,
            steps=s.steps,
            eta=s.eta,
            guidance_scale=s.guidance_scale,
            seed=p.seed,
        )
        labels = class_names if kind == "adapter" else [f"{n} (base id {i})" for i, n in enumerate(class_names)]
        grids[kind] = out / f"{kind}.png"
        write_grid(
            grids[kind],
            images,
            labels,
            s.per_class,
            f"{name}: {'base + LoRA adapter' if kind == 'adapter' else 'base alone'} ({settings})",
        )
    run = tracking.read_run_file(Paths.runs / f"finetune-{name}.json")
    tracking.setup(p)
    with mlflow.start_run(run_id=run["run_id"]):
        for path in grids.values():
            mlflow.log_artifact(str(path), "samples")
    print(f"samples {name}: {', '.join(str(g) for g in grids.values())}")


if __name__ == "__main__":
    main(sys.argv[1])
