"""`osmf learner run` against the real broker: pairs in, a verified version out, malformed pairs dead-lettered."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from learner.model.gmllm import GMLLM
from learner.publish import read_announcement, versions
from infra.kafka import TopicFollower, consume_all, ensure_topics, produce_raw
from infra.contracts.messages import parse_dead_letter, to_bytes
from streams.pairs import PairMinerConfig

from helpers.worker_harness import free_port

runner = CliRunner()

TINY_DPO = {
    "OSMF_LEARNER__DPO__MAX_STEPS": "10",
    "OSMF_LEARNER__DPO__BATCH_SIZE": "8",
    "OSMF_LEARNER__DPO__LEARNING_RATE": "0.003",
    "OSMF_LEARNER__DPO__BETA": "0.5",
    "OSMF_LEARNER__DPO__EPOCHS": "10",
}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model, tiny_log) -> Path:  # noqa: ANN001
    """A pre-training run directory as `osmf learner pretrain` writes it: model/ and traffic/ (untrained model)."""
    from features.group import read_group_features

    run = tmp_path_factory.mktemp("pretrain-run")
    corpus = [f.to_text() for f in read_group_features(tiny_log).values()] + [r.prompt for r in tiny_log.records[:200]]
    GMLLM.build(tiny_model, corpus=corpus, seed=0).save(run / "model")
    tiny_log.save(run / "traffic")
    return run


@pytest.fixture
def env(broker_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's settings: the session broker, its own topics and data dir, no feature store, a tiny fit."""
    run_id = uuid.uuid4().hex[:8]
    values = {
        "OSMF_KAFKA_BOOTSTRAP": broker_settings.bootstrap_servers,
        "OSMF_DATA_DIR": str(tmp_path),
        "OSMF_FEATURES__ENABLED": "false",
        "OSMF_TOPICS__PARTITIONS": "2",
        "HF_HUB_OFFLINE": "1",
        **TINY_DPO,
    }
    for topic in ("impressions", "clicks", "preference_pairs", "dead_letter", "drift_alerts"):
        values[f"OSMF_TOPICS__{topic.upper()}"] = f"t-{run_id}.{topic}"
    monkeypatch.delenv("OSMF_CONFIG", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.mark.broker
def test_once_trains_publishes_a_loadable_version_logs_it_and_dead_letters_the_malformed(
    env, base_run, tiny_log, one_thread  # noqa: ANN001
) -> None:
    from learner.dpo.data import pairs_from_traffic

    pairs = pairs_from_traffic(tiny_log, PairMinerConfig(min_impressions=20, confidence=0.9))
    random.Random(0).shuffle(pairs)
    pairs = pairs[:120]
    stranger = pairs[0].model_copy(update={"product_id": "kettle-9", "pair_id": "stranger"})
    bootstrap, topic, dead = env["OSMF_KAFKA_BOOTSTRAP"], env["OSMF_TOPICS__PREFERENCE_PAIRS"], env["OSMF_TOPICS__DEAD_LETTER"]
    malformed = json.dumps({**json.loads(to_bytes(pairs[1])), "winner_ctr": 7.5}).encode()
    items = [(p.group_id.encode(), to_bytes(p)) for p in pairs]
    items[40:40] = [(b"mugs/g0", malformed), (b"mugs/g0", to_bytes(stranger)), (b"mugs/g1", to_bytes(pairs[2]))]
    ensure_topics(bootstrap, [topic, dead], 2)
    produce_raw(bootstrap, topic, items)

    repo = Path(env["OSMF_DATA_DIR"]) / "models"
    result = runner.invoke(app, ["learner", "run", "--once", "--base", str(base_run), "--min-new-pairs", "1000"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "version 1 of" in out and "published from" in out
    assert "read 122 pairs" in out and "1 duplicates" in out and "1 malformed" in out and "1 of unknown products" in out
    assert "round 1: " in out and "learner rounds" in out
    assert "kettle-9 (1)" in out

    live = versions(repo, "gmllm")
    assert live[0] == 1 and read_announcement(repo, "gmllm")["version"] == live[-1]
    GMLLM.load(repo / "gmllm" / str(live[-1]))  # verifies every file against the manifest
    records = [json.loads(line) for line in (repo / "gmllm" / "rounds.jsonl").read_text().splitlines()]
    # one fit per group (learner.loop.lineage: group), both from version 1, each on its own group's pairs
    assert [r["round"] for r in records] == [1, 2] and {r["reference_version"] for r in records} == {1}
    assert [set(r["pairs_per_group"]) for r in records] == [{"mugs/g0"}, {"mugs/g1"}]
    assert sum(sum(r["pairs_per_group"].values()) + r["heldout_pairs"] for r in records) == 120
    # per-group promotion: each group's held-out pairs (8 and 9) all agree with its own candidate (binomial
    # p <= 0.004): version 2 goes live for mugs/g0, version 3 for mugs/g1, version 1 stays the default
    assert [(r["decision"], r["version"], r["gate"]["promoted_groups"]) for r in records] == [
        ("promoted", 2, ["mugs/g0"]), ("promoted", 3, ["mugs/g1"])], [r["gate"] for r in records]
    assert live[-1] == 3 and "mugs/g0 -> v2" in out and "mugs/g1 -> v3" in out

    [letter] = [parse_dead_letter(r.value) for r in consume_all(bootstrap, [dead])]
    assert letter.source_topic == topic and letter.field == "winner_ctr" and letter.original == malformed
    assert "less than or equal to 1" in letter.reason

    # A restart re-reads the topic from the start: nothing is new, nothing is dead-lettered twice.
    again = runner.invoke(app, ["learner", "run", "--once", "--traffic", str(base_run / "traffic")])
    assert again.exit_code == 0, again.output
    assert "incumbent: version 1" in again.output and "mugs/g0 on version 2" in again.output
    assert "mugs/g1 on version 3" in again.output
    assert "0 new since the last round" in again.output
    assert "no new pairs; no round run" in again.output and "1 already there" in again.output
    assert len(consume_all(bootstrap, [dead])) == 1 and versions(repo, "gmllm") == [1, 2, 3]


@pytest.mark.broker
def test_clear_errors_for_no_broker_no_model_and_a_base_that_is_not_a_model(env, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    no_model = runner.invoke(app, ["learner", "run", "--once"])
    assert no_model.exit_code == 2 and "no published version" in no_model.output and "--base" in no_model.output

    (tmp_path / "junk").mkdir()
    junk = runner.invoke(app, ["learner", "run", "--once", "--base", str(tmp_path / "junk")])
    assert junk.exit_code == 2 and "neither a model artifact" in junk.output

    monkeypatch.setenv("OSMF_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    down = runner.invoke(app, ["learner", "run", "--once"])
    assert down.exit_code == 2 and "osmf broker start" in down.output and "OSMF_KAFKA_BOOTSTRAP" in down.output


@pytest.mark.broker
def test_the_follower_reads_a_topic_from_the_start_then_follows_it(env) -> None:  # noqa: ANN001
    bootstrap, topic = env["OSMF_KAFKA_BOOTSTRAP"], env["OSMF_TOPICS__PREFERENCE_PAIRS"]
    ensure_topics(bootstrap, [topic], 3)
    produce_raw(bootstrap, topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(20)])
    with TopicFollower(bootstrap, [topic]) as follower:
        seen: list[bytes] = []
        while not follower.caught_up:
            seen += [r.value for r in follower.poll(timeout_s=0.5)]
        assert sorted(seen) == sorted(f"v{i}".encode() for i in range(20))
        produce_raw(bootstrap, topic, [(b"k", b"later")])
        while b"later" not in seen:
            seen += [r.value for r in follower.poll(timeout_s=0.5)]
        assert len(seen) == 21
