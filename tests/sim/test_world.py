"""The simulated world: loading, validation, determinism, the click model and its pixel features."""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sim.oracle import OracleRow, oracle_table
from sim.schema import WorldError, load_spec
from sim.simulate import creative_id, generate_events, simulate_ctr
from sim.vision import visual_features
from sim.world import World
from serving.render.template import TemplateRenderer
from infra.contracts.events import Click, Impression, parse_event, to_bytes
from infra.contracts.prompt import CreativePrompt, parse_prompt, random_prompt

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "sim" / "examples"
WORLD_FILES = {"a": EXAMPLES / "world_a.yaml", "b": EXAMPLES / "world_b.yaml"}
ORACLE_PROMPTS = 300


@pytest.fixture(scope="module")
def worlds() -> dict[str, World]:
    return {key: World.load(path) for key, path in WORLD_FILES.items()}


@pytest.fixture(scope="module")
def oracles(worlds: dict[str, World]) -> dict[str, list[OracleRow]]:
    return {key: oracle_table(world, n_prompts=ORACLE_PROMPTS, seed=0) for key, world in worlds.items()}


def _prompt(
    background: str = "solid",
    palette: tuple[str, str] = ("white", "gray"),
    position: str = "center",
    scale: float = 0.6,
    copy: str = "",
    style: tuple[str, ...] = (),
) -> CreativePrompt:
    return CreativePrompt(background, palette, position, scale, copy, style)


# --- loading and validation ---------------------------------------------------------------


def test_examples_load_and_differ_in_structure(worlds: dict[str, World]) -> None:
    a, b = worlds["a"], worlds["b"]
    assert [len(a.segments[c]) for c in a.categories] == [3, 3]
    assert len(b.categories) == 3 and sorted(len(b.segments[c]) for c in b.categories) == [2, 3, 4]
    assert any(s.shifts for c in b.categories for s in b.segments[c])
    for world in (a, b):
        for category in world.categories:
            assert len(world.products[category]) == world.spec.categories[world.categories.index(category)].products
            assert all(p.image.mode == "RGBA" and p.image.getpixel((0, 0))[3] == 0 for p in world.products[category])


def test_doc_example_is_a_valid_world(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "world.md").read_text()
    block = re.search(r"## Example\n\n```yaml\n(.*?)```", text, re.S)
    assert block is not None
    path = tmp_path / "doc.yaml"
    path.write_text(block.group(1))
    world = World.load(path)
    assert world.categories == ["mugs"]


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _valid() -> dict:
    return yaml.safe_load((ROOT / "docs" / "world.md").read_text().split("```yaml\n")[-1].split("```")[0])


DELETE = object()
SEG0 = "categories.0.segments.0"
SEG1 = "categories.0.segments.1"


def _edit(data: dict, path: str, value: object) -> None:
    """Set (or with DELETE remove) the item at a dotted path such as ``categories.0.shape``."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("colour", "red", "colour", "unknown field"),
        ("users.count", "many", "users.count", "integer"),
        ("users.attributes.age_band.probabilities", [0.9, 0.9], "users.attributes.age_band", "sum to 1"),
        (f"{SEG0}.base_ctr", DELETE, f"{SEG0}.base_ctr", "missing"),
        (f"{SEG0}.preferences.sparkle", {"weight": 1}, f"{SEG0}.preferences.sparkle", "brightness"),
        (f"{SEG0}.membership.agee", {"young": 1}, f"{SEG0}.membership.agee", "not a user attribute"),
        (f"{SEG1}.membership.age_band.teen", 1, f"{SEG1}.membership.age_band.teen", "not a value"),
        (f"{SEG0}.share", 0.9, "categories.0.segments", "sum to 1"),
        (f"{SEG0}.preferences.hue.target", DELETE, f"{SEG0}.preferences.hue.target", "needs a target"),
        (f"{SEG1}.preferences.product_area.target", 3, f"{SEG1}.preferences.product_area.target", "[0.0, 0.5]"),
        ("categories.0.shape", "teapot", "categories.0.shape", "bottle"),
    ],
)
def test_bad_world_file_names_the_field(tmp_path: Path, path: str, value: object, field: str, words: str) -> None:
    data = _valid()
    _edit(data, path, value)
    file = _write(tmp_path, data)
    with pytest.raises(WorldError) as info:
        World.load(file)
    lines = info.value.problems
    assert any(line.startswith(f"world {file}: {field}") and words in line for line in lines), lines


def test_unreadable_or_malformed_world_file(tmp_path: Path) -> None:
    with pytest.raises(WorldError, match="cannot read file"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(WorldError, match="not valid YAML"):
        load_spec(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(WorldError, match="<root>: must be a mapping"):
        load_spec(broken)


# --- the population ---------------------------------------------------------------------------


def test_world_is_a_function_of_its_file(worlds: dict[str, World]) -> None:
    again = World.load(WORLD_FILES["b"])
    world = worlds["b"]
    assert [u.attributes for u in again.users[:200]] == [u.attributes for u in world.users[:200]]
    for category in world.categories:
        assert [again.segment_of(u, category).name for u in again.users] == [
            world.segment_of(u, category).name for u in world.users
        ]
        assert [p.image.tobytes() for p in again.products[category]] == [
            p.image.tobytes() for p in world.products[category]
        ]


def test_segment_shares_match_the_spec(worlds: dict[str, World]) -> None:
    for world in worlds.values():
        for category in world.categories:
            shares = world.segment_shares(category)
            for segment in world.segments[category]:
                assert shares[segment.name] == pytest.approx(segment.share, abs=0.03)


def test_segments_are_recoverable_from_attributes(worlds: dict[str, World]) -> None:
    """Grouping users by their attributes puts most of each group into one segment."""
    for world in worlds.values():
        for category in world.categories:
            groups: dict[tuple, Counter] = defaultdict(Counter)
            for user in world.users:
                groups[tuple(sorted(user.attributes.items()))][world.segment_of(user, category).name] += 1
            purity = sum(c.most_common(1)[0][1] for c in groups.values()) / len(world.users)
            assert purity >= 0.75, (world.name, category, purity)


def test_same_user_sits_in_differently_driven_segments(worlds: dict[str, World]) -> None:
    world = worlds["a"]
    lipstick = Counter((u.attributes["age_band"], world.segment_of(u, "lipstick").name) for u in world.users)
    drill = Counter((u.attributes["age_band"], world.segment_of(u, "drill").name) for u in world.users)
    # Lipstick segments follow age; drill segments do not.
    young_lipstick = [lipstick[("18-24", s.name)] for s in world.segments["lipstick"]]
    young_drill = [drill[("18-24", s.name)] for s in world.segments["drill"]]
    assert max(young_lipstick) / sum(young_lipstick) > 0.8
    assert max(young_drill) / sum(young_drill) < 0.6


# --- the event stream -------------------------------------------------------------------------


def test_same_seed_same_events_different_seed_different(worlds: dict[str, World]) -> None:
    world = worlds["a"]
    first = list(generate_events(world, seed=5, n_impressions=3000))
    second = list(generate_events(World.load(WORLD_FILES["a"]), seed=5, n_impressions=3000))
    other = list(generate_events(world, seed=6, n_impressions=3000))
    assert first == second
    assert [e.event_id for e in first] != [e.event_id for e in other]
    assert [(e.user_id, e.product_id) for e in first[:100]] != [(e.user_id, e.product_id) for e in other[:100]]


def test_events_follow_the_contract(worlds: dict[str, World]) -> None:
    world = worlds["b"]
    start = 1_700_000_000_000
    events = list(
        generate_events(world, seed=2, n_impressions=4000, rate=200.0, start_ts_ms=start, creatives_per_product=3)
    )
    impressions = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    assert len(impressions) == 4000 and 0 < len(clicks) < 4000
    assert len({e.event_id for e in events}) == len(events)
    assert [e.ts for e in impressions[:3]] == [start, start + 5, start + 10]
    by_id = {e.event_id: e for e in impressions}
    for index, event in enumerate(events):
        assert parse_event(to_bytes(event)) == event
        if isinstance(event, Click):
            impression = events[index - 1]
            assert isinstance(impression, Impression) and event.impression_id == impression.event_id
            assert (event.user_id, event.product_id, event.creative_id) == (
                impression.user_id, impression.product_id, impression.creative_id)
            assert 200 <= event.ts - by_id[event.impression_id].ts <= 5000
    per_product = defaultdict(set)
    for imp in impressions:
        assert imp.model_version == "random" and imp.prompt is not None
        per_product[imp.product_id].add(imp.creative_id)
        assert imp.user == dict(world.users[int(imp.user_id[1:])].attributes)
    assert all(len(ids) <= 3 for ids in per_product.values())
    some = impressions[0]
    assert some.creative_id == creative_id(some.product_id, parse_prompt(some.prompt or ""))


def test_duration_and_rate_set_the_count(worlds: dict[str, World]) -> None:
    events = [e for e in generate_events(worlds["a"], seed=0, duration_s=2.0, rate=50.0) if e.type == "impression"]
    assert len(events) == 100 and events[-1].ts - events[0].ts == 1980
    with pytest.raises(ValueError, match="exactly one"):
        next(generate_events(worlds["a"], seed=0))
    with pytest.raises(ValueError, match="exactly one"):
        next(generate_events(worlds["a"], seed=0, n_impressions=5, duration_s=1.0))


def test_generation_is_fast_after_warm_up(worlds: dict[str, World]) -> None:
    world = worlds["b"]
    for _ in generate_events(world, seed=9, n_impressions=3000):
        pass  # renders every creative once
    started = time.perf_counter()
    count = sum(1 for _ in generate_events(world, seed=9, n_impressions=20_000))
    rate = count / (time.perf_counter() - started)
    assert rate >= 5000, f"{rate:.0f} events/s"


def test_stream_ctr_reflects_segment_taste(worlds: dict[str, World], oracles: dict[str, list[OracleRow]]) -> None:
    """Over a long stream, observed CTR stays between the worst and best the oracle allows."""
    world = worlds["a"]
    shown: Counter = Counter()
    clicked: Counter = Counter()
    impressions: dict[str, Impression] = {}
    for event in generate_events(world, seed=4, n_impressions=20_000):
        if isinstance(event, Impression):
            impressions[event.event_id] = event
            shown[event.category] += 1
        else:
            clicked[impressions[event.impression_id].category] += 1
    for category in world.categories:
        rows = [r for r in oracles["a"] if r.category == category]
        ctr = clicked[category] / shown[category]
        assert min(r.worst_ctr for r in rows) < ctr < max(r.best_ctr for r in rows)


# --- the click model and the oracle --------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "b"])
def test_preferred_creative_wins_in_simulated_clicks(
    worlds: dict[str, World], oracles: dict[str, list[OracleRow]], key: str
) -> None:
    world = worlds[key]
    n = 6000
    for row in oracles[key]:
        segment = world.segment(row.category, row.segment)
        product = world.products[row.category][0]
        best = simulate_ctr(world, segment, product, row.best_prompt, n, seed=1)
        worst = simulate_ctr(world, segment, product, row.worst_prompt, n, seed=2)
        pooled = (best + worst) / 2
        z = (best - worst) / math.sqrt(2 * pooled * (1 - pooled) / n)
        assert row.best_ctr >= 1.5 * row.worst_ctr, row
        assert best >= 1.5 * worst and z > 4, (row.category, row.segment, best, worst, z)


@pytest.mark.parametrize("key", ["a", "b"])
def test_preferred_creatives_differ_between_segments(
    worlds: dict[str, World], oracles: dict[str, list[OracleRow]], key: str
) -> None:
    """One size does not fit all: a segment's best creative is clearly worse for every other segment."""
    world = worlds[key]
    for category in world.categories:
        rows = [r for r in oracles[key] if r.category == category]
        assert len({r.best_prompt for r in rows}) == len(rows)
        product = world.products[category][0]
        for mine in rows:
            for theirs in rows:
                if mine is theirs:
                    continue
                segment = world.segment(category, theirs.segment)
                ctr = world.click_probability(segment, world.features(product, mine.best_prompt))
                assert ctr <= 0.8 * theirs.best_ctr, (category, mine.segment, theirs.segment)
        assert min(r.one_size_ctr / r.best_ctr for r in rows) < 0.6


def test_oracle_rows_are_consistent(oracles: dict[str, list[OracleRow]]) -> None:
    for rows in oracles.values():
        for row in rows:
            assert 0 < row.worst_ctr <= row.mean_ctr <= row.best_ctr < 1
            assert row.worst_ctr <= row.one_size_ctr <= row.best_ctr


def test_preference_shift_changes_taste(worlds: dict[str, World]) -> None:
    world = worlds["b"]
    segment = world.segment("skincare", "deal_seeker")
    product = world.products["skincare"][0]
    with_copy = world.features(product, _prompt(copy="Limited offer", scale=0.7))
    without = world.features(product, _prompt(scale=0.7))
    before = world.click_probability(segment, with_copy, t_s=0) / world.click_probability(segment, without, t_s=0)
    after = world.click_probability(segment, with_copy, t_s=601) / world.click_probability(segment, without, t_s=601)
    assert before > 1.3 and after < 0.9
    assert segment.phase(599.9) == 0 and segment.phase(600) == 1


# --- what the click model sees ------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderer() -> TemplateRenderer:
    return TemplateRenderer(128)


@pytest.fixture(scope="module")
def product(worlds: dict[str, World]) -> Image.Image:
    return worlds["b"].products["snacks"][0].image


def _features(renderer: TemplateRenderer, product: Image.Image, **fields: object) -> dict[str, float]:
    return visual_features(renderer.render(_prompt(**fields), product))  # type: ignore[arg-type]


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def test_features_follow_hue(renderer: TemplateRenderer, product: Image.Image) -> None:
    expected = {("red", "pink"): 350, ("blue", "navy"): 220, ("green", "teal"): 130, ("yellow", "orange"): 38}
    for palette, hue in expected.items():
        feats = _features(renderer, product, palette=palette, background="gradient", scale=0.4)
        assert _hue_distance(feats["hue"], hue) < 25, (palette, feats["hue"])
    grey = _features(renderer, product, palette=("white", "gray"), scale=0.4)
    vivid = _features(renderer, product, palette=("red", "orange"), scale=0.4)
    assert grey["colorfulness"] < vivid["colorfulness"]


def test_features_follow_brightness_and_saturation(renderer: TemplateRenderer, product: Image.Image) -> None:
    def feats(*style: str) -> dict[str, float]:
        return _features(renderer, product, palette=("pink", "beige"), background="split", style=style)

    assert feats("dark")["brightness"] < feats()["brightness"] < feats("bright")["brightness"]
    assert feats("soft")["saturation"] < feats()["saturation"] < feats("vivid")["saturation"]
    calm = _features(renderer, product, background="solid", palette=("teal", "white"))
    busy = _features(renderer, product, background="stripes", palette=("teal", "white"), style=("playful",))
    assert calm["edge_density"] < busy["edge_density"]


def test_features_follow_scale_and_position(renderer: TemplateRenderer, product: Image.Image) -> None:
    scales = (0.4, 0.5, 0.6, 0.7, 0.8)
    areas = [_features(renderer, product, scale=s, palette=("beige", "white"))["product_area"] for s in scales]
    assert areas == sorted(areas) and areas[-1] > 3 * areas[0]
    spots = {
        p: _features(renderer, product, position=p, scale=0.5, palette=("navy", "blue"))
        for p in ("center", "left", "right", "top", "bottom")
    }
    assert spots["left"]["product_x"] < spots["center"]["product_x"] - 0.1 < spots["right"]["product_x"] - 0.2
    assert spots["top"]["product_y"] < spots["center"]["product_y"] - 0.1 < spots["bottom"]["product_y"] - 0.2
    assert abs(spots["center"]["product_x"]) < 0.03


def test_features_over_random_creatives_track_the_truth(worlds: dict[str, World], renderer: TemplateRenderer) -> None:
    """Copy detection is exact and product area close to the drawn truth on most random creatives."""
    world = worlds["b"]
    rng = random.Random(0)
    products = [p for c in world.categories for p in world.products[c][:2]]
    copy_errors, area_errors = 0, []
    for index in range(150):
        product = products[index % len(products)]
        prompt = random_prompt(rng)
        feats = visual_features(renderer.render(prompt, product.image))
        copy_errors += feats["copy"] != (1.0 if prompt.copy else 0.0)
        left, top, right, bottom = renderer.product_box(prompt, product.image)
        content = product.image.crop(product.image.getchannel("A").getbbox())
        truth = np.zeros((128, 128), dtype=bool)
        truth[top:bottom, left:right] = np.asarray(content.getchannel("A").resize((right - left, bottom - top))) > 127
        rows = renderer.banner_rows(prompt)
        if rows:
            truth[rows[0] : rows[1]] = False
        area_errors.append(abs(feats["product_area"] - truth.mean()))
    assert copy_errors == 0
    assert float(np.median(area_errors)) < 0.02 and float(np.mean(area_errors)) < 0.04


def test_stream_is_identical_across_processes(worlds: dict[str, World]) -> None:
    """No dependence on hash randomisation or process state: a replayed run gives the same bytes."""
    code = (
        "import hashlib, sys\n"
        "from sim.world import World\n"
        "from sim.simulate import generate_events\n"
        "from infra.contracts.events import to_bytes\n"
        "digest = hashlib.sha256()\n"
        f"for e in generate_events(World.load({str(WORLD_FILES['a'])!r}), seed=3, n_impressions=1500):\n"
        "    digest.update(to_bytes(e))\n"
        "print(digest.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    digest = hashlib.sha256()
    for event in generate_events(worlds["a"], seed=3, n_impressions=1500):
        digest.update(to_bytes(event))
    assert out.stdout.strip() == digest.hexdigest()
