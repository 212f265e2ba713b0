"""The dashboard page: Plotly figures and Dash components built from a :class:`cli.dashboard.data.Snapshot`.

Every function here is pure (snapshot rows in, figure or component out), so
the page can be checked without a browser. Element ids (the browser test reads
them): ``ctr-graph``, ``versions-graph``, ``versions-table``,
``freshness-table``, ``lag-graph``, ``dead-letter-table``, ``creatives``, ``notes``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import plotly.graph_objects as go
from dash import dcc, html
from plotly.subplots import make_subplots

from cli.dashboard.data import Snapshot

PANEL = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "8px 12px", "margin": "8px 0",
         "background": "#fff"}
PROMOTED, REFUSED = "#2ca02c", "#d62728"


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds)


def _empty(figure: go.Figure, message: str) -> go.Figure:
    figure.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                          font={"size": 14, "color": "#888"})
    return figure


def ctr_figure(snapshot: Snapshot) -> go.Figure:
    """CTR per group over time, one row per category, drift alerts marked with an X at their group's CTR after."""
    categories = sorted({r["category"] for r in snapshot.ctr} | {a["category"] for a in snapshot.alerts})
    if not categories:
        return _empty(go.Figure(layout={"height": 300}), "no CTR yet: is `osmf worker` running and traffic flowing?")
    figure = make_subplots(rows=len(categories), cols=1, shared_xaxes=True, subplot_titles=categories,
                           vertical_spacing=min(0.12, 0.3 / len(categories)))
    for row, category in enumerate(categories, start=1):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for point in snapshot.ctr:
            if point["category"] == category:
                groups[point["group"]].append(point)
        for group, points in sorted(groups.items()):
            figure.add_trace(go.Scatter(
                x=[_time(p["time"]) for p in points], y=[p["ctr"] for p in points], mode="lines+markers",
                name=group, legendgroup=category,
                customdata=[[p["impressions"], p["clicks"]] for p in points],
                hovertemplate=f"{group}<br>%{{x}}<br>CTR %{{y:.2%}}<br>%{{customdata[0]}} impressions, "
                              "%{customdata[1]} clicks<extra></extra>",
            ), row=row, col=1)
        alerts = [a for a in snapshot.alerts if a["category"] == category]
        if alerts:
            figure.add_trace(go.Scatter(
                x=[_time(a["time"]) for a in alerts], y=[a["ctr_after"] for a in alerts], mode="markers",
                name=f"drift alert ({category})", legendgroup=category,
                marker={"symbol": "x", "size": 12, "color": REFUSED, "line": {"width": 1}},
                text=[f"{a['group']}: CTR {a['ctr_before']:.2%} -> {a['ctr_after']:.2%} ({a['detector']}, "
                      f"{a['observations']} obs.)" for a in alerts],
                hovertemplate="drift alert<br>%{text}<extra></extra>",
            ), row=row, col=1)
        figure.update_yaxes(tickformat=".1%", title_text="CTR", row=row, col=1)
    figure.update_layout(height=max(300, 240 * len(categories)), margin={"t": 40, "b": 30, "l": 60, "r": 20},
                         legend={"orientation": "v"})
    return figure


def versions_figure(snapshot: Snapshot) -> go.Figure:
    """Top: traffic share of each model version over time. Bottom: each round's gate figure, promoted or refused."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.08,
                           subplot_titles=("traffic share by model version", "rounds: gate figure (candidate)"))
    if not snapshot.traffic and not snapshot.rounds:
        return _empty(figure.update_layout(height=380), "no impressions or rounds yet")
    totals: dict[float, int] = defaultdict(int)
    for row in snapshot.traffic:
        totals[row["time"]] += row["impressions"]
    by_version: dict[str, dict[float, int]] = defaultdict(dict)
    for row in snapshot.traffic:
        by_version[row["version"]][row["time"]] = row["impressions"]
    times = sorted(totals)
    for version, counts in sorted(by_version.items()):
        figure.add_trace(go.Scatter(
            x=[_time(t) for t in times], y=[counts.get(t, 0) / totals[t] for t in times], name=f"version {version}",
            stackgroup="share", mode="lines", hovertemplate=f"version {version}: %{{y:.0%}}<extra></extra>",
        ), row=1, col=1)
    for promoted in (True, False):
        rounds = [r for r in snapshot.rounds if (r.get("decision") == "promoted") is promoted]
        if not rounds:
            continue
        figure.add_trace(go.Scatter(
            x=[_time(float(r.get("finished_at", 0))) for r in rounds],
            y=[_overall(r)[0] for r in rounds], mode="markers+text",
            text=[f"v{r.get('version')}" if promoted else f"r{r.get('round')}" for r in rounds],
            textposition="top center", name="promoted" if promoted else "refused (kept incumbent)",
            marker={"symbol": "circle" if promoted else "x", "size": 11, "color": PROMOTED if promoted else REFUSED},
            customdata=[[r.get("round"), _overall(r)[1], r.get("decision", "")] for r in rounds],
            hovertemplate="round %{customdata[0]}: %{customdata[2]}<br>candidate %{y:.4f}, incumbent "
                          "%{customdata[1]:.4f}<extra></extra>",
        ), row=2, col=1)
    figure.update_yaxes(tickformat=".0%", range=[0, 1], row=1, col=1)
    figure.update_layout(height=420, margin={"t": 40, "b": 30, "l": 60, "r": 20})
    return figure


def _overall(entry: dict[str, Any]) -> tuple[float | None, float | None]:
    gate = entry.get("gate") or {}
    return gate.get("overall_candidate"), gate.get("overall_incumbent")


def lag_figure(snapshot: Snapshot) -> go.Figure:
    """Consumer lag per worker, topic and partition (messages behind the high-watermark)."""
    if not snapshot.lag:
        return _empty(go.Figure(layout={"height": 260}), "no lag figures: the worker's /metrics did not answer")
    labels = [f"{r['worker']} {r['topic']}[{r['partition']}]" for r in snapshot.lag]
    values = [r["lag"] for r in snapshot.lag]
    figure = go.Figure(go.Bar(x=labels, y=values, name="consumer lag", text=[f"{v:g}" for v in values],
                              textposition="outside", hovertemplate="%{x}: %{y} messages behind<extra></extra>"))
    figure.update_layout(height=260, margin={"t": 20, "b": 80, "l": 60, "r": 20}, yaxis_title="messages behind")
    return figure


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], element_id: str, empty: str) -> html.Div:
    """A plain HTML table of ``rows`` (``columns`` in order), or a note when there are none."""
    if not rows:
        return html.Div(html.Em(empty), id=element_id)
    head = html.Tr([html.Th(c, style={"textAlign": "left", "padding": "2px 8px"}) for c in columns])
    body = [html.Tr([html.Td(_cell(r.get(c)), style={"padding": "2px 8px"}) for c in columns]) for r in rows]
    return html.Div(html.Table([html.Thead(head), html.Tbody(body)], style={"borderCollapse": "collapse",
                                                                            "fontSize": "13px"}), id=element_id)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def version_rows(snapshot: Snapshot) -> list[dict[str, Any]]:
    """One row per round (newest first) with its gate figures and what serving made of its version."""
    states = {v["version"]: v for v in snapshot.versions}
    rows = []
    for entry in sorted(snapshot.rounds, key=lambda r: r.get("round", 0), reverse=True):
        version = entry.get("version") if entry.get("decision") == "promoted" else None
        state = states.get(version, {})
        candidate, incumbent = _overall(entry)
        rows.append({
            "round": entry.get("round"), "finished": time.strftime("%H:%M:%S", time.localtime(entry.get("finished_at", 0))),
            "decision": "promoted" if version else "refused", "version": version,
            "trained from": entry.get("reference_version"),
            "train pairs": sum((entry.get("pairs_per_group") or {}).values()),
            "held-out": entry.get("heldout_pairs"), "gate candidate": candidate, "gate incumbent": incumbent,
            "serving": state.get("state", "-") + (f" ({state['reason']})" if state.get("reason") else ""),
            "reason": (entry.get("gate") or {}).get("reason", entry.get("decision", "")),
        })
    return rows


def creatives_panel(snapshot: Snapshot) -> html.Div:
    """Thumbnails of the creatives each group was served most recently, grouped by group."""
    if not snapshot.creatives:
        return html.Div(html.Em("no creatives served yet"), id="creatives")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in snapshot.creatives:
        groups[row["group"]].append(row)
    cards = []
    for group, rows in sorted(groups.items()):
        images = [html.Figure([
            html.Img(src=r["src"], alt=r["prompt"], title=r["prompt"], className="creative-thumb",
                     style={"width": "110px", "height": "110px", "objectFit": "cover", "border": "1px solid #ccc"})
            if r["src"] else html.Div("(prompt does not parse)", style={"width": "110px"}),
            html.Figcaption(f"{r['product']}: +{r['impressions']} shown, +{r['clicks']} clicks",
                            style={"fontSize": "11px", "maxWidth": "110px"}),
        ], style={"margin": "4px", "display": "inline-block", "verticalAlign": "top"}) for r in rows]
        cards.append(html.Div([html.Strong(group), html.Div(images)],
                              style={"display": "inline-block", "margin": "6px 12px", "verticalAlign": "top"}))
    return html.Div(cards, id="creatives")


def notes_panel(snapshot: Snapshot) -> html.Div:
    """What could not be read this refresh, and why."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at)) if snapshot.taken_at else "-"
    lines = [html.Li(n) for n in snapshot.notes]
    return html.Div([html.Span(f"updated {stamp}"), html.Ul(lines, style={"color": "#a60", "fontSize": "12px"})],
                    id="notes")


def page(refresh_s: float, title: str) -> html.Div:
    """The static page skeleton; :func:`panels` fills it at every refresh."""
    def section(heading: str, *children: Any) -> html.Section:
        return html.Section([html.H3(heading, style={"margin": "4px 0"}), *children], style=PANEL)

    return html.Div([
        html.H2(title, style={"margin": "8px 0"}),
        html.Div(id="notes-box"),
        section("CTR per group over time (X: drift alert)", dcc.Graph(id="ctr-graph")),
        section("Model versions: traffic share, gate, promoted / refused",
                dcc.Graph(id="versions-graph"), html.Div(id="versions-box")),
        section("Freshness: event -> feature -> pair -> model -> live", html.Div(id="freshness-box")),
        section("Stream lag and dead letters", dcc.Graph(id="lag-graph"), html.Div(id="dead-letter-box")),
        section("Creatives each group is served now", html.Div(id="creatives-box")),
        dcc.Interval(id="tick", interval=int(refresh_s * 1000), n_intervals=0),
    ], style={"fontFamily": "sans-serif", "background": "#f6f6f6", "padding": "8px 16px"})


def panels(snapshot: Snapshot) -> tuple[Any, ...]:
    """The outputs of the refresh callback, in the order :func:`cli.dashboard.server.build_app` declares them."""
    dead = table(snapshot.dead_letter_counts, ["source_topic", "field", "count"], "dead-letter-table",
                 "no dead letters")
    latest = table([{**r, "time": _clock(r.get("time"))} for r in snapshot.dead_letters[:10]],
                   ["time", "source_topic", "field", "reason"], "dead-letter-latest", "")
    return (
        notes_panel(snapshot),
        ctr_figure(snapshot),
        versions_figure(snapshot),
        table(version_rows(snapshot), ["round", "finished", "decision", "version", "trained from", "train pairs",
                                       "held-out", "gate candidate", "gate incumbent", "serving", "reason"],
              "versions-table", "no learner rounds logged yet (rounds.jsonl)"),
        table(snapshot.freshness, ["stage", "newest", "age_s", "after_previous_s", "source"], "freshness-table",
              "nothing measured yet"),
        lag_figure(snapshot),
        html.Div([html.H4("dead letters by topic and field", style={"margin": "4px 0"}), dead,
                  html.H4("latest", style={"margin": "4px 0"}) if snapshot.dead_letters else None, latest]),
        creatives_panel(snapshot),
    )


def _clock(at: float | None) -> str:
    return "-" if at is None else time.strftime("%H:%M:%S", time.localtime(at))
