"""How close a decimal must be to count as the same number (the convention in docs/verifiers.md).

Exact values (integers, fractions, radicals, pi) are compared exactly, and a decimal is a rounded value.
Two cases, by who wrote the decimal:

* the gold answer is a decimal: its digits state how the task wanted the answer rounded, so a prediction
  matches when it is within half a unit in the gold's last written place ("16386.17" accepts 16386.169).
  The gold must carry at least MIN_SIGNIFICANT_DIGITS significant digits for this ("0.5" never stands
  for 0.46), and a value is never rounded to zero (1e-7 vs 4e-7 stay different);
* the gold answer is exact and the prediction a decimal: an integer gold is matched only by the same
  integer (no rounding, in plain digits or in scientific notation: 1.2346e9 is not 1234567890), and any
  other exact value only by a decimal at full float precision: the value correctly rounded to at least
  FLOAT_DIGITS significant digits (the digits a double always keeps: 0.0833333333333333 for 1/12), or
  a decimal of as many digits within one double ulp of it (what a program computing in doubles prints:
  1.4142135623730951 for sqrt 2). A tool makes a 4-digit rounding free to compute, so a rounding is not
  the answer an exact gold asks for.
"""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline
from fractions import Fraction

MIN_SIGNIFICANT_DIGITS = 4
FLOAT_DIGITS = 15  # DBL_DIG: a decimal this precise is what printing a double gives
_DOUBLE_ULP = Fraction(1, 2**52)  # relative spacing of doubles
# Exponents beyond this are left to the bounded worker: 10**(10**9) must never be built in-process.
MAX_EXPONENT = 1000
MAX_DIGITS = 4000  # below CPython's int<->str conversion limit (4300)

# A decimal literal, optionally in the canonical scientific form the normaliser writes.
_DECIMAL_LITERAL = re.compile(r"(?<![\w.])(\d*)\.(\d+)(?:\\times10\^\{([+-]?\d+)\})?(?![\d.])")


def significant_digits(integer_part: str, fraction_part: str) -> int:
    return len((integer_part + fraction_part).lstrip("0"))


def decimal_value(integer_part: str, fraction_part: str, exponent: int = 0) -> tuple[Fraction, Fraction | None]:
    """The exact value of a written decimal and its half-unit in the last place, or None when it has
    too few significant digits to carry a tolerance."""
    value = Fraction(int(integer_part or "0") * 10 ** len(fraction_part) + int(fraction_part or "0"),
                     10 ** len(fraction_part)) * Fraction(10) ** exponent
    if significant_digits(integer_part, fraction_part) < MIN_SIGNIFICANT_DIGITS:
        return value, None
    return value, Fraction(1, 2 * 10 ** len(fraction_part)) * Fraction(10) ** exponent


def written_decimals(text: str) -> dict[Fraction, tuple[Fraction | None, int]]:
    """Every decimal literal in `text`: exact value -> (half-unit in the last place, or None when it has too
    few significant digits to carry one; its significant digits). A value written twice keeps its least
    precise writing (the one that claims the least)."""
    found: dict[Fraction, tuple[Fraction | None, int]] = {}
    for m in _DECIMAL_LITERAL.finditer(text):
        integer_part, fraction_part, exponent = m.group(1), m.group(2), m.group(3)
        if len(integer_part) + len(fraction_part) > MAX_DIGITS:
            continue
        exp = int(exponent) if exponent else 0
        if abs(exp) > MAX_EXPONENT:
            continue
        value, half_ulp = decimal_value(integer_part, fraction_part, exp)
        digits = significant_digits(integer_part, fraction_part)
        if value not in found or digits < found[value][1]:
            found[value] = (half_ulp, digits)
    return found


def full_precision_match(pred: Fraction, pred_half_ulp: Fraction | None, pred_digits: int, gold) -> bool:
    """Whether decimal `pred` (its digits and half-ulp as written) is the exact non-integer value `gold` at full
    float precision: at least FLOAT_DIGITS significant digits, and within its own rounding or one double
    ulp of `gold` (what computing in doubles and printing the result gives: math.pi / 3 prints
    1.0471975511965976, an ulp from pi/3). `gold` is a Fraction, or a SymPy number evaluated well past
    double precision."""
    if pred_digits < FLOAT_DIGITS or pred_half_ulp is None:
        return False
    distance = abs(gold - pred)
    return bool(distance <= pred_half_ulp or distance <= abs(gold) * _DOUBLE_ULP)
