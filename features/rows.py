"""Feature rows from what the stream worker knows: one builder per feature view.

Pure functions on plain data (no Feast, no stream types), so the worker calls
them on its hot path and tests recompute the same rows from the worker's
tables. Each returns a dict laid out as :data:`features.schema.VIEWS` says.

>>> row = group_preferences_row(
...     "lipstick/g1",
...     prompts={"background=dots": (100, 9), "background=solid": (50, 1)},
...     attributes={"background=dots": (100, 9), "background=solid": (50, 1)},
...     top_k=1,
... )
>>> row["impressions"], row["clicks"], row["top_prompts"]
(150, 10, ['background=dots'])
>>> user_group_row("u7", "drill", "drill/g3")
{'user_id': 'u7', 'category': 'drill', 'group_id': 'drill/g3'}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PRIOR_STRENGTH = 100.0
"""Pseudo-impressions of the Beta prior (centred on the group's CTR) that rank top prompts."""

IMAGE_ATTRIBUTES = ("image_ref", "image_url", "image")
"""Product attributes read, in this order, as the product image reference."""


def group_profile_row(
    group_id: str,
    *,
    category: str,
    rule: str,
    member_count: int,
    weight: float,
    centroid: Mapping[str, float],
) -> dict[str, Any]:
    """The ``group_profile`` row: who is in the group (centroid keys sorted)."""
    keys = sorted(centroid)
    return {
        "group_id": group_id,
        "category": category,
        "rule": rule,
        "member_count": int(member_count),
        "weight": float(weight),
        "centroid_keys": keys,
        "centroid": [float(centroid[k]) for k in keys],
    }


def group_preferences_row(
    group_id: str,
    *,
    prompts: Mapping[str, tuple[int, int]],
    attributes: Mapping[str, tuple[int, int]],
    impressions: int | None = None,
    clicks: int | None = None,
    top_k: int = 5,
    prior_strength: float = PRIOR_STRENGTH,
) -> dict[str, Any]:
    """The ``group_creative_preferences`` row of a group.

    ``prompts``: prompt text -> (impressions, clicks) over all the group's
    products; ``attributes``: ``"attribute=value"`` -> (impressions, clicks);
    ``impressions`` / ``clicks``: the group's totals (default: the sums over
    ``prompts``; pass them when some creatives have no prompt). Top prompts are
    ranked by posterior mean CTR under a Beta prior of ``prior_strength``
    pseudo-impressions at the group's CTR, so one lucky click does not win.
    """
    total_i = sum(i for i, _ in prompts.values()) if impressions is None else int(impressions)
    total_c = sum(c for _, c in prompts.values()) if clicks is None else int(clicks)
    base = total_c / total_i if total_i else 0.0
    scored = [
        ((c + prior_strength * base) / (i + prior_strength), i, c, text)
        for text, (i, c) in prompts.items()
        if i > 0
    ]
    scored.sort(key=lambda s: (-s[0], -s[1], s[3]))
    top = scored[:top_k]
    keys = sorted(attributes)
    return {
        "group_id": group_id,
        "impressions": total_i,
        "clicks": total_c,
        "ctr": base,
        "attribute_keys": keys,
        "attribute_impressions": [int(attributes[k][0]) for k in keys],
        "attribute_clicks": [int(attributes[k][1]) for k in keys],
        "attribute_ctr": [_ctr(*attributes[k]) for k in keys],
        "top_prompts": [t[3] for t in top],
        "top_prompt_impressions": [int(t[1]) for t in top],
        "top_prompt_clicks": [int(t[2]) for t in top],
        "top_prompt_score": [float(t[0]) for t in top],
    }


def group_preferences_from_tables(
    group_id: str,
    ctr_rows: Mapping[str, Mapping[str, list[Any]]],
    attr_row: Mapping[str, list[int]] | None,
    *,
    top_k: int = 5,
) -> dict[str, Any]:
    """The same row, recomputed from the worker's tables.

    ``ctr_rows``: the group's rows of the ``ctr`` table, product ->
    ``{creative: [impressions, clicks, prompt]}``; ``attr_row``: its row of
    ``attr-ctr``. The worker keeps these sums incrementally; this full
    recomputation is what it must equal.
    """
    prompts: dict[str, list[int]] = {}
    total_i = total_c = 0
    for creatives in ctr_rows.values():
        for imps, clks, prompt in creatives.values():
            total_i += imps
            total_c += clks
            if prompt:
                acc = prompts.setdefault(prompt, [0, 0])
                acc[0] += imps
                acc[1] += clks
    return group_preferences_row(
        group_id,
        prompts={p: (v[0], v[1]) for p, v in prompts.items()},
        attributes={k: (v[0], v[1]) for k, v in (attr_row or {}).items()},
        impressions=total_i,
        clicks=total_c,
        top_k=top_k,
    )


def user_group_row(user_id: str, category: str, group_id: str) -> dict[str, Any]:
    """The ``user_group`` row: the user's current group in ``category``."""
    return {"user_id": user_id, "category": category, "group_id": group_id}


def product_row(product_id: str, category: str, attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The ``product_profile`` row from an impression's product attributes.

    ``price`` is read when it is a finite number, ``title`` when a string, the
    image reference from the first of :data:`IMAGE_ATTRIBUTES` present; the
    title embedding is filled in by the pusher (it needs the sentence encoder).

    >>> product_row("p1", "drill", {"title": "Pro drill", "price": 99.5})["price"]
    99.5
    """
    price = attributes.get("price")
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price):
        price = None
    title = attributes.get("title")
    image = next((attributes[k] for k in IMAGE_ATTRIBUTES if isinstance(attributes.get(k), str)), None)
    return {
        "product_id": product_id,
        "category": category,
        "price": None if price is None else float(price),
        "title": title if isinstance(title, str) and title else None,
        "title_embedding": None,
        "image_ref": image,
    }


def _ctr(impressions: int, clicks: int) -> float:
    return clicks / impressions if impressions else 0.0
