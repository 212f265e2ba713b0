"""Prometheus metrics of the stream worker (scraped from ``http://127.0.0.1:<metrics_port>/metrics``)."""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram

from infra.contracts.events import Click, EventBatch, Impression

EVENTS_IN = Counter("osmf_events_in_total", "Events read from the input topics (each event of a batch).", ["topic"])
MESSAGES_IN = Counter("osmf_messages_in_total", "Kafka messages read from the input topics (one event or a batch).",
                      ["topic"])
EVENTS_ACCEPTED = Counter("osmf_events_accepted_total", "Valid, new events accepted by stage 1.", ["kind"])
DEAD_LETTERED = Counter("osmf_dead_lettered_total", "Invalid events sent to the dead-letter topic.", ["field"])
KNOWN_FIELDS = frozenset({*Impression.model_fields, *Click.model_fields, *EventBatch.model_fields,
                          "<event>", "<message>"})
"""Values of the dead-letter metric's ``field`` label; any other field an event names counts as ``<other>``."""


def field_label(field: str) -> str:
    """The dead-letter metric's label for an error's field: its top-level event field when the contract knows it,
    else ``<other>`` (a producer's unknown keys must not create one series each).

    >>> field_label("user.age_band"), field_label("events[3].ts"), field_label("x-evil-key-123")
    ('user', 'ts', '<other>')
    """
    path = re.sub(r"^events\[\d+\]\.?", "", field) or "events"
    head = re.split(r"[.\[]", path, maxsplit=1)[0]
    return head if head in KNOWN_FIELDS else "<other>"
DUPLICATES = Counter("osmf_duplicates_total", "Events dropped as already seen (by event_id).", ["stage"])
CLICKS = Counter(
    "osmf_clicks_total", "Clicks by attribution outcome.", ["outcome"]
)  # attributed, late, orphan, repeat
REFETCHED = Counter("osmf_records_refetched_total",
                    "Records the consumer skipped (a hole in a partition's offsets) that the worker read itself.",
                    ["topic"])
HELD_CLICKS = Gauge("osmf_clicks_waiting_for_impression", "Clicks held until their impression arrives.")
COUNTED = Counter("osmf_counted_total", "Impressions and clicks counted in the CTR tables.", ["kind"])
PAIRS = Counter("osmf_preference_pairs_total", "Preference pairs emitted.")
DRIFT_ALERTS = Counter("osmf_drift_alerts_total", "CTR drift alerts emitted.")
GROUPS = Gauge("osmf_groups", "Groups per product category.", ["category"])
LAG = Gauge("osmf_consumer_lag", "Fetch high-watermark minus next offset to read.", ["topic", "partition"])
BATCHES_STARTED = Counter("osmf_batches_started_total", "Micro-batches a stage began to handle.", ["stage"])
LAST_BATCH = Gauge(
    "osmf_last_batch_timestamp_seconds",
    "Unix time a stage last finished a micro-batch (a stalled stage: this stops while its lag grows).", ["stage"],
)
STAGE_SECONDS = Histogram(
    "osmf_stage_seconds", "Time a stage spends on one batch, delivery waits included.", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DELIVERY_WAIT = Histogram(
    "osmf_delivery_wait_seconds", "Time a stage's batch waits for the broker to acknowledge what it sent.", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_SIZE = Histogram(
    "osmf_batch_size", "Events per stage-1 micro-batch.", buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000)
)

# Feature push (features/push.py through streams.app.PushMetrics)
FEATURE_ROWS_PUSHED = Counter("osmf_feature_rows_pushed_total", "Feature rows written to the online store.", ["view"])
FEATURE_PUSH_FAILURES = Counter(
    "osmf_feature_push_failures_total",
    "Feature pushes that failed after every retry (view '<open>': the store could not be opened).",
    ["view"],
)
FEATURE_PUSH_RETRIES = Counter("osmf_feature_push_retries_total", "Feature push attempts retried.", ["view"])
FEATURE_ROWS_DROPPED = Counter(
    "osmf_feature_rows_dropped_total", "Feature rows not pushed (queue_full, invalid, closing).", ["view", "reason"]
)
FEATURE_QUEUE = Gauge("osmf_feature_push_queue_rows", "Feature rows waiting to be pushed.")
FEATURE_PUSH_SECONDS = Histogram(
    "osmf_feature_push_seconds", "Time of one online write of a batch of feature rows.", ["view"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FEATURE_PUSH_DELAY = Histogram(
    "osmf_feature_push_delay_seconds", "From a row's submit by the stream to its online write (oldest row of a push).",
    ["view"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FEATURE_SUBMIT_SECONDS = Histogram(
    "osmf_feature_submit_seconds", "Stream time spent building and queueing feature rows per batch.",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
)
FEATURE_FEED_ERRORS = Counter("osmf_feature_feed_errors_total", "Batches whose feature rows could not be built.")
