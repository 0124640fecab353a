"""Sweeps: many SAE configs ("members") trained together from one activation stream.

    saejax train --config base.yaml --sweep 'sae.relu.l1_coefficient=[1e-3,2e-3]' \
                                    --sweep 'train.seed=[0,1]'

or in the YAML file

    sweep:
      grid: {sae.relu.l1_coefficient: [1e-3, 2e-3], train.seed: [0, 1]}   # crossed
      members: [{sae.n_features: 1024}, {sae.n_features: 4096}]            # crossed with the grid

Every member is the base config with its overrides, named by the values as written
(`l1_coefficient=2e-3,seed=1`). Members whose configs differ only in `DATA_FIELDS` (and their
family's `Family.data_fields`, and its `bound_fields` such as TopK's k, compiled at the group's
largest value and masked below it) form one *group*: one compiled step vmapped over a leading
member axis, their differences carried as arrays in the state. Fields that change shapes or the
compiled program (n_features, arch, dtype, the LR schedule's shape) split groups; all groups
step on the same batch in one loop. Fields of the shared stream and loop (`SHARED_PREFIXES`)
cannot vary. Every member is validated before any compute, errors naming the member.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from saejax import config as config_lib
from saejax.config import Config
from saejax.errors import ConfigError
from saejax.paths import AnyPath, as_path, is_url
from saejax.sae import get_family
from saejax.typedconfig import flatten, from_dict, load_tree, read_yaml

DATA_FIELDS = frozenset({
    "optim.lr", "optim.b1", "optim.b2", "optim.eps", "train.seed",
    "resample.window_steps", "resample.enc_scale", "sae.scale_inputs", "sae.init_b_dec_median",
})
"""Fields every family carries as data (state arrays or initial values), not compiled in;
tests/test_sweep.py checks that changing one leaves the compiled step's program unchanged."""

SHARED_PREFIXES = ("data.", "mesh.", "train.steps", "train.batch_size", "train.log_every",
                   "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing",
                   "train.run_dir", "train.tensorboard", "train.progress",
                   "train.dead_window_tokens", "sae.d_in", "resample.enabled",
                   "resample.at_fractions", "resample.steps", "resample.n_inputs")
"""Fields of the one activation stream and the one loop (its length, logging, checkpoints and
resampling events): the same for every member."""

FILENAME = "sweep.yaml"
"""The members of a sweep run, beside its config.yaml (the base config)."""


@dataclass(frozen=True)
class Member:
    name: str
    """Short stable name from the values as written, e.g. `l1_coefficient=2e-3,seed=1`."""
    overrides: tuple[str, ...]
    """Its dotted overrides of the base config (`field=value`)."""
    cfg: Config
    """Its whole config (run_dir: the sweep's)."""


@dataclass(frozen=True)
class Group:
    name: str
    """`g0`, `g1`, ... in order of first appearance (the key of its state in checkpoints)."""
    members: tuple[Member, ...]

    @property
    def cfg(self) -> Config:
        """The config its step is compiled for: the first member's (the others differ only in
        fields carried as data), with each of its family's `bound_fields` at the members'
        largest value."""
        first = self.members[0].cfg
        tree = config_lib.to_dict(first)
        for name in get_family(first.sae.arch).bound_fields:
            *path, last = f"sae.{name}".split(".")
            node = tree
            for part in path:
                node = node[part]
            node[last] = max(flatten(config_lib.to_dict(m.cfg))[f"sae.{name}"]
                             for m in self.members)
        return from_dict(Config, tree)


@dataclass(frozen=True)
class Sweep:
    base: Config
    members: tuple[Member, ...]
    groups: tuple[Group, ...]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"sweep member {name!r} is not one of: "
                          f"{', '.join(m.name for m in self.members)}")

    def to_dict(self) -> dict:
        """What sweep.yaml holds: each member's overrides, in order."""
        return {"members": {m.name: list(m.overrides) for m in self.members}}


# ---------------------------------------------------------------- parsing


def split_list(text: str) -> list[str]:
    """`[a,b,[c,d]]` -> ["a", "b", "[c,d]"]: the values of a bracketed list as written
    (commas inside nested brackets kept)."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ConfigError(f"--sweep value {text!r}: expected a list such as [1e-3,2e-3]")
    items, depth, current = [], 0, ""
    for ch in text[1:-1]:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current.strip())
    if not items:
        raise ConfigError(f"--sweep value {text!r}: the list is empty")
    return items


def parse_sweep_arg(text: str) -> tuple[str, list[str]]:
    """`field=[v1,v2]` (one --sweep) -> (field, values as written)."""
    if "=" not in text:
        raise ConfigError(f"--sweep {text!r}: expected field=[value,...]")
    key, raw = text.split("=", 1)
    return key.strip(), split_list(raw)


def _written(value: Any) -> str:
    """A YAML value as an override would write it (`2e-3`, `[512,1024]`, `true`)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").replace(", ", ",")


def _section(spec: Any) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """(grid, members) of a YAML `sweep:` section, values as written."""
    if not isinstance(spec, dict) or set(spec) - {"grid", "members"}:
        raise ConfigError("sweep: expected a mapping with `grid` and/or `members`")
    grid = spec.get("grid") or {}
    members = spec.get("members") or []
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError("sweep.grid: expected {field: [value, ...]} with non-empty lists")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ConfigError("sweep.members: expected a list of {field: value} mappings")
    return ({k: [_written(v) for v in vs] for k, vs in grid.items()},
            [{k: _written(v) for k, v in m.items()} for m in members])


def _names(keys: list[str]) -> dict[str, str]:
    """Each swept field's label in member names: its last part, or the whole dotted name where
    two fields share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def expand(grid: dict[str, list[str]], members: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every member's {field: value as written}: the grid crossed, then crossed with the
    explicit members (each a dict; none = the grid alone)."""
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{**m, **cell} for m in (members or [{}]) for cell in cells]


# ---------------------------------------------------------------- building


def sweep_fields(overrides: list[dict[str, str]]) -> list[str]:
    """The fields any member sets, in order of first appearance."""
    return list(dict.fromkeys(k for o in overrides for k in o))


def data_fields(cfg: Config) -> frozenset[str]:
    """The fields of `cfg` carried as data in its step: DATA_FIELDS and its family's."""
    return DATA_FIELDS | {f"sae.{f}" for f in get_family(cfg.sae.arch).data_fields}


def group_key(cfg: Config) -> str:
    """Members with equal keys share a compiled step: the config without its data fields and
    bound fields."""
    flat = flatten(config_lib.to_dict(cfg))
    bound = {f"sae.{f}" for f in get_family(cfg.sae.arch).bound_fields}
    keep = {k: v for k, v in flat.items() if k not in data_fields(cfg) | bound}
    return json.dumps(keep, sort_keys=True, default=str)


def build(base_tree: dict, cells: list[dict[str, str]], n_devices: int | None = None) -> Sweep:
    """The sweep of `cells` (each member's {field: value as written}) over the base config
    given as a tree (YAML and overrides applied), every member validated."""
    fields = sweep_fields(cells)
    for field in fields:
        if field.startswith(SHARED_PREFIXES):
            raise ConfigError(f"sweep: {field} cannot vary within a sweep (all members share "
                              "one activation stream, mesh and loop); run separate sweeps")
    base = from_dict(Config, base_tree)
    labels = _names(fields)
    members, seen = [], {}
    for cell in cells:
        name = ",".join(f"{labels[k]}={v}" for k, v in cell.items()) or "base"
        overrides = tuple(f"{k}={v}" for k, v in cell.items())
        if name in seen:
            raise ConfigError(f"sweep: member {name} appears twice")
        seen[name] = True
        try:
            cfg = from_dict(Config, load_tree(overrides=list(overrides),
                                              tree=json.loads(json.dumps(base_tree))))
            config_lib.validate(cfg, n_devices)
        except ConfigError as e:
            raise ConfigError(f"sweep member {name}: {e}") from None
        members.append(Member(name, overrides, cfg))
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(group_key(m.cfg), []).append(m)
    return Sweep(base, tuple(members),
                 tuple(Group(f"g{i}", tuple(ms)) for i, ms in enumerate(groups.values())))


def load_sweep(path: str | Path | None, overrides: list[str], sweep_args: list[str],
               n_devices: int | None = None) -> Sweep | None:
    """The sweep of a command line (YAML `sweep:` section and/or --sweep arguments, crossed),
    or None when it names none."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml(path, "config file")
    grid, members = _section(tree.pop("sweep", None) or {})
    for text in sweep_args:
        key, values = parse_sweep_arg(text)
        grid[key] = values
    if not grid and not members:
        return None
    base = load_tree(overrides=overrides, tree=tree)
    from_dict(Config, base)  # unknown keys and wrong types of the base, named
    return build(base, expand(grid, members), n_devices)


def map_configs(sweep: Sweep, fn: Callable[[Config], Config]) -> Sweep:
    """The sweep with `fn` applied to every config (e.g. paths made absolute)."""
    members = {m.name: dataclasses.replace(m, cfg=fn(m.cfg)) for m in sweep.members}
    return Sweep(fn(sweep.base), tuple(members.values()),
                 tuple(Group(g.name, tuple(members[m.name] for m in g.members))
                       for g in sweep.groups))


# ---------------------------------------------------------------- a sweep's run directory


def read_sweep(run_dir: str | Path, base: Config) -> Sweep | None:
    """The sweep recorded in run_dir (sweep.yaml beside config.yaml), or None for a solo run."""
    path = as_path(run_dir) / FILENAME
    if not path.is_file():
        return None
    recorded = read_yaml(path, "the sweep's members").get("members") or {}
    cells = [dict(o.split("=", 1) for o in overrides) for overrides in recorded.values()]
    return build(config_lib.to_dict(base), cells)


def save_sweep(sweep: Sweep, run_dir: str | Path) -> None:
    from saejax.atomic import write_text_atomic  # noqa: PLC0415

    write_text_atomic(as_path(run_dir) / FILENAME,
                      yaml.safe_dump(sweep.to_dict(), sort_keys=False))


def split_member(spec: str | Path) -> tuple[AnyPath, str | None]:
    """`RUN:member` -> (RUN, member); a plain path -> (path, None). A path that exists as
    written is a path, even with a colon in it; a URL's `scheme://` is not a member's colon.
    The run comes back as `saejax.paths.as_path` gives it."""
    text = os.fspath(spec)
    scheme = text.index("://") + 3 if is_url(text) else 0
    if ":" in text[scheme:] and not as_path(text).exists():
        run, member = text.rsplit(":", 1)
        if (as_path(run) / FILENAME).is_file():
            return as_path(run), member
    return as_path(text), None
