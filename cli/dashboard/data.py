"""What the dashboard shows, read from the stores the system already keeps (read-only).

=================  ===================================================================
panel              source
=================  ===================================================================
CTR per group      the worker's ``ctr`` table (its changelog topic, followed), sampled at
                   every refresh; before the dashboard started: the feature store's
                   parquet history of ``group_creative_preferences`` (when features are on)
drift alerts       the drift-alerts topic
traffic share      the impressions topic (``model_version`` of each impression)
versions           ``rounds.jsonl`` (``learner.history``) and serving's version states
                   (``serving.live.versions_table``)
freshness          newest impression, feature-store update, preference pair, published
                   version (``LATEST.json``) and live switch (``serving/live.json``)
stream lag         the worker's ``/metrics`` (``osmf_consumer_lag``)
dead letters       the dead-letter topic
creatives          per group, the creatives whose impressions grew most recently in the
                   ``ctr`` table; pixels from the serving cache, else rendered with the
                   template renderer from the prompt and the world's product image
=================  ===================================================================

:class:`Collector` keeps followers on the topics and folds what they bring
into plain rows (:class:`Snapshot`); :mod:`cli.dashboard.layout` draws them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import urllib.request
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.contracts.events import EventError, Impression, decode_message
from infra.contracts.messages import parse_dead_letter, parse_drift_alert, parse_pair
from infra.kafka import ConsumedRecord, KafkaIOError, TopicFollower
from infra.settings import Settings
from streams.tables import changelog_topic

log = logging.getLogger(__name__)


MAX_SAMPLES = 200_000
"""Most CTR samples kept (oldest dropped first): about a day of 30 groups at one refresh every 5 s."""


@dataclass(frozen=True)
class CtrSample:
    """A group's cumulative impressions and clicks as counted at time ``at`` (epoch seconds)."""

    at: float
    group: str
    impressions: int
    clicks: int


@dataclass
class Served:
    """A creative a group was served recently: impressions and clicks added since the dashboard last looked."""

    group: str
    product: str
    creative_id: str
    prompt: str
    impressions: int
    clicks: int
    at: float


@dataclass
class Snapshot:
    """Everything one page refresh draws, as plain rows (see the module docstring)."""

    taken_at: float = 0.0
    ctr: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    traffic: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    freshness: list[dict[str, Any]] = field(default_factory=list)
    lag: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    dead_letter_counts: list[dict[str, Any]] = field(default_factory=list)
    creatives: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def category_of(group: str) -> str:
    """The category of a group id (``lipstick/g3`` -> ``lipstick``)."""
    return group.split("/", 1)[0]


# ------------------------------------------------------------------ pure folds (unit-tested)


def ctr_bins(samples: Iterable[CtrSample], bin_s: float) -> list[dict[str, Any]]:
    """CTR per group per time bin from cumulative samples: clicks and impressions added within each bin.

    A group's first sample counts from zero (its bin holds all it had by
    then). A counter that goes down (a worker table rebuilt from scratch) is
    skipped instead of producing a negative bin.
    """
    by_group: dict[str, list[CtrSample]] = defaultdict(list)
    for sample in samples:
        by_group[sample.group].append(sample)
    rows = []
    for group, series in sorted(by_group.items()):
        series.sort(key=lambda s: s.at)
        bins: dict[float, list[int]] = defaultdict(lambda: [0, 0])
        start = CtrSample(series[0].at, group, 0, 0)  # the first count covers everything before it
        for before, after in zip([start, *series], series):
            shown, clicked = after.impressions - before.impressions, after.clicks - before.clicks
            if shown <= 0 or clicked < 0:
                continue
            cell = bins[after.at - after.at % bin_s]
            cell[0] += shown
            cell[1] += clicked
        for start, (shown, clicked) in sorted(bins.items()):
            rows.append({"time": start, "group": group, "category": category_of(group),
                         "impressions": shown, "clicks": clicked, "ctr": clicked / shown})
    return rows


def group_totals(table: dict[str, dict[str, list[Any]]]) -> dict[str, tuple[int, int]]:
    """``ctr`` table rows (``group|product`` -> ``{creative: [impressions, clicks, prompt]}``) summed per group."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, creatives in table.items():
        group = key.split("|", 1)[0]
        for shown, clicked, *_ in (creatives or {}).values():
            totals[group][0] += int(shown)
            totals[group][1] += int(clicked)
    return {g: (v[0], v[1]) for g, v in totals.items()}


def served_changes(
    key: str, before: dict[str, list[Any]] | None, after: dict[str, list[Any]] | None, at: float
) -> list[Served]:
    """Creatives of one ``ctr`` row whose impressions grew between two values of the row."""
    group, _, product = key.partition("|")
    out = []
    for creative, (shown, clicked, *rest) in (after or {}).items():
        old = (before or {}).get(creative) or [0, 0]
        if shown > old[0]:
            prompt = rest[0] if rest and rest[0] else ""
            out.append(Served(group, product, creative, prompt, shown - old[0], max(0, clicked - old[1]), at))
    return out


def parse_lag(text: str, worker: str) -> list[dict[str, Any]]:
    """``osmf_consumer_lag{topic,partition}`` samples of one worker's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    rows = []
    for family in text_string_to_metric_families(text):
        if family.name != "osmf_consumer_lag":
            continue
        for sample in family.samples:
            rows.append({"worker": worker, "topic": sample.labels.get("topic", ""),
                         "partition": int(sample.labels.get("partition", 0)), "lag": float(sample.value)})
    return rows


def freshness_rows(stamps: Sequence[tuple[str, float | None, str]], now: float) -> list[dict[str, Any]]:
    """One row per stage (event -> feature -> pair -> model -> live): newest time, age, delay after the stage before."""
    rows, previous = [], None
    for stage, at, source in stamps:
        row = {"stage": stage, "source": source, "newest": _clock(at), "age_s": None if at is None else round(now - at, 1),
               "after_previous_s": None}
        if at is not None and previous is not None:
            row["after_previous_s"] = round(at - previous, 1)
        rows.append(row)
        previous = at if at is not None else previous
    return rows


def _clock(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


# ------------------------------------------------------------------ topic following


class LazyFollower:
    """A :class:`infra.kafka.TopicFollower` on one topic, opened once the topic exists (retried at each poll)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.follower: TopicFollower | None = None
        self.problem = ""

    def poll(self, max_batches: int = 50) -> list[ConsumedRecord]:
        """Every record that arrived since the last poll (nothing, with :attr:`problem` set, while unreadable)."""
        if self.follower is None:
            try:
                self.follower = TopicFollower(self.bootstrap, [self.topic], timeout_s=10.0)
                self.problem = ""
            except KafkaIOError as exc:
                self.problem = str(exc)
                return []
        records: list[ConsumedRecord] = []
        try:
            for _ in range(max_batches):
                batch = self.follower.poll(timeout_s=0.2)
                records.extend(batch)
                if not batch and self.follower.caught_up:
                    break
        except KafkaIOError as exc:
            self.problem = str(exc)
            self.close()
        return records

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None


# ------------------------------------------------------------------ the collector


class Collector:
    """Follows the topics, reads the files, and folds them into a :class:`Snapshot` (thread-safe).

    ``world``: a world YAML whose product images the thumbnails use;
    ``clock``: the time source of samples (tests).
    """

    def __init__(self, settings: Settings, world: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.world = world
        topics, bootstrap = settings.topics, settings.bootstrap_servers
        self.ctr_topic = changelog_topic(settings.streams.app_id, "ctr")
        self.followers = {name: LazyFollower(bootstrap, topic) for name, topic in (
            ("ctr", self.ctr_topic), ("alerts", topics.drift_alerts), ("dead", topics.dead_letter),
            ("pairs", topics.preference_pairs), ("impressions", topics.impressions))}
        self.table: dict[str, dict[str, list[Any]]] = {}
        self.samples: list[CtrSample] = []
        self._last_totals: dict[str, tuple[int, int]] = {}
        self.alerts: list[dict[str, Any]] = []
        self.dead: list[dict[str, Any]] = []
        self.dead_counts: dict[tuple[str, str], int] = defaultdict(int)
        self.traffic: dict[tuple[float, str], int] = defaultdict(int)
        self.served: dict[str, OrderedDict[tuple[str, str], Served]] = defaultdict(OrderedDict)
        self.newest: dict[str, float | None] = {"event": None, "pair": None}
        self._images: Any = None
        self._thumbs: dict[tuple[str, str], str] = {}
        self._reader: Any = None
        self._lock = threading.Lock()
        self._history_loaded = False

    # ---------------------------------------------------------------- refresh

    def refresh(self) -> None:
        """Poll every source once and fold what arrived (call from one thread; snapshots may run meanwhile)."""
        now = self.clock()
        if not self._history_loaded:
            self._history_loaded = True
            self._load_feature_history()
        ctr = self.followers["ctr"].poll()
        alerts = self.followers["alerts"].poll()
        dead = self.followers["dead"].poll()
        pairs = self.followers["pairs"].poll()
        impressions = self.followers["impressions"].poll()
        with self._lock:
            self._fold_ctr(ctr, now)
            self._fold_alerts(alerts)
            self._fold_dead(dead)
            self._fold_pairs(pairs)
            self._fold_impressions(impressions)

    def _fold_ctr(self, records: list[ConsumedRecord], now: float) -> None:
        if not records:
            return
        for record in records:
            key = json.loads(record.key) if record.key else None
            if not isinstance(key, str):
                continue
            value = json.loads(record.value) if record.value else None
            for served in served_changes(key, self.table.get(key), value, now):
                row = self.served[served.group]
                row.pop((served.product, served.creative_id), None)
                row[(served.product, served.creative_id)] = served
                while len(row) > 50:
                    row.popitem(last=False)
            if value is None:
                self.table.pop(key, None)
            else:
                self.table[key] = value
        for group, totals in group_totals(self.table).items():
            if self._last_totals.get(group) != totals:
                self._last_totals[group] = totals
                self.samples.append(CtrSample(now, group, *totals))
        del self.samples[:-MAX_SAMPLES]

    def _fold_alerts(self, records: list[ConsumedRecord]) -> None:
        for record in records:
            try:
                alert = parse_drift_alert(record.value)
            except EventError:
                continue
            self.alerts.append({"time": alert.ts / 1000, "group": alert.group_id, "category": alert.category,
                                "ctr_before": alert.ctr_before, "ctr_after": alert.ctr_after,
                                "detector": alert.detector, "observations": alert.n_observations})

    def _fold_dead(self, records: list[ConsumedRecord]) -> None:
        for record in records:
            try:
                letter = parse_dead_letter(record.value)
            except EventError as exc:
                letter_row = {"time": None, "source_topic": record.topic, "field": exc.field, "reason": str(exc)}
            else:
                letter_row = {"time": letter.ts / 1000, "source_topic": letter.source_topic, "field": letter.field,
                              "reason": letter.reason}
            self.dead_counts[(letter_row["source_topic"], letter_row["field"])] += 1
            self.dead.append(letter_row)
            del self.dead[:-20]

    def _fold_pairs(self, records: list[ConsumedRecord]) -> None:
        for record in records:
            try:
                pair = parse_pair(record.value)
            except EventError:
                continue
            self.newest["pair"] = max(self.newest["pair"] or 0.0, pair.ts / 1000)

    def _fold_impressions(self, records: list[ConsumedRecord]) -> None:
        bin_s = self.settings.dashboard.ctr_bin_s
        for record in records:
            for event in decode_message(record.value):  # one event or a batch; bad ones are the worker's to dead-letter
                if not isinstance(event, Impression):
                    continue
                ts = event.ts / 1000
                self.traffic[(ts - ts % bin_s, event.model_version)] += 1
                self.newest["event"] = max(self.newest["event"] or 0.0, ts)

    def _load_feature_history(self) -> None:
        """CTR samples from before the dashboard started: the feature store's parquet history, when present."""
        if not self.settings.features.enabled:
            return
        from features.store import history_dir

        folder = history_dir(self.settings, "group_creative_preferences")
        files = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
        if not files:
            return
        import pyarrow.parquet as pq

        samples = []
        for path in files:
            try:
                table = pq.read_table(path, columns=["group_id", "impressions", "clicks", "event_timestamp"])
            except Exception as exc:  # noqa: BLE001 - a part being written or compacted: skip it this time
                log.debug("skipping %s: %s", path, exc)
                continue
            for group, shown, clicked, stamp in zip(*(table.column(i).to_pylist() for i in range(4))):
                samples.append(CtrSample(stamp.timestamp(), group, int(shown), int(clicked)))
        with self._lock:
            self.samples[:0] = samples

    # ---------------------------------------------------------------- snapshot

    def snapshot(self) -> Snapshot:
        """The rows of every panel as of now."""
        now = self.clock()
        snap = Snapshot(taken_at=now)
        with self._lock:
            snap.ctr = ctr_bins(self.samples, self.settings.dashboard.ctr_bin_s)
            snap.alerts = list(self.alerts)
            snap.traffic = [{"time": t, "version": v, "impressions": n} for (t, v), n in sorted(self.traffic.items())]
            snap.dead_letters = list(reversed(self.dead))
            snap.dead_letter_counts = [{"source_topic": s, "field": f, "count": n}
                                       for (s, f), n in sorted(self.dead_counts.items())]
            served = {g: list(row.values()) for g, row in self.served.items()}
            newest = dict(self.newest)
        snap.creatives = self._creatives(served)
        snap.rounds, snap.versions = self._versions(snap.notes)
        snap.freshness = freshness_rows(self.freshness_stamps(snap.notes, newest), now)
        snap.lag = self._lag(snap.notes)
        for name, follower in self.followers.items():
            if follower.problem:
                snap.notes.append(f"{name}: {follower.problem}")
        return snap

    def _versions(self, notes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from learner.history import read_rounds

        repo = self.settings.learner.loop.model_repository or self.settings.data_dir / "models"
        rounds = read_rounds(repo / self.settings.learner.loop.model_name / "rounds.jsonl")
        try:
            from serving.live import versions_table

            versions = versions_table(self.settings)
        except Exception as exc:  # noqa: BLE001 - serving is optional on the page
            notes.append(f"versions: {exc}")
            versions = []
        return rounds, versions

    def totals(self) -> dict[str, Any]:
        """Cumulative counts for the dashboard's own /metrics: per group, per version, drift alerts, dead letters."""
        with self._lock:
            alerts: dict[str, int] = defaultdict(int)
            for alert in self.alerts:
                alerts[alert["group"]] += 1
            versions: dict[str, int] = defaultdict(int)
            for (_, version), count in self.traffic.items():
                versions[version] += count
            return {"groups": group_totals(self.table), "alerts": dict(alerts), "versions": dict(versions),
                    "dead_letters": dict(self.dead_counts)}

    def freshness_stamps(
        self, notes: list[str], newest: dict[str, float | None] | None = None
    ) -> list[tuple[str, float | None, str]]:
        """(stage, newest time in epoch seconds or None, source) for event -> feature -> pair -> model -> live."""
        from learner.publish import read_announcement

        if newest is None:
            with self._lock:
                newest = dict(self.newest)

        repo = self.settings.learner.loop.model_repository or self.settings.data_dir / "models"
        announcement = read_announcement(repo, self.settings.learner.loop.model_name) or {}
        live_at = None
        try:
            from serving.live import read_state

            live_at = max((e["at"] for e in read_state(self.settings).events if e.get("event") == "live"), default=None)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"live state: {exc}")
        return [
            ("event", newest["event"], "newest impression (event time)"),
            ("feature", self._feature_time(notes), "newest group-preferences row in the online store"),
            ("pair", newest["pair"], "newest preference pair"),
            ("model", announcement.get("published_at"), f"version {announcement.get('version', '-')} published"),
            ("live", live_at, "newest switch of the live version (serving)"),
        ]

    def _feature_time(self, notes: list[str]) -> float | None:
        """Newest ``group_creative_preferences`` update of the groups on the page, from the Feast online store."""
        if not self.settings.features.enabled:
            return None
        with self._lock:
            groups = sorted({key.split("|", 1)[0] for key in self.table})
        if not groups:
            return None
        try:
            from features.store import is_applied

            if not is_applied(self.settings):
                return None
            if self._reader is None:
                from features.read import FeatureReader

                self._reader = FeatureReader(self.settings)
            stamps = self._reader.read_group_rows(groups).preferences_updated_at
            valid = [s for s in stamps.tolist() if s is not None]
            return max((s.timestamp() if hasattr(s, "timestamp") else None for s in valid), default=None)
        except Exception as exc:  # noqa: BLE001 - the store is optional on the page
            notes.append(f"feature freshness: {exc}")
            return None

    def _lag(self, notes: list[str]) -> list[dict[str, Any]]:
        cfg = self.settings.streams
        if not cfg.metrics_port:
            return []
        rows = []
        for index in range(cfg.workers):
            url = f"http://127.0.0.1:{cfg.metrics_port + index}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=self.settings.dashboard.scrape_timeout_s) as response:
                    rows.extend(parse_lag(response.read().decode(), f"worker {index + 1}"))
            except OSError as exc:
                notes.append(f"stream lag: {url} did not answer ({getattr(exc, 'reason', exc)}); is `osmf worker` "
                             "running?")
        return rows

    # ---------------------------------------------------------------- thumbnails

    def _creatives(self, served: dict[str, list[Served]]) -> list[dict[str, Any]]:
        per_group = self.settings.dashboard.thumbnails_per_group
        rows = []
        for group in sorted(served):
            recent = sorted(served[group], key=lambda s: (s.at, s.impressions), reverse=True)[:per_group]
            for item in recent:
                rows.append({"group": group, "category": category_of(group), "product": item.product,
                             "creative_id": item.creative_id, "prompt": item.prompt,
                             "impressions": item.impressions, "clicks": item.clicks,
                             "src": self._thumbnail(item.product, item.prompt)})
        return rows

    def _thumbnail(self, product: str, prompt: str) -> str:
        """A data URI of the creative: the serving cache's PNG, else a template rendering ('' if the prompt is bad)."""
        key = (product, prompt)
        if key not in self._thumbs:
            png = self._cached_png(product, prompt) or self._rendered_png(product, prompt)
            self._thumbs[key] = "" if png is None else "data:image/png;base64," + base64.b64encode(png).decode()
        return self._thumbs[key]

    def _cached_png(self, product: str, prompt: str) -> bytes | None:
        root = self.settings.serving.cache_dir or self.settings.data_dir / "serving" / "cache"
        index = root / "index.jsonl"
        if not index.is_file():
            return None
        for line in reversed(index.read_text().splitlines()):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("product") != product:
                continue
            for item in entry.get("creatives", []):
                path = root / "png" / item["sha256"][:2] / f"{item['sha256']}.png"
                if item.get("prompt") == prompt and path.is_file():
                    return _small_png(path.read_bytes())
        return None

    def _rendered_png(self, product: str, prompt: str) -> bytes | None:
        from PIL import Image

        from infra.contracts.prompt import PromptError, parse_prompt
        from serving.render.template import TemplateRenderer

        try:
            parsed = parse_prompt(prompt)
        except PromptError:
            return None
        image = self._product_images().get(product) or Image.new("RGBA", (64, 64), (150, 150, 150, 255))
        buffer = io.BytesIO()
        TemplateRenderer(size=128).render(parsed, image).save(buffer, format="PNG")
        return buffer.getvalue()

    def _product_images(self) -> dict[str, Any]:
        if self._images is None:
            self._images = {}
            try:
                from sim.simulate import world_path
                from sim.world import World

                world = World.load(world_path(self.settings, self.world))
                self._images = {p.id: p.image for p in world.all_products()}
            except Exception as exc:  # noqa: BLE001 - thumbnails fall back to a grey product
                log.info("no product images for thumbnails: %s", exc)
        return self._images

    def close(self) -> None:
        for follower in self.followers.values():
            follower.close()
        if self._reader is not None:
            self._reader.close()


def _small_png(png: bytes, size: int = 128) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()
