"""Unicode math written by models (½ √2 ∞ 90° −3 x² π) rewritten as the LaTeX the parser reads."""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline
import unicodedata

_SYMBOLS = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",  # en dash, used as a minus by some tokenizers
    "\u00d7": r"\times ",
    "\u22c5": r"\cdot ",
    "\u00b7": r"\cdot ",
    "\u00f7": r"\div ",
    "\u221e": r"\infty ",
    "\u03c0": r"\pi ",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2260": r"\ne ",
    "\u00b1": r"\pm ",
    "\u2213": r"\mp ",
    "\u222a": r"\cup ",
    "\u2229": r"\cap ",
    "\u2208": r"\in ",
    "\u2205": r"\emptyset ",
    "\u00b0": r"^\circ ",
    "\u2044": "/",  # fraction slash
    "\u2026": r"\ldots ",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
    "\u2007": " ",
}
_SUPERSCRIPTS = dict(zip("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207a\u207b",
                         "0123456789+-"))
_SUPERSCRIPT_RUN = re.compile("[" + "".join(_SUPERSCRIPTS) + "]+")
_VULGAR = re.compile(r"(\d?)([\u00bc-\u00be\u2150-\u215e])")
_ROOT = "\u221a"


def _vulgar_fraction(m: re.Match) -> str:
    # NFKC spells the character out: "½" -> "1⁄2" (with a fraction slash).
    num, _, den = unicodedata.normalize("NFKC", m.group(2)).partition("\u2044")
    # "2½" is a mixed number; LaTeX "2\frac{1}{2}" is read as 2 + 1/2.
    return f"{m.group(1)}\\frac{{{num}}}{{{den}}}"


def closing_paren(s: str, start: int) -> int:
    """The index of the ')' that closes the '(' at `start`, or -1."""
    depth = 0
    for i in range(start, len(s)):
        depth += {"(": 1, ")": -1}.get(s[i], 0)
        if depth == 0:
            return i
    return -1


def _square_roots(s: str) -> str:
    """√2 -> \\sqrt{2}, √(x+1) -> \\sqrt{x+1}, √{..} kept as a LaTeX argument."""
    out = []
    i = 0
    while (j := s.find(_ROOT, i)) >= 0:
        out.append(s[i:j])
        k = j + 1
        if k < len(s) and s[k] == "(" and (end := closing_paren(s, k)) > 0:
            out.append("\\sqrt{" + s[k + 1:end] + "}")
            i = end + 1
        elif k < len(s) and s[k] == "{":
            out.append("\\sqrt")
            i = k
        else:
            m = re.match(r"\d+(?:\.\d+)?|[A-Za-z]|\\[A-Za-z]+", s[k:])
            arg = m.group(0) if m else ""
            out.append("\\sqrt{" + arg + "}")
            i = k + len(arg)
    out.append(s[i:])
    return "".join(out)


def replace_unicode_math(text: str) -> str:
    if text.isascii():
        return text
    s = _VULGAR.sub(_vulgar_fraction, text)
    s = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + "".join(_SUPERSCRIPTS[c] for c in m.group(0)) + "}", s)
    if _ROOT in s:
        s = _square_roots(s)
    return "".join(_SYMBOLS.get(c, c) for c in s)
