"""The in-process fast path: answers that are plain numbers are compared here, exactly, with Fractions.

Most grades in a GSM8K-style round are "42" against "42": shipping those to a worker process would
cost a round trip each. Only a small, bounded grammar is accepted here (integers, decimals, a/b,
\\frac{a}{b}, mixed numbers, scientific notation with a bounded exponent, a trailing percent sign, an
"x = " prefix); everything else goes to the worker, so this module never evaluates anything unbounded.
The strings are expected to have been through normalize.normalize_answer.
"""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline
from dataclasses import dataclass
from fractions import Fraction

from verifiers.math.precision import MAX_DIGITS, MAX_EXPONENT, decimal_value, full_precision_match, significant_digits


@dataclass(frozen=True)
class PlainNumber:
    value: Fraction  # as written, before any percent sign
    half_ulp: Fraction | None  # tolerance the digits state (see precision.py); None: exact
    percent: bool
    decimal: bool = False  # written with a decimal point: a rounded value, unless it is exactly the other side
    digits: int = 0  # significant digits, for a decimal


_PERCENT = r"(?P<pct>\s*\\%)?"
_DECIMAL = re.compile(r"^(?P<sign>[+-]?)(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:\\times10\^\{(?P<exp>[+-]?\d+)\})?"
                      + _PERCENT + "$")
_SLASH = re.compile(r"^(?P<sign>[+-]?)(?P<num>\d+)\s*/\s*(?P<den>\d+)" + _PERCENT + "$")
_FRAC = re.compile(r"^(?P<sign>[+-]?)\\frac\{\s*(?P<nsign>[+-]?)(?P<num>\d+)\s*\}\{\s*(?P<dsign>[+-]?)(?P<den>\d+)\s*\}"
                   + _PERCENT + "$")
_MIXED = re.compile(r"^(?P<sign>[+-]?)(?P<whole>\d+)\s*\\frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}" + _PERCENT + "$")
_ASSIGNMENT = re.compile(r"^(?P<var>[A-Za-z])\s*=\s*(?P<rest>[^=]+)$")


def _too_long(*digit_strings: str | None) -> bool:
    return sum(len(s or "") for s in digit_strings) > MAX_DIGITS


def parse_plain_number(text: str) -> PlainNumber | None:
    """The number `text` writes, or None when it is not a plain number (or too big to handle here)."""
    s = text.strip()
    if m := _DECIMAL.match(s):
        integer, fraction, exponent = m["int"], m["frac"], m["exp"]
        if not (integer or fraction) or _too_long(integer, fraction, exponent):
            return None
        exp = int(exponent) if exponent else 0
        if abs(exp) > MAX_EXPONENT:
            return None
        if fraction is None or fraction == "":
            value, half_ulp = Fraction(int(integer)) * Fraction(10) ** exp, None
        else:
            value, half_ulp = decimal_value(integer, fraction, exp)
        return PlainNumber(-value if m["sign"] == "-" else value, half_ulp, bool(m["pct"]), bool(fraction),
                           significant_digits(integer, fraction or ""))
    for pattern in (_SLASH, _FRAC):
        if m := pattern.match(s):
            if _too_long(m["num"], m["den"]) or int(m["den"]) == 0:
                return None  # n/0 is not a number; the worker reports what it is
            negative = [m["sign"], m.groupdict().get("nsign"), m.groupdict().get("dsign")].count("-") % 2 == 1
            value = Fraction(int(m["num"]), int(m["den"]))
            return PlainNumber(-value if negative else value, None, bool(m["pct"]))
    if m := _MIXED.match(s):
        if _too_long(m["whole"], m["num"], m["den"]) or int(m["den"]) == 0:
            return None
        value = int(m["whole"]) + Fraction(int(m["num"]), int(m["den"]))
        return PlainNumber(-value if m["sign"] == "-" else value, None, bool(m["pct"]))
    return None


def _readings(n: PlainNumber, other_has_percent: bool) -> list[tuple[Fraction, Fraction | None]]:
    """The values a number may stand for. "28%" is 28 or 0.28 (datasets often drop the sign), but
    only against a side without a percent sign: 28% never equals 0.28%."""
    if n.percent and not other_has_percent:
        scaled_ulp = n.half_ulp / 100 if n.half_ulp is not None else None
        return [(n.value, n.half_ulp), (n.value / 100, scaled_ulp)]
    return [(n.value, n.half_ulp)]


def plain_numbers_equal(pred: PlainNumber, gold: PlainNumber) -> bool:
    """Equal values, or a match under the decimal convention of precision.py."""
    for g_value, g_ulp in _readings(gold, pred.percent):
        for p_value, p_ulp in _readings(pred, gold.percent):
            if g_value == p_value:
                return True
            if g_ulp is not None:
                if abs(g_value - p_value) <= g_ulp:
                    return True
            elif (pred.decimal and g_value.denominator != 1
                  and full_precision_match(p_value, p_ulp, pred.digits, g_value)):
                return True
    return False


def split_assignment(text: str) -> tuple[str | None, str]:
    """("x", "5") for "x = 5"; (None, text) otherwise."""
    if m := _ASSIGNMENT.match(text.strip()):
        return m["var"], m["rest"].strip()
    return None, text


def compare_plain(pred: str, gold: str) -> bool | None:
    """True/False when both answers are plain numbers (optionally "v = number"), None otherwise."""
    p_var, p_rest = split_assignment(pred)
    g_var, g_rest = split_assignment(gold)
    p, g = parse_plain_number(p_rest), parse_plain_number(g_rest)
    if p is None or g is None:
        return None
    if p_var is not None and g_var is not None and p_var != g_var:
        return False  # "y = 5" does not answer "x = 5"
    return plain_numbers_equal(p, g)
