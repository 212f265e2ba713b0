"""What the G-MLLM reads and writes for each task: the text layout of its inputs and targets.

Every task input is a plain string ending in a newline, with one ``<image>``
placeholder where the product image goes (the LLaVA processor expands it
into the vision tower's patch tokens). The group prefix comes first, so the
policy and the reference of Group-DPO are conditioned on the group by the same
tokens. The generation input is what a TRL ``DPOTrainer`` dataset's
``prompt`` column holds (with the product image in its ``images`` column);
its completion is a canonical prompt followed by the EOS token.

>>> from learner.data import ProductRecord
>>> product = ProductRecord("p1", "mugs", "Enamel mug", 9.5)
>>> print(task_input("generate", group="group mugs/g0 | 100% of mugs", product=product), end="")
group mugs/g0 | 100% of mugs
<image>
product Enamel mug | mugs | price 9.5
task: write the creative prompt
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learner.data import ProductRecord
from features.group import GroupFeatures, creative_attributes
from infra.contracts.prompt import COLORS

TASKS: tuple[str, ...] = ("group", "click", "product", "generate")
"""The four pre-training tasks: group analysis, click-behaviour prediction, product comprehension,
prompt generation."""

IMAGE_TOKEN = "<image>"
YES, NO = "yes", "no"
INSTRUCTIONS: dict[str, str] = {
    "group": "task: describe the group",
    "click": "task: will the group click",
    "product": "task: describe the product",
    "generate": "task: write the creative prompt",
}


def group_text(group: GroupFeatures | str) -> str:
    """The group's text prefix (a :class:`GroupFeatures` is rendered with ``to_text``)."""
    return group if isinstance(group, str) else group.to_text()


def product_text(product: ProductRecord) -> str:
    """One line of product text: title, category, price."""
    price = "unknown" if product.price is None else f"{product.price:.4g}"
    return f"product {product.title} | {product.category} | price {price}"


def task_segments(
    task: str,
    *,
    group: GroupFeatures | str | None = None,
    product: ProductRecord | None = None,
    creative: str | None = None,
) -> list[str]:
    """The input of ``task`` as lines (each ending in a newline); ``"".join`` gives :func:`task_input`."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    needs_group = task in ("group", "click", "generate")
    needs_product = task in ("click", "product", "generate")
    if needs_group and group is None:
        raise ValueError(f"task {task!r} needs the group's features")
    if needs_product and product is None:
        raise ValueError(f"task {task!r} needs the product")
    if task == "click" and creative is None:
        raise ValueError("task 'click' needs the creative prompt")
    lines: list[str] = []
    if needs_group:
        lines.append(group_text(group) + "\n")  # type: ignore[arg-type]
    if needs_product:
        lines.append(IMAGE_TOKEN + "\n")
        if task != "product":
            lines.append(product_text(product) + "\n")  # type: ignore[arg-type]
    if task == "click":
        lines.append(f"creative {creative}\n")
        if isinstance(group, GroupFeatures):
            lines.append(creative_fit(group, creative, product.id) + "\n")  # type: ignore[arg-type, union-attr]
    lines.append(INSTRUCTIONS[task] + "\n")
    return lines


LIFT_MARKS: tuple[tuple[float, str], ...] = (
    (0.6, "---"), (0.75, "--"), (0.9, "-"), (1.1, "="), (1.33, "+"), (1.67, "++"), (float("inf"), "+++"),
)
"""Lift → mark: a few single tokens the model can add up (digits would be read one by one)."""


def lift_mark(lift: float) -> str:
    """The mark of a CTR lift: ``---`` (below 0.6) … ``=`` (0.9–1.1) … ``+++`` (1.67 and above).

    >>> [lift_mark(x) for x in (0.5, 0.8, 1.0, 1.2, 2.0)]
    ['---', '-', '=', '+', '+++']
    """
    for bound, mark in LIFT_MARKS:
        if lift < bound:
            return mark
    return LIFT_MARKS[-1][1]  # pragma: no cover


def creative_fit(group: GroupFeatures, creative: str, product_id: str | None = None) -> str:
    """How the group clicks the product and each visual attribute of ``creative`` (CTR lifts as marks).

    Part of the click-task input.

    >>> g = GroupFeatures("mugs/g0", "mugs", 1.0, 100, 5, lifts={"primary=pink": 1.43}, product_lifts={"p1": 0.7})
    >>> creative_fit(g, 'background=solid; palette=pink,white; position=left; scale=0.5; copy=""; style=', "p1")
    'fit product --, background=solid =, primary=pink ++, secondary=white =, position=left =, scale=0.5 =, copy=none ='
    """
    parts = [] if product_id is None else [f"product {lift_mark(group.product_lifts.get(product_id, 1.0))}"]
    parts += [f"{token} {lift_mark(group.lifts.get(token, 1.0))}" for token in creative_attributes(creative)]
    return "fit " + ", ".join(parts)


def task_input(
    task: str,
    *,
    group: GroupFeatures | str | None = None,
    product: ProductRecord | None = None,
    creative: str | None = None,
) -> str:
    """The full input text of ``task`` (see the module docstring)."""
    return "".join(task_segments(task, group=group, product=product, creative=creative))


def generation_input(group: GroupFeatures | str, product: ProductRecord) -> str:
    """Input of the prompt-generation task: the ``prompt`` column of a Group-DPO dataset."""
    return task_input("generate", group=group, product=product)


def group_description(group: GroupFeatures) -> str:
    """Target of the group-analysis task: the group's preferences in words."""
    who = ", ".join(group.who) if group.who else "a mix of users"
    likes = ", ".join(f"{t} x{group.lifts.get(t, 1.0):.1f}" for t in group.likes) or "no clear favourite"
    avoids = ", ".join(f"{t} x{group.lifts.get(t, 1.0):.1f}" for t in group.avoids) or "nothing in particular"
    return (
        f"mostly {who}; {round(100 * group.share)}% of {group.category} traffic, clicks {100 * group.ctr:.1f}%; "
        f"clicks more on {likes}; clicks less on {avoids}"
    )


def product_description(product: ProductRecord) -> str:
    """Target of the product-comprehension task: colour, category, title and price of the product."""
    price = "unknown" if product.price is None else f"{product.price:.4g}"
    return f"{dominant_colour(product)} {product.category}: {product.title}, price {price}"


def dominant_colour(product: ProductRecord) -> str:
    """Name (from the prompt palette) of the colour nearest to the product's median opaque pixel."""
    if product.image is None:
        return "unknown"
    pixels = np.asarray(product.image.convert("RGBA"), dtype=np.float64).reshape(-1, 4)
    opaque = pixels[pixels[:, 3] > 128, :3]
    if len(opaque) == 0:
        return "unknown"
    median = np.median(opaque, axis=0)
    names: Sequence[str] = list(COLORS)
    distances = [float(np.sum((median - np.array(COLORS[name])) ** 2)) for name in names]
    return names[int(np.argmin(distances))]
