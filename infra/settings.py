"""The one typed settings object every room reads.

Defaults describe the embedded mode (one machine, ``make demo``). Each field
can be overridden by an environment variable ``OSMF_<FIELD>`` (nested
sections with ``__``, e.g. ``OSMF_BROKER__PORT=19092``) or by a YAML file
named by ``OSMF_CONFIG`` (or ``osmf --config FILE``). Precedence: explicit
arguments > environment > YAML file > defaults.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV_VAR = "OSMF_CONFIG"


class BrokerSettings(BaseModel):
    """The embedded Tansu broker (ignored when ``kafka_bootstrap`` is set)."""

    host: str = Field("127.0.0.1", description="Address Tansu listens on.")
    port: int = Field(19092, ge=1, le=65535, description="Kafka port of Tansu.")
    storage: Literal["memory", "s3"] = Field(
        "memory",
        description="memory: fast, lost on restart; s3: durable, on a local SeaweedFS.",
    )
    s3_port: int = Field(18333, ge=1, le=65535, description="S3 port of the local SeaweedFS.")
    s3_bucket: str = Field("tansu", description="Bucket that holds the broker's data.")
    start_timeout_s: float = Field(30.0, gt=0, description="How long `start` waits for the broker.")


class TopicSettings(BaseModel):
    """Topic names and partition counts (DESIGN.md §3)."""

    impressions: str = "osmf.impressions"
    clicks: str = "osmf.clicks"
    preference_pairs: str = "osmf.preference-pairs"
    dead_letter: str = "osmf.dead-letter"
    drift_alerts: str = "osmf.drift-alerts"
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of each topic created.")

    def all_names(self) -> list[str]:
        """Every topic the product writes to."""
        return [self.impressions, self.clicks, self.preference_pairs, self.dead_letter, self.drift_alerts]


class StreamsSettings(BaseModel):
    """The Faust stream worker (``osmf worker``)."""

    app_id: str = Field("osmf-worker", min_length=1, description="Consumer group and table-topic prefix.")
    batch_size: int = Field(1000, ge=1, le=100_000, description="Events per micro-batch (stream.take_events).")
    batch_within_s: float = Field(0.2, gt=0, description="Longest wait to fill a micro-batch.")
    dedupe_window_s: float = Field(3600.0, gt=0, description="Event-time window in which duplicate ids are dropped.")
    attribution_window_s: float = Field(1800.0, gt=0, description="Latest a click may follow its impression.")
    drift_label_delay_s: float = Field(
        60.0, gt=0, description="An impression counts as not clicked for drift once this much event time passed."
    )
    max_groups: int = Field(8, ge=1, le=256, description="Most groups per product category.")
    min_pair_impressions: int = Field(100, ge=1, description="Impressions each creative needs before pairing.")
    pair_confidence: float = Field(0.95, gt=0.5, lt=1.0, description="P(CTR_A > CTR_B) needed for a pair.")
    outcome_partitions: int = Field(4, ge=1, le=1024, description="Partitions of the internal per-category topic.")
    session_timeout_s: float = Field(
        10.0, gt=1, description="Kafka group session timeout; joining a group takes about half of it on Tansu."
    )
    metrics_port: int = Field(
        9108, ge=0, le=65535, description="Prometheus metrics port of worker 1 (worker i: +i-1); 0 = off."
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes started by `osmf worker`.")


class SimulatorSettings(BaseModel):
    """The simulated ad system (``osmf simulate``)."""

    world: Path | None = Field(None, description="World YAML; default: example world A.")
    rate: float = Field(500.0, gt=0, description="Impressions per second.")
    duration_s: float = Field(20.0, gt=0, description="Seconds of simulated traffic.")
    seed: int = Field(0, description="Same seed, same events.")
    creatives_per_product: int = Field(4, ge=1, le=64, description="Random prompts shown per product.")


class RenderSettings(BaseModel):
    """Which renderer turns a creative prompt into pixels, and at what size."""

    kind: Literal["template"] = Field("template", description="template (embedded default).")
    size: int = Field(256, ge=16, le=2048, description="Side of the square ad image in pixels.")


class Settings(BaseSettings):
    """All of OSMF's configuration in one object."""

    model_config = SettingsConfigDict(
        env_prefix="OSMF_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("data"), description="Pid, log, store and model files live here.")
    kafka_bootstrap: str | None = Field(
        None, description="External Kafka bootstrap servers; when set Tansu is never started."
    )
    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    streams: StreamsSettings = StreamsSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    render: RenderSettings = RenderSettings()

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @property
    def bootstrap_servers(self) -> str:
        """Where Kafka clients connect: the external cluster or the embedded broker."""
        return self.kafka_bootstrap or f"{self.broker.host}:{self.broker.port}"

    @property
    def uses_external_kafka(self) -> bool:
        """True when an external cluster is configured and Tansu must not start."""
        return self.kafka_bootstrap is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV_VAR)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_existing_file(config_file)))
        return tuple(sources)


def _existing_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{CONFIG_ENV_VAR}={path}: no such file; point it at a YAML settings file or unset it")
    return file


class ConfigError(ValueError):
    """A settings file or variable is invalid; the message names the field and the fix."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from defaults, the YAML file, the environment and ``overrides``.

    Raises :class:`ConfigError` with a one-line message naming the bad field.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source="settings")) from None


def describe_validation_error(exc: "ValidationError", source: str) -> str:  # noqa: F821
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = err.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {field}: {err['msg']}{got_text}")
    return "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, loaded once."""
    return load_settings()
