"""Per-group versions without a server: live state, rollback, kept versions, creative's parameters, client cache."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import pytest

from infra.settings import Settings, load_settings
from learner.publish import Routing
from serving import live, server
from serving.cache import SlateCache
from serving.client import stale_pairs
from serving.live import LiveState, VersionManager, kept_versions, promote_state, read_state, rollback_state
from serving.repository import CREATIVE, creative_config, repository_path
from serving.triton_io import routing_of
from serving.triton_models import creative


@pytest.mark.parametrize("module", [live, creative, __import__("serving.triton_io").triton_io])
def test_docstring_examples(module) -> None:  # noqa: ANN001
    assert doctest.testmod(module).failed == 0


def test_group_promotion_routes_only_its_groups_and_rollback_restores_them() -> None:
    state = promote_state(promote_state(LiveState(), 1, None), 2, None)
    state = promote_state(state, 3, ["mugs/g0", "mugs/g1"])
    assert (state.live, state.previous, state.groups) == (2, 1, {"mugs/g0": 3, "mugs/g1": 3})
    state = promote_state(state, 4, ["mugs/g1"])
    assert state.routing() == Routing(2, {"mugs/g0": 3, "mugs/g1": 4})
    assert kept_versions(state, "latest") == [2, 3, 4]
    assert kept_versions(state, "live_and_previous") == [1, 2, 3, 4]
    state = promote_state(state, 5, None)
    assert (state.live, state.previous, state.groups) == (5, 2, {})
    assert kept_versions(state, "latest") == [5]
    assert kept_versions(state, "live_and_previous") == [2, 3, 4, 5], "the routing rollback returns to stays loaded"
    state, undone = rollback_state(state)
    assert undone == 5 and state.routing() == Routing(2, {"mugs/g0": 3, "mugs/g1": 4}) and state.previous == 1
    state, undone = rollback_state(state)
    assert undone == 4 and state.routing() == Routing(2, {"mugs/g0": 3, "mugs/g1": 3})
    assert state.rolled_back == [5, 4] and state.good == [1, 2, 3, 4, 5]


def test_first_version_serves_every_group_and_cannot_be_rolled_back() -> None:
    state = promote_state(LiveState(), 1, ["mugs/g0"])
    assert (state.live, state.groups) == (1, {})
    with pytest.raises(server.ServingError, match="no previous good version"):
        rollback_state(state)


def test_old_live_file_loads_and_rolls_back_to_previous(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    path = live.state_file(settings)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"live": 3, "previous": 2, "good": [1, 2, 3], "refused": {}, "rolled_back": [],
                                "events": []}))
    state = read_state(settings)
    assert state.groups == {} and state.promotions == []
    state, undone = rollback_state(state)
    assert (undone, state.live, state.previous, state.groups) == (3, 2, 1, {})


def _creative_params(text: str) -> dict[str, str]:
    pairs = re.findall(r'key: ("(?:[^"\\]|\\.)*") value: \{ string_value: ("(?:[^"\\]|\\.)*") \}', text)
    return {json.loads(k): json.loads(v) for k, v in pairs}


def test_creative_config_carries_group_versions_and_creative_routes_by_group_text(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    params = _creative_params(creative_config(settings, 2, {"mugs/g1": 4, "mugs/g0": 3}))
    assert params == {"gmllm_version": "2", "group_versions": '{"mugs/g0": 3, "mugs/g1": 4}'}
    assert _creative_params(creative_config(settings, 2))["group_versions"] == "{}"
    model = creative.TritonPythonModel()
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model.initialize({"model_config": json.dumps(config)})
    assert model.version_for(b"group mugs/g0 | 60% of mugs | ctr 4.0%") == 3
    assert model.version_for("group mugs/g1") == 4
    assert model.version_for("group all | 100% of all users") == 2
    assert model.version_for("no group prefix") == 2
    assert routing_of(params) == Routing(2, {"mugs/g0": 3, "mugs/g1": 4})


@pytest.mark.parametrize("bad", ["not json", "[3]", '{"mugs/g0": "three"}'])
def test_bad_group_versions_parameter_serves_the_default(bad: str) -> None:
    model = creative.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"parameters": {"gmllm_version": {"string_value": "2"},
                                                                 "group_versions": {"string_value": bad}}})})
    assert model.version_for("group mugs/g0 | x") == 2
    groups, complaint = creative.group_versions_param(bad)
    assert groups == {} and "group_versions" in complaint and "creative_config" in complaint
    model.initialize({"model_config": json.dumps({"parameters": {}})})
    assert model.version_for("group mugs/g0") == -1, "no parameter: Triton's newest version"


def test_client_cache_follows_each_groups_version(tmp_path: Path) -> None:
    cache = SlateCache(tmp_path)
    cache.put(1, "mugs/g0", "mug-1", [("p", b"png-a")])
    cache.put(3, "mugs/g0", "mug-1", [("q", b"png-b")])
    cache.put(1, "mugs/g1", "mug-1", [("r", b"png-c")])
    routing = Routing(1, {"mugs/g0": 3})
    assert stale_pairs(cache, routing) == []
    assert stale_pairs(cache, Routing(1, {})) == [("mugs/g0", "mug-1")]
    assert stale_pairs(cache, Routing(4, {"mugs/g0": 3})) == [("mugs/g1", "mug-1")]
    restarted = SlateCache(tmp_path)
    assert restarted.load(1, routing.groups) == 2
    assert restarted.get("mugs/g0", "mug-1").version == 3 and restarted.get("mugs/g1", "mug-1").version == 1


# ---------------------------------------------------------------------- VersionManager without a server


def _publish_fake(settings: Settings, version: int, groups: list[str] | None) -> None:
    path = settings.data_dir / "models" / "gmllm" / str(version)
    path.mkdir(parents=True)
    published = {} if groups is None else {"groups": groups}
    (path / "gmllm.json").write_text(json.dumps({"kind": "osmf-gmllm", "published": published}))


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VersionManager:
    """A VersionManager whose Triton calls only record what they would load."""
    settings = load_settings(data_dir=tmp_path)
    manager = VersionManager(settings)
    loaded: list[int] = []
    manager.loaded = loaded  # type: ignore[attr-defined]
    monkeypatch.setattr(live, "verify_artifact", lambda path: None)
    monkeypatch.setattr(VersionManager, "smoke", lambda self, version: None)
    monkeypatch.setattr(VersionManager, "_load_gmllm", lambda self, versions: loaded.__setitem__(slice(None), versions))
    monkeypatch.setattr(server, "ready_versions", lambda settings, name: list(loaded))
    monkeypatch.setattr(server, "load_model", lambda settings, name, timeout=None: None)
    return manager


def _served(manager: VersionManager) -> dict[str, str]:
    return _creative_params((repository_path(manager.settings) / CREATIVE / "config.pbtxt").read_text())


def test_manager_promotes_in_publish_order_and_rolls_back(offline: VersionManager) -> None:
    settings = offline.settings
    _publish_fake(settings, 1, None)
    assert offline.check().version == 1
    _publish_fake(settings, 2, ["mugs/g0"])
    _publish_fake(settings, 3, ["mugs/g1"])
    assert offline.check().version == 2, "group versions go live in publish order, none skipped"
    outcome = offline.check()
    assert outcome is not None and outcome.version == 3 and outcome.result == "live"
    state = read_state(settings)
    assert (state.live, state.groups) == (1, {"mugs/g0": 2, "mugs/g1": 3})
    assert _served(offline) == {"gmllm_version": "1", "group_versions": '{"mugs/g0": 2, "mugs/g1": 3}'}
    assert offline.loaded == [1, 2, 3]
    assert state.events[-1]["event"] == "live" and state.events[-1]["groups"] == ["mugs/g1"]
    rows = {row["version"]: row["state"] for row in live.versions_table(settings)}
    assert rows == {1: "live", 2: "live for 1 group", 3: "live for 1 group"}
    _publish_fake(settings, 4, ["mugs/g0"])
    _publish_fake(settings, 5, None)
    assert offline.check().version == 5, "a version for every group supersedes the pending ones before it"
    assert offline.check() is None
    assert _served(offline) == {"gmllm_version": "5", "group_versions": "{}"}
    assert offline.loaded == [1, 2, 3, 5]
    outcome = offline.rollback()
    assert outcome.version == 1 and "from 5" in outcome.reason
    assert _served(offline)["group_versions"] == '{"mugs/g0": 2, "mugs/g1": 3}'
    outcome = offline.rollback()
    assert outcome.version == 1 and "mugs/g1" in outcome.reason
    state = read_state(settings)
    assert state.groups == {"mugs/g0": 2} and state.rolled_back == [5, 3]
    assert state.events[-1] | {"at": 0, "seconds": 0} == {"at": 0, "version": 3, "event": "rolled_back", "to": 1,
                                                          "groups": {"mugs/g1": 1}, "seconds": 0}
    outcome = offline.check()  # as before per-group versions: a version skipped for a newer one is pending again
    assert outcome is not None and outcome.version == 4
    assert read_state(settings).groups == {"mugs/g0": 4}
    assert offline.check() is None, "rolled-back versions are not promoted again"
