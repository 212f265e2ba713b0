"""The runnable examples in module docstrings stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "infra.contracts.events",
    "infra.contracts.prompt",
    "streams.ingest",
    "streams.journal",
    "streams.ctr",
    "streams.grouping",
    "streams.grouping.config",
    "streams.grouping.grouper",
    "streams.grouping.evidence",
    "streams.grouping.statistics",
    "streams.grouping.tree",
    "learner.dpo.weights",
    "learner.gate",
    "learner.buffer",
    "learner.dpo.data",
    "learner.dpo.heldout",
    "learner.loop",
    "learner.estimate",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
