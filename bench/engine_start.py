"""vLLM-CPU engine start: vLLM's default (its EngineCore and that core's worker in processes of their own, each
importing torch and vLLM again) against the engine inside the process that starts it (VLLM_ENABLE_V1_MULTIPROCESSING=0,
which the test suite uses: tests/conftest.py).

Each timed run is a fresh process that starts `VLLMEngine` (the loop's engine), decodes a fixed greedy batch and
closes it; the settings alternate run by run (--repeats), so a machine shared with other work slows both alike. The
greedy tokens of both settings must be identical (the run stops otherwise). Printed: seconds to start, to generate
and to close, tokens/s, and the ratios of the in-process setting against the default measured in this run.

    .venv/bin/python bench/engine_start.py                  # SmolLM2-135M, as the tests start it
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"processes": "1", "in-process": "0"}


def one_run(model: str, prompts: int, max_tokens: int) -> dict:
    """In a fresh process (the setting is read when vLLM starts): start, generate, close."""
    from loop.generation.engine import EngineConfig, VLLMEngine
    from loop.models.resolve import resolve_model

    path = resolve_model(model).path
    t0 = time.perf_counter()
    engine = VLLMEngine(path, EngineConfig(max_model_len=512, kv_cache_memory_bytes=256 << 20))
    t1 = time.perf_counter()  # the start includes importing vLLM in this process, as a run's does
    from vllm import SamplingParams

    tok = engine.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {3 * i}?"}],
                                       add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
           for i in range(prompts)]
    outs = engine.llm.generate([{"prompt_token_ids": x} for x in ids],
                               SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    t2 = time.perf_counter()
    engine.close()
    t3 = time.perf_counter()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {"start_s": t1 - t0, "generate_s": t2 - t1, "close_s": t3 - t2,
            "tokens_per_s": sum(map(len, tokens)) / (t2 - t1), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # the child process: one run, its result as the last line
        print(json.dumps(one_run(args.model, args.prompts, args.max_tokens)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for setting, value in SETTINGS.items():
            done = subprocess.run([sys.executable, __file__, "--one", setting, "--model", args.model, "--prompts",
                                   str(args.prompts), "--max-tokens", str(args.max_tokens)], capture_output=True,
                                  text=True, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": value})
            if done.returncode != 0:
                sys.exit(f"{setting}: exit {done.returncode}\n{done.stderr[-3000:]}")
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = {s: r[0]["tokens"] for s, r in runs.items()}
    if tokens["processes"] != tokens["in-process"]:
        sys.exit("the two settings decoded different greedy tokens: not the same engine")
    best = {s: {k: (max if k == "tokens_per_s" else min)(r[k] for r in rs) for k in rs[0] if k != "tokens"}
            for s, rs in runs.items()}
    print(f"{args.model}, {args.prompts} prompts x {args.max_tokens} greedy tokens, best of {args.repeats}; "
          "greedy tokens identical in both settings")
    print("| setting | start s | generate s | close s | tokens/s |\n|---|---:|---:|---:|---:|")
    for s, b in best.items():
        print(f"| {s} | {b['start_s']:.1f} | {b['generate_s']:.1f} | {b['close_s']:.1f} | {b['tokens_per_s']:.1f} |")
    a, b = best["in-process"], best["processes"]
    print(f"in-process / processes: start {a['start_s'] / b['start_s']:.2f}x, "
          f"tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
