"""Throughput of one DPO round (loop.training.update.train_round) on synthetic multi-turn pairs with the real model.

Prints a table and writes JSON: pairs/s, tokens/s (every prompt+completion token of chosen and rejected
sequences, per second of training), peak memory (CPU: the process's max RSS; GPU: torch.cuda.max_memory_allocated)
and the achieved model FLOP/s as a fraction of a bf16 (GPU) / fp32 (CPU) matmul rate measured in the same run.

Model FLOPs per token ~ 3 x forward: the policy forward, its backward (input gradients only: the base is frozen
and the LoRA weight gradients are negligible) and the reference forward. Forward = 2 x (linear weights, LM head
included) + the causal attention scores (2 x layers x context x hidden, averaged over positions).

    .venv/bin/python bench/train.py --lengths 128 512 --pairs 8

--variants compares training paths in one run, alternating: `trl` is TRL's own (its GPU-sized fused LM head tiles
over every position, a reference forward in every step), `ours` this project's CPU path (loop/training/trainers.py
CPU_LM_HEAD, reference log-probs precomputed once), `ours-gc` the same with gradient checkpointing.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loop.models.resolve import resolve_model  # noqa: E402
from loop.pairs import PreferencePair  # noqa: E402
from loop.records import Segment, Trajectory  # noqa: E402
from loop.run.peak_memory import PeakMemory  # noqa: E402
from loop.training import trainers  # noqa: E402
from loop.training.config import TrainConfig  # noqa: E402
from loop.training.update import _use_bf16, train_round  # noqa: E402

VARIANTS = {"trl": (None, {"precompute_ref_log_probs": False}),
            "ours": (trainers.CPU_LM_HEAD, {}),
            "ours-gc": (trainers.CPU_LM_HEAD, {"gradient_checkpointing": True})}


def synthetic_pairs(n: int, prompt_len: int, completion_len: int, obs_frac: float, vocab: int,
                    seed: int = 0, spread: float = 0.0) -> list[PreferencePair]:
    """Random tokens shaped like tool-use trajectories: model turn, observation, model turn. With `spread`, each
    completion's length is drawn uniformly from [completion_len x (1 - spread), completion_len] (real pairs differ
    in length, so a batch holds padding)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(100, vocab) for _ in range(k)]  # noqa: E731 (above the special tokens)

    def traj(task: str, sample: int, prompt: list[int]) -> Trajectory:
        length = rng.randint(max(1, round(completion_len * (1 - spread))), completion_len)
        obs = int(length * obs_frac)
        first = (length - obs) // 2
        segs = [Segment("model", "", ids(first)), Segment("observation", "", ids(obs)),
                Segment("model", "", ids(length - obs - first))]
        return Trajectory(task, sample, prompt, [s for s in segs if s.token_ids])

    out = []
    for i in range(n):
        prompt = ids(prompt_len)
        out.append(PreferencePair(f"t{i}", prompt, traj(f"t{i}", 0, prompt), traj(f"t{i}", 1, prompt), "random"))
    return out


def matmul_flops(dtype: torch.dtype, device: str, size: int, seconds: float = 2.0) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - t0)


def model_flops_per_token(model_path: Path, context: int) -> float:
    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * cfg.num_hidden_layers * context * cfg.hidden_size
    return 3 * (2 * linear + attention)


def peak_memory_gib(device: str, peak: PeakMemory) -> float:
    """CUDA: torch's peak allocation; CPU: the process's peak RSS during that round (loop/run/peak_memory.py)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak.peak_rss / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128], help="completion tokens per sequence")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--obs-frac", type=float, default=0.25, help="share of completion tokens that are observations")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accumulation", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--spread", type=float, default=0.0, help="completion lengths uniform in [len x (1-spread), len]")
    ap.add_argument("--target-modules", nargs="+", default=None, help="LoRA targets (default: all-linear)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["ours"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="per variant, in --variants order (default: --batch-size for all)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtypes", nargs="+", choices=["auto", "fp32", "bf16"], default=["auto"],
                    help="training precisions to measure in this run (auto: TrainConfig's default for the device)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_path = Path(resolve_model(args.model).path)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    rows, rates = [], {}
    batch_sizes = args.batch_sizes or [args.batch_size] * len(args.variants)
    for dtype in args.dtypes:
        base = dict(max_length=None, gradient_checkpointing=args.gradient_checkpointing, epochs=args.epochs,
                    bf16={"auto": None, "fp32": False, "bf16": True}[dtype],
                    **({"target_modules": args.target_modules} if args.target_modules else {}))
        bf16 = _use_bf16(TrainConfig(**base))
        mm_dtype = torch.bfloat16 if bf16 else torch.float32
        name = str(mm_dtype).split(".")[-1]
        rates[name] = mm_rate = matmul_flops(mm_dtype, device, 8192 if device == "cuda" else 2048)
        with tempfile.TemporaryDirectory() as tmp:
            # Warm-up round (kernel selection, allocator, lazy imports) so the measured round is steady-state.
            train_round(model_path, synthetic_pairs(args.batch_size, 16, 16, args.obs_frac, vocab), TrainConfig(**base),
                        out_dir=Path(tmp) / "warmup")
            for length in args.lengths:
                pairs = synthetic_pairs(args.pairs, args.prompt_len, length, args.obs_frac, vocab, spread=args.spread)
                for variant, batch in zip(args.variants, batch_sizes):
                    lm_head, overrides = VARIANTS[variant]
                    trainers.CPU_LM_HEAD = lm_head
                    accumulation = max(1, args.grad_accumulation * args.batch_size // batch)  # same pairs per step
                    cfg = TrainConfig(**{**base, **overrides, "per_device_batch_size": batch,
                                         "grad_accumulation": accumulation})
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    peak = PeakMemory()
                    with peak:
                        res = train_round(model_path, pairs, cfg, out_dir=Path(tmp) / f"{variant}-{length}")
                    m = res.metrics
                    # The pairs' own tokens (no padding) x epochs: the same work for every variant, however batched.
                    seconds = m["train/time_s"]
                    tokens = args.epochs * sum(2 * len(p.prompt_token_ids) + len(p.chosen.completion_token_ids)
                                               + len(p.rejected.completion_token_ids) for p in pairs)
                    achieved = model_flops_per_token(model_path, (args.prompt_len + length) // 2) * tokens / seconds
                    rows.append({"dtype": name, "variant": variant, "batch": batch, "grad_accumulation": accumulation,
                                 "completion_len": length, "prompt_len": args.prompt_len, "pairs": args.pairs,
                                 "steps": m["train/steps"], "seconds": seconds, "pairs_per_s": args.pairs / seconds,
                                 "tokens_per_s": tokens / seconds, "model_tokens": m["train/model_tokens"],
                                 "loss": m["train/loss"], "peak_mem_gib": peak_memory_gib(device, peak),
                                 "model_tflops": achieved / 1e12, "mfu_vs_matmul": achieved / mm_rate})

    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(),
            "matmul_tflops": {k: v / 1e12 for k, v in rates.items()}, "batch_size": args.batch_size, "obs_frac": args.obs_frac,
            "gradient_checkpointing": args.gradient_checkpointing, "epochs": args.epochs, "spread": args.spread,
            "memory": "cuda max allocated" if device == "cuda" else "process peak RSS during the round"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    print(f"{meta['model']} on {meta['device']} ({device}, {meta['threads']} threads); measured matmul TFLOP/s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in meta["matmul_tflops"].items()))
    head = ["dtype", "variant", "batch", "grad_accumulation", "completion_len", "steps", "seconds", "pairs_per_s",
            "tokens_per_s", "peak_mem_gib", "model_tflops", "mfu_vs_matmul"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in head))
    by = {(r["dtype"], r["variant"], r["completion_len"]): r for r in rows}
    for (dtype, variant, length), r in by.items():
        if ("bfloat16", variant, length) in by and dtype == "float32":
            print(f"{variant}, completion {length}: bf16 / fp32 training tokens/s = "
                  f"{by['bfloat16', variant, length]['tokens_per_s'] / r['tokens_per_s']:.2f}x")
        if variant != args.variants[0] and (dtype, args.variants[0], length) in by:
            first = by[dtype, args.variants[0], length]
            print(f"{dtype}, completion {length}: {variant} / {args.variants[0]} tokens/s = "
                  f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x, peak memory "
                  f"{r['peak_mem_gib']:.2f} vs {first['peak_mem_gib']:.2f} GiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
