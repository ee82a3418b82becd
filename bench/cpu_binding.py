"""vLLM-CPU thread binding: `engine.cpu_threads: all` (every CPU, none reserved) against vLLM's own binding.

vLLM-CPU reserves one CPU per engine for its scheduler and, on x86, runs one OpenMP thread per physical core; on
a 2-CPU machine that leaves one CPU to run the model. Each timed run starts a fresh process (the binding is read
when the engine starts) that runs this project's generation path (rollout.generate with a real LoRA adapter, every
sequence to --max-tokens), then, with the engine still up and idle, a fixed torch workload in the same process:
the trainer runs there while the engine waits, so a binding that kept the idle engine busy would show in it. The
same workload without any engine, in this process, is the baseline. Settings alternate run by run (--repeats),
so a machine shared with other work slows both alike; the best run of each is reported.

    .venv/bin/python bench/cpu_binding.py                       # the demo's shape (SmolLM2, q/v LoRA)
    .venv/bin/python bench/cpu_binding.py --model qwen2.5-coder-0.5b-instruct --prompts 8 --n 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = ("vllm", "all")


def workload_s(iters: int = 60) -> float:
    """Seconds for a fixed fp32 matmul chain on torch's default threads (a stand-in for a training step)."""
    import torch

    a = torch.randn(768, 768)
    b = torch.randn(768, 3072)
    t0 = time.perf_counter()
    for _ in range(iters):
        (a @ b).relu_().sum()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    from generation import ignore_eos_in_engine

    from loop.generation import rollout
    from loop.generation.engine import EngineConfig, VLLMEngine
    from loop.generation.rollout import SamplingConfig
    from loop.models.resolve import resolve_model
    from loop.tasks import TaskSetConfig, load_tasks

    tasks = load_tasks(TaskSetConfig(family="arithmetic", split="train", limit=args.prompts, difficulty=1))
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    t0 = time.perf_counter()
    engine = VLLMEngine(resolve_model(args.model).path, EngineConfig(max_model_len=512, kv_cache_memory_bytes=512 << 20,
                                                                     cpu_threads=args.setting))
    start_s = time.perf_counter() - t0
    try:
        rollout.generate(engine, tasks[:2], sampling.model_copy(update={"max_tokens": 8}), round=0, adapter=args.adapter,
                         adapter_id=1)  # warm-up, adapter loaded
        t0 = time.perf_counter()
        with ignore_eos_in_engine():
            trajs = rollout.generate(engine, tasks, sampling, round=0, adapter=args.adapter, adapter_id=1)
        gen_s = time.perf_counter() - t0
        tokens = sum(t.num_model_tokens for t in trajs)
        time.sleep(1.0)  # let the engine go idle
        idle_work_s = workload_s()
    finally:
        engine.close()
    print("RESULT " + json.dumps({"setting": args.setting, "engine_start_s": start_s, "generate_s": gen_s,
                                  "tokens": tokens, "tokens_per_s": tokens / gen_s, "workload_idle_engine_s": idle_work_s,
                                  "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND",
                                                                         "VLLM_CPU_NUM_OF_RESERVED_CPU")}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_binding.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    user = {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU") if k in os.environ}
    if user:
        sys.exit(f"unset {', '.join(user)} first: they override both settings compared here")

    from generation import make_adapter

    from loop.models.resolve import resolve_model

    baseline = min(workload_s() for _ in range(3))
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-bind-") as tmp:
        adapter = make_adapter(str(resolve_model(args.model).path), Path(tmp) / "adapter", 16, "q_proj,v_proj")
        for _ in range(args.repeats):
            for setting in SETTINGS:
                cmd = [sys.executable, __file__, "--child", "--setting", setting, "--adapter", str(adapter),
                       "--model", args.model, "--prompts", str(args.prompts), "--n", str(args.n),
                       "--max-tokens", str(args.max_tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    sys.exit(f"the {setting} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
                runs[setting].append(json.loads(line[len("RESULT "):]))
    best = {s: max(rs, key=lambda r: r["tokens_per_s"]) for s, rs in runs.items()}
    idle = {s: min(r["workload_idle_engine_s"] for r in rs) for s, rs in runs.items()}
    ratios = {"all/vllm tokens_per_s": best["all"]["tokens_per_s"] / best["vllm"]["tokens_per_s"],
              **{f"workload with idle {s} engine / without engine": idle[s] / baseline for s in SETTINGS}}
    meta = {"model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "cpus": sorted(os.sched_getaffinity(0)), "baseline_workload_s": baseline,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs, "ratios": ratios}, indent=1))
    print(f"{args.model}: {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, q/v LoRA r16, "
          f"CPUs {meta['cpus']}, best of {args.repeats} (alternating)")
    print(f"{'setting':<7} | {'tokens/s (each run)':<24} | {'engine start s':>14} | workload with idle engine s")
    for s in SETTINGS:
        rates = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs[s])
        print(f"{s:<7} | {rates:<24} | {best[s]['engine_start_s']:14.1f} | {idle[s]:.2f} (no engine: {baseline:.2f})")
    print(" | ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
