"""The grouper is a River estimator: River's own checks, clone and parameters, learn_one / predict_one on dicts."""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from river import base, checks
from river.checks import common

from streams.grouping import GroupingConfig, ProductAwareGrouper

DATASET_CHECKS: tuple[Callable[..., None], ...] = (
    common.check_learn_one,
    common.check_pickling,
    common.check_shuffle_features_no_impact,
    common.check_emerging_features,
    common.check_disappearing_features,
    common.check_radically_disappearing_features,
    common.check_predict_one_pure,
    common.check_predict_one_before_any_learn,
    common.check_no_state_aliasing_with_input,
    common.check_clone_is_independent,
    common.check_bounded_memory_growth,
)
"""River's dataset checks. River yields no dataset for clusterers, so these get one of user dicts."""


def _users(n: int, seed: int = 0) -> Iterator[tuple[dict[str, Any], None]]:
    rng = random.Random(seed)
    for _ in range(n):
        x = {
            "age": rng.choice(["18-24", "25-34", "35+"]),
            "gender": rng.choice(["female", "male"]),
            "tier": rng.choice([1, 2, 3]),
            "device": rng.choice(["ios", "android", None]),
            "spend": rng.uniform(0, 300),
            "member": rng.random() < 0.3,
        }
        yield x, None


def _general_checks() -> list[Callable[..., None]]:
    return list(checks.yield_checks(ProductAwareGrouper()))


def test_is_a_river_clusterer() -> None:
    assert isinstance(ProductAwareGrouper(), base.Clusterer)
    assert not ProductAwareGrouper()._supervised


@pytest.mark.parametrize("check", _general_checks(), ids=lambda check: check.__name__)
def test_river_general_checks(check: Callable[..., None]) -> None:
    model = ProductAwareGrouper(GroupingConfig(max_groups=4, first_recluster=100))
    check(model.clone())


@pytest.mark.parametrize("check", DATASET_CHECKS, ids=lambda check: check.__name__)
def test_river_dataset_checks(check: Callable[..., None]) -> None:
    model = ProductAwareGrouper(GroupingConfig(first_recluster=100, recluster_every=200))
    check(model.clone(), dataset=list(_users(400 if check is common.check_bounded_memory_growth else 120)))


def test_clone_keeps_parameters_and_drops_state() -> None:
    grouper = ProductAwareGrouper(GroupingConfig(max_groups=3), category="tea")
    for x, _ in _users(50):
        grouper.learn_one(x, creative="c1")
    clone = grouper.clone()
    assert clone._get_params() == {"config": GroupingConfig(max_groups=3), "category": "tea"}
    assert grouper.categories() == ["tea"] and clone.categories() == []
    other = grouper.clone({"config": GroupingConfig(max_groups=5)})
    assert other.config.max_groups == 5 and other.category == "tea"


def test_learn_one_with_clicks_matches_the_worker_verbs() -> None:
    """``learn_one(x, category, creative, clicked)`` is ``learn_and_assign`` plus ``learn_click``."""
    config = GroupingConfig(first_recluster=1000, recluster_every=2000, halflife=None)
    river_style, worker_style = ProductAwareGrouper(config), ProductAwareGrouper(config)
    rng = random.Random(3)
    users = [{"age": age, "device": device} for age in ("young", "old") for device in ("ios", "android")]
    for _ in range(8000):
        user, creative = rng.choice(users), rng.choice(["pink", "beige", "green"])
        liked = (user["age"] == "young") == (creative == "pink")
        clicked = rng.random() < (0.12 if liked else 0.02)
        river_style.learn_one(user, category="lipstick", creative=creative, clicked=clicked)
        worker_style.learn_and_assign("lipstick", user, creative)
        if clicked:
            worker_style.learn_click("lipstick", user, creative)
    assert river_style.groups("lipstick") == worker_style.groups("lipstick")
    young, old = users[0], users[2]
    assert river_style.predict_one(young, category="lipstick") != river_style.predict_one(old, category="lipstick")
    number = river_style.predict_one(young, category="lipstick")
    assert river_style.assign("lipstick", young) == f"lipstick/g{number}"
    assert pickle.loads(pickle.dumps(river_style)).predict_one(young, category="lipstick") == number
