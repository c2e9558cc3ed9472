"""Stage finetune@DOMAIN: train the domain's LoRA adapter with the tuned config via Ray Train; register it.

The MLflow run logs the params the adapter was trained with: the tuned rank, alpha and lr replace
the configured ones (data.domains.DOMAIN.lora.r/alpha, train.lora.lr).
"""

import sys

from cdiff import results
from cdiff.adapter_format import save_adapter
from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.lora import trainable_parameter_share
from cdiff.train import validation_loss
from pipelines.core import distributed, registry, tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.jobs import Weights, job_for
from pipelines.core.layout import make_parents, paths


@stage
def main(name: str) -> None:
    best = results.load(paths.tune_best(name), results.TuneTrial, "tuned config")
    p = params().tuned(name, best.r, best.alpha, best.lr, best.variant, best.up_r)
    lora, cfg = p.domain(name).lora, p.train.lora
    base, schedule, base_config = load_model(paths.base_model)
    train_set, val_set = (load_imageset(paths.prepared(name), split) for split in ("train", "val"))
    make_parents(paths.adapter(name), paths.finetune_curve(name), paths.finetune_run(name))
    fp = base_config.fingerprint
    with tracking.stage_run(p, "finetune", name) as run_id:
        tracking.log_params({"base_fingerprint": fp})
        job = job_for(p, "lora", train_set, cfg, base=Weights.of(base), lora=lora, grid=p.sampler)
        with distributed.session(p):
            model, curve = distributed.fit(p, job, mlflow_run_id=run_id)
        val = validation_loss(model, schedule, val_set, p.evaluate.val_images, seed=p.seed)
        trainable, _ = trainable_parameter_share(model)
        result = results.FinetuneResult(
            lora.r, lora.alpha, cfg.lr, val, trainable, trainable / sum(t.numel() for t in base.parameters())
        )
        save_adapter(model, paths.adapter(name), class_names=train_set.class_names, overwrite=True)
        results.save_curve(paths.finetune_curve(name), curve)
        tracking.log_result(result)
        tracking.log_files(paths.adapter(name), "adapter")
        model_name = p.mlflow.adapter_model_prefix + name
        tags = registry.VersionTags(r=lora.r, alpha=lora.alpha, val_loss=val, base_fingerprint=fp)
        version = registry.log_servable(model_name, paths.base_model, paths.adapter(name), p.sampler, tags)
        registry.set_base_alias(p, fp)
        tracking.save_run_record(paths.finetune_run(name), run_id, version)
    made = f"adapter r={lora.r} alpha={lora.alpha:g} lr={cfg.lr:.2e}, {trainable} trainable params"
    summary(made, f"val loss {val:.4f}", f"{paths.show(paths.adapter(name))}, MLflow {model_name} v{version}")


if __name__ == "__main__":
    main(sys.argv[1])
