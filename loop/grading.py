"""Grade trajectories with the verifier their task names: math answers or sandboxed code tests.

Only what the model wrote is graded. A math answer must be stated by the model (as in M-DPO): a number
that appears only in a tool observation (the sandbox's ```output block) earns nothing, so the
observation segments are removed before extraction (see model_written_text). A ```output block the
model types itself is model text and is read as such.

Nothing a sample contains may stop the round: what the policy wrote is graded (a malformed reply, a dead
sandbox, an answer the comparison cannot handle are failed gradings of that sample). A crash of the grader
itself (a bug, a gold answer it cannot read, a missing sandbox) is an "error" verdict, never a reward of 0:
each is logged with its sample, and the round stops when any of them is a gold answer's fault or their share
passes `max_error_share`. A math timeout is an unverifiable answer, kept out of the pairs and counted; a code
timeout is a wrong program (graded incorrect, a candidate for the rejected side) unless the config says
otherwise. See docs/verifiers.md.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from loop.records import Graded, Trajectory
from loop.tasks.base import Task

# A fence's body, up to its closing fence or the end of the text (an answer whose closing fence never came).
_CODE_BLOCK = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
# Chat special tokens end a completion (the rollout decodes them with the text): nothing after one is the answer.
_CHAT_TOKEN = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end_of_text|start_header_id|end_header_id|user|"
                         r"assistant|end)\|>|</s>|<end_of_turn>|<start_of_turn>")
log = logging.getLogger(__name__)
# Reasons of "error" verdicts caused by the task's data (a gold answer or tests the grader cannot use): any one
# of them stops the round, since every sample of that task would be graded against broken data.
GOLD_ERROR = "[gold] "
CODE_TIMEOUT = "tests timeout (counted as incorrect): "


class VerifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = 2
    """Parallel graders (math worker processes, code sandboxes)."""
    math_timeout_s: float = 5.0
    """Time for comparing one math answer with its gold; over it the verdict is timeout (kept out of the pairs)."""
    code_timeout_s: float = 10.0
    """Time for running one program against its tests in the sandbox."""
    fallback_last_number: bool = True
    """Accept the last number of a completion when it states no explicit answer (small models rarely
    write '####' or \\boxed{}); the verdict's reason says which rule extracted the answer."""
    cutoff_is_wrong: bool = True
    """Grade a trajectory cut off by a budget (max_tokens, the context window, max_turns) as incorrect, in training
    and in evaluation alike, whatever its text states: it did not finish, and a last number that happens to be
    right is not an answer. Off: cut-off samples are graded on their text (pairs never choose them either way)."""
    max_error_share: float = Field(0.01, ge=0, le=1)
    """Stop the round when more than this share of its samples crashed the grader ("error" verdicts, each
    logged with its sample). A crash caused by the gold data stops it at once, whatever the share."""
    code_timeout_is_incorrect: bool = True
    """A program that overruns its time limit is graded incorrect (for code a timeout is a wrong program, and
    leaving it out would let an endless loop escape every penalty); False keeps it a "timeout" verdict."""


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
    """Every trajectory's verdict, in order; VerifierCrash if grader crashes pass the config's threshold."""
    return raise_on_crash(grade_each(tasks, trajectories, cfg), cfg.max_error_share)


def _crash(e: BaseException) -> str:
    return f"the grader crashed: {type(e).__name__}: {str(e)[:300]}"


def grade_each(tasks: dict[str, Task], trajectories: list[Trajectory], cfg: VerifyConfig) -> list[Graded]:
    """`grade_trajectories` without the crash check: crashed gradings come back as "error" verdicts (for callers
    that grade in parts, e.g. loop/cluster/grading.py, and check the whole with `raise_on_crash`)."""
    # Imported here: the math verifier pulls in SymPy (~0.6 s), which loading a config (VerifyConfig) does not need.
    from verifiers import math as math_verifier
    from verifiers import python_exec

    math_idx = [i for i, t in enumerate(trajectories) if tasks[t.task_id].verifier == "math"]
    code_idx = [i for i, t in enumerate(trajectories) if tasks[t.task_id].verifier == "code"]
    out: list[Graded | None] = [None] * len(trajectories)

    if math_idx:
        for i in list(math_idx):
            gold = tasks[trajectories[i].task_id].answer
            if not isinstance(gold, str) or not gold.strip():
                out[i] = Graded(trajectories[i], "error", None, f"{GOLD_ERROR}the task's gold answer is {gold!r}")
                math_idx.remove(i)
        # Model-written text only: the answer must be the model's statement, not the sandbox's print.
        items = [(model_written_text(trajectories[i]), tasks[trajectories[i].task_id].answer) for i in math_idx]
        try:
            verdicts = math_verifier.grade_many(items, workers=cfg.workers, timeout_s=cfg.math_timeout_s,
                                                fallback_last_number=cfg.fallback_last_number)
        except Exception as e:  # noqa: BLE001 - a grader bug: every sample of the batch is an error, counted
            verdicts = [math_verifier.Verdict("error", None, _crash(e)) for _ in items]
        for i, v in zip(math_idx, verdicts):
            reason = GOLD_ERROR + v.reason if v.gold_error else v.reason
            out[i] = Graded(trajectories[i], v.status, v.extracted, reason)

    if code_idx:
        def run_one(i: int) -> Graded:
            t = trajectories[i]
            task = tasks[t.task_id]
            program = extract_program(t.model_text, task.entry_point)
            if not isinstance(task.tests, str) or not task.tests.strip():
                return Graded(t, "error", program, f"{GOLD_ERROR}the task has no tests ({task.tests!r:.40})")
            try:
                r = python_exec.run_tests(program, task.tests, entry_point=task.entry_point,
                                          timeout_s=cfg.code_timeout_s)
            except Exception as e:  # noqa: BLE001 - the grader's own failure (no sandbox, a bug), counted
                return Graded(t, "error", program, _crash(e))
            detail = r.reason if r.status != "ok" else ""
            if r.status == "timeout" and cfg.code_timeout_is_incorrect:
                return Graded(t, "incorrect", program, f"{CODE_TIMEOUT}{detail}")
            status = {"ok": "correct", "timeout": "timeout"}.get(r.status, "incorrect")
            return Graded(t, status, program, f"tests {r.status}: {detail}; {r.stderr.strip()[-300:]}")

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


def raise_on_crash(graded: list[Graded], max_error_share: float = 0.01) -> list[Graded]:
    """`graded` as it is, with each crash logged with its sample; VerifierCrash naming the first crash when one
    is the gold data's fault or more than `max_error_share` of the samples crashed. A crash is never a reward
    of 0: below the threshold the "error" verdicts stay in `graded`, and pairing leaves them out."""
    errors = [g for g in graded if g.status == "error"]
    for g in errors:
        log.warning("grader crash on task %s sample %d: %s\n  sample: %.500r", g.trajectory.task_id,
                    g.trajectory.sample, g.reason, g.trajectory.model_text)
    gold = [g for g in errors if g.reason.startswith(GOLD_ERROR)]
    if gold or len(errors) > max_error_share * len(graded):
        e = (gold or errors)[0]
        why = "on gold data" if gold else f"over the threshold of {max_error_share:.1%} of {len(graded)} samples"
        raise VerifierCrash(f"the verifier crashed on {len(errors)} sample(s), {why}; first: task "
                            f"{e.trajectory.task_id} sample {e.trajectory.sample}: {e.reason}")
    return graded


def grading_counts(graded: list[Graded]) -> dict[str, float]:
    """The round's grading counts for MLflow: grader crashes, and timeouts by verifier (a math timeout is an
    unverifiable answer left out of the pairs; a code timeout is graded incorrect by default)."""
    return {"verify/errors": float(sum(g.status == "error" for g in graded)),
            "verify/math_timeouts": float(sum(g.status == "timeout" and not g.reason.startswith("tests ")
                                              for g in graded)),
            "verify/code_timeouts": float(sum(g.reason.startswith((CODE_TIMEOUT, "tests timeout")) for g in graded))}
