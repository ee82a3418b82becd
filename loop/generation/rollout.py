"""Rollouts: n trajectories per task from an engine (loop/generation/engine.py), turn by turn, with an environment
(loop/generation/environments.py) acting between the model's turns.

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

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from loop.generation.engine import Engine, TurnRequest
from loop.generation.environments import Environment, PythonSession
from loop.records import Segment, Trajectory
from loop.tasks.base import Task

log = logging.getLogger(__name__)

MAX_SANDBOX_FAILURES = 16
"""Tool calls in a row whose sandbox failed (loop.generation.environments 'sandbox_failed') before the rollout stops:
one failure is that trajectory's observation, a run of them means the sandbox cannot work on this machine."""


class SandboxBroken(RuntimeError):
    pass


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1)
    """Samples (trajectories) per prompt."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    max_tokens: int = Field(512, ge=1)
    """Model-written tokens per trajectory, all turns together (tool observations do not count): a trajectory that
    reaches it ends with finish_reason 'length'."""
    seed: int = 0
    """Every sampled request's seed derives from it, the round, the task, the sample and the turn (`sample_seed`)."""
    tools: bool = False
    """Multi-turn tool-integrated reasoning: run the model's ```python blocks and show it the output."""
    max_turns: int = Field(4, ge=1)
    """Tool calls per trajectory; a trajectory that asks for one more ends with finish_reason 'max_turns'."""
    observation_max_chars: int = Field(1024, ge=16)
    """A tool observation longer than this is cut (the model sees where)."""
    tool_timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit of one tool call (a cell); a cell that runs over is stopped and the observation says so."""
    max_live_sessions: int = Field(64, ge=1)
    """With tools on: at most this many sandboxed interpreters (a Python process with its imports) alive at once. A
    trajectory opens its own at its first tool call and holds it until it ends or its tool budget is spent; one that
    calls the tool while all are taken waits for one to close, and trajectories that have not called it never wait.
    Memory grows with this number, not with n x prompts."""
    system_prompt: str | None = None
    """None: none for plain chain of thought, loop.generation.environments.TOOL_SYSTEM_PROMPT when tools are on."""

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


class _LiveTrajectory:
    """A trajectory being generated, with its environment; `job`: its place among generate_many's jobs."""

    def __init__(self, traj: Trajectory, cfg: SamplingConfig, round: int, job: int = 0):
        self.traj = traj
        self.cfg = cfg
        self.round = round
        self.job = job
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


def generate(engine: Engine, tasks: list[Task], cfg: SamplingConfig, *, round: int, adapter: Path | None = None,
             adapter_id: int | None = None) -> list[Trajectory]:
    """n trajectories per task, in task order then sample order; `round` enters every request's seed."""
    [trajs] = generate_many(engine, [(tasks, cfg)], round=round, adapter=adapter, adapter_id=adapter_id)
    return trajs


def generate_many(engine: Engine, jobs: list[tuple[list[Task], SamplingConfig]], *, round: int,
                  adapter: Path | None = None, adapter_id: int | None = None,
                  checkpoint: Path | None = None) -> list[list[Trajectory]]:
    """Several `generate` calls in one pass through the engine (e.g. sampled and greedy evaluation).

    One batch keeps the engine full: separate calls each end in a tail where a few long answers decode
    alone, which on CPU runs at a fraction of the batched speed.

    `checkpoint`: a JSONL file that every finished trajectory is appended to as it ends. Trajectories already in
    it (from a call that failed or was stopped partway) are taken from it instead of being generated again; the
    others are generated as they would have been (each request's seed depends only on its task, sample and turn).
    The caller deletes it once the stage's own output is written. A checkpoint written for other jobs, seeds or
    adapter (its first line says which) is discarded, not mixed in."""
    lora = engine.lora_request(adapter, adapter_id)
    key = hashlib.sha256(json.dumps([[[t.id for t in tasks], cfg.model_dump(mode="json")] for tasks, cfg in jobs]
                                    + [round, str(adapter), adapter_id]).encode()).hexdigest()
    done = _read_checkpoint(checkpoint, key) if checkpoint is not None else {}
    sets: list[list[_LiveTrajectory | Trajectory]] = []
    todo: list[_LiveTrajectory] = []
    for j, (tasks, cfg) in enumerate(jobs):
        row: list[_LiveTrajectory | Trajectory] = []
        for task in tasks:
            ids = None
            for s in range(cfg.n):
                kept = done.get((j, task.id, s))
                if kept is not None:
                    row.append(kept)
                    continue
                ids = ids or prompt_ids(engine.tokenizer, task, cfg)
                lv = _LiveTrajectory(Trajectory(task.id, s, ids, cumulative_logprob=0.0), cfg, round, job=j)
                row.append(lv)
                todo.append(lv)
        sets.append(row)
    if done:
        log.info("rollout: %d trajectories taken from %s, %d to generate", len(done), checkpoint, len(todo))
    if checkpoint is not None and not done:
        checkpoint.write_text(json.dumps({"checkpoint_of": key}) + "\n")
    with open(checkpoint, "a") if checkpoint is not None else contextlib.nullcontext() as out:
        def record(lv: _LiveTrajectory) -> None:
            if out is not None:
                out.write(json.dumps({"job": lv.job, "trajectory": lv.traj.to_dict()}) + "\n")
                out.flush()

        _run(engine, todo, lora, on_done=record)
    return [[x.traj if isinstance(x, _LiveTrajectory) else x for x in row] for row in sets]


def _read_checkpoint(path: Path, key: str) -> dict[tuple[int, str, int], Trajectory]:
    """(job, task id, sample) -> trajectory of the lines of `path` that are whole (the last one may have been cut by
    a kill mid-write); {} when `path` was written for another key."""
    out: dict[tuple[int, str, int], Trajectory] = {}
    if not path.exists():
        return out
    lines = path.read_text().splitlines()
    if not lines or lines[0] != json.dumps({"checkpoint_of": key}):
        log.warning("rollout: %s was written for other jobs, seeds or adapter; starting over", path)
        return out
    for line in lines[1:]:
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        t = Trajectory.from_dict(d["trajectory"])
        out[(d["job"], t.task_id, t.sample)] = t
    return out


def continue_trajectories(engine: Engine, trajectories: list[Trajectory], cfg: SamplingConfig, *, round: int,
                          adapter: Path | None = None, adapter_id: int | None = None) -> list[Trajectory]:
    """Go on from partial trajectories (e.g. a prefix ending in a ```python block, which runs first);
    returned in the order given. Each keeps its cumulative log-prob: None (a prefix not sampled here)
    stays None."""
    live = []
    for t in trajectories:
        lv = _LiveTrajectory(Trajectory.from_dict(t.to_dict()), cfg, round)
        last_obs = max((i for i, s in enumerate(lv.traj.segments) if s.kind == "observation"), default=-1)
        lv.turn_text = "".join(s.text for s in lv.traj.segments[last_obs + 1:] if s.kind == "model")
        live.append(lv)
    _run(engine, live, engine.lora_request(adapter, adapter_id))
    return [lv.traj for lv in live]


def _run(engine: Engine, live: list[_LiveTrajectory], lora,
         on_done: Callable[[_LiveTrajectory], None] | None = None) -> None:
    """Generate every trajectory in `live` to its end, in place; each follows its own SamplingConfig. With tools on,
    at most `max_live_sessions` environments hold a session at once: a tool call that would open one more waits
    (its trajectory paused) until one closes; `on_done` sees each trajectory as it ends."""
    flight: list[_LiveTrajectory] = []  # ready for their next model turn
    calls: list[tuple[_LiveTrajectory, str]] = []  # waiting for their environment's step
    failures = [0]  # sandbox failures in a row (MAX_SANDBOX_FAILURES)

    def end(lv: _LiveTrajectory) -> None:
        if lv.env is not None:
            lv.env.close()
        if on_done is not None:
            on_done(lv)

    def route(lv: _LiveTrajectory) -> None:
        """Carry out the environment's action that ends the model's text, end a trajectory whose tool budget is
        spent, or let the model go on."""
        action = lv.pending_action()
        if action is not None:
            calls.append((lv, action))
        elif lv.traj.finish_reason == "max_turns":
            end(lv)
        else:
            flight.append(lv)

    def ready_calls() -> list[tuple[_LiveTrajectory, str]]:
        """The calls that may run now: those of environments that hold a session, and as many others as there
        are sessions free (in order); the rest stay in `calls`. Every session is held by a trajectory that is
        running (a model turn or a step), so one frees up and a waiting call never waits for ever."""
        held = sum(lv.env is not None and lv.env.holds_session for lv in live)
        ready, wait = [], []
        for lv, action in calls:
            if lv.env.holds_session or held < lv.cfg.max_live_sessions:
                held += not lv.env.holds_session
                ready.append((lv, action))
            else:
                wait.append((lv, action))
        calls[:] = wait
        return ready

    try:
        for lv in live:  # a trajectory handed in ending with an action (a Python block) carries it out first
            route(lv)
        while flight or calls:
            if calls:
                ready = ready_calls()
                if not ready and not flight:  # cannot happen (see ready_calls); never spin
                    raise RuntimeError(f"{len(calls)} tool calls wait for a session that no running trajectory holds")
                if ready:
                    _step(engine, ready, failures)
                flight += [lv for lv, _ in ready]
            requests, active = [], []
            for lv in flight:
                cfg = lv.cfg
                room = engine.max_model_len - len(lv.ids)
                budget = min(cfg.max_tokens - lv.traj.num_model_tokens, room)
                if budget < 1:
                    lv.traj.finish_reason = "context" if room < 1 else "length"
                    end(lv)
                    continue
                requests.append(TurnRequest(lv.ids, cfg.temperature, cfg.top_p, budget, lv.seed(),
                                            list(lv.env.stop) if lv.env is not None else None))
                active.append(lv)
            flight = []
            # As each request finishes (not when the whole batch has), so that a trajectory that ends here reaches
            # `on_done` (the stage's checkpoint) while the rest of the batch is still running. Closed on the way out,
            # so that an error or an interrupt here aborts the requests still in the engine.
            with contextlib.closing(engine.generate_stream(requests, lora)) as outputs:
                for i, out in outputs:
                    lv = active[i]
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
                        # Cut by the token budget, or by the context window when that was the tighter one.
                        lv.traj.finish_reason = "context" if len(lv.ids) >= engine.max_model_len else "length"
                        end(lv)
                    elif lv.env is not None and isinstance(out.stop_reason, str):
                        route(lv)  # a block closed: run it, or (asking for nothing) let the model go on
                    else:
                        lv.traj.finish_reason = "stop"
                        end(lv)
    finally:
        for lv in live:
            if lv.env is not None:
                lv.env.close()


def _step(engine: Engine, calls: list[tuple[_LiveTrajectory, str]], failures: list[int]) -> None:
    """Carry out every trajectory's action concurrently and append the observations (tokenised as they are). A
    trajectory whose tool budget is now spent closes its environment: it cannot call the tool again."""
    with ThreadPoolExecutor(max_workers=min(16, len(calls))) as ex:
        observations = list(ex.map(lambda call: call[0].env.step(call[1]), calls))
    for (lv, _), obs in zip(calls, observations):
        obs_ids = engine.tokenizer(obs, add_special_tokens=False)["input_ids"]
        lv.traj.segments.append(Segment("observation", obs, obs_ids))
        lv.traj.num_tool_calls += 1
        lv.turn_text = ""
        error = lv.env.last_error
        if error is not None:
            lv.traj.tool_errors.append(error)
        failures[0] = failures[0] + 1 if error == "sandbox_failed" else 0
        if failures[0] >= MAX_SANDBOX_FAILURES:
            raise SandboxBroken(f"the Python sandbox failed {failures[0]} times in a row (last, task "
                                f"{lv.traj.task_id}: {obs.strip()[:300]}); it cannot work on this machine as set up; "
                                "the run's log has each failure (check bubblewrap and the cgroup delegation)")
        if lv.traj.num_tool_calls >= lv.cfg.max_turns:
            lv.env.close()
