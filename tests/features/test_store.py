"""Apply, push and read through Feast, on SQLite and on Redis: the typed read API and its cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from features.push import FeaturePusher, PushConfig
from features.read import FeatureReader, FeatureReadError
from features.rows import group_preferences_row, group_profile_row, product_row, user_group_row
from features.sink import FeastSink
from features.store import FeatureStoreError, apply

from .conftest import store_settings

T0 = 1_767_225_600_000_000  # 2026-01-01, epoch µs


class FakeEmbedder:
    def embed(self, titles: list[str]) -> list[list[float]]:
        return [[float(len(t))] + [0.0] * 383 for t in titles]


@pytest.fixture
def store(tmp_path: Path, online_store: str, project: str):
    settings = store_settings(tmp_path, online_store, project)
    apply(settings)
    pusher = FeaturePusher(FeastSink(settings, embedder=FakeEmbedder()), PushConfig(flush_s=0.02))
    pusher.start()
    yield settings, pusher
    pusher.close()


def _profile(group: str, members: int) -> dict:
    return group_profile_row(group, category=group.split("/")[0], rule="age_band=18-24", member_count=members,
                             weight=12.5, centroid={"age_band=18-24": 1.0, "device=ios": 0.4, "device=android": 0.6})


def test_read_api_round_trip_with_explicit_missing(store) -> None:
    settings, pusher = store
    pusher.submit("group_profile", [_profile("lipstick/g1", 40), _profile("lipstick/g2", 7)], T0)
    prefs = group_preferences_row("lipstick/g1", prompts={"p-a": (300, 30), "p-b": (100, 2)},
                                  attributes={"primary=pink": (300, 30), "primary=navy": (100, 2)})
    pusher.submit("group_creative_preferences", [prefs], T0)
    pusher.submit("user_group", [user_group_row("u1", "lipstick", "lipstick/g1")], T0)
    pusher.submit("product_profile", [product_row("p1", "lipstick", {"title": "Rose matte", "price": 19.0})], T0)
    assert pusher.flush(30), pusher.counters

    reader = FeatureReader(settings)
    got = reader.read_group_rows(["lipstick/g1", "lipstick/g2", "lipstick/g99", "lipstick/g1"])
    assert got.found.tolist() == [True, False, False, True]
    assert got.found_profile.tolist() == [True, True, False, True]
    assert got.missing == ["lipstick/g2", "lipstick/g99"]
    assert got.member_count[:3].tolist()[:2] == [40.0, 7.0] and np.isnan(got.member_count[2])
    assert np.isnan(got.ctr[1]) and np.isnan(got.impressions[2]), "unknown is NaN, never 0"
    assert got.top_prompts[2] is None and got.centroid[2] is None and got.category[2] is None
    assert got.ctr[0] == pytest.approx(32 / 400)
    assert [t.prompt for t in got.top_prompts[0]] == ["p-a", "p-b"]
    assert got.distributions(0) == {"age_band": {"18-24": 1.0}, "device": {"android": 0.6, "ios": 0.4}}
    assert got.attribute_keys[0] == ("primary=navy", "primary=pink")
    with pytest.raises(ValueError, match="read-only"):
        got.attribute_ctr[0][0] = 1.0  # arrays are shared with the cache
    assert got.attribute_ctr[0].tolist() == [0.02, 0.1]
    assert str(got.profile_updated_at[0]) == "2026-01-01T00:00:00.000000"
    assert np.isnat(got.profile_updated_at[2])
    assert got.row("lipstick/g99") is None and got.row("lipstick/g1")["rule"] == "age_band=18-24"

    assert reader.resolve_group("u1", "lipstick") == "lipstick/g1"
    assert reader.resolve_group("u1", "drill") is None
    assert reader.resolve_groups(["u1", "u2"], "lipstick") == ["lipstick/g1", None]

    products = reader.read_products(["p1", "p2"])
    assert products.found.tolist() == [True, False] and products.missing == ["p2"]
    assert products.price[0] == 19.0 and np.isnan(products.price[1])
    assert products.has_embedding.tolist() == [True, False]
    assert products.title_embedding[0, 0] == len("Rose matte") and np.isnan(products.title_embedding[1]).all()


def test_the_cache_drops_exactly_what_a_push_changed(store) -> None:
    settings, pusher = store
    groups = [f"drill/g{i}" for i in range(20)]
    pusher.submit("group_profile", [_profile(g, 1) for g in groups], T0)
    assert pusher.flush(30)
    reader = FeatureReader(settings)
    fetched: list[int] = []
    real_fetch = reader._fetch  # noqa: SLF001 - count what goes to Feast

    def counting_fetch(views, keys):  # noqa: ANN001, ANN202
        fetched.append(len(keys))
        return real_fetch(views, keys)

    reader._fetch = counting_fetch  # noqa: SLF001
    assert reader.read_group_rows(groups).member_count.tolist() == [1.0] * 20
    assert reader.read_group_rows(groups).member_count.tolist() == [1.0] * 20
    assert fetched == [20], "the second read is served from the cache"
    pusher.submit("group_profile", [_profile("drill/g3", 99)], T0 + 1)
    assert pusher.flush(30)
    counts = reader.read_group_rows(groups).member_count
    assert counts[3] == 99.0 and counts.sum() == 19 + 99
    assert fetched == [20, 1], "only the pushed group is read again"
    other = FeatureReader(settings, cache=False)
    assert other.read_group_rows(["drill/g3"]).member_count[0] == 99.0


def test_cached_reads_of_100_groups_are_stable(store) -> None:
    settings, pusher = store
    groups = [f"drill/g{i}" for i in range(100)]
    pusher.submit("group_profile", [_profile(g, i) for i, g in enumerate(groups)], T0)
    pusher.submit("group_creative_preferences",
                  [group_preferences_row(g, prompts={"p": (10, 1)}, attributes={"a=b": (10, 1)}) for g in groups], T0)
    assert pusher.flush(30)
    reader = FeatureReader(settings)
    first = reader.read_group_rows(groups)
    again = reader.read_group_rows(groups)  # served from the cache (speed: `osmf bench feature-read`)
    assert repr(first) == repr(again)


def test_read_arguments_are_checked(store) -> None:
    settings, _ = store
    reader = FeatureReader(settings)
    with pytest.raises(FeatureReadError, match="group_ids: give a list of ids, not one string"):
        reader.read_group_rows("lipstick/g1")
    with pytest.raises(FeatureReadError, match=r"group_ids\[1\]: ids are non-empty strings, got 3"):
        reader.read_group_rows(["a", 3])
    with pytest.raises(FeatureReadError, match="category: must be a non-empty string"):
        reader.resolve_group("u1", "")


def test_reading_a_store_never_applied_says_what_to_run(tmp_path: Path) -> None:
    reader = FeatureReader(store_settings(tmp_path, "sqlite", "never"))
    with pytest.raises(FeatureStoreError, match="run `osmf features apply`"):
        reader.read_group_rows(["x/g0"])


def test_a_failing_store_counts_failed_pushes_keeps_the_rows_and_never_blocks(tmp_path: Path) -> None:
    settings = store_settings(tmp_path, "sqlite", "broken")
    apply(settings)
    online = tmp_path / "features" / "online.db"
    for name in ("online.db", "online.db-wal", "online.db-shm"):
        (tmp_path / "features" / name).unlink(missing_ok=True)
    online.mkdir()  # SQLite cannot open it: every write fails at once
    pusher = FeaturePusher(FeastSink(settings, embedder=FakeEmbedder()),
                           PushConfig(flush_s=0.01, retries=1, retry_backoff_s=0.01))
    pusher.start()
    try:
        for i in range(100):  # returns at once: rows are queued for the background thread
            pusher.submit("user_group", [user_group_row(f"u{i}", "drill", "drill/g0")], T0 + i)
        deadline = time.monotonic() + 30
        while pusher.counters.failed_pushes < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pusher.counters.failed_pushes >= 2  # the store cannot even be opened; it is tried again and again
        assert "OperationalError: unable to open database file" in pusher.counters.last_error
        assert pusher.waiting() + pusher._inflight == 100, "rows are kept for when the store works again"  # noqa: SLF001
        online.rmdir()  # the store recovers: the kept rows go through
        assert pusher.flush(30)
        assert FeatureReader(settings).resolve_group("u99", "drill") == "drill/g0"
    finally:
        pusher.close(timeout_s=2)
