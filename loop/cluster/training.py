"""Training on a Ray cluster: `loop.training.update.train_round` in `cluster.train_workers` Ray actors, data-parallel.

One worker is one actor running `train_round` as on a single machine. Several are ranks of one torch.distributed
group (gloo on CPU, NCCL on GPU) that the trainer (transformers + accelerate) joins through the usual environment
variables, as under `accelerate launch`: every rank holds the model and the same seeded LoRA start, takes its share of
each optimizer step's pairs (accelerate shards the seeded shuffle by batch), and DDP averages the LoRA gradients.
The workers are placed together (a placement group, packed onto as few nodes as fit) and live for one round: their
processes exit with the trainer's memory. Each sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so its
local rank is 0. Rank 0's adapter is the result; the others hold the same weights.

No shared filesystem is assumed: the previous adapter goes to the workers as the bytes of its files, each trains into
a temporary folder of its own, rank 0 sends the new adapter's files back, and the driver writes them to `out_dir`
(where the flow, the engine pool and MLflow read it). (Its ratchet_train.json names the worker's temporary paths as
base model and initial adapter.)
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from loop.cluster.driver import ClusterConfig, pack_folder, unpack_folder
from loop.training.config import TrainConfig
from loop.training.update import TrainResult

PLACEMENT_TIMEOUT_S = 120


class _Trainer:
    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it: where the other ranks find rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def train(self, model: str, data: list, cfg: TrainConfig, init: dict[str, bytes] | None, rehearsal: list,
              rank: int = 0, world: int = 1, master: tuple[str, int] | None = None,
              ) -> tuple[dict[str, bytes], dict[str, float], list] | None:
        from loop.models.resolve import resolve_model
        from loop.training.update import train_round

        if world > 1:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        tmp = Path(tempfile.mkdtemp(prefix="ratchet-train-"))
        try:
            init_adapter = unpack_folder(init, tmp / "init") if init is not None else None
            result = train_round(resolve_model(model).path, data, cfg, init_adapter=init_adapter, out_dir=tmp / "out",
                                 rehearsal=rehearsal)
            if rank:
                return None
            return pack_folder(result.adapter_dir), result.metrics, result.history
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_on_ray(model: str, data: list, cfg: TrainConfig, *, init_adapter: Path | None, out_dir: Path,
                 rehearsal: list = (), cluster: ClusterConfig) -> TrainResult:
    """`train_round` on the cluster: `model` (a config's `model:`) is resolved on each worker's node; the adapter is
    saved to `out_dir` here, on the driver. With several workers the metrics are rank 0's (TRL averages the loss and
    its metrics over the ranks); `train/workers` says how many there were."""
    n = cluster.train_workers
    bundle = {k: v for k, v in (("CPU", cluster.train_num_cpus), ("GPU", cluster.train_num_gpus)) if v > 0}
    pg = placement_group([bundle] * n, strategy="PACK")
    actors = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"Ray could not place {n} training worker(s) of {cluster.train_num_cpus:g} CPU and "
                f"{cluster.train_num_gpus:g} GPU in {PLACEMENT_TIMEOUT_S} s (free now: {ray.available_resources()}); "
                "lower cluster.train_workers or cluster.train_num_cpus / train_num_gpus, or add nodes. Completed "
                "rounds are kept: rerun with the same run id to resume")
        actors = [ray.remote(max_restarts=0)(_Trainer).options(
            num_cpus=cluster.train_num_cpus, num_gpus=cluster.train_num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
            for i in range(n)]
        master = ray.get(actors[0].rendezvous.remote()) if n > 1 else None
        init = ray.put(pack_folder(init_adapter) if init_adapter is not None else None)
        data_ref, rehearsal_ref = ray.put(list(data)), ray.put(list(rehearsal))
        refs = [a.train.remote(model, data_ref, cfg, init, rehearsal_ref, rank=i, world=n, master=master)
                for i, a in enumerate(actors)]
        # As each finishes: a rank that failed (a divergence, an error) raises here at once, and the others, which
        # would wait for it in the next all-reduce, are killed below.
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
        results = ray.get(refs)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)
    files, metrics, history = results[0]
    unpack_folder(files, Path(out_dir))
    return TrainResult(Path(out_dir), {**metrics, "train/workers": float(n)}, history)
