"""`osmf dashboard` in headless Chromium against a short running loop: the charts hold data; a screenshot is kept.

The loop: the session's Tansu broker, a real `osmf worker`, a few seconds of
simulated traffic of example world A (two model versions serving), and a round
log with a promoted and a refused round. Chromium is Debian's package
(``tests/setup-system.sh`` installs it; ``make test`` runs that first). The
screenshot goes to ``data/test-output/dashboard.png``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from browser.cdp import Chromium, chromium_binary
from helpers.worker_harness import REPO, free_port, isolated_run
from learner.history import RoundRecord, append_round

SCREENSHOT = REPO / "data" / "test-output" / "dashboard.png"

PAGE_STATE = """(() => { try {
  const graph = id => {
    const plot = document.querySelector('#' + id + ' .js-plotly-plot');
    return plot && plot.data ? plot.data.map(t => ({name: t.name || '', n: (t.x || []).length})) : null;
  };
  const thumbs = [...document.querySelectorAll('img.creative-thumb')];
  return {
    ctr: graph('ctr-graph'), versions: graph('versions-graph'), lag: graph('lag-graph'),
    thumbs: thumbs.filter(i => i.complete && i.naturalWidth > 0).length,
    rounds: document.querySelectorAll('#versions-table tbody tr').length,
    freshness: [...document.querySelectorAll('#freshness-table tbody tr')].map(r => r.innerText),
    height: document.documentElement ? document.documentElement.scrollHeight : 0,
  };
} catch (e) { return {}; } })()"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (installed by tests/setup-system.sh when missing)."""
    if chromium_binary() is None:
        subprocess.run(["bash", str(Path(__file__).with_name("setup.sh"))], check=False, timeout=900)
    binary = chromium_binary()
    if binary is None:
        reason = "Debian's chromium is not installed and apt-get could not install it (tests/setup-system.sh)"
        if os.environ.get("OSMF_REQUIRE_SERVICES") == "1":
            pytest.fail(f"OSMF_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return binary


def _send_traffic(settings, stop: threading.Event, errors: list[BaseException], max_s: float = 120.0) -> None:  # noqa: ANN001
    """Paced simulated traffic of world A in 2-second chunks until ``stop``: version 1 first, then version 2."""
    from infra.contracts.events import Impression
    from infra.kafka import produce_events
    from sim.replay import paced
    from sim.simulate import simulated_events, time_ordered, world_path
    from sim.world import World

    try:
        world = World.load(world_path(settings))
        started = time.monotonic()
        for chunk in range(10_000):
            if stop.is_set() or time.monotonic() - started > max_s:
                return
            version = "1" if chunk < 3 else "2"
            events = simulated_events(world, settings, seed=chunk, rate=100.0, duration_s=2.0,
                                      start_ts_ms=int(time.time() * 1000))
            labelled = (e.model_copy(update={"model_version": version}) if isinstance(e, Impression) else e
                        for e in events)
            produce_events(settings.bootstrap_servers, paced(time_ordered(labelled), speedup=1.0), settings.topics)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard did not answer at {url} within {timeout_s:g}s")


@pytest.mark.broker
@pytest.mark.timeout(540)
def test_dashboard_page_shows_the_running_loop(broker_settings, tmp_path: Path, chromium: str) -> None:  # noqa: ANN001
    run = isolated_run(broker_settings, tmp_path, min_pair_impressions=20)
    rounds = tmp_path / "models" / "gmllm" / "rounds.jsonl"
    gate = {"promote": True, "reason": "", "overall_candidate": 0.62, "overall_incumbent": 0.5}
    now = time.time()
    append_round(rounds, RoundRecord(1, now - 5, (0, 1), {"lipstick/g0": 40}, 10, [0.6], gate, "promoted", 2, 1,
                                     finished_at=now - 4))
    append_round(rounds, RoundRecord(2, now - 3, (0, 2), {"lipstick/g0": 40}, 10, [0.6],
                                     {**gate, "promote": False, "reason": "group lipstick/g1 lost CTR"},
                                     "kept: group lipstick/g1 lost CTR", 2, 2, finished_at=now - 2))
    port = free_port()
    env = {**run.env, "OSMF_DASHBOARD__CTR_BIN_S": "2", "OSMF_DASHBOARD__THUMBNAILS_PER_GROUP": "2"}
    dash_log = open(tmp_path / "dashboard.log", "wb")
    dashboard = subprocess.Popen([sys.executable, "-m", "cli.main", "dashboard", "--port", str(port), "--refresh", "1"],
                                 cwd=REPO, env=env, stdout=dash_log, stderr=subprocess.STDOUT, start_new_session=True)
    browser: Chromium | None = None
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        run.start()
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, dashboard, timeout_s=120)
        sender = threading.Thread(target=_send_traffic, args=(run.settings, stop, errors), daemon=True)
        sender.start()  # the loop runs while the page is open, until the page shows enough
        run.wait_for(lambda: bool(run.table("ctr")), timeout_s=180, what="the worker's first CTR counts")

        browser = Chromium(chromium)
        with browser.page() as page:
            page.send("Page.enable")
            page.send("Page.navigate", url=url)
            state: dict = {}
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                state = page.evaluate(PAGE_STATE) or {}
                ctr = [t["n"] for t in state.get("ctr") or [] if "/" in t["name"] and "alert" not in t["name"]]
                versions = {t["name"] for t in state.get("versions") or [] if t["n"]}
                if (len(ctr) >= 2 and min(ctr) >= 3 and {"version 1", "version 2", "promoted"} <= versions
                        and sum(t["n"] for t in state.get("lag") or []) and state.get("thumbs", 0) >= 2):
                    break
                time.sleep(1.0)
            path = page.screenshot(SCREENSHOT, width=1400, height=min(int(state.get("height") or 2400), 6000))
        print(f"dashboard screenshot: {path}")
        stop.set()
        sender.join(timeout=30)
        assert not errors, errors

        ctr_traces = [t for t in state.get("ctr") or [] if "/" in t["name"] and "alert" not in t["name"]]
        assert len(ctr_traces) >= 2 and min(t["n"] for t in ctr_traces) >= 3, state  # CTR over time per group
        versions = {t["name"]: t["n"] for t in state.get("versions") or []}
        assert versions.get("version 1") and versions.get("version 2"), state
        assert versions.get("promoted") == 1 and versions.get("refused (kept incumbent)") == 1, state
        assert sum(t["n"] for t in state.get("lag") or []) >= 1, state
        assert state["rounds"] == 2 and state["thumbs"] >= 2, state
        event = next(row.split("\t") for row in state["freshness"] if row.startswith("event"))
        assert event[1] != "-" and float(event[2]) >= 0, state  # the newest event's time and age are measured

        from PIL import Image

        with Image.open(path) as shot:
            assert shot.size[0] == 1400 and shot.size[1] >= 1000
            colours = shot.convert("RGB").resize((140, 100)).getcolors(maxcolors=100_000)
            assert colours is not None and len(colours) > 50  # charts and thumbnails, not a blank page
    finally:
        stop.set()
        if browser is not None:
            browser.close()
        if dashboard.poll() is None:
            os.killpg(dashboard.pid, signal.SIGINT)
            try:
                dashboard.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(dashboard.pid, signal.SIGKILL)
                dashboard.wait()
        dash_log.close()
        run.stop()
    assert dashboard.returncode in (0, -signal.SIGINT), (tmp_path / "dashboard.log").read_text()[-3000:]
    assert json.loads(rounds.read_text().splitlines()[0])["round"] == 1  # read-only: the log is untouched
