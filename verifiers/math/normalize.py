"""One answer string -> the canonical text both the fast path and the LaTeX parser read.

Only rewrites that cannot change which number an answer denotes are made: delimiters, spacing
commands, currency signs, thousands separators, unicode symbols, number words, Python/SymPy
spellings (** pi oo sqrt()), scientific notation, and unit words after a number. Unit words are
dropped only when none of them could change the value ("5 or 6", "5 squared", "3 million",
"2 thirds" keep their words, and the worker then sees them).
"""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline

from verifiers.math.number_words import leading_number_words, scale_word
from verifiers.math.plain_numbers import parse_plain_number
from verifiers.math.unicode_math import closing_paren, replace_unicode_math

_WRAPPERS = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
_BOXED_WHOLE = re.compile(r"^\\(?:boxed|fbox)\s*\{(.*)\}$", re.S)
_TEXT_WHOLE = re.compile(r"^\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}$")
_BOLD_WHOLE = re.compile(r"^\*\*(.*)\*\*$", re.S)
_SPACING = re.compile(r"(?<!\\)\\[,;: ]|~|\\q?quad(?![A-Za-z])")  # not the "\\" of a matrix row
_THOUSANDS_BRACE = re.compile(r"\{,\}")
_LEADING_CURRENCY = re.compile(r"^(?P<sign>[+-]?)\s*(?:\\\$|\$|US\$|USD|EUR|GBP|Rs\.?|€|£|¥|₹)\s*(?=[\d.])")
_TRAILING_CURRENCY = re.compile(r"(?<=\d)\s*(?:\\\$|\$|€|£|¥|₹|USD|EUR|GBP)$")
# (?<!\s): a whitespace run is scanned once, from its start, not again from each of its positions.
_PERCENT_WORD = re.compile(r"(?<!\s)\s*\b(?:percentage|percent|pct)\b")
_BARE_PERCENT = re.compile(r"(?<!\\)%")
_PY_POWER = re.compile(r"\*\*\s*(\d+)|\*\*")
_PY_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_PY_INFINITY = re.compile(r"(?<![\\A-Za-z])oo(?![A-Za-z])")
_PY_SQRT = re.compile(r"(?<![\\A-Za-z])sqrt\(")
_SCI_E = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_SCI_TIMES = re.compile(r"(?<=\d)\s*(?:\\times|\\cdot|\*|\s[x×]\s)\s*10\s*\^\s*(?:\{\s*([+-]?\d+)\s*\}|([+-]?\d+))")
# Upright constants: math-verify's unit stripping would take a trailing "\mathrm{e}" for a unit.
_UPRIGHT_CONSTANT = re.compile(r"\\(?:mathrm|text|operatorname)\s*\{\s*([ei])\s*\}")
# Spellings of the empty set: \varnothing is \emptyset (the parser reads it as a symbol named
# "varnothing"), and so are "\{\}" / "\left\{ \right\}" with any spacing inside.
_EMPTY_SET = re.compile(r"\\varnothing(?![A-Za-z])"
                        r"|(?:\\(?:left|bigl?|Bigl?)\s*)?\\\{\s*(?:\\(?:right|bigr?|Bigr?)\s*)?\\\}")
_FRAC_VARIANTS = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_GROUPED_NUMBER = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACE_GROUPED = re.compile(r"^([+-]?\d{1,3}(?: \d{3})+)(\.\d+)?$")
_MIXED_SLASH = re.compile(r"^([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)(\s*\\%)?$")
_DEGREES = re.compile(r"(?<!\s)\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\text\{\s*degrees?\s*\})$")
_TEXT_UNIT = re.compile(r"(?<!\s)\s*\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{([^{}]*)\}(?:\s*\^\s*\{?\d\}?)?$")
_TRAILING_WORDS = re.compile(r"^(.*?\d)\s+([A-Za-z][A-Za-z .'/-]*)$")

# Words after a number that change (or may change) which value the answer states.
_VALUE_WORDS = frozenset("""
and or to through plus minus times over divided by not nor but except between less more than squared
cubed square root roots factorial power powers percent dozen dozens score half halves third thirds
quarter quarters fourth fourths fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths
tenth tenths hundredth hundredths thousandth thousandths millionth millionths e i pi x y z n k or/and
hundred thousand million billion trillion negative positive approximately about nearly almost
""".split())


_TEXT_GROUP = re.compile(r"\\(?:text(?:rm|bf|it|normal)?|math(?:rm|it|bf)|mbox)\s*\{([^{}]*)\}")
_CONNECTIVE = re.compile(r"\s*,?\s*(?:and|or)?\s*,?\s*")  # "x = 1 \text{ or } x = 2": the parser reads a list
_UNIT_EXPONENT = re.compile(r"\s*(?:\^\s*\{?\s*\d\s*\}?)?\s*")
_HEDGE_WORDS = _VALUE_WORDS | frozenset("""if when unless otherwise else except where whether maybe perhaps probably
possibly likely roughly around approx assuming depending either guess""".split())


def unparsed_remainder(answer: str) -> str | None:
    """Why a normalised answer is not a clean statement of one value, or None when it is.

    math-verify's unit stripping deletes everything after the first \\text{ of an answer, so "3 \\text{ or 4
    if n is odd}" would read as 3. A text group is accepted only as the whole answer (\\text{Evelyn}), as a
    connective the parser reads (\\text{ or }), or as a last group of unit words after the value
    (15 \\text{cm}^2); anything else leaves part of the answer unread, and the answer is not a commitment."""
    groups = [m for m in _TEXT_GROUP.finditer(answer) if not _CONNECTIVE.fullmatch(m.group(1))]
    if not groups:
        return None
    first = groups[0]
    if first.start() == 0 and first.end() == len(answer):
        return None
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", first.group(1))}
    if (_UNIT_EXPONENT.fullmatch(answer, first.end()) and first.start() > 0 and not words & _HEDGE_WORDS
            and not re.search(r"\d", first.group(1))):
        return None
    return (f"the answer goes on in text the checker would not read ({answer[first.start():][:80]!r}): "
            "not a clean statement of one answer")


def _unwrap(s: str) -> str:
    """Strip delimiters around the whole answer, repeatedly ($\\boxed{5}$ -> 5)."""
    while True:
        before = s
        s = s.strip()
        for left, right in _WRAPPERS:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):-len(right)].strip()
        if (m := _BOXED_WHOLE.match(s)) and _balanced(m.group(1)):
            s = m.group(1)
        if m := _BOLD_WHOLE.match(s):
            s = m.group(1)
        if (m := _TEXT_WHOLE.match(s)) and parse_plain_number(_grouping(m.group(1).strip())) is not None:
            s = m.group(1)
        if s == before:
            return s


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _python_sqrt(s: str) -> str:
    """sqrt(x+(1)) -> \\sqrt{x+(1)} (balanced; math-verify's own fix stops at the first ')')."""
    while m := _PY_SQRT.search(s):
        end = closing_paren(s, m.end() - 1)
        if end < 0:
            break
        s = s[:m.start()] + "\\sqrt{" + s[m.end():end] + "}" + s[end + 1:]
    return s


def _scientific(s: str) -> str:
    s = _SCI_E.sub(lambda m: f"{m.group(1)}\\times10^{{{int(m.group(2))}}}", s)
    return _SCI_TIMES.sub(lambda m: f"\\times10^{{{int(m.group(1) or m.group(2))}}}", s)


def _grouping(s: str) -> str:
    """Thousands separators: "1,000" and "1 000" -> "1000", when the answer holds no other comma
    (in "(1,000, 2)" the comma is structure, and the parser decides)."""
    groups = _GROUPED_NUMBER.findall(s)
    if len(groups) == 1 and s.count(",") == groups[0].count(","):
        s = s.replace(groups[0], groups[0].replace(",", ""))
    if m := _SPACE_GROUPED.match(s):
        s = m.group(1).replace(" ", "") + (m.group(2) or "")
    return s


def _is_number_with_units(number: str, words: str) -> bool:
    tokens = re.findall(r"[A-Za-z]+", words)
    return (parse_plain_number(number) is not None
            and not any(t.lower() in _VALUE_WORDS or leading_number_words(t) for t in tokens))


def _strip_units(s: str) -> str:
    """"15 \\text{cm}^2", "5 apples", "90^\\circ", "3 million" -> the number they state."""
    if (m := _DEGREES.search(s)) and parse_plain_number(s[:m.start()]) is not None:
        return s[:m.start()]
    if (m := _TEXT_UNIT.search(s)) and _is_number_with_units(s[:m.start()], m.group(1)):
        return s[:m.start()]
    if m := _TRAILING_WORDS.match(s):
        number, words = m.group(1), m.group(2)
        first, _, rest = words.partition(" ")
        if (scale := scale_word(first)) and not rest and (n := parse_plain_number(number)) and not n.percent:
            value = n.value * scale
            return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        if _is_number_with_units(number, words):
            return number
    return s


def _number_words(s: str) -> str:
    if not s[:1].isalpha():
        return s
    parsed = leading_number_words(s)
    if parsed is None:
        return s
    value, rest = parsed
    if rest.strip() == "" or rest[:1].isspace():
        return f"{value}{rest}"
    return s


def _mixed_number(s: str) -> str:
    """"4 4/9" -> "\\frac{40}{9}": the parser would read the space as a product."""
    if m := _MIXED_SLASH.match(s):
        sign, whole, num, den, percent = m.groups()
        if int(den) != 0:
            return f"{sign}\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}{percent or ''}"
    return s


def _strip_trailing_punct(s: str) -> str:
    """s without its trailing spaces and sentence punctuation: a single period goes, an ellipsis stays
    ("1, 2, 3, ..." is not "1, 2, 3"), "5!" keeps its "!". A scan from the end: linear, where a regex
    ending in (...)+$ backtracks quadratically over a long whitespace run."""
    end = len(s)
    while end > 0:
        c = s[end - 1]
        if c.isspace() or c in ",;:?":
            end -= 1
        elif c == "." and end >= 2 and s[end - 2] == "\\":
            end -= 2  # "\."
        elif c == "." and (end < 2 or s[end - 2] != "."):
            end -= 1
        else:
            break
    return s[:end]


def strip_delimiters(answer: str) -> str:
    """The answer without the delimiters, bold markers and sentence punctuation around it."""
    s = _unwrap(answer)
    s = _strip_trailing_punct(s)
    return _unwrap(s)


def normalize_answer(answer: str) -> str:
    s = replace_unicode_math(answer)
    s = _unwrap(s)
    s = re.sub(r",\\!\s*", ",", s)  # "11,\! 111" groups thousands; a bare ", " does not
    s = s.replace("\\!", "")
    s = _THOUSANDS_BRACE.sub(",", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _strip_trailing_punct(s)
    s = _unwrap(s)
    s = _LEADING_CURRENCY.sub(lambda m: m.group("sign"), s)
    s = _TRAILING_CURRENCY.sub("", s)
    s = _PERCENT_WORD.sub(r"\\%", s)
    s = _BARE_PERCENT.sub(r"\\%", s)
    s = _UPRIGHT_CONSTANT.sub(r"\1", s)
    s = _EMPTY_SET.sub(r"\\emptyset", s)
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _PY_POWER.sub(lambda m: f"^{{{m.group(1)}}}" if m.group(1) else "^", s)
    s = _PY_PI.sub(r"\\pi ", s)
    s = _PY_INFINITY.sub(r"\\infty ", s)
    s = _python_sqrt(s)
    s = _number_words(s)
    s = _grouping(s)
    s = _scientific(s)
    s = _strip_units(s).strip()
    s = _grouping(s)
    s = _mixed_number(s)
    return s.strip()
