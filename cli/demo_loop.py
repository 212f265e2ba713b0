"""``osmf demo``: the whole embedded system on one machine, the loop closed on creatives the model itself served.

The parts run in :class:`sim.closed_loop.ClosedLoop`; this module shows its
progress (a live display on a terminal, a status line every 30 s in a log)
and prints the summary: CTR per group per served model version, the worst
group, the learner's rounds and the click → live time of each promoted version.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from infra.settings import Settings
from sim.closed_loop import ClosedLoop, LoopStatus, OutcomeBook, click_to_live, round_log
from sim.world import World


def run_loop_demo(settings: Settings, world: World, world_file: Path, minutes: float, rate: float, seed: int) -> int:
    """The closed loop for ``minutes`` of traffic; returns 0 when a Group-DPO version was promoted and served."""
    console = Console()
    loop = ClosedLoop(settings, world, world_file, echo=console.print)
    try:
        loop.start(seed)
        traffic = loop.play(minutes, rate, seed)
        console.print(f"[5/6] the simulated ad system pulls every creative from serving: {minutes:g} min at "
                      f"{rate:g} impressions/s (Ctrl-C stops everything)")
        if console.is_terminal:
            with Live(console=console, refresh_per_second=1) as live:
                while traffic.is_alive():
                    live.update(Group(status_line(loop.status()), ctr_table(loop.book, "CTR per group and version")))
                    traffic.join(timeout=1.0)
        else:  # a log file: one status line every 30 s
            while traffic.is_alive():
                traffic.join(timeout=30.0)
                console.print(status_line(loop.status()))
        console.print(f"[5/6] sent {loop.sent:,} events")
        return _summary(console, settings, loop)
    except KeyboardInterrupt:
        console.print("interrupted: stopping everything the demo started")
        return 130
    finally:
        for what in loop.stop():
            console.print(f"stopped {what}")


def status_line(s: LoopStatus) -> str:
    """Elapsed time, impressions and rate, groups, pairs, rounds, live version and fallbacks in one line."""
    return (f"elapsed {s.elapsed_s:.0f} s | impressions {s.impressions:,} ({s.impressions / max(s.elapsed_s, 1):.0f}/s)"
            f" | groups {s.groups} | pairs {s.pairs} | rounds {s.rounds} ({s.promoted} promoted) | "
            f"live version {s.live_version} | fallbacks {s.fallbacks:,}")


def ctr_table(book: OutcomeBook, title: str) -> Table:
    """CTR per group (rows) and served model version (columns), with impressions."""
    table = Table(title=title)
    table.add_column("group")
    versions = book.versions()
    for version in versions:
        table.add_column(f"v{version}" if version.isdigit() else f"({version})", justify="right")
    for group in [*book.groups(), "-"]:
        cells = [book.cells.get((v, group)) for v in versions]
        if not any(cells):
            continue
        table.add_row(group if group != "-" else "(fallback)",
                      *(f"{c[1] / c[0]:.2%} of {c[0]:,}" if c and c[0] else "" for c in cells))
    return table


def _summary(console: Console, settings: Settings, loop: ClosedLoop) -> int:
    from serving.live import read_state

    book = loop.book
    console.print(ctr_table(book, "[6/6] CTR per group, per served model version (before → after)"))
    worst: dict[str, tuple[str, float]] = {}
    for (version, group), (n, clicks) in book.cells.items():
        if group != "-" and n >= 200 and (version not in worst or clicks / n < worst[version][1]):
            worst[version] = (group, clicks / n)
    for version, (group, rate) in sorted(worst.items()):
        console.print(f"worst group under v{version} (groups with ≥ 200 impressions): {group} {rate:.2%}")
    rounds = Table(title="learner rounds")
    for column in ("round", "pairs", "decision", "version"):
        rounds.add_column(column)
    for r in round_log(loop.repo, loop.model_name):
        rounds.add_row(str(r.get("round")), str(sum((r.get("pairs_per_group") or {}).values())),
                       str(r.get("decision")), str(r.get("version") or ""))
    console.print(rounds)
    delays = click_to_live(settings, loop.repo, loop.model_name)
    if delays:
        console.print("click → new version live: " + ", ".join(f"{d:.0f} s" for d in delays))
    served_new = any(v.isdigit() and int(v) > 1 and n for (v, _g), (n, _c) in book.cells.items())
    state = read_state(settings)
    routed = "".join(f", {group} on v{version}" for group, version in sorted(state.groups.items()))
    console.print(f"live version at the end: {state.live}{routed}; a Group-DPO version served: "
                  f"{'yes' if served_new else 'no'}")
    console.print(f"dashboard: `osmf dashboard` (http://{settings.dashboard.host}:{settings.dashboard.port})")
    return 0 if served_new else 1
