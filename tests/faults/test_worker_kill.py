"""kill -9 the stream worker mid-run and restart it: the CTR tables and pairs equal what the log implies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from faults._support import START_TS_MS, WORLD_A, kill_worker, listening_addresses, metric, proc_of, scrape, wait_until
from helpers.worker_harness import count_difference, expected_counts, isolated_run, table_counts
from infra.contracts.messages import parse_pair
from infra.kafka import consume_all, produce_events
from learner.buffer import PairBuffer
from sim.simulate import generate_events
from sim.world import World

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TOKEN = "fault-test-secret-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_worker_killed_mid_run_restarts_with_exact_tables_and_no_double_pairs(broker_settings, tmp_path: Path) -> None:
    world = World.load(WORLD_A)
    events = list(generate_events(world, seed=21, n_impressions=6000, start_ts_ms=START_TS_MS))
    expected = expected_counts(events)
    n_imps = sum(expected.impressions.values())
    run = isolated_run(broker_settings, tmp_path, min_pair_impressions=30)
    run.env["OSMF_SECURITY__HTTP_TOKEN"] = TOKEN  # a secret in the environment: must never reach the log
    # Faust commits offsets every 0.1 s instead of 2.8 s, so the kill often lands after the commit of a batch that
    # just returned: the batch must be durable by then (docs/streams.md, "Delivery guarantees").
    run.env["BROKER_COMMIT_INTERVAL"] = "0.1"
    try:
        run.start()
        port = run.settings.streams.metrics_port
        wait_until(lambda: bool(scrape(port, AUTH)), 90, "the worker's metrics endpoint")
        assert scrape(port) == {}  # the endpoint asks for the bearer token (security.http_token)
        assert listening_addresses(proc_of(run).pid) == {"127.0.0.1"}, "the worker listens on loopback only"

        # Produce at a steady rate in the background; kill -9 once part of it is counted.
        producer = threading.Thread(
            target=produce_events, args=(run.settings.bootstrap_servers, events, run.settings.topics),
            kwargs={"rate": 400.0}, daemon=True,  # 15 s of traffic: the kill lands while it flows
        )
        producer.start()
        wait_until(lambda: metric(scrape(port, AUTH), "osmf_counted_total", kind="impression") >= 1000, 120,
                   "1,000 impressions counted before the kill", poll_s=0.1)
        counted_at_kill = metric(scrape(port, AUTH), "osmf_counted_total", kind="impression")
        assert kill_worker(run) == 1
        assert 1000 <= counted_at_kill < n_imps, "the kill came mid-run"
        producer.join(timeout=120)
        assert not producer.is_alive()

        run.start()  # a fresh process: replays the changelog, resumes from the committed offsets
        impressions, clicks = {}, {}

        def exact() -> bool:
            nonlocal impressions, clicks
            impressions, clicks = table_counts(run.table("ctr"))
            return impressions == expected.impressions and clicks == expected.clicks

        try:
            run.wait_for(exact, timeout_s=180, what="CTR tables to equal the produced log after the restart")
        except AssertionError as failure:
            raise AssertionError(f"{count_difference(impressions, expected.impressions, 'impressions')}; "
                                 f"{count_difference(clicks, expected.clicks, 'clicks')}\n{failure}") from None
        assert impressions == expected.impressions  # per (product, creative): no loss, no double count
        assert clicks == expected.clicks
        assert sum(impressions.values()) == n_imps == 6000

        # Pairs are at-least-once on the topic (a kill -9 between sending a pair and journaling the miner's
        # state re-sends it after the restart, with the same pair_id); the learner's buffer counts each
        # (group, product, winner, loser, evidence level) once. So: exactly one new pair per distinct id.
        topic = run.settings.topics.preference_pairs
        pairs = [parse_pair(r.value) for r in consume_all(run.settings.bootstrap_servers, [topic])]
        assert pairs, "min_pair_impressions=30 on 6,000 impressions yields pairs"
        ids = [p.pair_id for p in pairs]
        buffer = PairBuffer(capacity=100_000)
        taken = sum(buffer.add(p) for p in pairs)
        print(f"pairs: {len(ids)} messages, {len(set(ids))} distinct, {len(ids) - len(set(ids))} re-sent after the kill")
        assert taken == len(set(ids)) == buffer.new_pairs, "the learner counts every pair once, none twice"
        first = {}
        for pair in pairs:
            seen = first.setdefault(pair.pair_id, pair)
            assert (seen.group_id, seen.product_id, seen.winner_creative_id, seen.loser_creative_id,
                    seen.evidence_level) == (pair.group_id, pair.product_id, pair.winner_creative_id,
                                             pair.loser_creative_id, pair.evidence_level)
        final = run.table("ctr")
        for pair in pairs:
            row = final[f"{pair.group_id}|{pair.product_id}"]
            assert pair.winner_impressions <= row[pair.winner_creative_id][0]
            assert pair.loser_impressions <= row[pair.loser_creative_id][0]
        letters = consume_all(run.settings.bootstrap_servers, [run.settings.topics.dead_letter])
        assert len(letters) == 0
        assert TOKEN not in run.log_tail()
    finally:
        run.stop()
