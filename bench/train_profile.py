"""Where a DPO step's time and memory go: loop.training.update.train_round on synthetic pairs, timed by phase.

Phases are cut by forward hooks on the policy (the peft model) and its backbone, gradient hooks on the backbone's
output and on the per-token log-probs (where backward enters the LM head and the backbone), and the Trainer's
optimizer callbacks; a thread samples the process's RSS every millisecond and keeps each phase's peak. The
reference forward is the no-grad forward (adapter disabled, or TRL's precompute before the first step).

    .venv/bin/python bench/train_profile.py --model qwen2.5-coder-0.5b-instruct --batch-size 1 --grad-accumulation 4
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop.models.resolve import resolve_model  # noqa: E402
from loop.training.config import TrainConfig  # noqa: E402
from loop.training.update import train_round  # noqa: E402
from train import synthetic_pairs  # noqa: E402

_PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PhaseProfiler(TrainerCallback):
    """Seconds and peak RSS per phase, accumulated over a run."""

    def __init__(self):
        self.phase = "setup"
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            rss = rss_bytes()
            with self._lock:
                self.peak[self.phase] = max(self.peak[self.phase], rss)

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        rss = rss_bytes()
        with self._lock:
            self.seconds[self.phase] += now - self._t
            self.peak[self.phase] = max(self.peak[self.phase], rss)
            self.phase, self._t = phase, now

    def close(self) -> None:
        self.enter("done")
        self._stop.set()

    # hooks
    def on_init_end(self, args, state, control, model=None, **kwargs):
        backbone = model.get_base_model().base_model

        def side() -> str:
            return "policy" if torch.is_grad_enabled() else "reference"

        def outer_post(_m, _a, _kw, out):
            if torch.is_grad_enabled():
                out.log_probs.register_hook(lambda g: self.enter("backward: LM head + log-probs"))
            self.enter("loss and other")

        def backbone_post(_m, _a, _kw, out):
            if torch.is_grad_enabled():
                out.last_hidden_state.register_hook(lambda g: self.enter("backward: backbone"))
            self.enter(f"{side()} forward: LM head + log-probs")

        model.register_forward_pre_hook(lambda *_: self.enter(f"{side()} forward: other"), with_kwargs=True)
        model.register_forward_hook(outer_post, with_kwargs=True)
        backbone.register_forward_pre_hook(lambda *_: self.enter(f"{side()} forward: backbone"), with_kwargs=True)
        backbone.register_forward_hook(backbone_post, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.enter("data and other")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.enter("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.enter("data and other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", type=int, default=384, help="longest completion; see --spread")
    ap.add_argument("--spread", type=float, default=0.5,
                    help="completion lengths drawn uniformly from [len x (1 - spread), len]")
    ap.add_argument("--obs-frac", type=float, default=0.0, help="share of completion tokens that are observations")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accumulation", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="more TrainConfig fields")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_profile.json"))
    args = ap.parse_args()

    model_path = Path(resolve_model(args.model).path)
    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = TrainConfig(per_device_batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, epochs=1,
                      max_length=None, target_modules=["q_proj", "v_proj"], bf16=False, **extra)
    n = args.steps * args.batch_size * args.grad_accumulation
    pairs = synthetic_pairs(n, args.prompt_len, args.completion_len, args.obs_frac, vocab, spread=args.spread)
    prof = PhaseProfiler()
    with tempfile.TemporaryDirectory() as tmp:
        res = train_round(model_path, pairs, cfg, out_dir=Path(tmp) / "a", callbacks=[prof])
    prof.close()
    m = res.metrics
    phases = {k: {"seconds": v, "peak_rss_gib": prof.peak[k] / 2**30} for k, v in prof.seconds.items()
              if k not in ("setup", "done")}
    busy = sum(p["seconds"] for p in phases.values())
    out = {"model": args.model, "config": cfg.model_dump(mode="json"), "pairs": n,
           "shape": {"prompt_len": args.prompt_len, "completion_len": args.completion_len, "spread": args.spread,
                     "obs_frac": args.obs_frac},
           "train_time_s": m["train/time_s"], "tokens_per_s": m.get("train/tokens_per_s"), "phases": phases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"{args.model}: {n} pairs, {args.steps} steps of {args.batch_size} x {args.grad_accumulation}; train "
          f"{m['train/time_s']:.1f} s, {m.get('train/tokens_per_s', float('nan')):.1f} tokens/s")
    print(f"{'phase':40s} {'seconds':>8s} {'share':>6s} {'peak RSS GiB':>12s}")
    for k, p in sorted(phases.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"{k:40s} {p['seconds']:8.2f} {p['seconds'] / busy:6.1%} {p['peak_rss_gib']:12.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
