"""What every ``osmf`` command shares: one-line errors, the settings, a world file from an option.

Heavy libraries are imported inside functions so ``osmf --help`` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("infra.settings", "ConfigError"),
    ("infra.broker", "BrokerError"),
    ("infra.kafka", "KafkaError"),
    ("infra.contracts.prompt", "PromptError"),
    ("infra.contracts.events", "EventError"),
    ("features.read", "FeatureReadError"),
    ("features.schema", "FeatureRowError"),
    ("features.store", "FeatureStoreError"),
    ("streams.worker", "WorkerStartError"),
    ("learner.data", "TrafficError"),
    ("learner.model.artifact", "ArtifactError"),
    ("sim.schema", "WorldError"),
    ("sim.replay", "ReplayError"),
    ("learner.service", "LearnerServiceError"),
    ("serving.server", "ServingError"),
    ("learner.export", "ExportError"),
)
"""(module, exception) whose message is already a one-line explanation with a fix."""


def user_errors(modules: tuple[tuple[str, str], ...] = USER_ERRORS) -> tuple[type[BaseException], ...]:
    """The exception classes of ``modules`` that are loaded.

    Each class is defined in its module, so one whose module was never imported cannot have been raised;
    importing it here would load the learner's libraries (torch, transformers: ~2 s) on every exit of a
    command that never used them, ``osmf worker`` stopped by SIGTERM included.
    """
    errors: list[type[BaseException]] = []
    for module, name in modules:
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def friendly_errors(func: F) -> F:
    """Print known errors as one line on stderr and exit with status 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def load_settings():  # noqa: ANN201 - the Settings type is imported lazily
    """The one settings object (defaults, ``--config``/``OSMF_CONFIG`` file, ``OSMF_*`` variables)."""
    from infra.settings import load_settings as load

    return load()


def load_world(path: Path):  # noqa: ANN201 - the World type is imported lazily
    """The world in ``path``; a missing file is a one-line error naming ``--world``."""
    from sim.world import World

    if not path.is_file():
        typer.echo(f"error: --world {path}: no such file; give a world YAML (see docs/world.md)", err=True)
        raise typer.Exit(2)
    return World.load(path)


def ready_bootstrap(settings: Any) -> str:
    """The bootstrap address of a broker that answers, with the product's topics created; else a one-line error."""
    from infra.kafka import ensure_topics, kafka_reachable

    bootstrap = settings.bootstrap_servers
    if not kafka_reachable(bootstrap):
        fix = "check OSMF_KAFKA_BOOTSTRAP, or unset it and start the embedded one with `osmf broker start`" \
            if settings.uses_external_kafka else "start it with `osmf broker start` or set OSMF_KAFKA_BOOTSTRAP to your cluster"
        typer.echo(f"error: no Kafka broker answers at {bootstrap}; {fix}", err=True)
        raise typer.Exit(2)
    ensure_topics(bootstrap, settings.topics.all_names(), settings.topics.partitions)
    return bootstrap
