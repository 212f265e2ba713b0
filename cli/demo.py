"""The embedded demo: broker, stream worker, simulated ad traffic, CTR tables per category and group."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from infra.contracts.events import BadEvent, Click, Impression, decode_message
from infra import _proc
from infra.settings import Settings
from sim.simulate import counted, simulated_events, time_ordered, world_path  # noqa: F401 - re-used by the demo
from sim.world import World


@dataclass
class CategoryCounts:
    """Impressions and clicks of one category."""

    impressions: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        """Clicks per impression (0 when nothing was shown)."""
        return self.clicks / self.impressions if self.impressions else 0.0


def ctr_by_category(values: Iterable[bytes], only_ids: set[str] | None = None) -> dict[str, CategoryCounts]:
    """Per-category impressions, clicks and CTR of wire events (clicks joined to impressions by id).

    ``only_ids`` restricts the count to impressions with those ids (and their clicks).
    """
    categories: dict[str, CategoryCounts] = defaultdict(CategoryCounts)
    category_of: dict[str, str] = {}
    clicks: list[Click] = []
    events = (event for value in values for event in decode_message(value) if not isinstance(event, BadEvent))
    for event in events:
        if isinstance(event, Impression):
            if only_ids is None or event.event_id in only_ids:
                category_of[event.event_id] = event.category
                categories[event.category].impressions += 1
        else:
            clicks.append(event)
    for click in clicks:
        category = category_of.get(click.impression_id)
        if category is not None:
            categories[category].clicks += 1
    return dict(sorted(categories.items()))


def run_demo(
    settings: Settings, world: World, world_name: str, duration: float, rate: float | None, *, with_worker: bool
) -> int:
    """Broker, (worker,) ``duration`` s of simulated traffic, the events read back, CTR tables. Returns an exit code."""
    from infra.broker import start_broker
    from infra.kafka import consume_all, ensure_topics
    from infra.producer import produce
    from sim.replay import paced

    console = Console()
    status = start_broker(settings)
    console.print(f"[1/4] broker ready at {status.bootstrap}" + ("" if status.external else f" (Tansu pid {status.pid})"))
    bootstrap = status.bootstrap
    ensure_topics(bootstrap, settings.topics.all_names(), settings.topics.partitions)
    app_id = f"osmf-demo-{int(time.time())}"
    worker = _start_worker(settings, app_id) if with_worker else None
    if worker is not None:
        console.print(f"[2/4] stream worker started (consumer group {app_id}, metrics on "
                      f"127.0.0.1:{settings.streams.metrics_port}/metrics)")
    try:
        rate = rate or settings.simulator.rate
        events = simulated_events(world, settings, seed=settings.simulator.seed, rate=rate, duration_s=duration,
                                  start_ts_ms=None)
        produced: set[str] = set()

        def remember(event: Impression | Click) -> Impression | Click:
            if isinstance(event, Impression):
                produced.add(event.event_id)
            return event

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"[3/4] simulating {world_name} for {duration:g} s", total=round(duration * rate))
            live = (remember(e) for e in paced(time_ordered(events), speedup=1.0))
            sent = produce(
                bootstrap, counted(live, lambda: progress.update(task, completed=len(produced))), settings.topics,
                settings.producer,
            )
        console.print(f"[3/4] sent {sent} events ({len(produced)} impressions) from world {world_name}")
        records = consume_all(bootstrap, [settings.topics.impressions, settings.topics.clicks])
        counts = ctr_by_category((r.value for r in records), only_ids=produced)
        seen = sum(c.impressions for c in counts.values())
        console.print(f"[4/4] read back {seen} of {len(produced)} impressions of this run from Kafka")
        console.print(_category_table(counts))
        if seen != len(produced):
            console.print(f"[red]error: {len(produced) - seen} impressions were lost between producer and consumer")
            return 1
        if worker is not None:
            all_impressions = sum(  # events, not messages: a message may carry a batch
                isinstance(event, Impression) for r in records for event in decode_message(r.value)
            )
            if not _wait_counted(settings, worker, all_impressions, console):
                return 1
            console.print(_group_table(_settled_ctr_rows(bootstrap, app_id, all_impressions)))
    finally:
        if worker is not None:
            _stop_worker(worker)
    if not status.external:
        console.print("the broker keeps running; stop it with `osmf broker stop`")
    return 0


def _category_table(counts: dict[str, CategoryCounts]) -> Table:
    table = Table(title="impressions, clicks and CTR per category (read back from Kafka)")
    for column in ("category", "impressions", "clicks", "CTR"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, c in counts.items():
        table.add_row(category, str(c.impressions), str(c.clicks), f"{c.ctr:.2%}")
    impressions = sum(c.impressions for c in counts.values())
    clicks = sum(c.clicks for c in counts.values())
    table.add_row("all", str(impressions), str(clicks), f"{clicks / impressions if impressions else 0:.2%}", style="bold")
    return table


def _settled_ctr_rows(bootstrap: str, app_id: str, impressions: int, timeout_s: float = 120.0) -> dict:
    """The worker's ``ctr`` table once its changelog holds every counted impression (it is flushed in batches)."""
    from streams.tables import read_table

    deadline = time.monotonic() + timeout_s
    while True:
        rows = read_table(bootstrap, app_id, "ctr")
        total = sum(v[0] for creatives in rows.values() for v in creatives.values())
        if total >= impressions or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _group_table(ctr_rows: dict) -> Table:
    """Per-group CTR from the worker's ``ctr`` table, with the best creative's CTR in each group."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    best: dict[str, float] = defaultdict(float)
    for key, creatives in ctr_rows.items():
        group = key.split("|", 1)[0]
        for impressions, clicks, _prompt in creatives.values():
            groups[group][0] += impressions
            groups[group][1] += clicks
            if impressions >= 50:
                best[group] = max(best[group], clicks / impressions)
    table = Table(title="per group, as the stream worker counted (groups are learned online per category)")
    for column in ("group", "impressions", "clicks", "CTR", "best creative CTR (≥50 impressions)"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for group, (impressions, clicks) in sorted(groups.items()):
        table.add_row(group, str(impressions), str(clicks), f"{clicks / impressions if impressions else 0:.2%}",
                      f"{best[group]:.2%}" if group in best else "-")
    return table


def _start_worker(settings: Settings, app_id: str) -> subprocess.Popen:
    log = open(settings.data_dir / "demo-worker.log", "ab") if settings.data_dir.is_dir() else subprocess.DEVNULL
    env = {**os.environ, "OSMF_STREAMS__APP_ID": app_id, "OSMF_KAFKA_BOOTSTRAP": settings.bootstrap_servers}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker", "-n", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_counted(settings: Settings, worker: subprocess.Popen, impressions: int, console: Console) -> bool:
    port = settings.streams.metrics_port
    deadline = time.monotonic() + 120
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("worker counting", total=impressions)
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                console.print(f"[red]error: the stream worker exited ({worker.returncode}); see "
                              f"{settings.data_dir / 'demo-worker.log'}")
                return False
            done = _counted_impressions(port)
            progress.update(task, completed=done)
            if done >= impressions:
                return True
            time.sleep(0.25)
    console.print("[red]error: the stream worker did not count every impression within 120 s")
    return False


def _counted_impressions(port: int) -> int:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    found = re.search(r'^osmf_counted_total\{kind="impression"\} ([0-9.e+]+)$', text, flags=re.M)
    return int(float(found.group(1))) if found else 0


def _stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        _proc.terminate(worker.pid, grace_s=20.0)
    worker.wait()
