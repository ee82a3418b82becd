"""How close a decimal must be to count as the same number: the digits it writes state its precision.

Exact values (integers, fractions, radicals, pi) are compared exactly. A decimal is a rounded value,
so it matches a number when it is that number correctly rounded to the digits written, i.e. within
half a unit in its last written place. Two guards keep this sound:

* the decimal must carry at least MIN_SIGNIFICANT_DIGITS significant digits, so "0.5" never stands
  for 0.46 and "3.14" not for pi (the implied relative tolerance is at most 5e-4 and shrinks with
  every digit written), and a value is never rounded to zero (1e-7 vs 4e-7 stay different);
* when the gold answer is a decimal, its precision decides (it says how the task wanted the answer
  rounded); otherwise the prediction's does.
"""
from __future__ import annotations

import re
from fractions import Fraction

MIN_SIGNIFICANT_DIGITS = 4
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


def written_decimals(text: str) -> dict[Fraction, Fraction]:
    """Every decimal literal in `text` that carries a tolerance: exact value -> half-unit in the last place.

    When one value is written twice with different precision the stricter tolerance is kept.
    """
    found: dict[Fraction, Fraction] = {}
    for m in _DECIMAL_LITERAL.finditer(text):
        integer_part, fraction_part, exponent = m.group(1), m.group(2), m.group(3)
        if len(integer_part) + len(fraction_part) > MAX_DIGITS:
            continue
        exp = int(exponent) if exponent else 0
        if abs(exp) > MAX_EXPONENT:
            continue
        value, half_ulp = decimal_value(integer_part, fraction_part, exp)
        if half_ulp is not None:
            found[value] = min(half_ulp, found.get(value, half_ulp))
    return found


def tolerance(gold_half_ulp: Fraction | None, pred_half_ulp: Fraction | None) -> Fraction | None:
    """The largest distance at which gold and prediction still denote the same number (None: exact).

    The gold's stated precision wins: when the task rounded its answer to cents, a prediction is
    judged at cents, whatever digits it adds.
    """
    return gold_half_ulp if gold_half_ulp is not None else pred_half_ulp
