"""Reject at once, by order of magnitude, an answer that is astronomically far from the other side.

2^{2^{100}}, 10^{10^{10^{10}}} or 100000! against a gold of 5 would otherwise go to a worker, where
SymPy tries to build the number and is killed at the deadline (a timeout that costs a worker). Here a
small grammar of numeric expressions is read into bounds on log10|value|, computed without ever
building a big number, and two sides whose bounds are more than a factor of 10 apart are different.

Soundness: this only ever *rejects*, and only when the difference is proven: every bound is widened
outward for float rounding, a sum keeps bounds only when one term dominates the others (so
2^{2^{100}} - 2^{2^{100}} + 5 gives up: it could cancel), and anything outside the grammar gives up
(None), leaving the decision to the worker. Equal values are never rejected: their bounds overlap. A
factor of 10 is far beyond what the precision rule of decimals (precision.py) ever accepts, and
the grammar reads no percent sign, so no reading the worker would accept is a factor of 10 away.

Grammar (after normalize.normalize_answer): integers and decimals, + - (binary and unary), \\cdot
\\times * /, \\frac{a}{b}, \\sqrt{a}, \\sqrt[n]{a}, a^{b} (or a^d with one digit d), n! after a
number or a bracketed group, ( ) { } \\left( \\right) groups. Ambiguous spellings give up: 2^22, 2^{3}!,
2^3^2, juxtaposed factors, !!.
"""
from __future__ import annotations

import math
from verifiers.math import deadline as re  # every pattern under the sample's deadline
from dataclasses import dataclass
from fractions import Fraction

from verifiers.math.plain_numbers import split_assignment

MAX_TEXT = 400  # longer answers are left to the worker
MAX_DEPTH = 40  # nesting of groups and exponents
MAX_EXACT_BITS = 16_384  # exact values up to about 4900 digits; bigger ones become bounds
_BIG = 1e300  # log10 bounds past this are clamped outward (a lower bound to _BIG, an upper to inf)
_SLACK = 1e-9  # relative (and absolute) widening of every float bound
_LOG10_E = math.log10(math.e)
APART_DECADES = 1.0  # reject only when the bounds are more than this many powers of 10 apart


@dataclass(frozen=True)
class _Exact:
    value: Fraction


@dataclass(frozen=True)
class _Bound:
    """A nonzero number known only by bounds: lo <= log10|x| <= hi, its sign, and whether it is an integer."""
    lo: float
    hi: float
    sign: int
    integer: bool


_Num = _Exact | _Bound


class _GiveUp(Exception):
    pass


def _widen(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened outward for rounding, with a lower bound past _BIG clamped down to _BIG (and
    an upper bound below -_BIG up to -_BIG): both stay true bounds, and no inf - inf can arise."""
    if math.isnan(lo) or math.isnan(hi):
        raise _GiveUp
    lo, hi = min(lo, _BIG), max(hi, -_BIG)
    lo = lo - abs(lo) * _SLACK - _SLACK
    hi = hi + abs(hi) * _SLACK + _SLACK
    return min(lo, _BIG), max(hi, -_BIG)


def _bits(q: Fraction) -> int:
    return q.numerator.bit_length() + q.denominator.bit_length()


def _log10_abs(q: Fraction) -> float:
    return math.log10(abs(q.numerator)) - math.log10(q.denominator)  # big ints are fine in math.log10


def _bound(x: _Num) -> _Bound:
    if isinstance(x, _Bound):
        return x
    if x.value == 0:
        raise _GiveUp  # zero has no logarithm; callers handle it before asking
    log = _log10_abs(x.value)
    lo, hi = _widen(log, log)
    return _Bound(lo, hi, 1 if x.value > 0 else -1, x.value.denominator == 1)


def _exact_or_bound(q: Fraction) -> _Num:
    return _Exact(q) if _bits(q) <= MAX_EXACT_BITS else _bound(_Exact(q))


def _pow10(e: float) -> float:
    """10**e, with overflow to inf (callers clamp)."""
    return math.inf if e > 300 else 10.0 ** e


def _neg(x: _Num) -> _Num:
    return _Exact(-x.value) if isinstance(x, _Exact) else _Bound(x.lo, x.hi, -x.sign, x.integer)


def _mul(a: _Num, b: _Num, divide: bool = False) -> _Num:
    if isinstance(b, _Exact) and b.value == 0:
        if divide:
            raise _GiveUp
        return _Exact(Fraction(0))
    if isinstance(a, _Exact) and a.value == 0:
        return a
    if isinstance(a, _Exact) and isinstance(b, _Exact):
        return _exact_or_bound(a.value / b.value if divide else a.value * b.value)
    x, y = _bound(a), _bound(b)
    lo, hi = (x.lo - y.hi, x.hi - y.lo) if divide else (x.lo + y.lo, x.hi + y.hi)
    lo, hi = _widen(lo, hi)
    return _Bound(lo, hi, x.sign * y.sign, x.integer and y.integer and not divide)


def _add(a: _Num, b: _Num) -> _Num:
    if isinstance(a, _Exact) and isinstance(b, _Exact):
        return _exact_or_bound(a.value + b.value)
    for big, small in ((a, b), (b, a)):
        if isinstance(small, _Exact) and small.value == 0:
            return big
    x, y = _bound(a), _bound(b)
    if x.lo < y.lo:
        x, y = y, x
    gap = x.lo - y.hi
    if not gap > 1:  # no term dominates: the sum may cancel to anything, zero included
        raise _GiveUp
    # |x| - |y| >= |x| (1 - 10^-gap) and |x| + |y| <= |x| (1 + 10^-gap)
    ratio = _pow10(-gap) if gap < 300 else 0.0
    lo, hi = _widen(x.lo + math.log10(1 - ratio), x.hi + math.log10(1 + ratio))
    return _Bound(lo, hi, x.sign, x.integer and y.integer)


def _is_integer(x: _Num) -> bool:
    return x.value.denominator == 1 if isinstance(x, _Exact) else x.integer


def _pow(base: _Num, exponent: _Num) -> _Num:
    if isinstance(exponent, _Exact):
        e = exponent.value
        if e == 0:
            return _Exact(Fraction(1))  # 0^0 included: SymPy reads it as 1 too
        if isinstance(base, _Exact):
            b = base.value
            if b == 0:
                if e < 0:
                    raise _GiveUp  # 1/0
                return base
            if abs(b) == 1 and e.denominator == 1:
                return _Exact(b ** int(e))
            if e.denominator == 1 and abs(e) * _bits(b) <= MAX_EXACT_BITS:
                return _Exact(b ** int(e))
        if e.denominator != 1 and not _bound(base).sign > 0:
            raise _GiveUp  # an even root of a negative number is not real
        x = _bound(base)
        try:
            ef = float(e)
        except OverflowError:  # an exponent past 1e308 (exact, e.g. 10^{400}): use its bounds
            return _pow(base, _bound(exponent))
        lo, hi = (x.lo * ef, x.hi * ef) if ef > 0 else (x.hi * ef, x.lo * ef)
        lo, hi = _widen(lo, hi)
        sign = x.sign if (e.denominator == 1 and e.numerator % 2) else 1
        return _Bound(lo, hi, sign, x.integer and e > 0 and e.denominator == 1)
    # A bounded (astronomically large or small) exponent.
    x = _bound(base)
    if x.sign < 0:
        raise _GiveUp  # a negative base: real only for integer exponents, and then of unknown sign
    if x.lo > 0:  # |base| > 1: log10|base| in [x.lo, x.hi], positive
        log_log = (math.log10(x.lo), math.log10(x.hi) if x.hi < math.inf else math.inf)
        log_sign = 1
    elif x.hi < 0:  # |base| < 1
        log_log = (math.log10(-x.hi), math.log10(-x.lo) if x.lo > -math.inf else math.inf)
        log_sign = -1
    else:
        raise _GiveUp  # |base| may be 1
    # log10|result| = exponent * log10|base|, whose own log10 lies in [lo, hi]:
    lo, hi = _widen(exponent.lo + log_log[0], exponent.hi + log_log[1])
    magnitude_lo = _BIG if lo > 300 else 10.0 ** lo
    magnitude_hi = _pow10(hi)
    if exponent.sign * log_sign > 0:
        rlo, rhi = magnitude_lo, magnitude_hi
    else:
        rlo, rhi = -magnitude_hi, -magnitude_lo
    rlo, rhi = _widen(rlo, rhi)
    return _Bound(rlo, rhi, 1, x.integer and exponent.sign > 0 and exponent.integer)


def _factorial(n: _Num) -> _Num:
    if not _is_integer(n) or (isinstance(n, _Exact) and n.value < 0) or (isinstance(n, _Bound) and n.sign < 0):
        raise _GiveUp
    if isinstance(n, _Exact):
        k = int(n.value)
        if k <= 1000:
            return _Exact(Fraction(math.factorial(k)))
        if k < 10**300:
            log = math.lgamma(k + 1) / math.log(10)  # float(k) is finite here
            lo, hi = _widen(log, log)
            return _Bound(lo, hi, 1, True)
        n = _bound(n)
    # n >= 10^lo: log10 n! >= n (log10 n - log10 e); n! <= n^n: log10 n! <= n log10 n
    if n.lo < 1:
        raise _GiveUp
    lo = _BIG if n.lo > 300 else 10.0 ** n.lo * (n.lo - _LOG10_E)
    hi = _pow10(n.hi) * n.hi
    lo, hi = _widen(lo, hi)
    return _Bound(lo, hi, 1, True)


_TOKEN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\left\(|\\right\)|\\frac|\\sqrt|\\cdot|\\times"
                    r"|[-+*/^(){}\[\]!]|\\[A-Za-z]+|.)")


class _Parser:
    def __init__(self, text: str):
        self.tokens = _TOKEN.findall(text)
        if "".join(self.tokens).replace(" ", "") != re.sub(r"\s+", "", text):
            raise _GiveUp
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> str | None:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _GiveUp
        self.i += 1
        return tok

    def whole(self) -> _Num:
        value = self.expr()
        if self.peek() is not None:
            raise _GiveUp
        return value

    def deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _GiveUp

    def expr(self) -> _Num:
        self.deeper()
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _add(value, rhs if op == "+" else _neg(rhs))
        self.depth -= 1
        return value

    def term(self) -> _Num:
        value = self.unary()
        while self.peek() in ("\\cdot", "\\times", "*", "/"):
            op = self.take()
            value = _mul(value, self.unary(), divide=op == "/")
        return value

    def unary(self) -> _Num:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.deeper()
            value = self.unary()
            self.depth -= 1
            return _neg(value) if op == "-" else value
        return self.power()

    def power(self) -> _Num:
        base, kind = self.primary()
        if self.peek() == "!":
            if kind not in ("number", "group"):
                raise _GiveUp  # \\frac{6}{2}! or \\sqrt{9}!: leave such readings to the parser
            self.take()
            if self.peek() in ("!", "^"):
                raise _GiveUp  # n!! is a double factorial; 3!^2 is ambiguous
            base = _factorial(base)
        if self.peek() == "^":
            self.take()
            if self.peek() == "{":
                self.take()
                exponent = self.expr()
                self.take("}")
            else:
                tok = self.take()
                if not re.fullmatch(r"\d", tok):
                    raise _GiveUp  # 2^22 or 2^x: the parser's reading is not ours to guess
                exponent = _Exact(Fraction(int(tok)))
            if self.peek() in ("^", "!"):
                raise _GiveUp  # 2^3^2, 2^{3}!: ambiguous
            base = _pow(base, exponent)
        return base

    def primary(self) -> tuple[_Num, str]:
        """A factor, and its kind: "number", "group" (in brackets), "frac" or "sqrt"."""
        tok = self.take()
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", tok):
            if len(tok) > 1000:
                raise _GiveUp
            if self.peek() is not None and re.fullmatch(r"\d+(?:\.\d*)?|\.\d+|\(|\\left\(|\\frac|\\sqrt", self.peek()):
                raise _GiveUp  # juxtaposition
            return _Exact(Fraction(tok)), "number"
        closing = {"(": ")", "{": "}", "\\left(": "\\right)"}
        if tok in closing:
            value = self.expr()
            self.take(closing[tok])
            return value, "group"
        if tok == "\\frac":
            self.take("{")
            num = self.expr()
            self.take("}")
            self.take("{")
            den = self.expr()
            self.take("}")
            return _mul(num, den, divide=True), "frac"
        if tok == "\\sqrt":
            index = Fraction(2)
            if self.peek() == "[":
                self.take()
                n = self.take()
                if not re.fullmatch(r"\d+", n) or int(n) < 2:
                    raise _GiveUp
                index = Fraction(int(n))
                self.take("]")
            self.take("{")
            radicand = self.expr()
            self.take("}")
            if isinstance(radicand, _Exact) and radicand.value == 0:
                return radicand, "sqrt"
            if index.numerator % 2 == 1 and _bound(radicand).sign < 0:
                return _neg(_pow(_neg(radicand), _Exact(1 / index))), "sqrt"
            return _pow(radicand, _Exact(1 / index)), "sqrt"
        raise _GiveUp


def read_magnitude(text: str) -> _Num | None:
    """The value of a numeric expression as an exact Fraction or as bounds on log10|value|; None
    when the text is outside the grammar (see the module docstring)."""
    if len(text) > MAX_TEXT:
        return None
    try:
        return _Parser(text).whole()
    except (_GiveUp, OverflowError, ValueError, ZeroDivisionError, RecursionError):
        return None


def _describe(x: _Num) -> str:
    if isinstance(x, _Exact):
        return "0" if x.value == 0 else f"10^{_log10_abs(x.value):.4g}"
    return f"10^[{x.lo:.4g}, {x.hi:.4g}]"


def magnitudes_apart(pred: str, gold: str) -> str | None:
    """Why `pred` and `gold` (normalised answers) are provably different numbers, judged by their size
    alone; None when that does not settle it (the answers are then compared in full)."""
    p_var, p_rest = split_assignment(pred)
    g_var, g_rest = split_assignment(gold)
    if p_var is not None and g_var is not None and p_var != g_var:
        return None
    p, g = read_magnitude(p_rest), read_magnitude(g_rest)
    if p is None or g is None:
        return None
    p_zero = isinstance(p, _Exact) and p.value == 0
    g_zero = isinstance(g, _Exact) and g.value == 0
    if p_zero or g_zero:
        if p_zero and g_zero:
            return None
        return f"one side is 0, the other is nonzero (|value| about {_describe(g if p_zero else p)})"
    pb, gb = _bound(p), _bound(g)
    if pb.lo - gb.hi > APART_DECADES or gb.lo - pb.hi > APART_DECADES:
        return f"|answer| is {_describe(p)}, |gold| is {_describe(g)}: more than {APART_DECADES:g} decade apart"
    return None
