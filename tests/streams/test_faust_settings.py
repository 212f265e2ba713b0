"""The Faust settings ``streams`` tunes reach the Faust app, and bad values name their field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from infra.settings import ConfigError, load_settings
from streams.app import Worker


def _worker(tmp_path: Path, **streams: object) -> Worker:
    return Worker(load_settings(data_dir=tmp_path, streams=streams))


def test_defaults_follow_the_batch_size(tmp_path: Path) -> None:
    conf = _worker(tmp_path, batch_size=2000).app.conf
    assert conf.stream_buffer_maxsize == 8000
    assert conf.broker_max_poll_records == 2000
    assert conf.cython_optimizations is False
    small = _worker(tmp_path, batch_size=10).app.conf
    assert (small.stream_buffer_maxsize, small.broker_max_poll_records) == (4096, 500)


def test_set_values_reach_the_faust_app(tmp_path: Path) -> None:
    conf = _worker(tmp_path, buffer_maxsize=1024, max_poll_records=300, cython_optimizations=True).app.conf
    assert conf.stream_buffer_maxsize == 1024
    assert conf.broker_max_poll_records == 300
    assert conf.cython_optimizations is True


def test_uvloop_runs_the_app(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    policy = asyncio.get_event_loop_policy()
    try:
        worker = _worker(tmp_path, event_loop="uvloop")
        assert isinstance(worker.app.loop, uvloop.Loop)
        assert asyncio.get_event_loop() is worker.app.loop
        worker.app.loop.close()  # closed, so no cache keeps handing it out
    finally:
        asyncio.set_event_loop_policy(policy)  # the previous policy still holds the previous loop


@pytest.mark.parametrize(
    ("field", "value"),
    [("event_loop", "trio"), ("buffer_maxsize", 0), ("max_poll_records", -1), ("cython_optimizations", "maybe")],
)
def test_bad_values_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"streams\.{field}"):
        load_settings(data_dir=tmp_path, streams={field: value})


def test_the_worker_keeps_the_root_logger_at_its_level(tmp_path: Path) -> None:
    """Faust's terminal spinner would set the root logger to DEBUG, making every hot-path debug call build a record."""
    import logging

    from streams.worker import faust_worker

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        made = faust_worker(_worker(tmp_path).app, "warning")
        made.on_setup_root_logger(root, logging.WARNING)  # Faust's hook at its first start (no stdout redirect here)
        assert root.getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("aiokafka.consumer.fetcher").isEnabledFor(logging.DEBUG)
        assert not [h for h in root.handlers if type(h).__name__ == "SpinnerHandler"]
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
