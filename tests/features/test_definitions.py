"""The Feast repository: declarations only, matching what the worker pushes; config from the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import features.repo.definitions as definitions
from features.schema import VIEWS, arrow_schema
from features.store import DEFINITIONS_DIR, apply, definitions as repo_objects, store_config, write_store_yaml
from infra.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_the_scanned_folder_holds_only_declarations() -> None:
    files = sorted(p.name for p in DEFINITIONS_DIR.glob("*.py"))
    assert files == ["__init__.py", "definitions.py"]
    source = (DEFINITIONS_DIR / "definitions.py").read_text()
    assert "import features" not in source and "infra" not in source, "definitions import only Feast"


def test_every_view_matches_the_pushed_layout() -> None:
    from feast import FeatureView, PushSource
    from feast.type_map import feast_value_type_to_pa

    from feast import Entity

    views = {o.name: o for o in repo_objects() if isinstance(o, FeatureView)}
    entities = {o.name: o for o in repo_objects() if isinstance(o, Entity)}
    assert set(views) == set(VIEWS)
    for name, schema in VIEWS.items():
        view = views[name]
        assert isinstance(view.stream_source, PushSource) and view.stream_source.name == schema.push_source
        assert view.batch_source.path == f"offline/{name}", "history paths are relative to the store's repo path"
        join_keys = [entities[e].join_key for e in view.entities]
        assert join_keys == list(schema.keys)
        arrow = arrow_schema(name)
        for field in view.features:
            expected = arrow.field(field.name).type
            assert feast_value_type_to_pa(field.dtype.to_value_type()) == expected, field.name
    assert {e.name for e in repo_objects() if type(e).__name__ == "Entity"} == {"group", "product", "user", "category"}
    assert definitions.user_group.entities == ["user", "category"]


def test_store_config_follows_the_settings(tmp_path: Path) -> None:
    sqlite = store_config(load_settings(data_dir=tmp_path))
    assert sqlite["online_store"] == {"type": "sqlite", "path": str(tmp_path.resolve() / "features" / "online.db")}
    assert sqlite["offline_store"] == {"type": "file"} and sqlite["project"] == "osmf"
    redis = load_settings(data_dir=tmp_path, features={"online_store": "redis", "redis_url": "redis://:s3cret@cache:6380/2"})
    assert store_config(redis)["online_store"] == {"type": "redis", "connection_string": "cache:6380,db=2,password=s3cret"}
    path = write_store_yaml(redis)
    assert yaml.safe_load(path.read_text())["online_store"]["type"] == "redis"
    assert path.read_text().startswith("# Generated from the OSMF settings")


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"online_store": "cassandra"}, "features.online_store: Input should be 'sqlite' or 'redis'"),
        ({"redis_url": "http://cache:6379"}, "features.redis_url: Value error, scheme 'http' is not redis://"),
        ({"redis_url": "redis://cache:6379/zero"}, "database 'zero' is not a number"),
        ({"project": "my-project"}, "features.project: String should match pattern"),
        ({"push_flush_s": 0}, "features.push_flush_s: Input should be greater than 0"),
    ],
)
def test_bad_feature_settings_are_refused_by_name(features: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(features=features)


def test_feature_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSMF_FEATURES__ONLINE_STORE", "redis")
    monkeypatch.setenv("OSMF_FEATURES__PUSH_FLUSH_S", "0.3")
    settings = load_settings()
    assert settings.features.online_store == "redis" and settings.features.push_flush_s == 0.3


def test_apply_is_idempotent_and_the_feast_cli_reads_the_generated_config(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, features={"project": "cli_check"})
    first = apply(settings)
    second = apply(settings)
    assert first.feature_views == second.feature_views == sorted(VIEWS)
    assert all((tmp_path / "features" / "offline" / view).is_dir() for view in VIEWS)
    feast = Path(sys.executable).with_name("feast")
    result = subprocess.run(
        [str(feast), "-c", str(DEFINITIONS_DIR), "-f", str(first.yaml_path), "feature-views", "list"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(view in result.stdout for view in VIEWS)


def test_osmf_help_does_not_import_feast() -> None:
    code = "import sys, cli.main; assert 'feast' not in sys.modules and 'features.store' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
