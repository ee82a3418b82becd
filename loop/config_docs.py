"""docs/configuration.md, written from the config models themselves: every key of a loop's YAML config with its type,
default and docstring, section by section, so the reference cannot drift from the code (tests/test_config_docs.py
fails when the committed page is stale).

    .venv/bin/python -m loop.config_docs > docs/configuration.md
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
import typing
from functools import cache

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Generated from the config models (`python -m loop.config_docs > docs/configuration.md`; a test fails when this page
is stale). A config is one YAML file; unknown keys are errors. Keys are shown as dotted paths: `eval.sampling.n` is

```yaml
eval:
  sampling: {n: 4}
```
"""


@cache
def _docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its annotation in the class body (attribute docstrings)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def _doc(model: type[BaseModel], name: str) -> str:
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and name in _docstrings(cls):
            return _docstrings(cls)[name]
    return ""


def _models_in(annotation) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in args for m in _models_in(a)]


def _type_name(annotation) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "(section)" if field.default_factory is not None else "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "null" if value is None else f"`{value}`" if not isinstance(value, str) else f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every field of `model`, nested sections after their key."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append((key, _type_name(field.annotation), _default(field), _doc(model, name)))
        for sub in _models_in(field.annotation):
            out += rows(sub, f"{key}.")
    return out


def render() -> str:
    from loop.config import RunConfig

    lines = [HEADER, "| key | type | default | what it does |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {_cell(t)} | {_cell(d)} | {_cell(doc)} |" for k, t, d, doc in rows(RunConfig)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
