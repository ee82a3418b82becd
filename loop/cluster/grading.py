"""Grading on a Ray cluster: `grade_trajectories` fanned out as Ray tasks, same verdicts, same order.

The trajectories go out in batches of `cluster.verify_batch_size`, one Ray task of 1 CPU each, at most
`cluster.verify_concurrency` in flight per node (pinned with a soft node affinity: a node that dies hands its
batches to the others). Each task grades its batch with one grader (`verify.workers` 1, its one CPU); a crash comes
back as an "error" verdict and the driver raises VerifierCrash over the whole set, exactly as the local path does.
"""
from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from loop.cluster.driver import ClusterConfig
from loop.grading import VerifyConfig, grade_each, raise_on_crash
from loop.records import Graded, Trajectory
from loop.tasks.base import Task


@ray.remote(num_cpus=1, max_retries=1)
def _grade_batch(tasks: dict[str, Task], trajectories: list[Trajectory], cfg: VerifyConfig) -> list[Graded]:
    return grade_each(tasks, trajectories, cfg)


def grade_on_ray(tasks: dict[str, Task], trajectories: list[Trajectory], cfg: VerifyConfig,
                 cluster: ClusterConfig) -> list[Graded]:
    """`loop.grading.grade_trajectories` on the Ray cluster this process is the driver of."""
    size = cluster.verify_batch_size
    batches = [trajectories[i:i + size] for i in range(0, len(trajectories), size)]
    one = cfg.model_copy(update={"workers": 1})
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise RuntimeError("the Ray cluster has no alive node with a CPU to grade on")
    slots = [node for _ in range(cluster.verify_concurrency) for node in nodes]  # round robin over the nodes
    results: list[list[Graded] | None] = [None] * len(batches)
    inflight: dict = {}
    nxt = 0
    while nxt < len(batches) or inflight:
        while slots and nxt < len(batches):
            node = slots.pop(0)
            batch = batches[nxt]
            needed = {t.task_id: tasks[t.task_id] for t in batch}
            ref = _grade_batch.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(
                needed, batch, one)
            inflight[ref] = (nxt, node)
            nxt += 1
        [ready], _ = ray.wait(list(inflight), num_returns=1)
        i, node = inflight.pop(ready)
        try:
            results[i] = ray.get(ready)
        except BaseException:
            for ref in inflight:
                ray.cancel(ref)
            raise
        slots.append(node)
    return raise_on_crash([g for batch in results for g in batch], cfg.max_error_share)
