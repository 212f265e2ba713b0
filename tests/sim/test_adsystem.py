"""The simulated ad system: creatives chosen by a serving client, clicks drawn on the served pixels."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra.contracts.events import Click, Impression
from infra.contracts.prompt import CreativePrompt
from sim.adsystem import ServedChooser, served_share
from sim.oracle import oracle_table
from sim.simulate import Shown, creative_id, generate_events
from sim.world import Product, User, World

WORLD_A = Path(__file__).resolve().parents[2] / "sim" / "examples" / "world_a.yaml"


@pytest.fixture(scope="module")
def world() -> World:
    return World.load(WORLD_A)


class TemplateClient:
    """Serves one fixed prompt per product, rendered by the world's own template renderer (PNG bytes)."""

    def __init__(self, world: World, prompt: CreativePrompt, version: str = "7") -> None:
        self.world, self.prompt, self.version = world, prompt, version
        self.pngs: dict[str, bytes] = {}

    def creative_for(self, user_id: str, product_id: str) -> SimpleNamespace:
        if product_id not in self.pngs:
            product = next(p for p in self.world.all_products() if p.id == product_id)
            buffer = io.BytesIO()
            self.world.render(product, self.prompt).save(buffer, format="PNG")
            self.pngs[product_id] = buffer.getvalue()
        return SimpleNamespace(png=self.pngs[product_id], prompt=self.prompt.to_text(), model_version=self.version,
                               creative_id=creative_id(product_id, self.prompt), group_id="lipstick/g0",
                               explores=False, fallback=False, reason="")


def test_a_chooser_decides_every_creative_and_keeps_the_traffic(world: World) -> None:
    row = oracle_table(world, n_prompts=60, seed=0)[0]

    def chooser(user: User, product: Product) -> Shown:
        return Shown(creative_id(product.id, row.best_prompt), row.best_prompt, "3", "g")

    plain = [e for e in generate_events(world, seed=4, n_impressions=300) if isinstance(e, Impression)]
    chosen = [e for e in generate_events(world, seed=4, n_impressions=300, chooser=chooser)
              if isinstance(e, Impression)]
    assert [(e.user_id, e.product_id) for e in plain] == [(e.user_id, e.product_id) for e in chosen]
    assert {e.prompt for e in chosen} == {row.best_prompt.to_text()} and {e.model_version for e in chosen} == {"3"}
    assert all(e.creative_id == creative_id(e.product_id, row.best_prompt) for e in chosen)


def test_clicks_follow_the_served_pixels(world: World) -> None:
    """The segment's best creative, served as PNG bytes, gets more clicks than its worst one."""
    rows = [r for r in oracle_table(world, n_prompts=40, seed=0) if r.best_ctr >= 2 * r.worst_ctr]
    row = rows[0]
    segment = world.segment(row.category, row.segment)
    members = {u.id for u in world.members(segment)}

    def ctr(prompt: CreativePrompt) -> float:
        chooser = ServedChooser(world, TemplateClient(world, prompt))
        shown: dict[str, bool] = {}
        for event in generate_events(world, seed=5, n_impressions=12_000, chooser=chooser):
            if isinstance(event, Impression):
                if event.user_id in members and event.category == row.category:
                    shown[event.event_id] = False
            elif isinstance(event, Click) and event.impression_id in shown:
                shown[event.impression_id] = True
        assert served_share(chooser.counts) == {"7": 1.0}
        return sum(shown.values()) / len(shown)

    assert ctr(row.best_prompt) > 1.3 * ctr(row.worst_prompt)
