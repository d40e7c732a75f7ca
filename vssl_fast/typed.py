"""Typed settings from plain dataclasses: one table of fields serves the parser, the help and the validation.

- Choices are part of the type (``typing.Literal``): ``check_choices`` validates them, ``parse_value``
  rejects a bad command-line value with the same message, and the help lists them.
- Each field's description is the comment on its declaration line (and the comment-only lines right
  under it), read from the source as tyro does, so fields stay declared in one plain style:
  ``lr: float = 1.0  # base LR for a global batch of 256``.
- ``parse_value`` turns a command-line string into the declared type; ``file_value`` checks a
  value read from a JSON/YAML file against it. Errors are one line that names the key.

Hand-written rather than tyro (or another dataclass-CLI library): the GPU machine runs ``train.py``
from the source tree with only torch, triton, torchvision, numpy, pillow and pytest installed, so the
training CLI cannot depend on a package that is not there; and these errors keep the project's
one-line ``config error: <key>: ...`` form (exit 2).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing

__all__ = ["ConfigError", "choices_of", "check_choices", "field_types", "field_docs", "parse_value", "file_value",
           "type_name", "show_value"]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it."""


def field_types(obj_or_cls) -> dict:
    """{field name: resolved type} of a dataclass (instance or class)."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(tp):
    """X for ``X | None`` / ``Optional[X]``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def choices_of(tp) -> tuple | None:
    """The allowed values of a ``Literal[...]`` type (also inside ``| None``), else None."""
    inner = _optional_inner(tp)
    if inner is not None:
        return choices_of(inner)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def _bad_choice(key: str, val, choices) -> ConfigError:
    return ConfigError(f"{key}: invalid value {val!r}; choose one of {list(choices)}")


def check_choices(obj, prefix: str) -> None:
    """Every ``Literal`` field of the dataclass ``obj`` holds one of its values (ConfigError naming ``prefix.key``)."""
    for name, tp in field_types(obj).items():
        allowed = choices_of(tp)
        val = getattr(obj, name)
        if allowed is not None and val not in allowed and not (val is None and _optional_inner(tp) is not None):
            raise _bad_choice(f"{prefix}.{name}", val, allowed)


# ----------------------------------------------------------------------------- descriptions
@functools.cache
def field_docs(cls) -> dict:
    """{field: description} from the comments of the class source; {} when the source cannot be read."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a zipped install): the help then lists types and defaults only
        return {}
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    lines = src.splitlines()
    docs = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts, line = [], node.end_lineno
        if line in comments:
            parts.append(comments[line])
            while line < len(lines) and lines[line].strip().startswith("#"):  # comment-only continuation lines
                line += 1
                parts.append(comments[line])
        docs[node.target.id] = " ".join(p for p in parts if p)
    return docs


# ----------------------------------------------------------------------------- values
def type_name(tp) -> str:
    """How the help shows a type: {a,b} for choices, float,float for a pair, int,... for a list, bool|none."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)}|none"
    allowed = choices_of(tp)
    if allowed is not None:
        return "{" + ",".join(show_value(a) for a in allowed) + "}"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{type_name(args[0])},..."
        return ",".join(type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def show_value(v) -> str:
    """A value written as it is typed on the command line."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, tuple | list):
        return ",".join(show_value(x) for x in v)
    return str(v)


def _integral(x) -> bool:
    if isinstance(x, str):
        try:
            int(x)
            return True
        except ValueError:
            return False
    return isinstance(x, int) and not isinstance(x, bool)


def _tuple_items(key: str, items: list, tp, parse) -> tuple:
    args = typing.get_args(tp)
    if not args:  # a bare ``tuple``: numbers, integers where they are written as integers
        return tuple(parse(key, x, int if _integral(x) else float) for x in items)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(parse(key, x, args[0]) for x in items)
    if len(items) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values ({type_name(tp)}), got {len(items)}")
    return tuple(parse(key, x, a) for x, a in zip(items, args))


def parse_value(key: str, raw: str, tp):
    """A command-line string as a value of type ``tp``; ConfigError naming ``key`` if it is not one."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if raw.strip().lower() in ("none", "null") else parse_value(key, raw, inner)
    allowed = choices_of(tp)
    if allowed is not None:
        for a in allowed:
            if show_value(a) == raw.strip() or (isinstance(a, str) and a == raw.strip().lower()):
                return a
        raise _bad_choice(key, raw, allowed)
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    if tp is tuple or typing.get_origin(tp) is tuple:
        items = [p.strip() for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
        return _tuple_items(key, items, tp, parse_value)
    raise ConfigError(f"{key}: cannot parse values of type {tp}")


def file_value(key: str, v, tp):
    """A value read from a config file (JSON/YAML types) checked against ``tp``; strings are parsed as on the
    command line (YAML reads ``1e-3`` as a string). ConfigError naming ``key`` if it does not fit."""
    if isinstance(v, str) and tp is not str:
        return parse_value(key, v, tp)
    inner = _optional_inner(tp)
    if inner is not None:
        return None if v is None else file_value(key, v, inner)
    allowed = choices_of(tp)
    if allowed is not None:
        if isinstance(v, bool) and all(isinstance(a, str) for a in allowed) and str(v).lower() in allowed:
            return str(v).lower()  # configs saved when the setting was a bool (e.g. model.sync_batchnorm)
        if v not in allowed or isinstance(v, bool) != any(isinstance(a, bool) for a in allowed):
            raise _bad_choice(key, v, allowed)
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: expected a boolean (true/false), got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key}: expected a string, got {v!r}")
        return v
    if tp is tuple or typing.get_origin(tp) is tuple:
        if not isinstance(v, list | tuple):
            raise ConfigError(f"{key}: expected a list ({type_name(tp)}), got {v!r}")
        return _tuple_items(key, list(v), tp, file_value)
    raise ConfigError(f"{key}: cannot read values of type {tp}")
