"""Feature splitting: a family tree of features across dictionaries of increasing size.

Levels are SAEs of increasing size on the same activations (level 0 the smallest). Each alive
feature of level l >= 1 is linked to its *parent*: the alive feature of level l − 1 with the
largest masked cosine similarity of activations (cosine over the tokens where either fires, as
in Towards Monosemanticity); the edge is kept when that similarity is at least `threshold`
(the paper draws edges above ~0.4). Each feature has at most one parent, so the edges form a
forest. A *split* is a parent with two or more children: one feature of the smaller dictionary
refined into several of the larger.

`draw_family` draws one family (a root and all its descendants) with levels as rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saejax.analysis.matching import Similarity, best_matches


@dataclass(frozen=True)
class Level:
    name: str
    alive: np.ndarray
    """[n_features] bool: features that fired often enough to be linked."""

    @property
    def n_features(self) -> int:
        return int(len(self.alive))


@dataclass(frozen=True)
class Edge:
    level: int
    """The child's level (>= 1); the parent is on level − 1."""
    parent: int
    child: int
    weight: float
    """Masked cosine similarity of the two features' activations."""


@dataclass(frozen=True)
class Split:
    level: int
    """The parent's level."""
    parent: int
    children: list[tuple[int, float]]
    """(child id, weight), strongest first."""


@dataclass
class FamilyTree:
    levels: list[Level]
    edges: list[Edge]
    threshold: float
    best_parent: list[np.ndarray] = field(default_factory=list)
    """Per level l >= 1 ([0] is level 1): [F_l] best parent's masked cosine, NaN if not alive;
    the edges are its entries >= threshold."""
    _children: dict = field(default_factory=dict, init=False, repr=False)
    _parent: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        kids = defaultdict(list)
        for e in self.edges:
            kids[(e.level - 1, e.parent)].append(e)
            self._parent[(e.level, e.child)] = e
        self._children = {k: sorted(v, key=lambda e: -e.weight) for k, v in kids.items()}

    def children(self, level: int, feature: int) -> list[Edge]:
        """Edges from (level, feature) to its children on level + 1, strongest first."""
        return self._children.get((level, feature), [])

    def parent(self, level: int, feature: int) -> Edge | None:
        return self._parent.get((level, feature))

    def splits(self) -> list[Split]:
        """Parents with >= 2 children: most children first, then strongest mean edge."""
        out = [Split(lv, p, [(e.child, e.weight) for e in es])
               for (lv, p), es in self._children.items() if len(es) >= 2]
        return sorted(out, key=lambda s: (-len(s.children),
                                          -np.mean([w for _, w in s.children]), s.level,
                                          s.parent))

    def root_of(self, level: int, feature: int) -> tuple[int, int]:
        while (e := self.parent(level, feature)) is not None:
            level, feature = level - 1, e.parent
        return level, feature

    def family(self, level: int, feature: int) -> list[list[int]]:
        """Feature ids per level of (level, feature) and all its descendants: [[feature], ...]."""
        rows = [[feature]]
        while rows[-1] and level + len(rows) < len(self.levels):
            rows.append([e.child for f in rows[-1] for e in self.children(level + len(rows) - 1,
                                                                           f)])
        return rows if rows[-1] else rows[:-1]

    def pick_family(self) -> tuple[int, int] | None:
        """Root of the family to show: the one holding the strongest split (climbed to its
        root), else the largest family; None when there are no edges at all."""
        if (s := self.splits()):
            return self.root_of(s[0].level, s[0].parent)
        if not self.edges:
            return None
        roots = {self.root_of(e.level, e.child) for e in self.edges}
        return max(sorted(roots), key=lambda r: sum(map(len, self.family(*r))))

    def summary(self) -> dict:
        per_level = []
        for lv, level in enumerate(self.levels):
            row = {"name": level.name, "n_features": level.n_features,
                   "n_alive": int(level.alive.sum())}
            if lv:
                row["n_with_parent"] = sum(e.level == lv for e in self.edges)
                row["n_split_parents"] = sum(s.level == lv - 1 for s in self.splits())
            per_level.append(row)
        return {"threshold": self.threshold, "levels": per_level, "n_edges": len(self.edges),
                "n_splits": len(self.splits())}

    def to_json(self, top_splits: int = 50) -> dict:
        return {**self.summary(),
                "edges": [[e.level, e.parent, e.child, round(e.weight, 6)] for e in self.edges],
                "edges_format": ["child_level", "parent", "child", "masked_cosine"],
                "top_splits": [{"level": s.level, "parent": s.parent,
                                "children": [[c, round(w, 6)] for c, w in s.children]}
                               for s in self.splits()[:top_splits]]}


def build_tree(levels: Sequence[Level], sims: Sequence, threshold: float = 0.4) -> FamilyTree:
    """Link every alive feature of level l >= 1 to its best alive parent on level l − 1.

    sims[l − 1]: [F_{l−1}, F_l] masked cosine (parents as rows), NaN where undefined.
    """
    if len(sims) != len(levels) - 1:
        raise ValueError(f"{len(levels)} levels need {len(levels) - 1} similarity matrices, "
                         f"got {len(sims)}")
    edges, best = [], []
    for lv in range(1, len(levels)):
        up, down = levels[lv - 1], levels[lv]
        if np.shape(sims[lv - 1]) != (up.n_features, down.n_features):
            raise ValueError(f"sims[{lv - 1}] has shape {np.shape(sims[lv - 1])}, levels "
                             f"{up.name!r} and {down.name!r} give "
                             f"({up.n_features}, {down.n_features})")
        m = best_matches(np.asarray(sims[lv - 1]).T, down.alive, up.alive, "masked_cosine",
                         (down.name, up.name))
        best.append(m.value)
        keep = np.flatnonzero(m.index >= 0)
        edges += [Edge(lv, int(m.index[c]), int(c), float(m.value[c]))
                  for c in keep if m.value[c] >= threshold]
    return FamilyTree(list(levels), edges, threshold, best)


def tree_from_similarities(sims: Sequence[Similarity], threshold: float = 0.4,
                           min_fires: int = 10) -> FamilyTree:
    """The tree from the statistics of consecutive levels, sims[l] = (level l, level l + 1)."""
    if not sims:
        raise ValueError("a family tree needs at least one pair of consecutive levels")
    for k in range(1, len(sims)):
        if sims[k].names[0] != sims[k - 1].names[1]:
            raise ValueError(f"similarities are not consecutive: {sims[k - 1].names} then "
                             f"{sims[k].names}")
    levels = [Level(sims[0].names[0], sims[0].fires_a >= min_fires)]
    levels += [Level(s.names[1], s.fires_b >= min_fires) for s in sims]
    return build_tree(levels, [s.masked_cosine() for s in sims], threshold)


# -- the figure ----------------------------------------------------------------------------------


def _layout(tree: FamilyTree, level: int, feature: int) -> dict[tuple[int, int], float]:
    """x of every node of the family: leaves in depth-first order, parents centred over their
    children."""
    xs, next_slot = {}, [0.0]

    def place(lv: int, f: int) -> float:
        kids = tree.children(lv, f)
        if kids:
            xs[(lv, f)] = float(np.mean([place(lv + 1, e.child) for e in kids]))
        else:
            xs[(lv, f)] = next_slot[0]
            next_slot[0] += 1.0
        return xs[(lv, f)]

    place(level, feature)
    return xs


def _label_for(labels: Mapping | None, level: Level, lv: int, f: int) -> str:
    """Caller's label of feature f: labels[level index or level name][f]."""
    if not labels:
        return ""
    per = labels.get(lv, labels.get(level.name)) or {}
    return str(per.get(f, ""))


def draw_family(tree: FamilyTree, level: int, feature: int, path: str | Path,
                labels: Mapping[int | str, Mapping[int, str]] | None = None) -> Path:
    """Draw the family of (level, feature) as a PNG at `path`: levels as rows (smallest SAE on
    top), edges as lines whose width and opacity grow with the masked cosine, nodes labelled by
    feature id and, if given, labels[level index or name][feature id] (e.g. top tokens)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    xs = _layout(tree, level, feature)
    width = max(xs.values()) + 1
    depth = len(tree.family(level, feature))
    fig, ax = plt.subplots(figsize=(min(max(4.0, 1.3 * width), 40.0), 1.0 + 1.6 * depth))
    for (lv, f), x in xs.items():
        for e in tree.children(lv, f):
            x2 = xs[(lv + 1, e.child)]
            ax.plot([x, x2], [-lv, -lv - 1], color="tab:blue", lw=0.5 + 4 * e.weight,
                    alpha=0.25 + 0.75 * e.weight, zorder=1)
            ax.text((x + x2) / 2, -lv - 0.5, f"{e.weight:.2f}", fontsize=7, ha="center",
                    va="center", color="0.3", zorder=3,
                    bbox={"fc": "white", "ec": "none", "pad": 0.5})
        label = _label_for(labels, tree.levels[lv], lv, f)
        ax.scatter([x], [-lv], s=60, color="tab:orange", zorder=2)
        ax.text(x, -lv - 0.1, f"#{f}" + (f"\n{label}" if label else ""), fontsize=8,
                ha="center", va="top", zorder=4, bbox={"fc": "white", "ec": "none", "pad": 1})
    rows = range(level, level + depth)
    ax.set_yticks([-lv for lv in rows],
                  [f"{tree.levels[lv].name}\n({tree.levels[lv].n_features})" for lv in rows])
    ax.set_xticks([])
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-level - depth + 0.5, -level + 0.3)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"Feature family of {tree.levels[level].name} #{feature} "
                 f"(masked cosine ≥ {tree.threshold:g})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
