"""Stage evaluate@DOMAIN: the adapter vs the base alone, by test loss, judge FID and GAN-test accuracy.

Also the floor (real train vs real test, same judge and count). The record goes to metrics/DOMAIN.json
(dvc metrics; per-class accuracy beside it) and onto the adapter's MLflow run; the registered adapter
version with the lowest FID of its domain gets the `champion` alias.
"""

import sys

from cdiff import results
from cdiff.adapter_format import load_adapter, read_adapter_config
from cdiff.checkpoint import load_model
from cdiff.data import load_imageset
from cdiff.lora import adapter_state_dict, merge_lora
from cdiff.metrics import NotComputable
from cdiff.train import validation_loss
from pipelines.core import registry, tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.layout import make_parents, paths
from pipelines.core.scoring import Scorer


@stage
def main(name: str) -> None:
    p = params()
    train_set, test_set = (load_imageset(paths.prepared(name), split) for split in ("train", "test"))
    judge = results.load(paths.judge_metrics(name), results.JudgeResult)
    try:
        cas = p.evaluate.cas(p.judge)
        scorer, note = Scorer(paths.judge(name), test_set, p.evaluate.fid_per_class, p.seed, p.sample, cas), ""
    except NotComputable as e:  # one class: the losses and the adapter's size still say something
        scorer, note = None, str(e)
    model, schedule, _ = load_model(paths.base_model)
    base_params = sum(t.numel() for t in model.parameters())
    loss_base = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    base = scorer.model(model, schedule, p.sampler) if scorer else None
    adapter_config = read_adapter_config(paths.adapter(name))  # the rank and alpha it was trained with
    load_adapter(model, paths.adapter(name))
    trainable = sum(t.numel() for t in adapter_state_dict(model).values())  # what the adapter trained
    loss_adapter = validation_loss(model, schedule, test_set, p.evaluate.val_images, seed=p.seed)
    merge_lora(model)  # zero-overhead inference
    adapter = scorer.model(model, schedule, p.sampler) if scorer else None
    floor = scorer.floor(train_set) if scorer else None
    vs_base = scorer.difference(adapter.judgement, base.judgement) if scorer else (None, None)  # paired
    evaluation = results.DomainEvaluation(
        floor and floor.score,
        base and base.score,
        adapter and adapter.score,
        loss_base,
        loss_adapter,
        judge.test_accuracy,
        adapter_config.lora.r,
        adapter_config.lora.alpha,
        trainable,
        trainable / base_params,
        note,
        *vs_base,
    )
    per_class = results.PerClass({"base": base.per_class, "adapter": adapter.per_class} if scorer else {})
    metrics = paths.domain_metrics(name)
    make_parents(metrics, paths.per_class(metrics), paths.judged(name, "real"))
    paths.judged(name, "real").parent.mkdir(exist_ok=True)  # a DVC output, empty where no judge scores the domain
    results.save(metrics, evaluation)
    results.save(paths.per_class(metrics), per_class)
    if scorer is not None:  # what the report compares the full fine-tune with, paired
        scorer.real().save(paths.judged(name, "real"))
        adapter.judgement.kept(scorer.reference).save(paths.judged(name, "adapter"))
    with tracking.reopen(p, paths.finetune_run(name)) as run:
        tracking.log_result(evaluation)
        tracking.log_result(per_class)
        if scorer is not None:  # what a later version is compared with, paired, should this one be champion
            registry.log_judged(adapter.judgement.kept(scorer.reference))
    if scorer is None:
        losses = f"test loss base {loss_base:.4f} -> adapter {loss_adapter:.4f}"
        summary(f"adapter v{run.model_version} scored", losses, f"{paths.show(metrics)}; {note}; champion not moved")
        return
    crowned = registry.set_champion(
        p.mlflow.adapter_model_prefix + name,
        run.model_version,
        adapter.score,
        lambda champion_run: scorer.versus_kept(adapter.judgement, registry.load_judged(champion_run)),
    )
    fid = f"FID base {base.score.shown('fid')} -> adapter {adapter.score.shown('fid')}"
    fid += f" (adapter - base {evaluation.adapter_vs_base_fid.shown()}; floor {floor.score.fid:.2f})"
    accuracy = f"GAN-test {base.score.gan_test:.3f} -> {adapter.score.gan_test:.3f}, KID {adapter.score.shown('kid')}"
    if crowned.comparison is None:
        verdict = "champion"
    else:
        against = f"v{run.model_version} - champion {crowned.comparison.shown()}"
        kept = {"better": "new champion", "tie": f"champion v{crowned.champion} kept (a tie)"}
        verdict = f"{kept.get(crowned.why, f'champion v{crowned.champion} kept')}: {against}"
    summary(f"adapter v{run.model_version} scored", f"{fid}, {accuracy}", f"{paths.show(metrics)}; {verdict}")


if __name__ == "__main__":
    main(sys.argv[1])
