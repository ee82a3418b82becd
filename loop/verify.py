"""Grade trajectories with the verifier their task names: math answers or sandboxed code tests.

Only what the model wrote is graded. A math answer must be stated by the model (as in M-DPO): a number
that appears only in a tool observation (the sandbox's ```output block) earns nothing, so the
observation segments are removed before extraction (see model_written_text). A ```output block the
model types itself is model text and is read as such.

A verifier crash is an error, not a reward of 0: an "error" verdict stops the round (the caller sees
which task and why), while a "timeout" is a known outcome kept out of the pairs and counted.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict

from loop.records import Graded, Trajectory
from loop.tasks.base import Task

# A fence's body, up to its closing fence or the end of the text (an answer whose closing fence never came).
_CODE_BLOCK = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
# Chat special tokens end a completion (the rollout decodes them with the text): nothing after one is the answer.
_CHAT_TOKEN = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_text|start_header_id|end_header_id|user|"
                         r"assistant|end)\|>|</s>|<end_of_turn>|<start_of_turn>")


class VerifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = 2
    """Parallel graders (math worker processes, code sandboxes)."""
    math_timeout_s: float = 5.0
    code_timeout_s: float = 10.0
    fallback_last_number: bool = True
    """Accept the last number of a completion when it states no explicit answer (small models rarely
    write '####' or \\boxed{}); the verdict's reason says which rule extracted the answer."""
    cutoff_is_wrong: bool = True
    """Grade a trajectory cut off by a budget (max_tokens, the context window, max_turns) as incorrect, in training
    and in evaluation alike, whatever its text states: it did not finish, and a last number that happens to be
    right is not an answer. Off: cut-off samples are graded on their text (pairs never choose them either way)."""


class VerifierCrash(RuntimeError):
    pass


def extract_program(text: str, entry_point: str | None = None) -> str:
    """The program a code completion proposes, read as a user reading the answer would: the text up to its first
    chat special token (an unfenced answer must not end in '<|im_end|>'); of its fenced blocks, the last one that
    defines `entry_point` (a fix followed by a block of tests is graded on the fix), else the last block; without a
    fenced block, the whole text."""
    if m := _CHAT_TOKEN.search(text):
        text = text[:m.start()]
    blocks = _CODE_BLOCK.findall(text)
    if entry_point is not None:
        defines = re.compile(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
        blocks = [b for b in blocks if defines.search(b)] or blocks
    return blocks[-1] if blocks else text


def model_written_text(trajectory: Trajectory) -> str:
    """The model-written segments of `trajectory`, in order, with each run of observation segments
    replaced by a line break: no extraction rule can see an observation, and text written before and
    after one never fuses into a single token ("#### 4" + observation + "2" is not "#### 42")."""
    parts: list[str] = []
    after_observation = False
    for segment in trajectory.segments:
        if segment.kind == "observation":
            after_observation = bool(parts)
            continue
        if segment.kind != "model":
            raise ValueError(f"task {trajectory.task_id} sample {trajectory.sample}: unknown segment kind "
                             f"{segment.kind!r} (expected 'model' or 'observation')")
        if after_observation:
            parts.append("\n")
            after_observation = False
        parts.append(segment.text)
    return "".join(parts)


def grade_trajectories(tasks: dict[str, Task], trajectories: list[Trajectory], cfg: VerifyConfig) -> list[Graded]:
    """Every trajectory's verdict, in order; VerifierCrash if any grading crashed."""
    return raise_on_crash(grade_each(tasks, trajectories, cfg))


def grade_each(tasks: dict[str, Task], trajectories: list[Trajectory], cfg: VerifyConfig) -> list[Graded]:
    """`grade_trajectories` without the crash check: crashed gradings come back as "error" verdicts (for callers
    that grade in parts, e.g. loop/ray_verify.py, and check the whole with `raise_on_crash`)."""
    # Imported here: the math verifier pulls in SymPy (~0.6 s), which loading a config (VerifyConfig) does not need.
    from verifiers import math as math_verifier
    from verifiers import python_exec

    math_idx = [i for i, t in enumerate(trajectories) if tasks[t.task_id].verifier == "math"]
    code_idx = [i for i, t in enumerate(trajectories) if tasks[t.task_id].verifier == "code"]
    out: list[Graded | None] = [None] * len(trajectories)

    if math_idx:
        # Model-written text only: the answer must be the model's statement, not the sandbox's print.
        items = [(model_written_text(trajectories[i]), tasks[trajectories[i].task_id].answer) for i in math_idx]
        verdicts = math_verifier.grade_many(items, workers=cfg.workers, timeout_s=cfg.math_timeout_s,
                                            fallback_last_number=cfg.fallback_last_number)
        for i, v in zip(math_idx, verdicts):
            out[i] = Graded(trajectories[i], v.status, v.extracted, v.reason)

    if code_idx:
        def run_one(i: int) -> Graded:
            t = trajectories[i]
            task = tasks[t.task_id]
            program = extract_program(t.model_text, task.entry_point)
            r = python_exec.run_tests(program, task.tests, entry_point=task.entry_point, timeout_s=cfg.code_timeout_s)
            status = {"ok": "correct", "timeout": "timeout"}.get(r.status, "incorrect")
            return Graded(t, status, program, f"tests {r.status}: {r.stderr.strip()[-300:]}")

        with ThreadPoolExecutor(cfg.workers) as ex:
            for i, g in zip(code_idx, ex.map(run_one, code_idx)):
                out[i] = g

    graded = [g for g in out if g is not None]
    for g in graded:
        task = tasks[g.trajectory.task_id]
        g.prompt, g.gold = task.prompt, task.answer if task.verifier == "math" else task.tests
    return [cut_off_as_incorrect(g) for g in graded] if cfg.cutoff_is_wrong else graded


def cut_off_as_incorrect(g: Graded) -> Graded:
    """`g` graded incorrect if its trajectory was cut off (verify.cutoff_is_wrong); a crash stays a crash."""
    if not g.trajectory.cut_off or g.status == "error":
        return g
    return Graded(g.trajectory, "incorrect", g.extracted,
                  f"cut off ({g.trajectory.finish_reason}): incorrect whatever it states; as graded: {g.status}, "
                  f"{g.reason}", g.prompt, g.gold)


def raise_on_crash(graded: list[Graded]) -> list[Graded]:
    """`graded` as it is, or VerifierCrash naming the first crash: a crash is never a reward of 0."""
    errors = [g for g in graded if g.status == "error"]
    if errors:
        e = errors[0]
        raise VerifierCrash(f"the verifier crashed on {len(errors)} sample(s); first: task {e.trajectory.task_id} "
                            f"sample {e.trajectory.sample}: {e.reason}")
    return graded
