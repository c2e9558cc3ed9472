"""Stage tune@DOMAIN: Ray Tune searches LoRA rank, alpha and lr with ASHA on a deterministic validation loss.

Each trial is a function trainable that trains in-process on 1 CPU (no nested Train run), so
`max_concurrent` trials fit a 2-CPU machine without deadlock. Trials report to Tune only; the driver
logs every trial to MLflow afterwards as a child run of the domain's tune run (one writer).
"""

import dataclasses
import sys

import mlflow
import torch

from cdiff.checkpoint import load_model
from cdiff.config import TrainConfig
from cdiff.data import load_imageset
from cdiff.io import write_json
from cdiff.lora import inject_lora
from cdiff.model import UNet
from cdiff.schedule import NoiseSchedule
from cdiff.train import train, validation_loss
from pipelines import tracking
from pipelines.common import Paths, mkdirs, params, ray_session, stage, storage_path


def trial(config, *, base, data, lora, cfg, seed, val_images, use_gpu):
    """One Tune trial: LoRA on the base (shipped through Ray's object store), validated every eval_every steps."""
    from ray import tune

    torch.set_num_threads(1)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model_cfg, base_state, diffusion = base
    model = UNet(model_cfg)
    model.load_state_dict(base_state)
    schedule = NoiseSchedule(diffusion)
    train_set, val_set = data
    model.prompt.class_names = list(train_set.class_names)
    r, alpha = config["r"], config["alpha_ratio"] * config["r"]
    torch.manual_seed(seed)  # the adapter's initialisation: trials are reproducible
    inject_lora(model, lora.targets, r, alpha, lora.dropout, lora.extra_trainable)
    run_cfg = dataclasses.replace(cfg, lr=config["lr"])

    model.to(device)

    def report(step, metrics):
        val = validation_loss(model, schedule, val_set, val_images, seed=seed, device=device)
        tune.report({"val_loss": val, "train_loss": metrics["loss"], "step": step})

    train(
        model,
        schedule,
        train_set,
        run_cfg,
        seed=seed,
        p_uncond=diffusion.p_uncond,
        device=device,
        on_log=report,
        progress=False,
    )


@stage
def main(name: str) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    p = params()
    domain, t = p.domain(name), p.tune
    folder = Paths.prepared / name
    data = (load_imageset(folder, "train"), load_imageset(folder, "val"))
    cfg = TrainConfig(
        steps=t.steps_per_trial,
        batch_size=t.batch_size,
        lr=t.lr_min,
        warmup_steps=min(20, t.steps_per_trial // 10),
        ema_decay=p.train.lora.ema_decay,
        log_every=t.eval_every,
        checkpoint_every=t.steps_per_trial,
    )
    space = {
        "r": tune.choice(t.ranks),
        "alpha_ratio": tune.choice(t.alpha_ratios),
        "lr": tune.loguniform(t.lr_min, t.lr_max),
    }
    start = {"r": domain.lora.r, "alpha_ratio": domain.lora.alpha / domain.lora.r, "lr": p.train.lora.lr}  # trial 0
    mkdirs(Paths.tune / name)
    with tracking.stage_run(p, "tune", name) as parent, ray_session(p):
        base_model, schedule, _ = load_model(Paths.base_model)
        base = (base_model.config, base_model.state_dict(), schedule.config)
        trainable = tune.with_parameters(
            trial,
            base=base,
            data=data,
            lora=domain.lora,
            cfg=cfg,
            seed=p.seed,
            val_images=t.val_images,
            use_gpu=p.ray.use_gpu,
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1, "gpu": 1 if p.ray.use_gpu else 0}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=t.num_samples,
                max_concurrent_trials=t.max_concurrent,
                search_alg=BasicVariantGenerator(points_to_evaluate=[start], random_state=p.seed),
                scheduler=ASHAScheduler(
                    time_attr="step",
                    max_t=t.steps_per_trial,
                    grace_period=t.grace_period,
                    reduction_factor=t.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(name=f"tune-{name}", storage_path=storage_path(p), verbose=1),
        )
        results = tuner.fit()
        rows = []
        for i, result in enumerate(results):
            if result.error:
                raise RuntimeError(f"trial {i} failed: {result.error}")
            df = result.metrics_dataframe
            c = result.config
            row = {
                "trial": i,
                "r": c["r"],
                "alpha": c["alpha_ratio"] * c["r"],
                "lr": c["lr"],
                "val_loss": float(df["val_loss"].min()),
                "steps": int(df["step"].max()),
            }
            rows.append(row)
            with mlflow.start_run(
                run_name=f"trial-{i}",
                nested=True,
                tags={"stage": "tune-trial", "domain": name, "git_commit": parent.data.tags["git_commit"]},
            ) as child:
                mlflow.log_params({k: row[k] for k in ("r", "alpha", "lr")})
                tracking.log_curve(child.info.run_id, "val_loss", list(zip(df["step"], df["val_loss"], strict=True)))
                tracking.log_curve(
                    child.info.run_id, "train_loss", list(zip(df["step"], df["train_loss"], strict=True))
                )
        best = min(rows, key=lambda row: (row["val_loss"], row["trial"]))
        mlflow.log_metrics(
            {"best_val_loss": best["val_loss"], "best_r": best["r"], "best_alpha": best["alpha"], "best_lr": best["lr"]}
        )
        write_json(Paths.tune / name / "best.json", best)
        write_json(Paths.tune / name / "trials.json", {"trials": rows})
    print(f"tune {name}: best r={best['r']} alpha={best['alpha']} lr={best['lr']:.2e} val_loss={best['val_loss']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
