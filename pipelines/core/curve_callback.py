"""The loss curve of a Ray Train run onto its MLflow run, from Ray's controller.

A module of its own, light to import: Ray's controller unpickles the callback, and so imports the module it
lives in before it starts any worker. Here that costs Ray's own imports only; MLflow is imported at the first
report, while the workers train (pipelines.core.distributed, with torch, cdiff and MLflow, cost about 4 s of
the controller's start on 2 CPUs).
"""

from __future__ import annotations

import json

from ray.train import UserCallback


class CurveToMlflow(UserCallback):
    """Logs the loss curve onto an MLflow run from Ray's controller: one writer, every step once.

    After a worker failure Ray restarts from the latest checkpoint and trains the steps after it
    again, with the same numbers (a step's randomness is a function of (seed, step)). Points of
    steps already logged are skipped, so the run keeps one continuous history. The Ray nodes the
    workers ran on (every worker reports its own) are the run's tag `ray_train_nodes`.
    """

    def __init__(self, run_id: str, tracking_uri: str):
        self.tracking_uri, self.run_id, self.last_step = tracking_uri, run_id, 0
        self.nodes: set[str] = set()

    def after_report(self, run_context, metrics, checkpoint):
        from pipelines.core import tracking

        curve = [(int(s), float(v)) for s, v in (metrics[0].get("curve", []) if metrics else [])]
        new = [(s, v) for s, v in curve if s > self.last_step]
        if new:
            tracking.log_curve(self.run_id, "loss", new, self.tracking_uri)
            self.last_step = new[-1][0]
        nodes = self.nodes | {m["node"] for m in metrics if "node" in m}
        if nodes != self.nodes:
            self.nodes = nodes
            tracking.set_tags(self.run_id, {"ray_train_nodes": json.dumps(sorted(nodes))}, self.tracking_uri)
