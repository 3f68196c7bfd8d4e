"""Typed dataclass configs read strictly: number ranges (`Range`, `PositiveInt`, `Probability`, ...),
`from_dict` (Literal, list[T], nested dataclasses, ranges; an unknown key names the nearest known
one), `check`, `key=value` overrides, and each field's docstring for help and `describe`.
`flava.config`, the documented entry point, re-exports all of it beside the model configs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Range:
    """Bounds of a number field, checked when a config is read: `Annotated[float, Range(0, 1)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """The low bound itself is not allowed."""
    high_open: bool = False

    def check(self, path: str, value: float) -> None:
        # An unbounded side is open: infinity is no value a setting can use (a weight of it is NaN once normalised).
        ok = not (isinstance(value, float) and not math.isfinite(value) and (
            math.isnan(value) or (self.high if value > 0 else self.low) is None))
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise ConfigError(f"{path} must lie in {self}; got {value!r}")

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{_number(self.low)}"
        high = "inf)" if self.high is None else f"{_number(self.high)}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # a seed's bound whole, not 4.29497e+09


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
Probability = Annotated[float, Range(0, 1)]
Seed = Annotated[int, Range(0, 2**43 - 1)]
"""What every seeded generator here takes: numpy's refuses negative seeds, and torch's take 64 bits,
which a step's seed (seed x 1,000,003 + step x 31 + micro-batch) must fit."""


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def plain(value: Any) -> Any:
    """A setting's value as JSON holds it: a section or a weighted source (a dataclass) as a mapping,
    in lists too."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _describe(typing.get_args(tp)[0])
    if origin is list:
        return f"a list of {_describe((typing.get_args(tp) or (Any,))[0])}s"
    if dataclasses.is_dataclass(tp):  # a settings object, as JSON writes one
        return "an object of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def check_value(path: str, value: Any, tp: Any) -> Any:
    """`value` checked against the field type `tp` (and converted where JSON is looser: an integer
    for a float); a ConfigError naming `path` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = check_value(path, value, base)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(path, value)
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise ConfigError(f"{path} {value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return check_value(path, value, rest[0])
        shaped = [o for o in rest if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(shaped) == 1:
            return check_value(path, value, shaped[0])  # a mapping is that option's: its own error names the key
        for option in rest:
            try:
                return check_value(path, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} fits none of {', '.join(_describe(o) for o in rest)}")
    if origin is list or tp is list:
        if isinstance(value, (str, dict)) and typing.get_args(tp):
            value = [value]  # one plain path (or source) where a list of them is taken
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return [check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return check(value, path)
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def check(cfg: Any, path: str = "") -> Any:
    """Check every field of a config object (and its sections) against its type, in place; for
    configs built in Python rather than read from a file. Returns `cfg`."""
    types_ = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        where = f"{path}.{f.name}" if path else f.name
        setattr(cfg, f.name, check_value(where, getattr(cfg, f.name), types_[f.name]))
    return cfg


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {data!r}")
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:  # suggested whole, as written: data.batch_size, not batch_size
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {(f'{path}.' if path else '') + close[0]!r}?" if close else \
                did_you_mean(key, names)
            raise ConfigError(f"unknown config key {where!r}{hint}")
        kwargs[key] = check_value(where, value, types_[key])
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path or 'config'}: {json.dumps(data, default=str)[:80]} has no {missing[0]!r}, which it "
                          "needs")
    return check(cls(**kwargs), path)


def _keys(cfg: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a settings tree."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        yield prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")


def set_value(cfg: Any, dotted: str, raw: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as JSON, else a string."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:  # a suggestion is the whole key, as --set takes it: data.pairs, not pairs
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else did_you_mean(part, names)
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}{hint}")
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                # codebook.vocab_size where codebook is a path: the key under another section.
                inner = [k for k in _keys(cfg) if k.endswith("." + dotted)]
                hint = f"; did you mean {inner[0]!r}?" if inner else ""
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section{hint}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        if raw.strip().startswith(("[", "{")):  # meant as JSON: a path never starts so
            raise ConfigError(f"{dotted}={raw}: not valid JSON ({e.msg} at character {e.pos}); write a list as "
                              '["a.csv", "b.csv"] (quoted for the shell) or give one path alone') from None
        value = raw
    setattr(target, parts[-1], check_value(dotted, value, _field_types(type(target))[parts[-1]]))


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip().lstrip("-"), raw)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def settings(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every setting, sections expanded: what `--set` accepts."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(settings(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of nested mappings (a JSON record of settings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(was: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (was, now)} of every value two records of settings (nested mappings) differ in."""
    a, b = flat(was), flat(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def said(diff: dict[str, tuple[Any, Any]]) -> str:
    """'key: old -> new; ...' of `differences`."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def describe(cfg: Any) -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring) of every setting."""
    docs: dict[str, str] = {}

    def collect(obj: Any, prefix: str) -> None:
        docs.update({prefix + k: v for k, v in field_docs(type(obj)).items()})
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                collect(getattr(obj, f.name), f"{prefix}{f.name}.")

    collect(cfg, "")
    return [(key, value, docs.get(key, "")) for key, value in settings(cfg).items()]
