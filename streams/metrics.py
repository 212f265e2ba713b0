"""Prometheus metrics of the stream worker (scraped from ``http://127.0.0.1:<metrics_port>/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("osmf_events_in_total", "Events read from the input topics.", ["topic"])
EVENTS_ACCEPTED = Counter("osmf_events_accepted_total", "Valid, new events accepted by stage 1.", ["kind"])
DEAD_LETTERED = Counter("osmf_dead_lettered_total", "Invalid events sent to the dead-letter topic.", ["field"])
DUPLICATES = Counter("osmf_duplicates_total", "Events dropped as already seen (by event_id).", ["stage"])
CLICKS = Counter(
    "osmf_clicks_total", "Clicks by attribution outcome.", ["outcome"]
)  # attributed, late, orphan, repeat
HELD_CLICKS = Gauge("osmf_clicks_waiting_for_impression", "Clicks held until their impression arrives.")
COUNTED = Counter("osmf_counted_total", "Impressions and clicks counted in the CTR tables.", ["kind"])
PAIRS = Counter("osmf_preference_pairs_total", "Preference pairs emitted.")
DRIFT_ALERTS = Counter("osmf_drift_alerts_total", "CTR drift alerts emitted.")
GROUPS = Gauge("osmf_groups", "Groups per product category.", ["category"])
LAG = Gauge("osmf_consumer_lag", "Fetch high-watermark minus next offset to read.", ["topic", "partition"])
BATCH_SIZE = Histogram(
    "osmf_batch_size", "Events per stage-1 micro-batch.", buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000)
)
