"""Rollouts: n trajectories per task from an engine (loop/engine.py), turn by turn, with an environment
(loop/envs.py) acting between the model's turns.

Trajectories are built in token space: every turn sends the exact token ids so far (prompt + model turns +
observations) and keeps which spans the model wrote, so training can mask the observations without re-tokenising
anything. With tools on, each trajectory has its own sandboxed Python session (envs.PythonSession): when a turn ends
with a complete ```python block, the code runs and its output is appended as a ```output block; the model then
continues. All live trajectories of a call go through the engine together, turn by turn, and each turn's tool calls
run concurrently.

Seeds: every sampled request has its own seed, `sample_seed(sampling seed, round, task id, sample, turn)`, on
every device, so the draws differ between rounds, samples and turns and do not depend on how vLLM batches the
requests: re-running a round (a resumed run id) samples the same tokens, as far as the engine's numerics repeat
(the same machine and vLLM build; tests/test_generate.py checks it on CPU).
"""
from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from loop.envs import Environment, PythonSession
from loop.records import Segment, Trajectory
from loop.tasks.base import Task


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    """Per model turn."""
    seed: int = 0
    """Every sampled request's seed derives from it, the round, the task, the sample and the turn (`sample_seed`)."""
    tools: bool = False
    """Multi-turn tool-integrated reasoning: run the model's ```python blocks and show it the output."""
    max_turns: int = Field(4, ge=1)
    """Tool calls per trajectory; a trajectory that asks for one more ends with finish_reason 'max_turns'."""
    observation_max_chars: int = Field(1024, ge=16)
    tool_timeout_s: float = Field(10.0, gt=0)
    system_prompt: str | None = None
    """None: none for plain chain of thought, loop.envs.TOOL_SYSTEM_PROMPT when tools are on."""

    def greedy(self) -> "SamplingConfig":
        return self.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0})


def sample_seed(seed: int, round: int, task_id: str, sample: int, turn: int) -> int:
    """The seed of one sampled request: sample `sample` of task `task_id`, model turn `turn` (0 = the first) of
    round `round`, under the sampling seed `seed`. A hash (blake2b), so it is the same in every process and on
    every machine, and distinct for every combination; 63 bits, which vLLM's generators take as is."""
    key = json.dumps([seed, round, task_id, sample, turn]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def make_environment(cfg: SamplingConfig) -> Environment | None:
    """The environment of one trajectory under `cfg`: a Python session with tools on, else none."""
    return PythonSession(cfg.tool_timeout_s, cfg.observation_max_chars) if cfg.tools else None


def prompt_ids(tokenizer, task: Task, cfg: SamplingConfig) -> list[int]:
    """The chat-templated prompt of `task`: the system prompt (cfg's, else the environment's), then the task."""
    env = make_environment(cfg)
    system = cfg.system_prompt if cfg.system_prompt is not None else (env.system_prompt if env else None)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task.prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Live:
    """A trajectory being generated, with its environment."""

    def __init__(self, traj: Trajectory, cfg: SamplingConfig, round: int):
        self.traj = traj
        self.cfg = cfg
        self.round = round
        self.env = make_environment(cfg)
        if self.env is not None:
            self.env.reset(traj.task_id)
        self.turn_text = ""  # model text since the last observation

    @property
    def ids(self) -> list[int]:
        return self.traj.prompt_token_ids + self.traj.completion_token_ids

    def seed(self) -> int | None:
        """This request's seed: the next model turn is the trajectory's n-th model segment (greedy: none)."""
        if self.cfg.temperature == 0:
            return None
        turn = sum(s.kind == "model" for s in self.traj.segments)
        return sample_seed(self.cfg.seed, self.round, self.traj.task_id, self.traj.sample, turn)

    def pending_action(self) -> str | None:
        """The environment's action that ends the current model turn; None if there is none, or if the tool budget
        is spent (then the trajectory ends with finish_reason 'max_turns')."""
        action = None if self.env is None else self.env.action(self.turn_text)
        if action is None:
            return None
        if self.traj.num_tool_calls >= self.cfg.max_turns:
            self.traj.finish_reason = "max_turns"
            return None
        return action


def generate(engine, tasks: list[Task], cfg: SamplingConfig, *, round: int, adapter: Path | None = None,
             adapter_id: int | None = None) -> list[Trajectory]:
    """n trajectories per task, in task order then sample order; `round` enters every request's seed."""
    [trajs] = generate_many(engine, [(tasks, cfg)], round=round, adapter=adapter, adapter_id=adapter_id)
    return trajs


def generate_many(engine, jobs: list[tuple[list[Task], SamplingConfig]], *, round: int,
                  adapter: Path | None = None, adapter_id: int | None = None) -> list[list[Trajectory]]:
    """Several `generate` calls in one pass through the engine (e.g. sampled and greedy evaluation).

    One batch keeps the engine full: separate calls each end in a tail where a few long answers decode
    alone, which on CPU runs at a fraction of the batched speed."""
    lora = engine.lora_request(adapter, adapter_id)
    sets = []
    for tasks, cfg in jobs:
        lives = []
        for task in tasks:
            ids = prompt_ids(engine.tokenizer, task, cfg)
            lives += [_Live(Trajectory(task.id, s, ids, cumulative_logprob=0.0), cfg, round) for s in range(cfg.n)]
        sets.append(lives)
    _run(engine, [lv for lives in sets for lv in lives], lora)
    return [[lv.traj for lv in lives] for lives in sets]


def continue_trajectories(engine, trajectories: list[Trajectory], cfg: SamplingConfig, *, round: int,
                          adapter: Path | None = None, adapter_id: int | None = None) -> list[Trajectory]:
    """Go on from partial trajectories (e.g. a prefix ending in a ```python block, which runs first);
    returned in the order given. Each keeps its cumulative log-prob: None (a prefix not sampled here)
    stays None."""
    live = []
    for t in trajectories:
        lv = _Live(Trajectory.from_dict(t.to_dict()), cfg, round)
        last_obs = max((i for i, s in enumerate(lv.traj.segments) if s.kind == "observation"), default=-1)
        lv.turn_text = "".join(s.text for s in lv.traj.segments[last_obs + 1:] if s.kind == "model")
        live.append(lv)
    _run(engine, live, engine.lora_request(adapter, adapter_id))
    return [lv.traj for lv in live]


def _run(engine, live: list[_Live], lora) -> None:
    """Generate every trajectory in `live` to its end, in place; each follows its own SamplingConfig."""
    from loop.engine import TurnRequest

    everyone = list(live)
    try:
        # Trajectories handed in ending with an action (a Python block) carry it out before generating.
        calls = [(lv, action) for lv in live if (action := lv.pending_action()) is not None]
        live = [lv for lv in live if lv.traj.finish_reason != "max_turns" and all(lv is not c[0] for c in calls)]
        while live or calls:
            if calls:
                _step(engine, calls)
                live += [lv for lv, _ in calls]
                calls = []
            requests, active = [], []
            for lv in live:
                cfg = lv.cfg
                budget = min(cfg.max_tokens, engine.max_model_len - len(lv.ids))
                if budget < 1:
                    lv.traj.finish_reason = "context"
                    continue
                requests.append(TurnRequest(lv.ids, cfg.temperature, cfg.top_p, budget, lv.seed(),
                                            list(lv.env.stop) if lv.env is not None else None))
                active.append(lv)
            live = []
            if not active:
                break
            for lv, out in zip(active, engine.generate(requests, lora)):
                ids = out.token_ids
                text = engine.tokenizer.decode(ids)
                logprob = out.cumulative_logprob
                if logprob is None or not math.isfinite(logprob):
                    raise RuntimeError(f"vLLM returned the log-prob {logprob} for task {lv.traj.task_id} sample "
                                       f"{lv.traj.sample} ({len(ids)} tokens); a sampled turn needs a finite "
                                       "log-prob (requested with logprobs=0)")
                lv.traj.segments.append(Segment("model", text, ids))
                if lv.traj.cumulative_logprob is not None:
                    lv.traj.cumulative_logprob += logprob
                lv.turn_text += text
                if out.finish_reason == "length":
                    # Cut by max_tokens, or by the context window when that was the tighter budget.
                    lv.traj.finish_reason = "context" if len(lv.ids) >= engine.max_model_len else "length"
                elif lv.env is not None and isinstance(out.stop_reason, str):
                    action = lv.pending_action()
                    if action is not None:
                        calls.append((lv, action))
                    elif lv.traj.finish_reason != "max_turns":
                        live.append(lv)  # a block closed that asks for nothing: let the model go on
                else:
                    lv.traj.finish_reason = "stop"
    finally:
        for lv in everyone:
            if lv.env is not None:
                lv.env.close()


def _step(engine, calls: list[tuple[_Live, str]]) -> None:
    """Carry out every trajectory's action concurrently and append the observations (tokenised as they are)."""
    with ThreadPoolExecutor(max_workers=min(16, len(calls))) as ex:
        observations = list(ex.map(lambda call: call[0].env.step(call[1]), calls))
    for (lv, _), obs in zip(calls, observations):
        obs_ids = engine.tokenizer(obs, add_special_tokens=False)["input_ids"]
        lv.traj.segments.append(Segment("observation", obs, obs_ids))
        lv.traj.num_tool_calls += 1
        lv.turn_text = ""
