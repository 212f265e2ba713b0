"""Shared fixtures of the learner tests: tiny settings, a synthetic traffic log, a tiny G-MLLM."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from PIL import Image

from infra.settings import ModelSettings
from learner.data import ProductRecord, TrafficLog, TrafficRecord
from infra.contracts.prompt import random_prompt

TINY_MODEL = ModelSettings(
    vocab_size=500, hidden_size=48, layers=2, heads=4, intermediate_size=96,
    vision_hidden_size=16, vision_layers=1, image_size=16, patch_size=8,
)
"""A model of ~0.1M parameters: builds in a second, trains a step in milliseconds."""

PINK = "primary=pink"
NAVY = "primary=navy"


def synthetic_log(n: int = 6000, seed: int = 0) -> TrafficLog:
    """Two groups of mugs with opposite tastes: g0 clicks pink primaries, g1 navy ones (10 % vs 1 %)."""
    rng = random.Random(seed)
    products = {
        f"mug-{i}": ProductRecord(f"mug-{i}", "mugs", f"Enamel mug {i}", 9.5 + i,
                                  Image.new("RGBA", (32, 32), (200, 40 * i, 40, 255)))
        for i in range(3)
    }
    prompts = []
    for i in range(24):  # a third with pink, a third with navy primaries
        prompt = random_prompt(rng)
        primary = ("pink", "navy", "gray")[i % 3]
        secondary = prompt.palette[1] if prompt.palette[1] not in ("pink", "navy") else "white"
        prompts.append(replace(prompt, palette=(primary, secondary)))
    users = {f"u{i}": {"age": "young" if i % 2 == 0 else "old", "city": rng.choice(["a", "b"])} for i in range(40)}
    records = []
    for t in range(n):
        user = f"u{rng.randrange(40)}"
        group = "mugs/g0" if users[user]["age"] == "young" else "mugs/g1"
        prompt = rng.choice(prompts)
        liked = "pink" if group == "mugs/g0" else "navy"
        p = 0.12 if prompt.palette[0] == liked else 0.01
        records.append(TrafficRecord(1_000 * t, user, group, "mugs", f"mug-{rng.randrange(3)}", prompt.to_text(),
                                     rng.random() < p))
    return TrafficLog(products, users, records, {"source": "synthetic"})


@pytest.fixture
def one_thread():  # noqa: ANN201
    """One torch thread for the test (the learner's default; two are far slower on 2 shared cores)."""
    from learner.pretrain import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_model() -> ModelSettings:
    """:data:`TINY_MODEL`."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def make_log():  # noqa: ANN201
    """The :func:`synthetic_log` factory."""
    return synthetic_log


@pytest.fixture(scope="session")
def tiny_log() -> TrafficLog:
    return synthetic_log()


@pytest.fixture(scope="session")
def tiny_gmllm():  # noqa: ANN201
    from learner.model.gmllm import GMLLM

    return GMLLM.build(TINY_MODEL, corpus=["group mugs/g0 | 50% of mugs | likes primary=pink"] * 5, seed=0)
