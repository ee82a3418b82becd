"""Plain values across the sandbox boundary: the host's decoder for what runner.encode_value sends.

The solution's sandbox is untrusted, so its encoder may have been replaced by the program: this decoder
accepts only the tagged format, builds genuine builtin objects (no subclass, no object with a rigged
__eq__ can come out of it), and bounds depth and size. Anything else is NotPlainValue.
"""
from __future__ import annotations

import builtins
import re

MAX_DEPTH = 100
MAX_ITEMS = 1_000_000
_HEX_INT = re.compile(r"-?[0-9a-f]+")

# Exceptions the solution may raise through a call and that the checker re-raises under their own name, so
# that tests expecting e.g. ValueError work. Control-flow exceptions are not among them: a StopIteration
# raised inside map() or a for loop's iterator would end the test's loop early instead of failing it.
_NOT_RERAISED = {"StopIteration", "StopAsyncIteration"}
RERAISABLE = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, Exception) and name not in _NOT_RERAISED)


class NotPlainValue(ValueError):
    """The reply does not encode a plain builtin value."""


def decode(data: object) -> object:
    counter = [0]
    return _decode(data, 0, counter)


def _decode(data: object, depth: int, counter: list[int]) -> object:
    counter[0] += 1
    if depth > MAX_DEPTH or counter[0] > MAX_ITEMS:
        raise NotPlainValue(f"more than {MAX_DEPTH} levels or {MAX_ITEMS} items")
    if type(data) is not list or not data or type(data[0]) is not str:
        raise NotPlainValue(f"not a tagged value: {data!r:.80}")
    tag, args = data[0], data[1:]
    try:
        if tag == "n" and not args:
            return None
        if tag == "b" and len(args) == 1 and type(args[0]) is bool:
            return args[0]
        if tag == "i" and len(args) == 1 and type(args[0]) is str and _HEX_INT.fullmatch(args[0]):
            return int(args[0], 16)
        if tag == "f" and len(args) == 1 and type(args[0]) is str:
            return float.fromhex(args[0])
        if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "s" and len(args) == 1 and type(args[0]) is str:
            return args[0]
        if tag == "y" and len(args) == 1 and type(args[0]) is str:
            return bytes.fromhex(args[0])
        if tag in _CONTAINERS and len(args) == 1 and type(args[0]) is list:
            return _CONTAINERS[tag](_decode(item, depth + 1, counter) for item in args[0])
        if tag == "d" and len(args) == 1 and type(args[0]) is list:
            out = {}
            for pair in args[0]:
                if type(pair) is not list or len(pair) != 2:
                    raise NotPlainValue(f"not a key/value pair: {pair!r:.80}")
                out[_decode(pair[0], depth + 1, counter)] = _decode(pair[1], depth + 1, counter)
            return out
    except (TypeError, ValueError, OverflowError) as exc:  # unhashable keys, bad hex
        if isinstance(exc, NotPlainValue):
            raise
        raise NotPlainValue(f"{tag!r}: {exc}") from None
    raise NotPlainValue(f"not a tagged value: {data!r:.80}")


_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}
