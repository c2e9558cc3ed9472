"""Stage tune@DOMAIN: Ray Tune searches LoRA rank, alpha and lr with ASHA on a deterministic validation loss.

Trial 0 is the domain's configured LoRA with train.lora.lr. The driver logs every trial to MLflow
afterwards as a child run of the domain's tune run (one writer).
"""

import sys

from cdiff import results
from cdiff.checkpoint import load_model
from cdiff.config import TrainConfig
from cdiff.data import load_imageset
from pipelines.core import distributed, tracking
from pipelines.core.config import params
from pipelines.core.console import stage, summary
from pipelines.core.jobs import Weights, job_for
from pipelines.core.layout import make_parents, paths


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
    make_parents(paths.tune_best(name), paths.tune_trials(name))
    with tracking.stage_run(p, "tune", name):
        with distributed.session(p):
            found = distributed.search(p, job, val_set, start)
        for trial, curves in found:
            tracking.log_trial(trial, curves, {"stage": "tune-trial", "domain": name})
        trials = [trial for trial, _ in found]
        best = min(trials, key=lambda trial: (trial.val_loss, trial.trial))
        tracking.log_result(best, prefix="best.")
        results.save(paths.tune_best(name), best)
        results.save(paths.tune_trials(name), results.TuneTrials(trials))
    chosen = f"best of {len(trials)} trials: r={best.r} alpha={best.alpha:g} lr={best.lr:.2e}"
    summary(chosen, f"val loss {best.val_loss:.4f}", paths.show(paths.tune_best(name)))


if __name__ == "__main__":
    main(sys.argv[1])
