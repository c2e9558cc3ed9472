"""Ray Tune, and only here: the search over a domain's LoRA rank, alpha and lr (stage tune@D).

Each trial is a function trainable that trains in-process on 1 CPU or GPU (no nested Train run), so
`tune.max_concurrent` trials run side by side on a 2-CPU machine without deadlock. The search lives in
ray.storage_path under a name fixed by the job and the search's settings: a rerun restores it.
Runs inside `distributed.session`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import NamedTuple

import ray
import torch
from ray import tune
from ray.air.constants import EXPR_RESULT_FILE
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from tqdm.auto import tqdm

from cdiff.config import to_dict
from cdiff.data import ImageSet
from cdiff.io import fingerprint
from cdiff.results import TuneTrial
from cdiff.schedule import NoiseSchedule
from cdiff.train import validation_loss
from pipelines.core.config import Params, TuneConfig, variant_of, with_variant
from pipelines.core.jobs import TrainJob, build_model, run_name, train_job
from pipelines.core.layout import paths


class TrialFound(NamedTuple):
    trial: TuneTrial
    curves: dict[str, list[tuple[int, float]]]  # val_loss, train_loss (and fid, gan_test for a judge objective)
    tags: dict[str, str]  # the Tune experiment, the trial's id in it, the Ray node it ran on, its GPU share


def rungs(t: TuneConfig, max_t: int) -> list[int]:
    """The steps at which ASHA compares trials: grace_period * reduction_factor**k, up to max_t (its one bracket)."""
    count = int(math.log(max_t / t.grace_period) / math.log(t.reduction_factor) + 1)
    return [t.grace_period * t.reduction_factor**k for k in range(count)]


def _trial(config: dict, *, job: TrainJob, val_set: ImageSet, t: TuneConfig, use_gpu: bool, judge=None) -> None:
    """One Tune trial: the job with the trial's rank, alpha and lr, validated every `log_every` steps.

    With a judge objective (judge: (Scorer, Sampler)), the trial reports only where ASHA reads it (the
    first validation at or after each rung, and the last step), each time with the judge's FID and
    GAN-test accuracy of `objective_per_class` seeded samples per class.
    """
    torch.set_num_threads(job.threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    r = config["r"]
    lora = dataclasses.replace(job.lora, r=r, alpha=config["alpha_ratio"] * r)
    lora = with_variant(lora, config.get("variant", variant_of(lora)), config.get("up_r"))
    job = dataclasses.replace(job, lora=lora, train=dataclasses.replace(job.train, lr=config["lr"]))
    model = build_model(job).to(device)
    schedule = NoiseSchedule(job.diffusion)
    node = ray.get_runtime_context().get_node_id()
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))  # of one GPU, as Ray gave it
    due = rungs(t, job.train.steps) if judge else []

    def report(step: int, metrics: dict) -> None:
        if judge and step < job.train.steps and not (due and step >= due[0]):
            return
        while due and step >= due[0]:
            due.pop(0)
        val = validation_loss(model, schedule, val_set, t.val_images, seed=job.seed, device=device)
        result = {"val_loss": val, "train_loss": metrics["loss"], "step": step, "node": node, "gpu_share": share}
        if judge:
            scorer, sampler = judge
            score = scorer.model(model, schedule, sampler, t.objective_per_class, progress=False).score
            result |= {"fid": score.fid, "gan_test": score.gan_test}
        tune.report(result)

    train_job(model, job, device=device, on_log=report, progress=False)


class _TrialBar(tune.Callback):
    """The tune stage's one progress bar: trials done (ASHA stops some early). Made where it runs, not pickled."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment, to restore them
        return {"total": self.total, "bar": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._step(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._step(trials)

    def _step(self, trials) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="tune trials", leave=False)
        self.bar.update(sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in trials) - self.bar.n)


class ResumableASHA(ASHAScheduler):
    """ASHA that, when Tune restores a search, first replays the results of the trials that had finished.

    Tune does not save a scheduler's state: a restored ASHA would compare the remaining trials with
    nothing, and stop (or keep) other trials than the uninterrupted search. Replaying each finished
    trial's results (its result.json in the experiment folder) fills the rungs as they were.
    """

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if trial.status != Trial.TERMINATED:
            return
        bracket = self._trial_info.pop(trial.trial_id)
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.path}/{EXPR_RESULT_FILE}") as f:
            results = [json.loads(line) for line in f.readall().decode().splitlines() if line.strip()]
        for result in results:
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def experiment_name(p: Params, job: TrainJob, val_set: ImageSet, start: dict, judge_fingerprint: str | None) -> str:
    """tune-<job>-<digest of the search>: a rerun of the same search restores it; any change starts anew."""
    search = {
        "tune": to_dict(p.tune),
        "start": start,
        "val": fingerprint({"images": val_set.images, "labels": val_set.labels}),
        "judge": judge_fingerprint,
        "gpu": p.ray.use_gpu,
    }
    return f"tune-{run_name(job)}-{hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest()[:8]}"


def trial_resources(p: Params) -> dict[str, float]:
    """One CPU per trial and, on GPUs, 1/trials_per_gpu of one: a small model leaves a card mostly idle, so
    several trials share it (Ray packs them by fractional GPU resources)."""
    return {"cpu": 1, "gpu": 1 / p.tune.trials_per_gpu if p.ray.use_gpu else 0}


def _searcher(t: TuneConfig, start: dict, seed: int):
    """Random sampling or Optuna's TPE, both seeded, trial 0 the domain's own config, `max_concurrent` at once."""
    if t.search == "tpe":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
        tpe = optuna.samplers.TPESampler(seed=seed)  # Optuna's default, named: the saved search state says so
        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[start], sampler=tpe), t.max_concurrent)
    # the concurrency limit belongs to the search generator: Tune ignores max_concurrent_trials for one
    return BasicVariantGenerator(points_to_evaluate=[start], random_state=seed, max_concurrent=t.max_concurrent)


def search(p: Params, job: TrainJob, val_set: ImageSet, start: dict, judge=None) -> list[TrialFound]:
    """Tune LoRA rank, alpha (as a ratio of r) and lr with ASHA on `tune.objective`; `start` is trial 0.

    judge: (Scorer, Sampler) for the fid and gan_test objectives. The search lives in
    ray.storage_path under a name fixed by the job and the search's settings: a rerun after an
    interruption restores it, and the trials that had finished are not run again.
    """
    t = p.tune
    space = {
        "r": tune.choice(t.ranks),
        "alpha_ratio": tune.choice(t.alpha_ratios),
        "lr": tune.loguniform(t.lr_min, t.lr_max),
    }
    if len(t.variants) > 1:
        space["variant"] = tune.choice(t.variants)
    if t.up_ranks:
        space["up_r"] = tune.choice(t.up_ranks)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer console prints its experiment table even at verbose=0
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # state on disk lags a finished trial by 2 s, not 10+
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=job, val_set=val_set, t=t, use_gpu=p.ray.use_gpu, judge=judge),
        trial_resources(p),
    )
    name = experiment_name(p, job, val_set, start, fingerprint(judge[0].judge.state_dict()) if judge else None)
    storage = paths.ray_storage(p.ray.storage_path)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, restart_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=t.objective,
                mode=t.mode,
                num_samples=t.num_samples,
                search_alg=_searcher(t, start, p.seed),
                scheduler=ResumableASHA(
                    time_attr="step",
                    max_t=job.train.steps,
                    grace_period=t.grace_period,
                    reduction_factor=t.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[_TrialBar(t.num_samples)]),
        )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} trial(s) failed, the first with: {grid.errors[0]}")
    found = []
    for result in sorted(grid, key=lambda r: int(r.metrics["experiment_tag"].split("_")[0])):  # creation order
        df, c, m = result.metrics_dataframe, result.config, result.metrics
        best = df[t.objective].min() if t.mode == "min" else df[t.objective].max()
        alpha, val, steps = c["alpha_ratio"] * c["r"], float(df["val_loss"].min()), int(df["step"].max())
        variant = c.get("variant", variant_of(job.lora))
        trial = TuneTrial(
            len(found), c["r"], alpha, c["lr"], val, steps, t.objective, float(best), variant, c.get("up_r")
        )
        keys = ["val_loss", "train_loss"] + (["fid", "gan_test"] if judge else [])
        curves = {k: list(zip(df["step"], df[k], strict=True)) for k in keys}
        tags = {"tune_experiment": name, "tune_trial_id": m["trial_id"], "ray_node": m["node"]}
        tags["ray_gpu_share"] = str(m.get("gpu_share", 0.0))  # a search restored from before this tag: 0
        found.append(TrialFound(trial, curves, tags))
    return found
