"""Generation throughput: this project's path (loop.generation.rollout.generate with a LoRA adapter) against bare vLLM
and HF.

Every round after round 0 samples with the previous round's LoRA adapter, so all methods run with the same real
peft adapter (random, non-zero B; --lora-targets, default q_proj,v_proj as configs/demo.yaml, or all-linear, the
TrainConfig default), on the same prompts (arithmetic train tasks through the chat template) and the same
sampling settings. Seeds follow the rollout: per request on GPU; on CPU none (the engine's seed; vLLM-CPU cannot
rewind a CPU generator), for every vLLM method alike.

  ours       loop.generation.rollout.generate: N requests per prompt, logprobs=0, Trajectory records
  vllm       bare vLLM: the same engine's LLM.generate(token prompts, SamplingParams(n=N), same LoRARequest)
  vllm/N-req (diagnostic) bare LLM.generate with the rollout's request shape: N requests per prompt, logprobs=0
  vllm/base  (diagnostic) bare LLM.generate as `vllm`, without the adapter: what LoRA costs
  hf         transformers model.generate on a peft PeftModel (adapter not merged), one left-padded batch

Only generated tokens are counted. Every sequence is made to run to --max-tokens: vLLM with ignore_eos=True
(the engine has no such option, so its SamplingParams get ignore_eos=True for the benchmark only), HF with
min_new_tokens=max_new_tokens; any shortfall is printed. Timings are the best of --repeats (the machine may be
shared), repeats interleaved across methods; each method has an untimed warm-up first.

    .venv/bin/python bench/generation.py --prompts 16 --n 4 --max-tokens 64
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def ignore_eos_in_engine():
    """Make the engine's SamplingParams ignore EOS (it imports vllm.SamplingParams when it generates)."""
    import vllm

    original = vllm.SamplingParams

    def params(*args, **kwargs):
        kwargs.setdefault("ignore_eos", True)
        return original(*args, **kwargs)

    vllm.SamplingParams = params
    try:
        yield
    finally:
        vllm.SamplingParams = original


def make_adapter(model_path: str, out: Path, r: int, targets: str = "all-linear", seed: int = 0) -> Path:
    """A real peft LoRA adapter on `targets` (comma-separated module names, or all-linear) with random, non-zero
    A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets if targets == "all-linear" else targets.split(","),
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)  # non-zero, small enough to keep the model's outputs text-like
    peft.save_pretrained(out)
    del peft, model
    gc.collect()
    return out


def _best(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return min(runs, key=lambda x: x[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16, help="arithmetic train prompts (~77 tokens each)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q_proj,v_proj",
                    help="comma-separated modules, or all-linear (default: configs/demo.yaml's q_proj,v_proj)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method (best one reported)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where HF runs (default: cuda if available, else cpu); vLLM runs where its platform is "
                         "and the engine's EngineConfig decides the rest")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-mib", type=int, default=512, help="vLLM-CPU KV cache")
    ap.add_argument("--hf-batch-size", type=int, default=None, help="sequences per HF generate call (default: all)")
    ap.add_argument("--hf-dtype", default=None, help="HF weights dtype (default: the vLLM engine's)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/generation.json"))
    args = ap.parse_args()

    import torch
    import transformers
    import vllm
    from vllm import SamplingParams, TokensPrompt

    from loop.generation import rollout
    from loop.generation.engine import EngineConfig, VLLMEngine, resolve_dtype
    from loop.generation.rollout import SamplingConfig, sample_seed
    from loop.models.resolve import resolve_model
    from loop.tasks import TaskSetConfig, load_tasks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and torch.cuda.is_available():
        print("note: CUDA is available, so vLLM runs on the GPU while HF runs on the CPU (--device cuda for both)")
    model_path = resolve_model(args.model).path
    tasks = load_tasks(TaskSetConfig(family="arithmetic", split="train", limit=args.prompts, difficulty=1))
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    engine_cfg = EngineConfig(max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_mib << 20,
                              max_lora_rank=max(16, args.lora_r))
    dtype = resolve_dtype(engine_cfg.dtype)  # what `auto` means on this machine, for every side of the comparison
    expected = args.prompts * args.n * args.max_tokens
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[float, int]]] = {"ours": [], "vllm": [], "vllm/N-req": [], "vllm/base": [], "hf": []}

    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        adapter = make_adapter(model_path, Path(tmp) / "adapter", args.lora_r, args.lora_targets, args.seed)

        t0 = time.perf_counter()
        engine = VLLMEngine(model_path, engine_cfg)
        engine_start_s = time.perf_counter() - t0
        try:
            lora = engine.lora_request(adapter, 1)  # the very LoRARequest rollout.generate sends
            shift = engine.check_adapter_applied(adapter, adapter_id=1).shift
            prompt_ids = [rollout.prompt_ids(engine.tokenizer, t, sampling) for t in tasks]
            prompt_tokens = sum(map(len, prompt_ids))
            # Seeds as the rollout sets them: one per sampled request, on every device
            # (loop.generation.rollout.sample_seed).
            request_seeds = args.temperature > 0
            bare_seed = args.seed if request_seeds else None

            def ours() -> int:
                with ignore_eos_in_engine():
                    trajs = rollout.generate(engine, tasks, sampling, round=0, adapter=adapter, adapter_id=1)
                return sum(t.num_model_tokens for t in trajs)

            bare_params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                         max_tokens=args.max_tokens, seed=bare_seed, ignore_eos=True)
            requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

            def bare() -> int:
                outs = engine.llm.generate(requests, bare_params, lora_request=lora, use_tqdm=False)
                return sum(len(c.token_ids) for o in outs for c in o.outputs)

            def n_requests() -> int:
                reqs = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(args.n)]
                params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                         seed=sample_seed(args.seed, 0, tasks[ti].id, s, 0) if request_seeds else None,
                                         logprobs=0, ignore_eos=True)
                          for ti in range(len(prompt_ids)) for s in range(args.n)]
                outs = engine.llm.generate(reqs, params, lora_request=lora, use_tqdm=False)
                return sum(len(o.outputs[0].token_ids) for o in outs)

            def no_adapter() -> int:
                outs = engine.llm.generate(requests, bare_params, use_tqdm=False)
                return sum(len(c.token_ids) for o in outs for c in o.outputs)

            # Warm-up (the adapter is already loaded by the check above).
            rollout.generate(engine, tasks[:2], sampling.model_copy(update={"max_tokens": 8}), round=0, adapter=adapter,
                             adapter_id=1)
            for _ in range(args.repeats):
                for name, fn in (("ours", ours), ("vllm", bare), ("vllm/N-req", n_requests),
                                 ("vllm/base", no_adapter)):
                    t0 = time.perf_counter()
                    tokens = fn()
                    runs[name].append((time.perf_counter() - t0, tokens))
        finally:
            engine.close()
            del engine
            gc.collect()

        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        hf_dtype = getattr(torch, args.hf_dtype or dtype)
        tok = AutoTokenizer.from_pretrained(model_path)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=hf_dtype).to(device)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        gen_cfg = GenerationConfig(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                   do_sample=args.temperature > 0, temperature=args.temperature or None,
                                   top_p=args.top_p, top_k=0, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        seqs = [ids for ids in prompt_ids for _ in range(args.n)]  # same order as num_return_sequences
        batch = args.hf_batch_size or len(seqs)
        eos = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set(tok.eos_token_id or [])

        def hf(items: list[list[int]], cfg=gen_cfg) -> int:
            torch.manual_seed(args.seed)
            generated = 0
            for i in range(0, len(items), batch):
                enc = tok.pad({"input_ids": items[i:i + batch]}, return_tensors="pt").to(device)
                with torch.inference_mode():
                    out = model.generate(**enc, generation_config=cfg)
                if device == "cuda":
                    torch.cuda.synchronize()
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    stop = next((j for j, t in enumerate(row) if t in eos), None)  # the EOS counts, padding not
                    generated += len(row) if stop is None else stop + 1
            return generated

        warm_cfg = copy.deepcopy(gen_cfg)
        warm_cfg.max_new_tokens = warm_cfg.min_new_tokens = 4
        hf(seqs[:2], warm_cfg)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = hf(seqs)
            runs["hf"].append((time.perf_counter() - t0, tokens))
        hf_threads = torch.get_num_threads()
        del model, base
        gc.collect()
    load_after = os.getloadavg()

    rows = []
    for name, what in (("ours", "rollout.generate (N requests/prompt, logprobs=0, trajectories)"),
                       ("vllm", "bare vLLM LLM.generate, SamplingParams(n=N)"),
                       ("vllm/N-req", "bare vLLM LLM.generate, N requests/prompt, logprobs=0"),
                       ("vllm/base", "bare vLLM LLM.generate, SamplingParams(n=N), no adapter"),
                       ("hf", f"transformers generate + peft, batch {batch}")):
        seconds, tokens = _best(runs[name])
        rows.append({"method": name, "what": what, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "all_seconds": [s for s, _ in runs[name]], "full_length": tokens == expected})
    rate = {r["method"]: r["tokens_per_s"] for r in rows}
    ratios = {"ours/vllm": rate["ours"] / rate["vllm"], "ours/hf": rate["ours"] / rate["hf"],
              "ours/vllm_N_req": rate["ours"] / rate["vllm/N-req"], "vllm/vllm_base": rate["vllm"] / rate["vllm/base"]}
    meta = {"model": args.model, "device": device, "vllm_platform": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": _cpu_model(), "nproc": os.cpu_count(), "hf_threads": hf_threads, "dtype": dtype,
            "hf_dtype": str(hf_dtype).split(".")[-1], "prompts": args.prompts, "n": args.n,
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "prompt_tokens": prompt_tokens, "expected_tokens": expected, "lora_r": args.lora_r,
            "lora_targets": args.lora_targets, "request_seeds": request_seeds, "adapter_logprob_shift": shift,
            "engine_start_s": engine_start_s,
            "kv_cache_mib": args.kv_cache_mib, "repeats": args.repeats, "loadavg_before": load_before,
            "loadavg_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "versions": {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=1))

    print(f"{args.model}, {args.prompts} prompts ({prompt_tokens} prompt tokens) x n={args.n} x {args.max_tokens} "
          f"tokens, T={args.temperature}, top_p={args.top_p}, seed {args.seed} "
          f"({'per request' if request_seeds else 'engine seed, no per-request seeds'}); LoRA r={args.lora_r} on "
          f"{args.lora_targets} (log-prob shift {shift:.3f}); vLLM on {meta['vllm_platform']} ({dtype}, engine start "
          f"{engine_start_s:.1f} s), HF on {device} ({meta['hf_dtype']}, {hf_threads} threads); best of "
          f"{args.repeats}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'method':<11} | {'seconds':>8} | {'gen tokens':>10} | {'tokens/s':>9} | what")
    for r in rows:
        print(f"{r['method']:<11} | {r['seconds']:8.2f} | {r['tokens']:>10} | {r['tokens_per_s']:9.1f} | {r['what']}")
    print(" | ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    short = [r["method"] for r in rows if not r["full_length"]]
    print(f"every method generated {expected} tokens" if not short else
          f"NOT the same token counts: {', '.join(short)} generated fewer than the {expected} expected")
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
