"""Ray, and only here: the session, Ray Train for a TrainJob, and Ray Tune's search over LoRA settings.

Train: each worker runs cdiff.train.train on its slice of every global batch (cdiff's seeded
sharding, the DistributedSampler equivalent); DDP averages gradients (gloo on CPU, nccl on GPU).
Rank 0 checkpoints every `checkpoint_every` steps; a rerun of the same job gets the same run name
(jobs.run_name), so Ray hands back the latest checkpoint and training resumes there.

Tune: each trial is a function trainable that trains in-process on 1 CPU (no nested Train run), so
`tune.max_concurrent` trials run side by side on a 2-CPU machine without deadlock.

Stops: ray.init and TrainTrainer.fit install signal handlers of their own (SIGTERM: sys.exit; SIGINT:
abort, then sys.exit(0), leaving the stage to go on). The stage's handlers (console.stage) are kept
instead, and a run stopped by SIGTERM or SIGINT is aborted through its controller before Ray shuts down.
A training error of cdiff's (divergence) ends the Ray run at once instead of being retried: a retry from
the same checkpoint would fail the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import signal
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.air.constants import EXPR_RESULT_FILE
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from tqdm.auto import tqdm

from cdiff.config import to_dict
from cdiff.data import ImageSet
from cdiff.errors import CdiffError
from cdiff.io import fingerprint
from cdiff.model import UNet
from cdiff.results import TuneTrial
from cdiff.schedule import NoiseSchedule
from cdiff.train import apply_ema, new_state, validation_loss
from pipelines.core import tracking
from pipelines.core.config import Params, TuneConfig
from pipelines.core.console import is_noise
from pipelines.core.jobs import TrainJob, build_model, run_name, train_job
from pipelines.core.layout import paths

STATE_FILE = "state.pt"
ERROR = "error"  # the metric of a run's last report that holds the message of a training error


@contextlib.contextmanager
def session(p: Params):
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized by params (no dashboard); shut down after."""
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME") if k in os.environ}
    runtime_env = {"env_vars": env}
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would end a search early on Ctrl-C, and the stage go on
    on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit(15)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local CPU DDP: gloo on loopback
        env["GLOO_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"]
        ray.init(num_cpus=p.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env, configure_logging=False)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    _drop_forwarded_noise()
    try:
        yield
    finally:
        ray.shutdown()


def _drop_forwarded_noise() -> None:
    """Wrap the driver's printers of worker output so that lines console.is_noise names are dropped."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def keep(handle):
        def printer(data: dict) -> None:
            lines = [line for line in data.get("lines", []) if not is_noise(line)]
            if lines:
                handle({**data, "lines": lines})

        return printer

    with dispatcher._lock:
        dispatcher.handlers = [(name, keep(handle)) for name, handle in dispatcher.handlers]


# ---- Ray Train -------------------------------------------------------------------------------


def train_fn(config: dict) -> None:
    """Runs on every Ray Train worker; rank 0 shows the one progress bar (rendered by the driver) and writes."""
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    job: TrainJob = ray.get(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads)
    model = build_model(job)
    device = ray.train.torch.get_device()
    model.to(device)
    resume = _resume_state(ray.train.get_checkpoint(), device, rank)
    node = ray.get_runtime_context().get_node_id()
    state = new_state(model, job.train, resume)
    if resume is not None and rank == 0:
        print(f"resuming from the checkpoint at step {state.step} of {job.train.steps}", flush=True)
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, nccl on GPU)
    bar = ray_tqdm(desc=f"train {job.kind}", total=job.train.steps) if rank == 0 else None
    pending: list[tuple[int, float]] = []
    reported = False
    with tempfile.TemporaryDirectory() as last:  # rank 0: the state of the last checkpoint (or of the start)
        saved = {"step": state.step}

        def save(st) -> None:
            if rank == 0:
                torch.save(st.state_dict(ddp_model), Path(last) / STATE_FILE)
            saved["step"] = st.step

        def report(metrics: dict) -> None:
            if rank == 0:  # rank 0 alone writes; the others report too: report is a barrier
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(last))
            else:
                ray.train.report(metrics)

        def on_log(step: int, metrics: dict) -> None:
            pending.append((step, metrics["loss"]))
            if bar:
                bar.update(step - bar.n)
                bar.set_description(f"train {job.kind}: loss {metrics['loss']:.4f}")

        def on_checkpoint(st) -> None:
            nonlocal reported
            metrics = {
                "step": st.step,
                "loss": pending[-1][1] if pending else math.nan,
                "curve": list(pending),
                "node": node,  # each worker's Ray node, for the run's record
            }
            pending.clear()
            save(st)
            report(metrics)
            reported = True

        save(state)
        if bar:
            bar.update(state.step)
        try:
            train_job(
                ddp_model,
                job,
                state=state,
                rank=rank,
                world_size=world,
                device=device,
                on_log=on_log,
                on_checkpoint=on_checkpoint,
                progress=False,
            )
        except CdiffError as e:
            # Deterministic (a divergence: the gradients are all-reduced, so every worker stops at the same step),
            # so a retry would fail alike: the last good state is reported again with the message, which fit()
            # raises. The loss points after that state are not sent: a rerun resumes there and trains them again.
            report({"step": saved["step"], "curve": [], ERROR: str(e)})
            return
        finally:
            if bar:
                bar.close()
        if not reported:  # resumed from the final checkpoint: hand it back as this run's result
            on_checkpoint(state)


def _resume_state(checkpoint, device, rank: int) -> dict | None:
    """The state in Ray's latest checkpoint; one that cannot be read (a folder cut short) starts over, saying so."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        try:
            return torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            if rank == 0:
                print(f"cannot read the checkpoint {checkpoint.path} ({type(e).__name__}): training starts over")
            return None


class CurveToMlflow(UserCallback):
    """Logs the loss curve onto an MLflow run from Ray's controller: one writer, every step once.

    After a worker failure Ray restarts from the latest checkpoint and trains the steps after it
    again, with the same numbers (a step's randomness is a function of (seed, step)). Points of
    steps already logged are skipped, so the run keeps one continuous history. The Ray nodes the
    workers ran on (every worker reports its own) are the run's tag `ray_train_nodes`.
    """

    def __init__(self, run_id: str):
        self.tracking_uri, self.run_id, self.last_step = tracking.tracking_uri(), run_id, 0
        self.nodes: set[str] = set()

    def after_report(self, run_context, metrics, checkpoint):
        curve = [(int(s), float(v)) for s, v in (metrics[0].get("curve", []) if metrics else [])]
        new = [(s, v) for s, v in curve if s > self.last_step]
        if new:
            tracking.log_curve(self.run_id, "loss", new, self.tracking_uri)
            self.last_step = new[-1][0]
        nodes = self.nodes | {m["node"] for m in metrics if "node" in m}
        if nodes != self.nodes:
            self.nodes = nodes
            tracking.set_tags(self.run_id, {"ray_train_nodes": json.dumps(sorted(nodes))}, self.tracking_uri)


class _StoppableTrainer(TorchTrainer):
    """A TorchTrainer whose run the driver can abort. fit() hands the run's controller to the SIGINT handler
    it installs (one that aborts, then sys.exit(0)s and lets the stage go on): kept here, no handler installed."""

    controller = None

    def _register_sigint_handler(self, controller) -> None:
        self.controller = controller

    def abort(self) -> None:
        """Stop the workers (no further checkpoint or report) and the controller; waits for them."""
        if self.controller is not None:
            with contextlib.suppress(ray.exceptions.RayError):  # the controller exits as it aborts
                ray.get(self.controller.abort.remote(), timeout=60)


def fit(p: Params, job: TrainJob, *, mlflow_run_id: str | None = None) -> tuple[UNet, list[tuple[int, float]]]:
    """Train a job with TorchTrainer; returns (the model with its EMA weights, the full loss curve).

    SIGTERM or SIGINT (console.stage) aborts the run before the interrupt goes on; a training error (divergence)
    is raised as the CdiffError it is, after one try.
    """
    trainer = _StoppableTrainer(
        train_fn,
        train_loop_config={"job": ray.put(job)},  # sent whole, through the object store
        torch_config=TorchConfig(backend="nccl" if p.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.ray.num_workers,
            use_gpu=p.ray.use_gpu,
            resources_per_worker={"CPU": p.ray.cpus_per_worker},
            placement_strategy=p.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name(job),
            storage_path=paths.ray_storage(p.ray.storage_path),
            callbacks=[CurveToMlflow(mlflow_run_id)] if mlflow_run_id else [],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=p.ray.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # Train's progress notes; warnings still show
        ),
    )
    with _one_at_a_time(paths.ray_storage(p.ray.storage_path), run_name(job)):
        try:
            result = trainer.fit()
        except KeyboardInterrupt:  # cdiff.io.Interrupted: SIGTERM or SIGINT
            trainer.abort()
            raise
    if result.metrics and result.metrics.get(ERROR):
        raise CdiffError(result.metrics[ERROR])
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    curve = [(int(s), float(v)) for s, v in state["losses"].tolist()]
    if mlflow_run_id:  # a stage resumed from a checkpoint logs the steps trained before it, too
        tracking.log_missing(mlflow_run_id, "loss", curve)
    model = build_model(job)
    model.load_state_dict(state["model"])
    apply_ema(model, state["ema"])
    return model.eval(), curve


@contextlib.contextmanager
def _one_at_a_time(storage: str, name: str, wait_s: float = 120.0):
    """One process at a time trains a Ray run. A rerun started while a stopped stage is still shutting down
    waits for it: sharing the run's folder, one would delete the checkpoint the other resumes from."""
    folder, lock = Path(storage), f".{name}.lock"
    if "://" in storage:  # cloud storage: a lock on this machine
        folder, lock = (
            Path(tempfile.gettempdir()) / "cdiff-ray-locks",
            f"{hashlib.sha256(storage.encode()).hexdigest()[:12]}{lock}",
        )
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / lock, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() > deadline:
                    raise CdiffError(
                        f"another process has been training the Ray run {name} in {storage} for {wait_s:.0f} s "
                        "after this stage started: wait for it to end, or stop it"
                    ) from e
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- Ray Tune --------------------------------------------------------------------------------


class TrialFound(NamedTuple):
    trial: TuneTrial
    curves: dict[str, list[tuple[int, float]]]  # val_loss, train_loss (and fid, gan_test for a judge objective)
    tags: dict[str, str]  # the Tune experiment, the trial's id in it and the Ray node it ran on


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
    job = dataclasses.replace(
        job,
        lora=dataclasses.replace(job.lora, r=r, alpha=config["alpha_ratio"] * r),
        train=dataclasses.replace(job.train, lr=config["lr"]),
    )
    model = build_model(job).to(device)
    schedule = NoiseSchedule(job.diffusion)
    node = ray.get_runtime_context().get_node_id()
    due = rungs(t, job.train.steps) if judge else []

    def report(step: int, metrics: dict) -> None:
        if judge and step < job.train.steps and not (due and step >= due[0]):
            return
        while due and step >= due[0]:
            due.pop(0)
        val = validation_loss(model, schedule, val_set, t.val_images, seed=job.seed, device=device)
        result = {"val_loss": val, "train_loss": metrics["loss"], "step": step, "node": node}
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


def _searcher(t: TuneConfig, start: dict, seed: int):
    """Random sampling or Optuna's TPE, both seeded, trial 0 the domain's own config, `max_concurrent` at once."""
    if t.search == "tpe":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[start], seed=seed), t.max_concurrent)
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
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer console prints its experiment table even at verbose=0
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # state on disk lags a finished trial by 2 s, not 10+
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=job, val_set=val_set, t=t, use_gpu=p.ray.use_gpu, judge=judge),
        {"cpu": 1, "gpu": 1 if p.ray.use_gpu else 0},
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
        trial = TuneTrial(len(found), c["r"], alpha, c["lr"], val, steps, t.objective, float(best))
        keys = ["val_loss", "train_loss"] + (["fid", "gan_test"] if judge else [])
        curves = {k: list(zip(df["step"], df[k], strict=True)) for k in keys}
        tags = {"tune_experiment": name, "tune_trial_id": m["trial_id"], "ray_node": m["node"]}
        found.append(TrialFound(trial, curves, tags))
    return found
