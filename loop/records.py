"""The records that flow through a round: trajectories (generation) and their grades (verification).

A trajectory is kept in token space, as a list of segments that are either written by the model or
observations injected by the tool (sandbox output). Training masks observation segments out of the
DPO log-probs, so the token ids here are exactly the ids the policy saw: no re-tokenisation drift.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

SegmentKind = Literal["model", "observation"]
# stop: the model ended its answer; length: cut off by max_tokens; max_turns: tool budget spent;
# context: the next turn would not fit in the model's context window.
FinishReason = Literal["stop", "length", "max_turns", "context"]
GradeStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
CUT_OFF = frozenset({"length", "context", "max_turns"})
"""The finish reasons of a trajectory that did not end by itself: its answer may be unfinished."""


@dataclass
class Segment:
    kind: SegmentKind
    text: str
    token_ids: list[int]


@dataclass
class Trajectory:
    task_id: str
    sample: int  # index among the n samples of this task in this round
    prompt_token_ids: list[int]  # the chat-templated prompt, ending with the generation prompt
    segments: list[Segment] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    cumulative_logprob: float | None = None
    """Sum of the sampler's log-probs over the model-written tokens; None when not all of them were sampled by the
    engine (e.g. a hand-written prefix), so it is left out rather than summed over part of the tokens."""
    num_tool_calls: int = 0
    tool_errors: list[str] = field(default_factory=list)
    """The kind of every tool call that failed (loop.generation.environments.TOOL_ERROR_KINDS), in order."""

    @property
    def cut_off(self) -> bool:
        """Ended by a budget (tokens, context window, tool calls) rather than by the model."""
        return self.finish_reason in CUT_OFF

    @property
    def text(self) -> str:
        """The completion as one string (model turns and observations, in order)."""
        return "".join(s.text for s in self.segments)

    @property
    def model_text(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "model")

    @property
    def completion_token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def completion_mask(self) -> list[int]:
        """1 for tokens the model wrote (trained on), 0 for observation tokens (masked)."""
        return [int(s.kind == "model") for s in self.segments for _ in s.token_ids]

    @property
    def num_model_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind == "model")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        d = dict(d)
        d["segments"] = [Segment(**s) for s in d["segments"]]
        return cls(**d)


@dataclass
class Graded:
    """A trajectory with the verifier's verdict, and the problem it answers (so a sample written out can be read
    against its problem: loop.grading fills them in)."""

    trajectory: Trajectory
    status: GradeStatus
    extracted: str | None
    reason: str
    prompt: str | None = None  # the task's user message
    gold: str | None = None  # the gold final answer (math) or the tests (code)

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    @property
    def gradeable(self) -> bool:
        """False when the verifier could not decide (timeout); such samples are kept out of pairs."""
        return self.status in ("correct", "incorrect", "no_answer")

    def to_dict(self) -> dict:
        return {"trajectory": self.trajectory.to_dict(), "status": self.status,
                "extracted": self.extracted, "reason": self.reason, "prompt": self.prompt, "gold": self.gold}

    @classmethod
    def from_dict(cls, d: dict) -> "Graded":
        return cls(Trajectory.from_dict(d["trajectory"]), d["status"], d["extracted"], d["reason"],
                   d.get("prompt"), d.get("gold"))
