"""Symbolic equivalence, run inside a worker process: math-verify's comparison made sound.

Parsing is latex2sympy2_extended's (through math-verify's normalisation), and the structural
comparison (relations and their set forms, intervals, tuples, unordered sets, matrices, "x = 5"
forms, text answers) is math-verify's sympy_expr_eq. Its numeric step is replaced: math-verify
rounds floats to 6 places and evaluates differences with chop=True, so 1/2004! equals 1/2006! and
1e-7 equals 4e-7. Here decimals are parsed exactly, exact values are compared exactly, and a
decimal is accepted only within the precision its digits state (precision.py).

This module may hang or exhaust memory on hostile input (10^10^10^10): only import it in a worker.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction

import math_verify.grader as mv_grader
import sympy
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, normalize_latex
from latex2sympy2_extended.logic import And as OrderedAnd
from latex2sympy2_extended.sets import FiniteSet as OrderedFiniteSet
from math_verify.grader import get_pct_val, should_treat_as_complex, verify
from math_verify.parser import parse_latex_cached
from sympy import Float, I, MatrixBase, Rational, Symbol
from sympy.core.relational import Relational
from sympy.matrices.expressions import MatrixExpr

from verifiers.math.precision import tolerance, written_decimals

# math-verify warns once per process that we disabled its SIGALRM timeouts: the worker is the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# The normalisation math-verify's LatexExtractionConfig applies (units, \dfrac, \sqrt3, ...).
_NORMALIZATION = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                     boxed="all", equations=False)


class GoldUnparseable(ValueError):
    """The gold answer is not math the parser reads: a data problem, reported as an error."""


@dataclass(frozen=True)
class Comparison:
    equal: bool
    how: str


def _exact_decimals(expr):
    """Every Float (a parsed decimal literal) replaced by the exact Rational it writes, without
    evaluating anything else (re-evaluation could expand a power tower)."""
    if isinstance(expr, Float):
        return Rational(str(expr))
    if isinstance(expr, MatrixBase):
        return expr.applyfunc(_exact_decimals)
    if not isinstance(expr, sympy.Basic) or not expr.has(Float):
        return expr
    with sympy.evaluate(False):
        if isinstance(expr, (OrderedFiniteSet, OrderedAnd)):
            # keep the written order, which math-verify reads for tuples
            return type(expr)(*[_exact_decimals(a) for a in expr._unsorted_args])
        if isinstance(expr, Relational):
            return expr.func(*[_exact_decimals(a) for a in expr.args], evaluate=False)
        return expr.func(*[_exact_decimals(a) for a in expr.args])


def parse_math(text: str):
    """The SymPy object an answer string denotes; raises when the parser cannot read it."""
    return _exact_decimals(parse_latex_cached(normalize_latex(text, _NORMALIZATION)))


# Tolerances of the decimals written in the answers under comparison (exact value -> half-ulp). The
# worker compares one pair at a time, so plain module state is enough.
_gold_decimals: dict[Rational, Rational] = {}
_pred_decimals: dict[Rational, Rational] = {}


def _readings(expr, other_is_percent: bool):
    """(value, tolerance scale) pairs a side may stand for: "28%" is 28 or 28/100, except against
    another percentage."""
    inner = get_pct_val(expr)
    if inner is None:
        return [(expr, 1)]
    if other_is_percent:
        return [(inner, 1)]
    return [(inner, 1), (inner / 100, Rational(1, 100))]


def _half_ulp(value, table: dict, scale):
    if isinstance(value, Rational) and value in table:
        return table[value] * scale
    return None


def _numbers_match(gold, pred, gold_scale, pred_scale) -> bool:
    if not (getattr(gold, "is_number", False) and getattr(pred, "is_number", False)):
        return False  # expressions with symbols are left to math-verify's symbolic step
    g, p = gold.doit(), pred.doit()
    if g == p:
        return True
    tol = tolerance(_half_ulp(g, _gold_decimals, gold_scale), _half_ulp(p, _pred_decimals, pred_scale))
    if tol is None:
        return False  # exact values that differ structurally: math-verify's simplify() decides
    distance = sympy.N(sympy.Abs(g - p), 30)
    return bool(distance.is_real and distance <= tol)


def sound_numeric_eq(gold, pred, float_rounding: int, numeric_precision: int) -> bool:
    """Drop-in for math_verify.grader.sympy_numeric_eq (same signature; the precision arguments
    are ignored): true only when the two values are equal, or a decimal matches within the
    precision its digits state."""
    if isinstance(gold, (MatrixBase, MatrixExpr)) and isinstance(pred, (MatrixBase, MatrixExpr)):
        gold, pred = gold.doit(), pred.doit()
        return (isinstance(gold, MatrixBase) and isinstance(pred, MatrixBase) and gold.shape == pred.shape
                and all(sound_numeric_eq(g, p, float_rounding, numeric_precision)
                        for g, p in zip(gold, pred)))
    gold_is_pct, pred_is_pct = get_pct_val(gold) is not None, get_pct_val(pred) is not None
    return any(_numbers_match(g, p, gs, ps)
               for g, gs in _readings(gold, pred_is_pct)
               for p, ps in _readings(pred, gold_is_pct))


# sympy_expr_eq looks sympy_numeric_eq up as a module global, so replacing it there is enough.
assert callable(getattr(mv_grader, "sympy_numeric_eq", None)), \
    "math_verify.grader.sympy_numeric_eq is gone: this math-verify release is not supported"
mv_grader.sympy_numeric_eq = sound_numeric_eq


# math-verify's complex_number_pattern looks for a standalone "i" (\\bi\\b), which misses an i with a
# coefficient ("3+4i", "\\frac{1}{2}i"): |3+4i| would stay Abs(3 + 4*i) with i a real symbol, not 5.
_COEFFICIENT_I = re.compile(r"[\d})]\s*i(?![A-Za-z])")


def _looks_complex(text: str) -> bool:
    return should_treat_as_complex(text) or bool(_COEFFICIENT_I.search(text))


def _imaginary_unit(expr):
    """latex2sympy reads "3+4i" with a plain symbol i; make it the imaginary unit so (1+i)^2 = 2i."""
    if isinstance(expr, sympy.Basic):
        symbols = [s for s in expr.free_symbols if isinstance(s, Symbol) and s.name == "i"]
        return expr.xreplace({s: I for s in symbols}) if symbols else expr
    return expr


def _as_table(decimals: dict[Fraction, Fraction]) -> dict[Rational, Rational]:
    return {Rational(k.numerator, k.denominator): Rational(v.numerator, v.denominator) for k, v in decimals.items()}


def compare(pred: str, gold: str) -> Comparison:
    """Whether normalised answer `pred` is mathematically `gold`. Raises GoldUnparseable when the
    gold cannot be read; an unreadable prediction is simply not equal."""
    global _gold_decimals, _pred_decimals
    try:
        gold_expr = parse_math(gold)
    except (MemoryError, RecursionError):
        raise  # a resource bound, reported as such by the worker
    except Exception as e:  # noqa: BLE001 - any parser failure means the same thing: bad gold
        raise GoldUnparseable(f"the gold answer {gold!r} is not math the parser reads "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "fix the task's answer") from e
    try:
        pred_expr = parse_math(pred)
    except (MemoryError, RecursionError):
        raise  # too big to read is not the same as unreadable
    except Exception as e:  # noqa: BLE001 - an unreadable answer is a wrong answer, said so
        detail = str(e).splitlines()[0] if str(e) else ""
        return Comparison(False, f"the answer is not math the parser reads ({type(e).__name__}: {detail})")
    if _looks_complex(gold) or _looks_complex(pred):
        gold_expr, pred_expr = _imaginary_unit(gold_expr), _imaginary_unit(pred_expr)
    _gold_decimals, _pred_decimals = _as_table(written_decimals(gold)), _as_table(written_decimals(pred))
    # timeout_seconds=None: math-verify's own timeout is SIGALRM (main thread only); the worker
    # process is killed from outside instead. raise_on_error: a comparison crash is an error.
    equal = verify(gold_expr, pred_expr, strict=True, allow_set_relation_comp=True,
                   timeout_seconds=None, raise_on_error=True)
    return Comparison(equal, "equal by math-verify (sound numeric step)" if equal
                      else "different by math-verify (sound numeric step)")
