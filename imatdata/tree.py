"""The product tree: 2,019 leaf classes under a 4-level hierarchy (root → level1 → level2 → level3).

The file (the competition's ``product_tree.json``, packaged as ``imatdata/data/product_tree.json``)
maps level-1 names to level-2 names to level-3 names to a list of leaf class ids (strings)::

    {"level1_node4": {"level2_node5": {"level3_node1": ["1784", "1785"], ...}, ...}, ...}

Node names repeat under different parents ("level2_node5" exists under several level-1 nodes),
so a node is identified by its *path key*: the names from level 1 down to it joined by "/",
e.g. ``"level1_node4/level2_node5"``. Used by ``imatdata stats`` and by the trainer's
hierarchy-aware losses; this module must not import torch.

    tree = ProductTree.load()                 # packaged tree
    tree = ProductTree.load("my_tree.json")   # a file
    tree.path(1784)        -> ("level1_node4", "level2_node5", "level3_node1")
    tree.node_key(1784, 2) -> "level1_node4/level2_node5"
    tree.nodes(1)          -> ["level1_node4", ...]                 (file order)
    tree.leaves_under("level1_node4/level2_node5") -> [1784, ...]
    keys, index = tree.class_to_node(2)   # index[class_id] -> position of its node in keys
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from imatdata.errors import UserError

LEVELS = 3  # named levels below the root; leaves hang under level 3
SEP = "/"
PACKAGED = "packaged"  # `--tree packaged` selects the tree shipped with imatdata


def packaged_tree_text() -> str:
    return (resources.files("imatdata") / "data" / "product_tree.json").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ProductTree:
    """A parsed, validated product tree. Build it with `load`, `from_file` or `from_mapping`."""

    source: str
    # class id -> (level1, level2, level3) names, in file order.
    leaf_paths: dict[int, tuple[str, str, str]]
    # level (1..3) -> path keys of its nodes, in file order.
    level_nodes: dict[int, list[str]]
    _leaves_by_key: dict[str, list[int]] = field(repr=False)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> ProductTree:
        """The tree in `path`; the packaged tree when `path` is None or the word "packaged"
        (unless a file of that name exists)."""
        if path is None or (str(path) == PACKAGED and not Path(path).exists()):
            return cls.from_mapping(_parse_json(packaged_tree_text(), "the packaged product tree"),
                                    source=PACKAGED)
        return cls.from_file(Path(path))

    @classmethod
    def from_file(cls, path: Path) -> ProductTree:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"product tree {path} does not exist: pass an existing JSON file to --tree "
                            f"(or '{PACKAGED}' for the tree shipped with imatdata)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read product tree {path}: {exc}") from None
        return cls.from_mapping(_parse_json(text, str(path)), source=str(path))

    @classmethod
    def from_mapping(cls, obj: Any, source: str = "<mapping>") -> ProductTree:
        """Validate the nested level1 → level2 → level3 → [leaf ids] structure."""
        if not isinstance(obj, Mapping) or not obj:
            raise UserError(f"product tree {source}: expected a non-empty JSON object of level-1 nodes")
        leaf_paths: dict[int, tuple[str, str, str]] = {}
        level_nodes: dict[int, list[str]] = {1: [], 2: [], 3: []}
        leaves_by_key: dict[str, list[int]] = {}
        for l1, sub1 in obj.items():
            k1 = _check_name(l1, source, "")
            _expect_mapping(sub1, source, k1)
            level_nodes[1].append(k1)
            for l2, sub2 in sub1.items():
                k2 = k1 + SEP + _check_name(l2, source, k1)
                _expect_mapping(sub2, source, k2)
                level_nodes[2].append(k2)
                for l3, leaves in sub2.items():
                    k3 = k2 + SEP + _check_name(l3, source, k2)
                    if not isinstance(leaves, list):
                        raise UserError(f"product tree {source}: node {k3} must hold a list of class ids")
                    level_nodes[3].append(k3)
                    for raw in leaves:
                        cid = _class_id(raw, source, k3)
                        if cid in leaf_paths:
                            other = SEP.join(leaf_paths[cid])
                            raise UserError(f"product tree {source}: class {cid} appears under both "
                                            f"{other} and {k3}; each class must have one parent")
                        leaf_paths[cid] = (l1, l2, l3)
                        for key in (k1, k2, k3):
                            leaves_by_key.setdefault(key, []).append(cid)
        if not leaf_paths:
            raise UserError(f"product tree {source}: no leaf classes found")
        return cls(source=source, leaf_paths=leaf_paths, level_nodes=level_nodes,
                   _leaves_by_key=leaves_by_key)

    # --- queries --------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.leaf_paths)

    @property
    def classes(self) -> list[int]:
        """Leaf class ids, ascending."""
        return sorted(self.leaf_paths)

    def __contains__(self, class_id: object) -> bool:
        return class_id in self.leaf_paths

    def path(self, class_id: int) -> tuple[str, str, str] | None:
        """(level1, level2, level3) names above a leaf; None for a class not in the tree."""
        return self.leaf_paths.get(int(class_id))

    def node_key(self, class_id: int, level: int) -> str | None:
        """Path key of the class's ancestor at `level` (1..3), e.g. "level1_node4/level2_node5"."""
        _check_level(level)
        p = self.path(class_id)
        return None if p is None else SEP.join(p[:level])

    def nodes(self, level: int) -> list[str]:
        """Path keys of every node at `level` (1..3), in file order."""
        _check_level(level)
        return list(self.level_nodes[level])

    def leaves_under(self, key: str) -> list[int]:
        """Leaf class ids below the node with this path key, in file order."""
        try:
            return list(self._leaves_by_key[key])
        except KeyError:
            raise KeyError(f"no node {key!r} in product tree {self.source}") from None

    def children(self, key: str | None = None) -> list[str]:
        """Path keys of the direct children of a node (of the root when `key` is None)."""
        if key is None:
            return self.nodes(1)
        depth = key.count(SEP) + 1
        if depth >= LEVELS:
            return []
        prefix = key + SEP
        return [k for k in self.level_nodes[depth + 1] if k.startswith(prefix)]

    def class_to_node(self, level: int) -> tuple[list[str], dict[int, int]]:
        """(node keys at `level`, {class id: index of its node in those keys}) — the shape a
        hierarchical loss or a per-node metric wants."""
        keys = self.nodes(level)
        position = {k: i for i, k in enumerate(keys)}
        return keys, {cid: position[SEP.join(p[:level])] for cid, p in self.leaf_paths.items()}


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"product tree {source} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _check_name(name: Any, source: str, parent: str) -> str:
    # Names are joined with "/" into path keys, so a "/" inside one would make keys ambiguous.
    if not isinstance(name, str) or not name or SEP in name:
        where = parent or "the top level"
        raise UserError(f"product tree {source}: node name {name!r} under {where} must be a non-empty "
                        f"string without '{SEP}'")
    return name


def _expect_mapping(obj: Any, source: str, key: str) -> None:
    if not isinstance(obj, Mapping):
        raise UserError(f"product tree {source}: node {key} must be a JSON object of child nodes "
                        f"(the tree has level1 → level2 → level3 → [class ids])")


def _class_id(raw: Any, source: str, key: str) -> int:
    # The file stores ids as strings; plain JSON integers are accepted too (never booleans).
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw)
    raise UserError(f"product tree {source}: leaf {raw!r} under {key} is not a class id "
                    f"(a non-negative integer)")


def _check_level(level: int) -> None:
    if level not in (1, 2, 3):
        raise ValueError(f"level must be 1, 2 or 3, not {level!r}")
