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
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from saejax.atomic import write_text_atomic
from saejax.errors import ConfigError


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
    value = yaml.safe_load(raw) if raw.strip() else ""
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
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = _floatify(tree)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return from_dict(cls, tree)



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


def check_same_run(saved: dict, cfg: Any, allowed: set[str], run_dir: str | Path) -> None:
    """Refuse to resume the run saved in `run_dir` (its config as a dict) with config dataclass
    `cfg` if any field outside `allowed` changed; the message names each change."""
    old, new = flatten(saved), flatten(dataclasses.asdict(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and k not in allowed)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"run_dir {run_dir} holds a run with a different config ({diffs}); "
                          "use another train.run_dir or the same settings")


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
