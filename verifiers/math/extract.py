"""The final answer a completion states, and which rule found it.

Before any rule runs, the completion is cut to the part that can hold the final answer: chat special
tokens and few-shot continuations ("\\nQuestion: ...") end it, the reasoning in <think>...</think> is
dropped (a completion cut off inside <think> has no answer), and fenced code blocks are set aside so
that code such as print(f"\\\\boxed{{{x}}}") is not read as an answer.

Rules (each reads the last occurrence):
  gsm8k_hashes   "#### 42" (GSM8K's format)
  boxed          \\boxed{...} / \\fbox{...} with nested braces, boxes next to each other joined
                 (\\boxed{1}\\boxed{2} -> "1,2"), and the brace-less \\boxed 5
  answer_phrase  "The final answer is X", "Answer: X", "... answer ... is X", and display math
                 right after the word ("Answer \\[ 9 \\]", also when the display spans lines)
    Of these three explicit statements the one written last wins: a model that boxes
    intermediate results and then writes "The final answer is 10455" means 10455.
  bold           "**73**": a short bold number, when there is no explicit statement
  tool_output    the last ```output block (the rules above on its text, else its last line). The
                 loop passes only model-written text (loop/grading.py drops tool observations), so
                 there it is a block the model typed itself: the sandbox's own output is never read
  last_math, last_number
                 lenient fallbacks for small models that never write an answer marker: the last
                 inline math ($x \\ge 5$) when nothing but prose follows it, else the last number
                 (fallback_last_number=False turns both off)
"""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline
from dataclasses import dataclass

from latex2sympy2_extended.math_normalization import extract_boxed_content

from verifiers.math.normalize import strip_delimiters

RULES = ("gsm8k_hashes", "boxed", "answer_phrase", "bold", "tool_output", "last_math", "last_number")


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str  # the rule that found the answer, or why no answer was found


_CHAT_TOKEN = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|start_header_id|end_header_id|user|assistant|end)\|>"
                         r"|</s>|<end_of_turn>|<start_of_turn>")
_FEW_SHOT = re.compile(r"\n[ \t]*(?:#+[ \t]*)?(?:Question|QUESTION|Problem|Human|User|Q)[ \t]*\d*[ \t]*:")
# An info string holds no backtick (CommonMark), which also keeps "```" * n from backtracking to each line end.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n`]*\n(.*?)(?:```|\Z)", re.S)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_WORD = re.compile(r"(?i)\banswer\b")
# Inline $...$ may hold an escaped dollar ("$\\frac{1}{2} \\$ = \\frac{10}{9}$"). A \\( or \\[ span holds no
# other \\( or \\[ (LaTeX does not nest them): a run of unclosed openers is then scanned once, not once each.
_MATH_SPAN = re.compile(r"\$\$.*?\$\$|(?<!\\)\$(?:\\\$|[^$\n])*\$"
                        r"|\\\((?:(?!\\[()]).)*?\\\)|\\\[(?:(?!\\[][]).)*?\\\]", re.S)
_LEADING_MATH = re.compile(r"\$\$(.*?)\$\$|\$((?:\\\$|[^$\n])*)\$"
                           r"|\\\(((?:(?!\\[()]).)*?)\\\)|\\\[((?:(?!\\[][]).)*?)\\\]", re.S)
_QUOTES = re.compile(r"^(?:\\?[\"'])+|(?:\\?[\"'])+$")  # 'is "$12$ and $13$".' quotes the answer
_MATH_JOINER = re.compile(r"\s*(?:,\s*and|,\s*or|,|and|or)\s*")
_SEPARATOR = re.compile(r"(?i)\b(?:is|are|be|equals)\b|:")
# What may stand between the word "answer" and display math that states it (no sentence end).
_LEAD = re.compile(r"^(?:\s|\*|:|[-\u2013\u2014](?=\s)|\\q?quad(?![A-Za-z])|\\[,;: ])*")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\bI hope\b")
_BOLD = re.compile(r"\*\*([^*\n]{1,80})\*\*")
_BOLD_NUMBER = re.compile(r"^[-+]?\s*(?:\\\$|\$)?\s*(?:\d|\.\d|\\d?frac|\\sqrt)")
_NUMBER = re.compile(r"(?<![A-Za-z\d.,\\])-?(?:\d+ \d+/\d+"  # a mixed number, 4 4/9
                     r"|(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?: \d{3})+(?![\d.])|\d+(?:\.\d+)?|\.\d+)"
                     r"(?:\s*/\s*\d+)?)(?:\s*\\?%)?|-?\\d?frac\{\d+\}\{\d+\}")
_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$\n])+?)\$"
                          r"|\\\(((?:(?!\\[()]).)+?)\\\)|\\\[((?:(?!\\[][]).)+?)\\\]", re.S)
# Commands with their name-only arguments (\begin{pmatrix}, \text{cm}) are not prose words.
_COMMAND = re.compile(r"\\[A-Za-z]+(?:\{[A-Za-z*]*\})*")
_PROSE_WORD = re.compile(r"[A-Za-z]{2,}")


def _mask_math(s: str) -> str:
    """`s` with the inside of every math span blanked, so that searches see only the prose."""
    return _MATH_SPAN.sub(lambda m: "$" * len(m.group(0)), s)


def _closing_brace(s: str, open_pos: int) -> int:
    depth = 0
    for i in range(open_pos, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _tidy(candidate: str | None) -> str | None:
    if candidate is None:
        return None
    s = strip_delimiters(candidate.strip())
    return s or None


Found = tuple[str, int]  # an answer and where its statement starts, to pick the last statement


def _gsm8k_hashes(text: str) -> Found | None:
    matches = list(_HASHES.finditer(text))
    if matches and (answer := _tidy(matches[-1].group(1))):
        return answer, matches[-1].start()
    return None


def _boxed(text: str) -> Found | None:
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    j = start + (6 if text.startswith("\\boxed", start) else 5)
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        end = _closing_brace(text, j)
        if end < 0:
            return None  # the completion was cut off inside the box
        # math-verify's helper joins the boxes that together form one answer ("\boxed{1}, \boxed{2}").
        answer = _tidy(extract_boxed_content(text[:end + 1], mode="last"))
    else:
        m = re.match(r"[^\s$]+", text[j:])  # \boxed 5
        answer = _tidy(m.group(0)) if m else None
    return (answer, start) if answer else None


def _ends_inside_box(text: str) -> bool:
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return False
    brace = re.match(r"\\(?:boxed|fbox)[ \t]*\{", text[start:])
    return brace is not None and _closing_brace(text, start + brace.end() - 1) < 0


def _single_number(s: str) -> str | None:
    numbers = [m.group(0) for m in _NUMBER.finditer(s)]
    return numbers[0] if len(numbers) == 1 else None


def _after_answer_word(text: str, pos: int) -> str | None:
    """The answer stated after one mention of "answer", or None if this mention states none.

    Lines are found with the math masked, so display math that spans lines ("Answer:\n\\[\n9\n\\]")
    is one piece of the sentence, not a line break that ends it."""
    window = text[pos:pos + 600]
    window_masked = _mask_math(window)  # same length as window: positions carry over
    line_ends = [i for i, c in enumerate(window_masked) if c == "\n"] + [len(window)]
    sentence, masked = window[:line_ends[0]], window_masked[:line_ends[0]]
    if not masked.strip(" \t*:") and len(line_ends) > 1:  # "**Final Answer:**\n42"
        for start, end in zip(line_ends, line_ends[1:]):
            if window_masked[start + 1:end].strip():
                sentence, masked = ":" + window[start + 1:end], ":" + window_masked[start + 1:end]
                break
        else:
            sentence, masked = ":", ":"
    if end := _SENTENCE_END.search(masked):
        sentence, masked = sentence[:end.start()], masked[:end.start()]
    separators = list(_SEPARATOR.finditer(masked))
    if separators:
        rest = sentence[separators[-1].end():]
    elif _LEADING_MATH.match(lead_free := _LEAD.sub("", sentence)):
        rest = lead_free  # "Answer \( 9 \)", "Answer - \[ 9 \]", "Answer \quad $$9$$"
    else:
        return None
    rest = _QUOTES.sub("", rest.strip(" \t*")).lstrip("=").strip()
    if _LEADING_MATH.match(rest):
        return _tidy(",".join(_leading_math_run(rest)))
    if rest.startswith(("\\boxed", "\\fbox")):
        found = _boxed(rest)
        return found[0] if found else None
    if not rest:
        return None
    if len(rest.split()) > 3 and "\\" not in rest:
        return _tidy(_single_number(rest))  # "Jane started growing Sphere 3 hours ago"
    return _tidy(rest)


def _leading_math_run(s: str) -> list[str]:
    """The contents of the math spans `s` starts with, when joined by "and"/"or"/commas
    ("$12$ and $13$" states one answer with two parts)."""
    parts, pos = [], 0
    while m := _LEADING_MATH.match(s, pos):
        parts.append(next(g for g in m.groups() if g is not None).strip())
        joiner = _MATH_JOINER.match(s, m.end())
        if not joiner or not _LEADING_MATH.match(s, joiner.end()):
            break
        pos = joiner.end()
    return parts


_MAX_ANSWER_MENTIONS = 64  # the last ones; a text saying "answer" thousands of times is not worth reading each


def _answer_phrase(text: str) -> Found | None:
    for m in reversed(_ANSWER_WORD.finditer(text)[-_MAX_ANSWER_MENTIONS:]):
        if (found := _after_answer_word(text, m.end())) is not None:
            return found, m.start()
    return None


def _explicit_statement(text: str) -> tuple[str, str] | None:
    """The last explicit answer statement (####, \\boxed, "the answer is") and its rule."""
    found = [(hit[1], -priority, name, hit[0])
             for priority, (name, rule) in enumerate((("gsm8k_hashes", _gsm8k_hashes), ("boxed", _boxed),
                                                      ("answer_phrase", _answer_phrase)))
             if (hit := rule(text)) is not None]
    if not found:
        return None
    _, _, name, answer = max(found)
    return answer, name


def _bold(text: str) -> str | None:
    for m in reversed(list(_BOLD.finditer(text))):
        content = m.group(1).strip()
        if _BOLD_NUMBER.match(content) and not content.endswith(":") and len(content.split()) <= 3:
            return _tidy(content)
    return None


def _tool_output(outputs: list[str]) -> str | None:
    if not outputs:
        return None
    body = outputs[-1]
    if found := _explicit_statement(body):
        return found[0]
    if found := _bold(body):
        return found
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return _tidy(lines[-1]) if lines and len(lines[-1]) <= 200 else None


def _looks_like_math(content: str) -> bool:
    """"x \\ge 5" is math; "5 for each and " (between two dollar amounts) is prose."""
    return bool(content.strip()) and not _PROSE_WORD.search(_COMMAND.sub(" ", content))


def _math_spans(text: str):
    """(match, content) of each inline math span that is math rather than prose between dollars."""
    for m in _INLINE_MATH.finditer(text):
        content = next(g for g in m.groups() if g is not None)
        if _looks_like_math(content):
            yield m, content


def _last(items):
    last = None
    for last in items:  # noqa: B007 - keeps the last item
        pass
    return last


def _fallback(text: str) -> tuple[str, str] | None:
    """The last inline math if no number follows it, else the last number."""
    number = _last(_NUMBER.finditer(text))
    math = _last(_math_spans(text))
    if math is not None and (number is None or math[0].end() >= number.end()):
        if answer := _tidy(math[1]):
            return answer, "last_math"
    if number is not None and (answer := _tidy(number.group(0))):
        return answer, "last_number"
    return None


def find_answer(completion: str, *, fallback_last_number: bool = True) -> Extraction:
    """The final answer of `completion` and the rule that found it (see the module docstring)."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a str, got {type(completion).__name__}")
    text = completion
    if m := _CHAT_TOKEN.search(text):
        text = text[:m.start()]
    close = text.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    elif "<think>" in text:
        return Extraction(None, "the completion ended inside <think>: it never stated a final answer")
    if m := _FEW_SHOT.search(text):
        text = text[:m.start()]

    outputs = [body for lang, body in _FENCE.findall(text) if lang.lower() == "output"]
    prose = _FENCE.sub("\n", text)
    if _ends_inside_box(prose):
        return Extraction(None, "the completion was cut off inside \\boxed{...}: its final answer is incomplete")
    if found := _explicit_statement(prose):
        return Extraction(*found)
    if (answer := _bold(prose)) is not None:
        return Extraction(answer, "bold")
    if (answer := _tool_output(outputs)) is not None:
        return Extraction(answer, "tool_output")
    if fallback_last_number:
        if found := _fallback(prose):
            return Extraction(*found)
        return Extraction(None, "no answer marker (####, \\boxed, 'the answer is', **bold**, ```output) and no number")
    return Extraction(None, "no answer marker (####, \\boxed, 'the answer is', **bold**, ```output); "
                            "the last-number fallback is off")


def extract_answer(completion: str, *, fallback_last_number: bool = True) -> str | None:
    """The final answer `completion` states, or None.

    fallback_last_number: when no explicit answer is stated, take the last number (or the last
    inline math, when it comes after every number) in the text. Lenient: small models such as
    SmolLM2-135M rarely write '####' or \\boxed{}. The rule used is reported by find_answer.
    """
    return find_answer(completion, fallback_last_number=fallback_last_number).answer
