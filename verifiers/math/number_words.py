"""Cardinal numbers written in English words ("twenty-one", "one hundred and five", "3 million")."""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline

_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_WORD = re.compile(r"[A-Za-z]+")


def words_to_int(words: list[str]) -> int | None:
    """The integer a sequence of number words spells, or None if it is not one well-formed number
    ("five six" and "five and six" are not numbers; "one hundred and five" is)."""
    total, group = 0, 0
    has_units = has_tens = has_hundreds = False
    last_scale = None
    after_and_allowed = False
    expect_number = False  # right after "and"
    if not words:
        return None
    for raw in words:
        w = raw.lower()
        if w == "and":
            if not after_and_allowed:
                return None
            after_and_allowed, expect_number = False, True
            continue
        after_and_allowed = False
        if w in _SMALL:
            if has_units or (has_tens and not 0 < _SMALL[w] < 10) or (w == "zero" and (total or group)):
                return None
            group += _SMALL[w]
            has_units = True
        elif w in _TENS:
            if has_tens or has_units:
                return None
            group += _TENS[w]
            has_tens = True
        elif w == "hundred":
            if not has_units or has_tens or has_hundreds or group >= 10:
                return None
            group *= 100
            has_hundreds, has_units = True, False
            after_and_allowed = True
        elif w in _SCALES:
            scale = _SCALES[w]
            if group == 0 or (last_scale is not None and scale >= last_scale):
                return None
            total += group * scale
            group, has_units, has_tens, has_hundreds = 0, False, False, False
            last_scale, after_and_allowed = scale, True
        else:
            return None
        expect_number = False
    if expect_number:
        return None
    return total + group


def leading_number_words(text: str) -> tuple[int, str] | None:
    """(value, rest) when `text` starts with number words: "twenty-one apples" -> (21, " apples")."""
    s = text.strip()
    sign = 1
    if m := re.match(r"(?i)(negative|minus)\s+", s):
        sign, s = -1, s[m.end():]
    tokens: list[str] = []
    best: tuple[int, int] | None = None  # value and end of the longest prefix that is a number
    pos = 0
    while m := _WORD.match(s, pos):
        tokens.append(m.group(0))
        pos = m.end()
        value = words_to_int(tokens)
        if value is not None:
            best = (value, pos)
        elif tokens[-1].lower() != "and":  # "and" is only valid once the next word arrives
            break
        sep = re.match(r"[ \t-]+", s[pos:])
        pos += sep.end() if sep else 0
    if best is None:
        return None
    return sign * best[0], s[best[1]:]


def scale_word(word: str) -> int | None:
    """10**6 for "million": "3 million" is 3000000, not 3 with a unit."""
    w = word.lower()
    return 100 if w == "hundred" else _SCALES.get(w)
