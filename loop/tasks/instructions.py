"""The one place that says how each family asks for its final answer, and how a prompt is put together.

A task's prompt is the plain problem followed by a blank line and a short answer-format instruction.
The verifiers accept '####', \\boxed{} and (optionally) a trailing number; we ask for '####' on the
GSM-style families because small models have seen that format in GSM8K-like data, and for \\boxed{}
on CHAMP, whose answers are expressions ("(x^2+x+1)(x^2-x+1)") that read naturally in LaTeX.
`TaskSetConfig.instruction` overrides the default ("" for none).
"""
from __future__ import annotations

from loop.tasks.base import VerifierKind

HASH_ANSWER = "Solve the problem step by step. Put the final answer after '####', e.g. '#### 42'."
BOXED_ANSWER = "Solve the problem step by step. Put the final answer in \\boxed{}, e.g. \\boxed{42}."
CODE_ANSWER = ("Write the complete Python function (with its imports and signature) in a single "
               "```python code block.")
FIX_ANSWER = "Answer with the whole fixed function (with its imports and signature) in a single ```python code block."

_DEFAULTS: dict[tuple[str, VerifierKind], str] = {
    ("arithmetic", "math"): HASH_ANSWER,
    ("gsm-symbolic", "math"): HASH_ANSWER,
    ("champ", "math"): BOXED_ANSWER,
    ("humaneval", "code"): CODE_ANSWER,
    ("python-debug", "code"): FIX_ANSWER,
    ("jsonl", "math"): HASH_ANSWER,
    ("jsonl", "code"): CODE_ANSWER,
    ("hf", "math"): HASH_ANSWER,
    ("hf", "code"): CODE_ANSWER,
}


def default_instruction(family: str, verifier: VerifierKind) -> str:
    try:
        return _DEFAULTS[(family, verifier)]
    except KeyError:
        raise KeyError(f"no default answer instruction for family {family!r} with a {verifier} verifier; "
                       f"add one to loop/tasks/instructions.py") from None


def render_prompt(problem: str, family: str, verifier: VerifierKind, instruction: str | None) -> str:
    """The user message: the problem, then the instruction (the family default when `instruction` is None)."""
    text = default_instruction(family, verifier) if instruction is None else instruction
    problem = problem.strip()
    return f"{problem}\n\n{text}" if text else problem
