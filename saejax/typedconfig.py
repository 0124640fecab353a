"""Typed dataclass configs: built from nested dicts, YAML files and dotted `a.b=value` overrides.

The machinery every saejax config uses (the SAE trainer's `saejax.config.Config`, the LM
trainer's, the SAE families' sections in `saejax.sae.config`): unknown keys and wrong types are
rejected with the dotted field named, and `config_reference` renders any config tree as the
README's table from the docstrings written beside each field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from saejax.atomic import write_text_atomic
from saejax.errors import ConfigError
from saejax.paths import as_path


def _check_type(value: Any, tp: Any, name: str) -> Any:
    """Return `value` coerced to `tp` (int -> float allowed), or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    tree[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (so 4e-3, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML "
                          f"({_yaml_problem(e)})") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "4e-3" as a string
    return key.strip(), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_dataclass(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Config dataclass `cls` from its defaults <- YAML file <- dotted `a.b=value` overrides,
    unknown keys and wrong types rejected (no cross-field validation)."""
    return from_dict(cls, load_tree(path, overrides))


def load_tree(path: str | Path | None = None, overrides: list[str] = (),
              tree: dict | None = None) -> dict:
    """The nested dict of a YAML file (or `tree`, already read) with dotted overrides applied,
    values as `load_dataclass` reads them (before any check)."""
    tree = _floatify(read_yaml(path, "config file") if path is not None else (tree or {}))
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return tree


def read_yaml(path: str | Path, what: str) -> dict:
    """The mapping in YAML file `path` (empty file: {}); a missing, unreadable or malformed file
    is a ConfigError naming `what`, the path and, for bad YAML, the line and column. `path` may
    be a URL (gs://, s3://)."""
    path = as_path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"{what} {path} {state}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} cannot be read ({e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping, got "
                          f"{type(tree).__name__}")
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (1-based line and column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _floatify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _floatify(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_floatify(v) for v in tree]
    if isinstance(tree, str) and _looks_numeric(tree):
        return float(tree)
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted keys, as overrides name fields."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_run(saved: dict, cfg: Any, allowed: set[str], run_dir: str | Path,
                   where: str = "config.yaml") -> None:
    """Refuse to resume the run saved in `run_dir` (its config as a dict, read from `where`)
    with config `cfg` (a dataclass or its dict) if any field outside `allowed` changed; the
    message names each change."""
    if not isinstance(saved, dict):
        raise ConfigError(f"run_dir {run_dir}: its {where} holds no config mapping")
    old, new = flatten(saved), flatten(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in allowed)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"run_dir {run_dir} holds a run with a different config ({where}: "
                          f"{diffs}); use another train.run_dir or the same settings")


INT_LIMIT = 2**31
"""Integer fields must lie in [-INT_LIMIT, INT_LIMIT): steps, seeds and counts reach the devices
as int32 (and larger seeds overflow the RNGs)."""

_COMPARE = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def check_ranges(cfg: Any, rules: dict[str, str], skip: tuple[str, ...] = ()) -> None:
    """Reject, before any compute, a numeric field of config dataclass `cfg` that is NaN/Inf, an
    int outside int32, or outside its rule in `rules` (dotted name -> rule; a list field's rule
    applies to each item). Fields whose dotted name starts with a `skip` prefix are not checked.

    A rule is `> a`, `>= a`, `< a`, `<= a`, an interval such as `[0, 1)` (either bracket kind on
    either side, `inf` allowed), a bare number the value must equal, or several of these joined
    by ` or ` (`-1 or >= 1`). The error names the field, the rule and the value, on one line."""
    for name, value in flatten(dataclasses.asdict(cfg)).items():
        if name.startswith(skip):
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            label = name if i is None else f"{name}[{i}]"
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{label} must be a finite number, got {v}")
            if isinstance(v, int) and not -INT_LIMIT <= v < INT_LIMIT:
                raise ConfigError(f"{label} must be below 2**31 in magnitude, got {v}")
            rule = rules.get(name)
            if rule is not None and not in_range(float(v), rule):
                raise ConfigError(f"{label} must be {_describe(rule)}, got {v!r}")


def in_range(v: float, rule: str) -> bool:
    """Whether `v` satisfies `rule` (the grammar of `check_ranges`)."""
    for alt in (a.strip() for a in rule.split(" or ")):
        if alt[0] in "[(":
            lo, hi = (float(x) for x in alt[1:-1].split(","))
            above = lo <= v if alt[0] == "[" else lo < v
            below = v <= hi if alt[-1] == "]" else v < hi
            ok = above and below
        elif " " in alt:
            op, bound = alt.split()
            ok = _COMPARE[op](v, float(bound))
        else:
            ok = v == float(alt)
        if ok:
            return True
    return False


def _describe(rule: str) -> str:
    """`[0, 1)` -> `in [0, 1)`; comparisons and numbers read as they are."""
    return " or ".join(f"in {a}" if a[0] in "[(" else a
                       for a in (a.strip() for a in rule.split(" or ")))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """The config dataclass as YAML at `path`, written atomically (readers never see a part)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it} of dataclass `cls`, on one line each."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(str(nxt.value.value).split()).replace("|", r"\|")
    return docs


def config_reference(root: type) -> str:
    """Markdown table of every field of the dataclass tree `root`: dotted name, default, and the
    docstring beside it (nested sections are walked, e.g. `sae.topk.k`)."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                value = getattr(defaults, f.name)
                rows.append(f"| `{prefix}{f.name}` | `{value!r}` | {docs.get(f.name, '')} |")

    walk(root, "")
    return "\n".join(rows)
