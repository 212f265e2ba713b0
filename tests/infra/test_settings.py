"""The one settings object: defaults, YAML file, environment, precedence, errors."""

from pathlib import Path

import pytest

from infra.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OSMF_CONFIG", "OSMF_KAFKA_BOOTSTRAP", "OSMF_BROKER__PORT", "OSMF_DATA_DIR"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_defaults_describe_the_embedded_mode() -> None:
    settings = load_settings()
    assert settings.broker.storage == "memory"
    assert not settings.uses_external_kafka
    assert settings.bootstrap_servers == f"127.0.0.1:{settings.broker.port}"
    assert settings.topics.impressions == "osmf.impressions"


def test_environment_overrides_yaml_which_overrides_defaults(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "osmf.yaml"
    config.write_text("broker:\n  port: 21000\n  storage: s3\ntopics:\n  partitions: 8\n")
    monkeypatch.setenv("OSMF_CONFIG", str(config))
    monkeypatch.setenv("OSMF_BROKER__PORT", "22000")
    settings = load_settings()
    assert settings.broker.port == 22000
    assert settings.broker.storage == "s3"
    assert settings.topics.partitions == 8


def test_external_bootstrap_switches_off_tansu(monkeypatch) -> None:
    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    settings = load_settings()
    assert settings.uses_external_kafka
    assert settings.bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_unknown_yaml_key_is_named(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "osmf.yaml"
    config.write_text("brokr:\n  port: 1\n")
    monkeypatch.setenv("OSMF_CONFIG", str(config))
    with pytest.raises(ConfigError, match="brokr"):
        load_settings()


def test_out_of_range_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"broker\.port.*70000"):
        load_settings(broker={"port": 70000})


def test_missing_config_file_is_named(monkeypatch) -> None:
    monkeypatch.setenv("OSMF_CONFIG", "/nowhere/osmf.yaml")
    with pytest.raises(ConfigError, match="/nowhere/osmf.yaml"):
        load_settings()
