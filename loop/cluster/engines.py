"""vLLM engine replicas on a Ray cluster, behind the interface of one loop.generation.engine.VLLMEngine.

`EnginePool` has what the flow, the rollout and the evaluation use of an engine (the `Engine` protocol of
loop/generation/engine.py: `generate`, `lora_request`, `prompt_logprobs`, `check_adapter_applied`, `tokenizer`,
`model_path`, `max_model_len`, `sleep`, `wake_up`, `memory`, `close`), so nothing downstream changes. Each replica is
a Ray actor holding one VLLMEngine. A `generate` call is cut into one contiguous shard per replica, balanced by the
requests' token budgets (prompt + max_tokens; contiguous keeps the samples of one prompt together, so vLLM's prefix
cache serves their shared prompt), and the outputs come back in request order. Every sampled request carries its own
seed (loop/generation/rollout.py), so where a request runs does not change what it draws, up to the engine's numerics.

Adapters reach the replicas without a shared filesystem: `lora_request` puts the adapter folder's files into the
object store once per LoRA id, and each replica writes them to a temporary folder of its own the first time it
serves that id. `check_adapter_applied` runs the adapter check on every replica.

A replica that dies (its actor, process or node) is replaced by a new one and its unfinished call is retried there,
at most `cluster.max_replica_restarts` times per pool; the replacement first passes the adapter check of every
adapter checked so far. One death past that raises ReplicaDied; the flow's finished stages are already in the run
directory, so rerunning the same run id resumes at the failed stage.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from loop.cluster.driver import ClusterConfig, pack_folder, unpack_folder
from loop.generation.engine import _BINDING_VARS, EngineConfig, TurnOutput, TurnRequest

log = logging.getLogger(__name__)


class ReplicaDied(RuntimeError):
    pass


@dataclass(frozen=True)
class PoolLoRA:
    """An adapter as the pool serves it (what `EnginePool.lora_request` returns)."""

    adapter_id: int
    path: str
    """The folder on the driver (for messages; replicas read `files`)."""
    files: list = field(hash=False)
    """[ObjectRef of pack_folder(path)]: in a list, so that Ray hands the replica the reference, and the replica
    fetches the bytes only the first time it serves the id."""


def shard_bounds(weights: list[float], n: int) -> list[tuple[int, int]]:
    """Cut `weights` into at most `n` non-empty contiguous runs of near-equal sums: (start, end) per run, in order.
    Each cut is placed at the prefix sum nearest to its share of the total."""
    n = min(n, len(weights))
    if n <= 1:
        return [(0, len(weights))] if weights else []
    cum = list(itertools.accumulate(weights))
    cuts: list[int] = []
    for k in range(1, n):
        target = cum[-1] * k / n
        j = bisect.bisect_left(cum, target)  # cum[j] >= target: a cut after j or before it
        below = cum[j - 1] if j > 0 else 0.0
        cut = j + 1 if cum[j] - target <= target - below else j
        lo, hi = (cuts[-1] if cuts else 0) + 1, len(weights) - (n - k)
        cuts.append(min(max(cut, lo), hi))
    return list(zip([0] + cuts, cuts + [len(weights)]))


class _Replica:
    """One engine replica (a Ray actor); vLLM starts in `start`, after the pool has chosen its CPUs."""

    def __init__(self):
        self.engine = None
        self.adapters: dict[int, Path] = {}
        self.dir: Path | None = None

    def where(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), sorted(os.sched_getaffinity(0))

    def start(self, model: str, cfg: EngineConfig, cpus: list[int] | None) -> int:
        from loop.generation.engine import VLLMEngine
        from loop.models.resolve import resolve_model

        if cpus is not None and not any(k in os.environ for k in _BINDING_VARS):
            # Before vLLM starts: its OpenMP threads bind to these CPUs (VLLMEngine keeps variables already set).
            os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
                               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
        self.engine = VLLMEngine(resolve_model(model).path, cfg)
        self.dir = Path(tempfile.mkdtemp(prefix="ratchet-adapters-"))
        return os.getpid()

    def _adapter(self, lora: PoolLoRA | None) -> Path | None:
        if lora is None:
            return None
        if lora.adapter_id not in self.adapters:
            self.adapters[lora.adapter_id] = unpack_folder(ray.get(lora.files[0]), self.dir / f"adapter-{lora.adapter_id}")
        return self.adapters[lora.adapter_id]

    def generate(self, requests: list[TurnRequest], lora: PoolLoRA | None) -> tuple[list[TurnOutput], float]:
        t0 = time.perf_counter()
        path = self._adapter(lora)
        out = self.engine.generate(requests, self.engine.lora_request(path, lora.adapter_id if lora else None))
        return out, time.perf_counter() - t0

    def prompt_logprobs(self, token_ids: list[int], lora: PoolLoRA | None) -> list[float]:
        return self.engine.prompt_logprobs(token_ids, self._adapter(lora), lora.adapter_id if lora else None)

    def check_adapter(self, lora: PoolLoRA):
        return self.engine.check_adapter_applied(self._adapter(lora), lora.adapter_id)

    def sleep(self, level: int) -> None:
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def memory(self) -> dict[str, float]:
        return self.engine.memory()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Replica:
    actor: object
    """The Ray actor handle."""
    node: str
    slot: int | None
    """Its CPU slot on the node (vLLM-CPU), else None."""
    cpus: list[int] | None


class EnginePool:
    """`cluster.engines` replicas of VLLMEngine(model, cfg) on the Ray cluster this process is the driver of.

    `model` is resolved on every replica's node (loop.models.resolve.resolve_model); `model_path` is its folder on the
    driver, where the pool's tokenizer (the one vLLM loads) is read from."""

    def __init__(self, model: str, model_path: str | Path, cfg: EngineConfig, cluster: ClusterConfig):
        from vllm.tokenizers import get_tokenizer

        self.cfg, self.cluster, self.model, self.model_path = cfg, cluster, model, str(model_path)
        self.tokenizer = get_tokenizer(self.model_path)
        self.restarts = 0
        self.stats = {"calls": 0, "requests": 0, "wall_s": 0.0, "engine_s": 0.0}
        """Per `generate` call summed: wall time on the driver, and the slowest shard's time inside its engine."""
        self.inflight: dict = {}
        """The calls running now (object ref -> (position, replica, method, args))."""
        self._adapters: dict[int, PoolLoRA] = {}
        self._checked: set[int] = set()
        self._slots: dict[str, set[int]] = {}
        self._check_fits()
        self._actor_cls = ray.remote(num_cpus=cluster.engine_num_cpus, num_gpus=cluster.engine_num_gpus,
                                     max_restarts=0)(_Replica)
        self.replicas: list[Replica] = []
        try:
            self.replicas = self._start(cluster.engines)
        except BaseException:
            self.close()
            raise

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_model_len

    def _check_fits(self) -> None:
        c = self.cluster
        have = ray.cluster_resources()
        for name, each in (("CPU", c.engine_num_cpus), ("GPU", c.engine_num_gpus)):
            if c.engines * each > have.get(name, 0.0):
                raise RuntimeError(f"cluster.engines: {c.engines} replicas of {each:g} {name} each need "
                                   f"{c.engines * each:g} {name}, and the Ray cluster has {have.get(name, 0.0):g}; "
                                   f"lower cluster.engines or cluster.engine_num_{name.lower()}s, or add nodes")

    def _bind(self, node: str, affinity: list[int]) -> tuple[int | None, list[int] | None]:
        """A vLLM-CPU replica's CPUs: the node's lowest free slot of engine_num_cpus CPUs (wrapping around when Ray's
        CPU count on the node is larger than the CPUs there)."""
        if self.cluster.engine_num_gpus > 0 or self.cfg.cpu_threads != "all":
            return None, None
        k = int(self.cluster.engine_num_cpus)
        taken = self._slots.setdefault(node, set())
        slot = next(i for i in itertools.count() if i not in taken)
        taken.add(slot)
        return slot, sorted({affinity[(slot * k + j) % len(affinity)] for j in range(k)})

    def _start(self, n: int) -> list[Replica]:
        actors = [self._actor_cls.remote() for _ in range(n)]
        try:
            wheres = ray.get([a.where.remote() for a in actors])
            placed = [(a, *self._bind(*w)) for a, w in zip(actors, wheres)]
            ray.get([a.start.remote(self.model, self.cfg, cpus) for a, _, cpus in placed])
        except BaseException:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise
        return [Replica(a, node, slot, cpus) for (a, slot, cpus), (node, _) in zip(placed, wheres)]

    def _replace(self, i: int, err: BaseException) -> None:
        m = self.cluster.max_replica_restarts
        if self.restarts >= m:
            raise ReplicaDied(
                f"engine replica {i} died ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}) after "
                f"{self.restarts} replacement(s), the most cluster.max_replica_restarts ({m}) allows; the stages "
                "finished so far are saved in the run directory: rerun with the same run id to resume") from err
        self.restarts += 1
        old = self.replicas[i]
        log.warning(f"engine replica {i} died ({type(err).__name__}); starting a replacement "
                    f"({self.restarts}/{m}) and retrying its work there")
        try:
            ray.kill(old.actor, no_restart=True)
        except Exception:  # already gone
            pass
        if old.slot is not None:
            self._slots[old.node].discard(old.slot)
        [new] = self._start(1)
        self.replicas[i] = new
        for aid in sorted(self._checked):  # the replacement serves a checked adapter only once it passed the check
            ray.get(new.actor.check_adapter.remote(self._adapters[aid]))

    def _run(self, calls: list[tuple[int, str, tuple]]) -> list:
        """Run (replica index, method, args) calls concurrently; their results in order. A call whose replica died
        is retried on the replacement."""
        out: list = [None] * len(calls)
        self.inflight = {getattr(self.replicas[i].actor, m).remote(*a): (k, i, m, a)
                         for k, (i, m, a) in enumerate(calls)}
        try:
            while self.inflight:
                [ready], _ = ray.wait(list(self.inflight), num_returns=1)
                k, i, m, a = self.inflight.pop(ready)
                try:
                    out[k] = ray.get(ready)
                except RayActorError as e:
                    self._replace(i, e)
                    self.inflight[getattr(self.replicas[i].actor, m).remote(*a)] = (k, i, m, a)
        finally:
            self.inflight = {}
        return out

    def each(self, method: str, *args) -> list:
        """Call a replica method (of `_Replica`) on every replica; the results in replica order."""
        return self._run([(i, method, args) for i in range(len(self.replicas))])

    # --- the VLLMEngine interface ---------------------------------------------------------------------
    def lora_request(self, adapter: Path | None, adapter_id: int | None) -> PoolLoRA | None:
        """As VLLMEngine.lora_request: an id stands for one adapter folder for the pool's life."""
        if adapter is None:
            return None
        if adapter_id is None or adapter_id < 1:
            raise ValueError("an adapter needs a LoRA id >= 1 (one per distinct adapter, e.g. its round)")
        path = str(Path(adapter).resolve())
        known = self._adapters.get(adapter_id)
        if known is not None:
            if known.path != path:
                raise ValueError(f"LoRA id {adapter_id} already serves {known.path}; give {path} a new id")
            return known
        lora = self._adapters[adapter_id] = PoolLoRA(adapter_id, path, [ray.put(pack_folder(Path(path)))])
        return lora

    def generate_stream(self, requests: list[TurnRequest],
                        lora: PoolLoRA | None = None) -> Iterator[tuple[int, TurnOutput]]:
        """`generate`'s outputs with their request indices, once every replica has answered its share."""
        yield from enumerate(self.generate(requests, lora))

    def generate(self, requests: list[TurnRequest], lora: PoolLoRA | None = None) -> list[TurnOutput]:
        """One model turn for every request, the requests split across the replicas; outputs in request order."""
        if not requests:
            return []
        t0 = time.perf_counter()
        bounds = shard_bounds([len(rq.token_ids) + rq.max_tokens for rq in requests], len(self.replicas))
        results = self._run([(i, "generate", (requests[a:b], lora)) for i, (a, b) in enumerate(bounds)])
        self.stats["calls"] += 1
        self.stats["requests"] += len(requests)
        self.stats["wall_s"] += time.perf_counter() - t0
        self.stats["engine_s"] += max(seconds for _, seconds in results)
        return [o for outs, _ in results for o in outs]

    def prompt_logprobs(self, token_ids: list[int], adapter: Path | None = None,
                        adapter_id: int | None = None) -> list[float]:
        [out] = self._run([(0, "prompt_logprobs", (list(token_ids), self.lora_request(adapter, adapter_id)))])
        return out

    def check_adapter_applied(self, adapter: Path, adapter_id: int):
        """The adapter check (loop.generation.adapter_check) on every replica: AdapterNotApplied unless each serves
        `adapter` as its trainer had it. Returns the check with the largest error."""
        checks = self.each("check_adapter", self.lora_request(adapter, adapter_id))
        self._checked.add(adapter_id)
        return max(checks, key=lambda c: c.error)

    def sleep(self, level: int = 1) -> None:
        self.each("sleep", level)

    def wake_up(self) -> None:
        self.each("wake_up")

    def memory(self) -> dict[str, float]:
        """Each key's largest value over the replicas (on CPU: empty)."""
        out: dict[str, float] = {}
        for mem in self.each("memory"):
            for k, v in mem.items():
                out[k] = max(v, out.get(k, v))
        return out

    def close(self) -> None:
        replicas, self.replicas = self.replicas, []
        for r in replicas:
            try:
                ray.get(r.actor.close.remote(), timeout=60)
            except Exception:  # a dead or stuck replica: killed below all the same
                pass
            ray.kill(r.actor, no_restart=True)
        self._adapters.clear()
