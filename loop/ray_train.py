"""Training on a Ray cluster: `loop.train.train_round` in a Ray actor that holds `cluster.train_num_gpus` GPUs.

No shared filesystem is assumed: the previous adapter goes to the actor as the bytes of its files, the actor trains
into a temporary folder of its own and sends the new adapter's files back, and the driver writes them to `out_dir`
(where the flow, the engine pool and MLflow read it). The actor lives for one round: its process exits with the
trainer's memory. (Its ratchet_train.json names the actor's temporary paths as base model and initial adapter.)
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ray

from loop.cluster import ClusterConfig, pack_folder, unpack_folder
from loop.train import TrainConfig, TrainResult


class _Trainer:
    def train(self, model: str, data: list, cfg: TrainConfig, init: dict[str, bytes] | None,
              rehearsal: list) -> tuple[dict[str, bytes], dict[str, float], list]:
        from loop.models import resolve_model
        from loop.train import train_round

        tmp = Path(tempfile.mkdtemp(prefix="ratchet-train-"))
        try:
            init_adapter = unpack_folder(init, tmp / "init") if init is not None else None
            result = train_round(resolve_model(model).path, data, cfg, init_adapter=init_adapter, out_dir=tmp / "out",
                                 rehearsal=rehearsal)
            return pack_folder(result.adapter_dir), result.metrics, result.history
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_on_ray(model: str, data: list, cfg: TrainConfig, *, init_adapter: Path | None, out_dir: Path,
                 rehearsal: list = (), cluster: ClusterConfig) -> TrainResult:
    """`train_round` on the cluster: `model` (a config's `model:`) is resolved on the actor's node; the adapter is
    saved to `out_dir` here, on the driver."""
    actor = ray.remote(num_cpus=cluster.train_num_cpus, num_gpus=cluster.train_num_gpus, max_restarts=0)(
        _Trainer).remote()
    try:
        init = pack_folder(init_adapter) if init_adapter is not None else None
        files, metrics, history = ray.get(actor.train.remote(model, data, cfg, init, list(rehearsal)))
    finally:
        ray.kill(actor, no_restart=True)
    unpack_folder(files, Path(out_dir))
    return TrainResult(Path(out_dir), metrics, history)
