"""Stage sample@DOMAIN: sample grids per domain, the base alone vs base + adapter (merged), same seed."""

import sys
from functools import partial

from cdiff.adapter_format import load_adapter, read_adapter_config
from cdiff.checkpoint import load_model
from cdiff.grid import sample_grid
from cdiff.lora import merge_lora
from pipelines.core import tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths


@stage
def main(name: str) -> None:
    p = params()
    model, schedule, _ = load_model(paths.base_model)
    class_names = read_adapter_config(paths.adapter(name)).class_names
    grids = base_grid, adapter_grid = paths.domain_grid(name, "base"), paths.domain_grid(name, "adapter")
    make_parents(*grids)
    classes = list(range(len(class_names)))
    draw = partial(
        sample_grid,
        model=model,
        schedule=schedule,
        sampler=p.sampler,
        class_ids=classes,
        per_class=p.sample.per_class,
        seed=p.seed,
    )
    draw(base_grid, row_labels=[f"{n} (base id {i})" for i, n in enumerate(class_names)], title=f"{name}: base alone")
    load_adapter(model, paths.adapter(name))
    merge_lora(model)  # zero-overhead inference
    draw(adapter_grid, row_labels=class_names, title=f"{name}: base + LoRA adapter")
    with tracking.reopen(p, paths.finetune_run(name)):
        for grid in grids:
            tracking.log_files(grid, "samples")
    summary(f"{len(grids)} grids of {len(classes)} classes", str(p.sampler), ", ".join(map(paths.show, grids)))


if __name__ == "__main__":
    main(sys.argv[1])
