"""Generation on Ray: one engine in this process against an EnginePool of 1 and of 2 vLLM replicas, and what Ray
costs per call and per round.

The same rollout (loop.generation.rollout.generate with a LoRA adapter, as every round after round 0 samples) runs three
ways, in one run, on the same machine:

  local      one VLLMEngine in this process (the path without a `cluster:` section), on every CPU
  pool-1     EnginePool, 1 replica on every CPU (engine_num_cpus = the CPUs)
  pool-2     EnginePool, 2 replicas, the CPUs split between them (engine_num_cpus = half)

Every sampled request has its own seed, so the three generate the same tokens (checked): the same work. Each
method has an untimed warm-up first; timings are the best of --repeats, interleaved. Ray's overhead of a generate
call is the driver's wall time minus the slowest shard's time inside its engine (EnginePool.stats): the driver's
round trips, pickling the requests and outputs, the object transfers. Also measured: an empty round trip to every
replica (the pool's `memory()`, which the flow calls after every stage), and shipping the adapter (ray.put of its
files, a replica writing them out and loading them the first time).

    .venv/bin/python bench/ray_generation.py      # = --prompts 16 --n 4 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ray_generation.json"))
    args = ap.parse_args()

    import ray
    import vllm

    from generation import make_adapter
    from loop.cluster.driver import ClusterConfig
    from loop.cluster.engines import EnginePool
    from loop.generation import rollout
    from loop.generation.engine import EngineConfig, VLLMEngine
    from loop.generation.rollout import SamplingConfig
    from loop.models.resolve import resolve_model
    from loop.tasks import TaskSetConfig, load_tasks

    cpus = len(os.sched_getaffinity(0))
    model_path = resolve_model(args.model).path
    tasks = load_tasks(TaskSetConfig(family="arithmetic", split="train", limit=args.prompts, difficulty=1))
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    engine_cfg = EngineConfig(max_model_len=512, kv_cache_memory_bytes=args.kv_cache_mib << 20,
                              max_lora_rank=max(16, args.lora_r))
    load_before = os.getloadavg()
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": cpus, "load_before": load_before,
                    "versions": {"ray": ray.__version__, "vllm": vllm.__version__, "python": platform.python_version()}}

    def gen(engine, adapter):
        t0 = time.perf_counter()
        trajs = rollout.generate(engine, tasks, sampling, round=1, adapter=adapter, adapter_id=1)
        return time.perf_counter() - t0, trajs

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        adapter = make_adapter(model_path, Path(tmp) / "adapter", args.lora_r, "q_proj,v_proj")
        adapter_bytes = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())

        # local: started, warmed, timed, stopped before the pools start (the CPUs are the pools' then).
        t0 = time.perf_counter()
        engine = VLLMEngine(model_path, engine_cfg)
        starts = {"local": time.perf_counter() - t0}
        try:
            gen(engine, adapter)
            runs = {"local": [gen(engine, adapter) for _ in range(args.repeats)]}
        finally:
            engine.close()
        reference = [t.to_dict() for t in runs["local"][0][1]]
        tokens = sum(t.num_model_tokens for t in runs["local"][0][1])

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        stats = {}
        try:
            for name, replicas in (("pool-1", 1), ("pool-2", 2)):
                if replicas > cpus:
                    continue
                t0 = time.perf_counter()
                pool = EnginePool(args.model, model_path, engine_cfg,
                                  ClusterConfig(engines=replicas, engine_num_cpus=cpus // replicas))
                starts[name] = time.perf_counter() - t0
                try:
                    t0 = time.perf_counter()
                    pool.lora_request(adapter, 1)
                    put_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    pool.check_adapter_applied(adapter, 1)  # the first use: every replica writes and loads it
                    first_use_s = time.perf_counter() - t0
                    gen(pool, adapter)  # warm-up
                    trips = []
                    for _ in range(20):
                        t0 = time.perf_counter()
                        pool.memory()
                        trips.append(time.perf_counter() - t0)
                    pool.stats = {k: 0 * v for k, v in pool.stats.items()}
                    runs[name] = [gen(pool, adapter) for _ in range(args.repeats)]
                    same = all([t.to_dict() for t in trajs] == reference for _, trajs in runs[name])
                    sample = runs[name][0][1]
                    stats[name] = {
                        **{k: v / args.repeats for k, v in pool.stats.items()},
                        "same_tokens_as_local": same, "replicas": replicas, "cpus_per_replica": cpus // replicas,
                        "round_trip_ms_median": 1000 * sorted(trips)[len(trips) // 2],
                        "adapter_put_s": put_s, "adapter_first_use_s": first_use_s, "adapter_bytes": adapter_bytes,
                        "trajectories_pickled_bytes": len(pickle.dumps([t.to_dict() for t in sample]))}
                finally:
                    pool.close()
        finally:
            ray.shutdown()

    best = {k: min(s for s, _ in v) for k, v in runs.items()}
    result.update({"generated_tokens": tokens, "engine_start_s": starts, "seconds": best,
                   "tokens_per_s": {k: tokens / s for k, s in best.items()}, "pool": stats,
                   "load_after": os.getloadavg()})
    base = best["local"]
    result["ratios_vs_local"] = {k: base / s for k, s in best.items()}  # throughput ratio (>1: faster than local)
    for name, s in stats.items():
        s["ray_overhead_s"] = s["wall_s"] - s["engine_s"]
        s["ray_overhead_share"] = s["ray_overhead_s"] / s["wall_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
