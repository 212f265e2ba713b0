"""Prometheus metrics of the learner service, served on ``http://127.0.0.1:<port>/metrics``.

Everything about rounds is read from the files the learner already writes,
at scrape time (so nothing in the round code has to update a counter): the
round log ``rounds.jsonl`` and ``LATEST.json``. The service's live counters
(pairs read, duplicates, unknown products, buffer size) come from a
``state`` callable, e.g. :func:`loop_state` of its :class:`learner.loop.LearnerLoop`.

===========================================  ===========================================
metric                                       meaning
===========================================  ===========================================
``osmf_learner_rounds_total{decision}``      rounds logged, ``promoted`` or ``refused``
``osmf_learner_last_round_timestamp_seconds`` when the newest round finished
``osmf_learner_last_round_seconds``          how long it took
``osmf_learner_last_round_pairs{split}``     its ``train`` and ``heldout`` pairs
``osmf_learner_gate_overall{figure}``        its gate figure, ``candidate`` and ``incumbent``
``osmf_learner_pair_to_model_seconds``       newest pair it trained on -> round finished
``osmf_learner_published_version``           version in ``LATEST.json``
``osmf_learner_published_timestamp_seconds`` when it was published
``osmf_learner_<name>`` (from ``state``)     e.g. ``pairs_offered_total``, ``buffer_pairs``
===========================================  ===========================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from infra.security import http_token, serve_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from learner.history import read_rounds
from learner.publish import read_announcement

log = logging.getLogger(__name__)

State = Callable[[], Mapping[str, float]]


class LearnerCollector(Collector):
    """Reads the round log and the announcement at every scrape (see the module docstring)."""

    def __init__(self, history: Path, repository: Path, model: str, state: State | None = None) -> None:
        self.history, self.repository, self.model, self.state = history, repository, model, state

    def collect(self) -> Iterator[Metric]:
        rounds = read_rounds(self.history)
        decisions = CounterMetricFamily("osmf_learner_rounds", "Learner rounds logged, by gate decision.",
                                        labels=["decision"])
        promoted = sum(1 for r in rounds if r.get("decision") == "promoted")
        decisions.add_metric(["promoted"], promoted)
        decisions.add_metric(["refused"], len(rounds) - promoted)
        yield decisions
        if rounds:
            yield from _last_round(rounds[-1])
        announcement = read_announcement(self.repository, self.model) or {}
        if "version" in announcement:
            yield GaugeMetricFamily("osmf_learner_published_version", "Newest published model version.",
                                    value=float(announcement["version"]))
        if announcement.get("published_at"):
            yield GaugeMetricFamily("osmf_learner_published_timestamp_seconds", "When it was published (epoch s).",
                                    value=float(announcement["published_at"]))
        for name, value in (self.state() if self.state else {}).items():
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            family_name = f"osmf_learner_{name.removesuffix('_total')}" if kind is CounterMetricFamily \
                else f"osmf_learner_{name}"
            yield kind(family_name, f"Learner service: {name.replace('_', ' ')}.", value=float(value))


def _last_round(entry: Mapping[str, Any]) -> Iterator[Metric]:
    finished = float(entry.get("finished_at") or 0.0)
    yield GaugeMetricFamily("osmf_learner_last_round_timestamp_seconds", "When the newest round finished (epoch s).",
                            value=finished)
    if entry.get("started_at"):
        yield GaugeMetricFamily("osmf_learner_last_round_seconds", "Duration of the newest round.",
                                value=max(0.0, finished - float(entry["started_at"])))
    pairs = GaugeMetricFamily("osmf_learner_last_round_pairs", "Pairs of the newest round.", labels=["split"])
    pairs.add_metric(["train"], float(sum((entry.get("pairs_per_group") or {}).values())))
    pairs.add_metric(["heldout"], float(entry.get("heldout_pairs") or 0))
    yield pairs
    gate = entry.get("gate") or {}
    overall = GaugeMetricFamily("osmf_learner_gate_overall", "Gate figure of the newest round.", labels=["figure"])
    for figure in ("candidate", "incumbent"):
        value = gate.get(f"overall_{figure}")
        if value is not None:
            overall.add_metric([figure], float(value))
    yield overall
    window = entry.get("data_window") or (0, 0)
    if window[1]:
        yield GaugeMetricFamily("osmf_learner_pair_to_model_seconds",
                                "Newest pair the newest round trained on -> that round finished.",
                                value=max(0.0, finished - float(window[1]) / 1000))


def loop_state(loop: Any) -> dict[str, float]:
    """The live counters of a :class:`learner.loop.LearnerLoop` (duck-typed: ``counts``, ``buffer``, ``version``)."""
    counts = loop.counts
    return {
        "pairs_offered_total": counts.offered, "pairs_new_total": counts.new,
        "pairs_duplicate_total": counts.duplicates, "pairs_unknown_product_total": counts.unknown_product,
        "pairs_unknown_group": counts.unknown_group, "buffer_pairs": len(loop.buffer),
        "buffer_new_pairs": loop.buffer.new_pairs, "incumbent_version": loop.version,
        "routed_groups": len(getattr(getattr(loop, "routing", None), "groups", {}) or {}),
    }


def start_learner_metrics(
    port: int, history: Path, repository: Path, model: str, state: State | None = None, host: str = "127.0.0.1"
) -> CollectorRegistry | None:
    """Serve the learner's metrics on ``http://host:port/metrics``; None when ``port`` is 0 or cannot be bound.

    A busy port is logged and skipped (metrics must never stop the learner).
    """
    if not port:
        return None
    registry = CollectorRegistry()
    registry.register(LearnerCollector(history, repository, model, state))
    try:
        serve_metrics(port, host, registry, token=http_token())
    except OSError as exc:
        log.warning("learner metrics: cannot listen on %s:%s (%s); set learner.metrics_port "
                    "(OSMF_LEARNER__METRICS_PORT) to a free port or 0", host, port, exc)
        return None
    return registry
