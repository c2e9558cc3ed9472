"""Ray, with pipelines/core/tuning.py only here: the session, and Ray Train for a TrainJob.

Train: each worker runs cdiff.train.train on its slice of every global batch (cdiff's seeded
sharding, the DistributedSampler equivalent); DDP averages gradients (gloo on CPU, nccl on GPU).
Rank 0 checkpoints every `checkpoint_every` steps; a rerun of the same job gets the same run name
(jobs.run_name), so Ray hands back the latest checkpoint and training resumes there.

Stops: ray.init and TrainTrainer.fit install signal handlers of their own (SIGTERM: sys.exit; SIGINT:
abort, then sys.exit(0), leaving the stage to go on). The stage's handlers (console.stage) are kept
instead, and a run stopped by SIGTERM or SIGINT is aborted through its controller before Ray shuts down.
A training error of cdiff's (divergence) ends the Ray run at once instead of being retried: a retry from
the same checkpoint would fail the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import pickle
import signal
import tempfile
import time
import warnings
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cdiff.errors import CdiffError
from cdiff.grid import sample_picture
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import apply_ema, new_state
from pipelines.core import tracking
from pipelines.core.config import Params
from pipelines.core.console import is_noise
from pipelines.core.curve_callback import CurveToMlflow
from pipelines.core.jobs import TrainJob, build_model, run_name, train_job
from pipelines.core.layout import paths

STATE_FILE = "state.pt"
ERROR = "error"  # the metric of a run's last report that holds the message of a training error


# A local session's settings, in its own environment and its workers': gloo on loopback for CPU DDP; Train's
# controller polling its workers every 0.5 s, not 2 (a run ends at the poll after its last report: a trivial
# fit 18.6, 19.2 s -> 16.3, 16.2 s, two pairs measured side by side on 2 CPUs); and no preemption watcher (an
# actor that watches for nodes being drained, as spot instances are) nor Train's Prometheus metrics (no
# dashboard here). A cluster keeps Ray's defaults.
LOCAL_ENV = {
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def is_local() -> bool:
    """A session of its own on this machine, not the cluster at RAY_ADDRESS."""
    return not os.environ.get("RAY_ADDRESS")


@contextlib.contextmanager
def session(p: Params):
    """Join the cluster at RAY_ADDRESS, or start a local Ray sized by params (no dashboard); shut down after."""
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "GLOO_SOCKET_IFNAME") if k in os.environ}
    runtime_env = {"env_vars": env}
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would end a search early on Ctrl-C, and the stage go on
    on_sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit(15)
    if not is_local():
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        for k, v in LOCAL_ENV.items():  # a user's own value wins
            os.environ.setdefault(k, v)
            env[k] = os.environ[k]
        ray.init(  # "local": a new instance of its own, never a `ray start` cluster found running on this machine
            address="local",
            num_cpus=p.ray.num_cpus,
            num_gpus=p.ray.num_gpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            configure_logging=False,
        )
        _start_autoscaling_coordinator()
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    _drop_forwarded_noise()
    try:
        yield
    finally:
        ray.shutdown()


def _start_autoscaling_coordinator() -> None:
    """Start the actor Train's controller asks for resources before it starts any worker (a detached actor,
    got by name), now, while the stage goes on: else the controller waits for its process to start (2 to 3 s
    of every fit on 2 CPUs)."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()


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
    # DDP warned once per worker on every multi-worker run that a grad's strides differ from its bucket's:
    # the output conv's weight ([channels, C, 1, 1]) gets its grad with other strides in its size-1 dims,
    # the same memory layout, so there is nothing to copy or fix
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
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
                "world_size": world,  # how many workers trained it (Ray keeps the report beside the checkpoint)
            }
            pending.clear()
            save(st)
            if rank == 0 and config.get("mlflow") and job.train.sample_every and st.step % job.train.sample_every == 0:
                log_grid(job, ddp_model, st, *config["mlflow"])
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


GRID_CLASSES, GRID_PER_CLASS = 10, 4  # the grids of train.sample_every: the first classes, a few images each


def log_grid(job: TrainJob, model, state, run_id: str, uri: str) -> None:
    """A seeded sample grid of the model's EMA weights at this step onto the MLflow run, as an image step
    (key `samples`): the UI's image slider shows the model learning. Drawn on a copy: training is untouched."""
    from mlflow.tracking import MlflowClient

    copy = build_model(job)
    copy.load_state_dict(getattr(model, "module", model).state_dict())
    apply_ema(copy, state.ema.shadow)
    classes = list(range(min(GRID_CLASSES, len(job.data.class_names))))
    picture = sample_picture(
        copy.eval(),
        NoiseSchedule(job.diffusion),
        job.grid,
        classes,
        GRID_PER_CLASS,
        seed=job.seed,
        title=f"step {state.step}",
    )
    MlflowClient(uri).log_image(run_id, picture, key="samples", step=state.step)


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


class _StoppableTrainer(TorchTrainer):
    """A TorchTrainer whose run the driver can abort. fit() hands the run's controller to the SIGINT handler
    it installs (one that aborts, then sys.exit(0)s and lets the stage go on): kept here, no handler installed.

    It also starts no actor it has no use for: Ray Data's DatasetManager (cdiff passes no Ray Dataset), and,
    in a local session, the detached PlacementGroupCleaner (which removes the run's placement group should the
    driver die, but a local session's Ray ends with its driver). Each is a Python process that imports Ray, on
    the CPUs the run's own start-up needs."""

    controller = None

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        drop = (() if self.datasets else (DatasetsCallback,)) + ((PlacementGroupCleanerCallback,) if is_local() else ())
        return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

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
        train_loop_config={  # the job sent whole, through the object store; where its grids go
            "job": ray.put(job),
            "mlflow": (mlflow_run_id, tracking.tracking_uri()) if mlflow_run_id and job.grid else None,
        },
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
            callbacks=[CurveToMlflow(mlflow_run_id, tracking.tracking_uri())] if mlflow_run_id else [],
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
