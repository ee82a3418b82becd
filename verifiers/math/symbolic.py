"""Symbolic equivalence, run inside a worker process: math-verify's comparison made sound.

Parsing is latex2sympy2_extended's (through math-verify's normalisation), and the structural
comparison (relations and their set forms, intervals, tuples, unordered sets, matrices, "x = 5"
forms, text answers) is math-verify's sympy_expr_eq. Its numeric step is replaced: math-verify
rounds floats to 6 places and evaluates differences with chop=True, so 1/2004! equals 1/2006! and
1e-7 equals 4e-7. Here decimals are parsed exactly, exact values are compared exactly, and a
decimal matches under the convention of precision.py. The numeric step is replaced in a private copy of
math-verify's grader module (_own_grader), not in math_verify.grader itself.

This module may hang or exhaust memory on hostile input (10^10^10^10): only import it in a worker.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from fractions import Fraction

import sympy
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, normalize_latex
from latex2sympy2_extended.logic import And as OrderedAnd
from latex2sympy2_extended.sets import FiniteSet as OrderedFiniteSet
from math_verify.grader import get_pct_val, should_treat_as_complex
from math_verify.parser import parse_latex_cached
from sympy import Float, I, MatrixBase, Rational, Symbol
from sympy.core.relational import Relational
from sympy.matrices.expressions import MatrixExpr

from verifiers.math.precision import full_precision_match, written_decimals

# math-verify warns once per process that we disabled its SIGALRM timeouts: the worker is the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# The normalisation math-verify's LatexExtractionConfig applies (units, \dfrac, \sqrt3, ...).
_NORMALIZATION = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                     boxed="all", equations=False)


class GoldUnparseable(ValueError):
    """The gold answer is not math the parser reads (or cannot be compared even with itself): a data problem,
    reported as an error."""


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


# The decimals written in the answers under comparison (exact value -> half-ulp or None, significant digits).
# The worker compares one pair at a time, so plain module state is enough.
_gold_decimals: dict[Rational, tuple[Rational | None, int]] = {}
_pred_decimals: dict[Rational, tuple[Rational | None, int]] = {}


def _readings(expr, other_is_percent: bool):
    """(value, tolerance scale) pairs a side may stand for: "28%" is 28 or 28/100, except against
    another percentage."""
    inner = get_pct_val(expr)
    if inner is None:
        return [(expr, 1)]
    if other_is_percent:
        return [(inner, 1)]
    return [(inner, 1), (inner / 100, Rational(1, 100))]


def _written(value, table: dict, scale) -> tuple[Rational | None, int] | None:
    """(half-ulp, significant digits) when `value` is a decimal written on that side (a percentage reading is
    scaled), else None."""
    if not isinstance(value, Rational) or (key := value / scale) not in table:
        return None
    half_ulp, digits = table[key]
    return (None if half_ulp is None else half_ulp * scale), digits


def _numbers_match(gold, pred, gold_scale, pred_scale) -> bool:
    """The decimal convention of precision.py on two numbers."""
    if not (getattr(gold, "is_number", False) and getattr(pred, "is_number", False)):
        return False  # expressions with symbols are left to math-verify's symbolic step
    g, p = gold.doit(), pred.doit()
    if g == p:
        return True
    gold_decimal = _written(g, _gold_decimals, gold_scale)
    if gold_decimal is not None and gold_decimal[0] is not None:
        distance = sympy.N(sympy.Abs(g - p), 30)
        return bool(distance.is_real and distance <= gold_decimal[0])
    pred_decimal = _written(p, _pred_decimals, pred_scale)
    if pred_decimal is not None and gold_decimal is None and g.is_integer is False and g.is_real:
        return full_precision_match(p, pred_decimal[0], pred_decimal[1], sympy.N(g, 40))
    return False  # exact values that differ structurally: math-verify's simplify() decides


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


def _own_grader():
    """A private copy of math_verify.grader whose numeric step is sound_numeric_eq. Its sympy_expr_eq looks
    sympy_numeric_eq up as a module global, so the copy's global is replaced; math_verify.grader itself, which
    other code in the process may use, is left as it is."""
    spec = importlib.util.find_spec("math_verify.grader")
    own = importlib.util.spec_from_file_location("verifiers.math._math_verify_grader", spec.origin)
    module = importlib.util.module_from_spec(own)
    own.loader.exec_module(module)
    if not callable(getattr(module, "sympy_numeric_eq", None)):
        raise ImportError("math_verify.grader.sympy_numeric_eq is gone: this math-verify release is not supported")
    module.sympy_numeric_eq = sound_numeric_eq
    return module


verify = _own_grader().verify


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


def _as_table(decimals: dict[Fraction, tuple[Fraction | None, int]]) -> dict[Rational, tuple[Rational | None, int]]:
    return {Rational(k.numerator, k.denominator): (None if v is None else Rational(v.numerator, v.denominator), d)
            for k, (v, d) in decimals.items()}


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
    try:
        equal = _verify(gold_expr, pred_expr)
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - whose fault it is decides the verdict, below
        # A comparison that raises on this prediction (chained relations of other lengths, a relation against
        # a gold written with \neq) is a failed grading of the prediction, not of the grader: the answer is
        # not one the checker can confirm. Only when the gold cannot be compared even with itself is it an error.
        try:
            _verify(gold_expr, gold_expr)
        except (MemoryError, RecursionError):
            raise
        except Exception as self_error:  # noqa: BLE001
            detail = f"{type(self_error).__name__}: {str(self_error)[:200]}"
            raise GoldUnparseable(f"the gold answer {gold!r} cannot be compared, even with itself ({detail}); "
                                  "fix the task's answer") from e
        return Comparison(False, f"the comparison raised {type(e).__name__} on this answer "
                                 f"({str(e).splitlines()[0][:200] if str(e) else ''}): not an answer it can confirm")
    return Comparison(equal, "equal by math-verify (sound numeric step)" if equal
                      else "different by math-verify (sound numeric step)")


def _verify(gold_expr, pred_expr) -> bool:
    # timeout_seconds=None: math-verify's own timeout is SIGALRM (main thread only); the worker
    # process is killed from outside instead. raise_on_error: a crash is seen, and judged by compare().
    return verify(gold_expr, pred_expr, strict=True, allow_set_relation_comp=True,
                  timeout_seconds=None, raise_on_error=True)
