"""The product tree: every leaf of the packaged tree maps to its path; bad files are user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imatdata.errors import UserError
from imatdata.tree import PACKAGED, ProductTree

PACKAGED_FILE = Path(__file__).resolve().parents[1] / "imatdata" / "data" / "product_tree.json"


def _walk(obj: dict) -> dict[int, tuple[str, str, str]]:
    return {int(c): (l1, l2, l3) for l1, a in obj.items() for l2, b in a.items() for l3, leaves in b.items()
            for c in leaves}


def test_packaged_tree_maps_all_2019_leaves() -> None:
    raw = json.loads(PACKAGED_FILE.read_text())
    expected = _walk(raw)
    tree = ProductTree.load()
    assert tree.source == PACKAGED
    assert tree.num_classes == 2019 == len(expected)
    assert tree.classes == sorted(expected) == list(range(2019))
    for cid, path in expected.items():
        assert tree.path(cid) == path
        assert tree.path(str(cid)) == path  # type: ignore[arg-type]  # ids arrive as strings too
        assert tree.node_key(cid, 1) == path[0]
        assert tree.node_key(cid, 2) == f"{path[0]}/{path[1]}"
        assert tree.node_key(cid, 3) == "/".join(path)
    assert tree.path(2019) is None and 2019 not in tree and 0 in tree
    assert ProductTree.load(PACKAGED_FILE).leaf_paths == tree.leaf_paths


def test_nodes_are_keyed_by_path_because_names_repeat() -> None:
    raw = json.loads(PACKAGED_FILE.read_text())
    tree = ProductTree.load()
    level2_names = [l2 for a in raw.values() for l2 in a]
    assert len(set(level2_names)) < len(level2_names), "the packaged tree reuses level-2 names"
    assert tree.nodes(1) == list(raw)
    assert tree.nodes(2) == [f"{l1}/{l2}" for l1, a in raw.items() for l2 in a]
    assert len(set(tree.nodes(2))) == len(tree.nodes(2)) == len(level2_names)
    assert len(tree.nodes(3)) == sum(len(b) for a in raw.values() for b in a.values())
    # Leaves under each level-1 node partition the classes.
    seen: list[int] = []
    for key in tree.nodes(1):
        under = tree.leaves_under(key)
        assert sorted(under) == sorted(c for c, p in tree.leaf_paths.items() if p[0] == key)
        assert sorted(under) == sorted(c for child in tree.children(key) for c in tree.leaves_under(child))
        seen += under
    assert sorted(seen) == tree.classes
    assert tree.children() == tree.nodes(1)
    assert tree.children(tree.nodes(3)[0]) == []
    with pytest.raises(KeyError):
        tree.leaves_under("level1_node1/nope")
    with pytest.raises(ValueError):
        tree.nodes(4)


def test_class_to_node_indexes() -> None:
    tree = ProductTree.load()
    for level in (1, 2, 3):
        keys, index = tree.class_to_node(level)
        assert keys == tree.nodes(level)
        assert set(index) == set(tree.classes)
        for cid in (0, 1000, 2018):
            assert keys[index[cid]] == tree.node_key(cid, level)


def test_small_tree_from_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": {"x": {"p": ["1", 2], "q": ["3"]}}, "b": {"x": {"p": ["4"]}}}))
    tree = ProductTree.load(path)
    assert tree.source == str(path)
    assert tree.path(2) == ("a", "x", "p")
    assert tree.path(4) == ("b", "x", "p")
    assert tree.nodes(2) == ["a/x", "b/x"]
    assert tree.leaves_under("a/x") == [1, 2, 3]
    assert tree.leaves_under("b/x/p") == [4]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not valid JSON"),
        ("[]", "non-empty JSON object"),
        ('{"a": ["1"]}', "JSON object of child nodes"),
        ('{"a": {"x": {"p": "1"}}}', "list of class ids"),
        ('{"a": {"x": {"p": ["one"]}}}', "not a class id"),
        ('{"a": {"x": {"p": [true]}}}', "not a class id"),
        ('{"a": {"x": {"p": ["1"]}}, "b": {"x": {"q": ["1"]}}}', "appears under both a/x/p and b/x/q"),
        ('{"a/b": {"x": {"p": ["1"]}}}', "without '/'"),
        ('{"a": {"x": {"p": []}}}', "no leaf classes"),
    ],
)
def test_bad_tree_files_are_user_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tree.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        ProductTree.load(path)
    assert str(path) in str(info.value)


def test_missing_tree_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ProductTree.load(tmp_path / "absent.json")
