"""CTR drift per group: detection, estimates, alert rules, pickling, the DriftAlert wire form."""

import doctest
import json
import pickle
import random
from collections import deque

import pytest

import streams.drift
from streams.drift import DriftConfig, DriftMonitor, _split
from infra.contracts.events import EventError
from infra.contracts.messages import DriftAlert, alert_id, parse_drift_alert, to_bytes


def test_doctests() -> None:
    assert doctest.testmod(streams.drift).failed == 0


def _feed(monitor: DriftMonitor, streams_: dict[str, list[float]], seed: int, step_ms: int = 100) -> list[DriftAlert]:
    """Interleave the groups' streams (one CTR per observation) and collect alerts."""
    rng = random.Random(seed)
    alerts = []
    length = max(len(rates) for rates in streams_.values())
    for i in range(length):
        for group, rates in streams_.items():
            if i < len(rates):
                alert = monitor.update(group, "lipstick", rng.random() < rates[i], ts=i * step_ms)
                if alert is not None:
                    alerts.append(alert)
    return alerts


def test_a_ctr_jump_alerts_its_group_only() -> None:
    monitor = DriftMonitor()
    alerts = _feed(monitor, {"jumps": [0.02] * 10_000 + [0.10] * 10_000, "stable": [0.02] * 20_000}, seed=1)
    assert [a.group_id for a in alerts] == ["jumps"]
    (alert,) = alerts
    assert 10_000 < alert.n_observations < 11_000
    assert alert.ctr_before == pytest.approx(0.02, abs=0.005)
    assert alert.ctr_after == pytest.approx(0.10, abs=0.035)
    assert (alert.detector, alert.category, alert.ts) == ("adwin", "lipstick", (alert.n_observations - 1) * 100)
    assert alert.alert_id == alert_id("lipstick", "jumps", "adwin", alert.n_observations)
    assert monitor.observations("stable", "lipstick") == 20_000


def test_adwin_sees_a_fall_too() -> None:
    alerts = _feed(DriftMonitor(), {"falls": [0.10] * 8_000 + [0.02] * 8_000}, seed=2)
    assert len(alerts) == 1
    assert alerts[0].ctr_before > 0.08 and alerts[0].ctr_after < 0.04


def test_ddm_is_selectable() -> None:
    monitor = DriftMonitor(DriftConfig(detector="ddm", params={"drift_threshold": 3.0}))
    alerts = _feed(monitor, {"jumps": [0.02] * 10_000 + [0.10] * 5_000}, seed=1)
    assert alerts and alerts[-1].detector == "ddm"
    assert any(a.n_observations > 10_000 and a.ctr_after > a.ctr_before for a in alerts)


def test_no_alert_before_min_observations() -> None:
    config = DriftConfig(min_observations=50_000)
    assert _feed(DriftMonitor(config), {"jumps": [0.02] * 5_000 + [0.10] * 5_000}, seed=1) == []


def test_cooldown_is_in_event_time() -> None:
    rates = {"swings": ([0.02] * 4_000 + [0.15] * 4_000) * 2}
    free = _feed(DriftMonitor(DriftConfig(cooldown_ms=0)), rates, seed=3)
    assert len(free) >= 3
    # 8,000 observations 100 ms apart = 800 s: a 1,000 s cooldown keeps only the first alert.
    cooled = _feed(DriftMonitor(DriftConfig(cooldown_ms=1_000_000)), rates, seed=3)
    assert [a.alert_id for a in cooled] == [free[0].alert_id]


def test_pickled_monitor_continues_identically() -> None:
    monitor = DriftMonitor()
    rng = random.Random(4)
    for i in range(6_000):
        monitor.update("g", "c", rng.random() < 0.02, ts=i)
    restored = pickle.loads(pickle.dumps(monitor))
    clicks = [rng.random() < 0.12 for _ in range(6_000)]
    original = [monitor.update("g", "c", x, ts=6_000 + i) for i, x in enumerate(clicks)]
    copy = [restored.update("g", "c", x, ts=6_000 + i) for i, x in enumerate(clicks)]
    assert original == copy
    assert any(original)


def test_groups_are_keyed_by_category_and_can_be_forgotten() -> None:
    monitor = DriftMonitor()
    monitor.update("g1", "lipstick", True, ts=0)
    monitor.update("g1", "drills", False, ts=0)
    assert len(monitor) == 2
    monitor.forget("g1", "lipstick")
    assert (monitor.observations("g1", "lipstick"), monitor.observations("g1", "drills"), len(monitor)) == (0, 1, 1)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="adwin"):
        DriftConfig(detector="magic")
    with pytest.raises(ValueError, match="params"):
        DriftMonitor(DriftConfig(params={"no_such_param": 1}))
    with pytest.raises(ValueError, match="checkpoint_every"):
        DriftConfig(checkpoint_every=0)


def test_split_finds_the_change_point() -> None:
    # 3,200 observations at 0.02 then 800 at 0.10, checkpoints every 32.
    marks: deque[tuple[int, int]] = deque(maxlen=200)
    n = clicks = 0
    for i in range(4_000):
        n += 1
        clicks += (i % 50 == 0) if i < 3_200 else (i % 10 == 0)
        if n % 32 == 0:
            marks.append((n, clicks))
    before, after = _split((0, 0), (n, clicks), marks, 32)
    assert (before, after) == (pytest.approx(0.02), pytest.approx(0.10))
    assert _split((0, 0), (10, 1), deque(), 32) == (0.1, 0.1)  # too short to split


def test_alert_round_trips() -> None:
    alerts = _feed(DriftMonitor(), {"jumps": [0.02] * 10_000 + [0.10] * 5_000}, seed=1)
    assert alerts
    for alert in alerts:
        assert parse_drift_alert(to_bytes(alert)) == alert
    wire = json.loads(to_bytes(alerts[0]))
    wire["ctr_after"] = 1.5
    with pytest.raises(EventError) as info:
        parse_drift_alert(json.dumps(wire).encode())
    assert info.value.field == "ctr_after"
