"""Stage tune@DOMAIN: Ray Tune searches LoRA rank, alpha and lr with ASHA on `tune.objective`.

Trial 0 is the domain's configured LoRA with train.lora.lr. The objective is the deterministic
validation loss, or the domain's judge on samples of each trial (FID or GAN-test accuracy). A rerun
after an interruption resumes the search. The driver logs every trial to MLflow afterwards as a
child run of the domain's tune run (one writer), each trial once.
"""

import sys

from cdiff import results
from cdiff.checkpoint import load_model
from cdiff.config import TrainConfig
from cdiff.data import load_imageset
from pipelines.core import distributed, tracking, tuning
from pipelines.core.config import params, variant_of
from pipelines.core.console import stage, summary
from pipelines.core.jobs import Weights, job_for
from pipelines.core.layout import make_parents, paths
from pipelines.core.scoring import Scorer


@stage
def main(name: str) -> None:
    p = params()
    domain, t = p.domain(name), p.tune
    train_set, val_set = (load_imageset(paths.prepared(name), split) for split in ("train", "val"))
    budget = TrainConfig(
        steps=t.steps_per_trial,
        batch_size=t.batch_size,
        lr=t.lr_min,  # each trial sets its own
        warmup_steps=min(20, t.steps_per_trial // 10),
        ema_decay=p.train.lora.ema_decay,
        log_every=t.eval_every,
        checkpoint_every=t.steps_per_trial,
    )
    base, _, _ = load_model(paths.base_model)
    job = job_for(p, "lora", train_set, budget, base=Weights.of(base), lora=domain.lora, threads=1)
    start = {"r": domain.lora.r, "alpha_ratio": domain.lora.alpha / domain.lora.r, "lr": p.train.lora.lr}
    if len(t.variants) > 1:  # trial 0 is the domain's own config: its variant, its rank on the up path too
        own = variant_of(domain.lora)
        start["variant"] = own if own in t.variants else t.variants[0]
    if t.up_ranks:
        start["up_r"] = domain.lora.r if domain.lora.r in t.up_ranks else t.up_ranks[0]
    judge = None
    if t.objective != "val_loss":  # the domain's judge scores samples of each trial
        test_set = load_imageset(paths.prepared(name), "test")
        judge = (Scorer(paths.judge(name), test_set, t.objective_per_class, p.seed), t.sampler)
    make_parents(paths.tune_best(name), paths.tune_trials(name))
    with tracking.stage_run(p, "tune", name):
        with distributed.session(p):
            found = tuning.search(p, job, val_set, start, judge)
        for trial, curves, tags in found:
            tracking.log_trial(trial, curves, {**tags, "stage": "tune-trial", "domain": name})
        trials = [trial for trial, _, _ in found]
        sign = -1 if t.mode == "max" else 1
        best = min(trials, key=lambda trial: (sign * trial.score, trial.trial))
        tracking.log_result(best, prefix="best.")
        results.save(paths.tune_best(name), best)
        results.save(paths.tune_trials(name), results.TuneTrials(trials))
    chosen = f"best of {len(trials)} trials: r={best.r} alpha={best.alpha:g} lr={best.lr:.2e}"
    chosen += (f" {best.variant}" if len(t.variants) > 1 else "") + (f" up-path r={best.up_r}" if t.up_ranks else "")
    summary(chosen, f"{t.objective.replace('_', ' ')} {best.score:.4f}", paths.show(paths.tune_best(name)))


if __name__ == "__main__":
    main(sys.argv[1])
