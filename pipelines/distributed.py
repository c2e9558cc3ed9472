"""Ray Train: one TorchTrainer train function for base pretraining and LoRA fine-tuning.

Each worker runs cdiff.train.train on its slice of every global batch (cdiff's seeded sharding,
the DistributedSampler equivalent); DDP averages gradients (gloo on CPU, nccl on GPU). Rank 0
checkpoints every `checkpoint_every` steps to the run's storage; rerunning a stage with the same
params reuses the run name, so Ray hands back the latest checkpoint and training resumes there.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import torch
from ray.train import UserCallback

from cdiff.config import DiffusionConfig, LoraConfig, ModelConfig, Params, TrainConfig, from_dict, to_dict
from cdiff.data import ImageSet
from cdiff.io import fingerprint
from cdiff.lora import inject_lora
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import apply_ema, new_state, train
from pipelines.common import storage_path

STATE_FILE = "state.pt"


def build_model(config: dict) -> UNet:
    """The model a run trains: fresh (base), or base weights + LoRA (adapter), or base weights (full fine-tune)."""
    torch.manual_seed(config["seed"])
    model = UNet(from_dict(ModelConfig, config["model"], "model"), config["class_names"])
    if config.get("base_state") is not None:
        import ray

        model.load_state_dict(
            ray.get(config["base_state"]) if isinstance(config["base_state"], ray.ObjectRef) else config["base_state"]
        )
        model.prompt.class_names = list(config["class_names"])
    if config.get("lora") is not None:
        lora = from_dict(LoraConfig, config["lora"], "lora")
        inject_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.extra_trainable)
    return model


def train_fn(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    images, labels = ray.get(config["data"])
    data = ImageSet(images, labels, config["class_names"])
    cfg = from_dict(TrainConfig, config["train"], "train")
    diffusion = from_dict(DiffusionConfig, config["diffusion"], "diffusion")
    model = build_model(config)
    device = ray.train.torch.get_device()
    model.to(device)
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    state = new_state(model, cfg, resume)
    if resume is not None and rank == 0:
        print(f"resuming from the checkpoint at step {state.step} of {cfg.steps}", flush=True)
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, nccl on GPU)
    pending: list[tuple[int, float]] = []
    reported = False

    def on_checkpoint(st) -> None:
        nonlocal reported
        metrics = {"step": st.step, "loss": pending[-1][1] if pending else math.nan, "curve": list(pending)}
        pending.clear()
        if rank == 0:  # rank 0 alone writes
            with tempfile.TemporaryDirectory() as d:
                torch.save(st.state_dict(ddp_model), Path(d) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)  # a barrier: every worker reports as often as rank 0
        reported = True

    train(
        ddp_model,
        NoiseSchedule(diffusion),
        data,
        cfg,
        seed=config["seed"],
        p_uncond=diffusion.p_uncond,
        state=state,
        rank=rank,
        world_size=world,
        device=device,
        on_log=lambda s, m: pending.append((s, m["loss"])),
        on_checkpoint=on_checkpoint,
        progress=rank == 0,
    )
    if not reported:  # resumed from the final checkpoint: hand it back as this run's result
        on_checkpoint(state)


class MlflowCurveCallback(UserCallback):
    """Logs the loss curve onto an MLflow run from Ray's controller: one writer, every step once.

    After a worker failure Ray restarts from the latest checkpoint and trains the steps after it
    again, with the same numbers (a step's randomness is a function of (seed, step)). Points of
    steps already logged are skipped, so the run keeps one continuous history.
    """

    def __init__(self, tracking_uri: str, run_id: str, prefix: str = ""):
        self.tracking_uri, self.run_id, self.prefix = tracking_uri, run_id, prefix
        self.last_step = 0

    def after_report(self, run_context, metrics, checkpoint):
        from pipelines.tracking import log_curve

        curve = [(int(s), float(v)) for s, v in (metrics[0].get("curve", []) if metrics else [])]
        new = [(s, v) for s, v in curve if s > self.last_step]
        if new:
            log_curve(self.run_id, f"{self.prefix}loss", new, self.tracking_uri)
            self.last_step = new[-1][0]


def run_name(kind: str, config: dict, data: ImageSet) -> str:
    """Deterministic: the same params and data give the same name, so Ray resumes that run."""
    public = {k: v for k, v in config.items() if k not in ("data", "base_state")}
    public["data"] = fingerprint({"images": data.images, "labels": data.labels})
    if config.get("base_state") is not None:
        public["base"] = fingerprint(config["base_state"])
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


def fit(
    p: Params,
    kind: str,
    model_cfg: ModelConfig,
    data: ImageSet,
    cfg: TrainConfig,
    *,
    base_state=None,
    lora: LoraConfig | None = None,
    mlflow_run_id: str | None = None,
    curve_prefix: str = "",
) -> tuple[UNet, list]:
    """Train with TorchTrainer; returns (the model with its EMA weights, the full loss curve)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.tracking import log_missing, tracking_uri

    config = {
        "seed": p.seed,
        "model": to_dict(model_cfg),
        "diffusion": to_dict(p.diffusion),
        "train": to_dict(cfg),
        "class_names": data.class_names,
        "lora": to_dict(lora) if lora else None,
        "threads": max(1, int(p.ray.cpus_per_worker)),
        "base_state": base_state,
    }
    name = run_name(kind, config, data)
    config["data"] = ray.put((data.images, data.labels))
    if base_state is not None:
        config["base_state"] = ray.put(base_state)
    callbacks = [MlflowCurveCallback(tracking_uri(), mlflow_run_id, curve_prefix)] if mlflow_run_id else []
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if p.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.ray.num_workers, use_gpu=p.ray.use_gpu, resources_per_worker={"CPU": p.ray.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(p),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=p.ray.max_failures),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    curve = [(int(s), float(v)) for s, v in state["losses"].tolist()]
    if mlflow_run_id:  # a stage resumed from a checkpoint logs the steps trained before it, too
        log_missing(mlflow_run_id, f"{curve_prefix}loss", curve, tracking_uri())
    config["base_state"] = base_state
    model = build_model(config)
    model.load_state_dict(state["model"])
    apply_ema(model, state["ema"])
    return model.eval(), curve
