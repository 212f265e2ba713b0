"""Product-aware adaptive grouping: users grouped per category, online, from attributes and clicks, with stable ids.

One job a module: :mod:`~streams.grouping.config` (settings, group
descriptions, the attribute encoding), :mod:`~streams.grouping.grouper` (the
River estimator and the worker's verbs), :mod:`~streams.grouping.category`
(one category's counts and routing tree), :mod:`~streams.grouping.tree`
(growing the tree at a macro step, interactions included),
:mod:`~streams.grouping.evidence` (per-creative and visual-attribute click
profiles) and :mod:`~streams.grouping.statistics` (the taste and level tests
that decide a split). Why
clicks and not attributes alone, the algorithm, its parameters and measured
figures: ``docs/grouping.md``.

Examples
--------
Users whose clicks show that ``age`` matters get their own group:

>>> import random
>>> rng = random.Random(0)
>>> grouper = ProductAwareGrouper(GroupingConfig(recluster_every=2000, first_recluster=2000))
>>> for _ in range(6000):
...     user = {"age": rng.choice(["young", "old"]), "device": rng.choice(["ios", "android"])}
...     creative = rng.choice(["pink", "beige"])
...     likes = (user["age"] == "young") == (creative == "pink")
...     group = grouper.learn_and_assign("lipstick", user, creative)
...     if rng.random() < (0.10 if likes else 0.02):
...         grouper.learn_click("lipstick", user, creative)
>>> young = grouper.assign("lipstick", {"age": "young", "device": "ios"})
>>> old = grouper.assign("lipstick", {"age": "old", "device": "ios"})
>>> young != old, young == grouper.assign("lipstick", {"age": "young", "device": "android"})
(True, True)
>>> sorted(group.rule for group in grouper.groups("lipstick"))
['age=old', 'age=young']
"""

from streams.grouping.category import _Category, _Tree  # noqa: F401 - names in journals written before the split
from streams.grouping.config import GroupInfo, GroupingConfig, encode_value
from streams.grouping.grouper import ProductAwareGrouper

__all__ = ["GroupingConfig", "GroupInfo", "ProductAwareGrouper", "encode_value"]
