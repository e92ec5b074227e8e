"""Ray's private parts that clf uses (`clf.ray_private.PARTS`): each one touched in Ray as clf uses it, so a Ray
upgrade that moves one fails here in seconds, naming it; and no private part reached from anywhere else in clf/."""

import re
from pathlib import Path

import pytest

from clf import ray_private
from tests.helpers import ROOT

# Ray's private things, as they would be written in clf's code.
PRIVATE = re.compile(r"ray\._private|\._internal|internal_kv|_get_global_client|print_to_stdstream|_global_node|"
                     r"PlacementGroupID|_create_default_callbacks|_register_sigint_handler")


@pytest.mark.parametrize("part", ray_private.PARTS, ids=lambda part: part.name)
def test_each_private_part_is_where_clf_finds_it(part):
    ray_private.touch(part)


def test_a_part_that_moved_fails_naming_itself():
    moved = ray_private.Part("a function Ray renamed", "ray._private.state", "available_resources_per_node_v2",
                             "callable", "nowhere", "", "")
    with pytest.raises(AssertionError, match=r"a function Ray renamed \(ray._private.state"):
        ray_private.touch(moved)
    gone = ray_private.Part("a variable Ray no longer reads", "ray.train.v2._internal.constants", "RAY_TRAIN_NO_SUCH",
                            "env", "nowhere", "", "")
    with pytest.raises(AssertionError, match="no longer reads this variable"):
        ray_private.touch(gone)


def test_no_private_part_is_reached_from_elsewhere_in_clf():
    found = []
    for path in sorted((ROOT / "clf").rglob("*.py")):
        if path.name == "ray_private.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code) and not code.strip().startswith(('"', "'")):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    # The two overridden methods are defined where they are overridden, and listed.
    overridden = [f for f in found if re.search(r"def (_create_default_callbacks|_register_sigint_handler)|"
                                                r"super\(\)\._create_default_callbacks", f)]
    assert [f for f in found if f not in overridden] == []
    assert all(Path(f.split(":")[0]).name == "ray_train.py" for f in overridden)
