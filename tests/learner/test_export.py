"""`osmf export pairs` against the real broker: mined pairs in, a parquet dataset `datasets` loads out."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from infra.contracts.messages import to_bytes
from infra.kafka import ensure_topics, produce_raw
from learner.export import SCHEMA
from learner.history import RoundRecord, append_round
from streams.pairs import PairMinerConfig

runner = CliRunner()


@pytest.fixture
def env(broker_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The session broker, this test's own topics and data dir, no feature store (features come from the log)."""
    run_id = uuid.uuid4().hex[:8]
    values = {
        "OSMF_KAFKA_BOOTSTRAP": broker_settings.bootstrap_servers,
        "OSMF_DATA_DIR": str(tmp_path / "data"),
        "OSMF_FEATURES__ENABLED": "false",
        "OSMF_TOPICS__PARTITIONS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    for topic in ("impressions", "clicks", "preference_pairs", "dead_letter", "drift_alerts"):
        values[f"OSMF_TOPICS__{topic.upper()}"] = f"t-{run_id}.{topic}"
    monkeypatch.delenv("OSMF_CONFIG", raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.mark.broker
def test_export_writes_grouped_pairs_that_datasets_loads(env, tiny_log, tmp_path: Path) -> None:  # noqa: ANN001
    import datasets

    from features.group import read_group_features
    from learner.dpo.data import pairs_from_traffic

    traffic = tiny_log.save(tmp_path / "traffic")
    pairs = sorted(pairs_from_traffic(tiny_log, PairMinerConfig(min_impressions=20, confidence=0.9)),
                   key=lambda p: p.pair_id)[:40]
    assert len(pairs) == 40
    for i, pair in enumerate(pairs):  # spread them in time: the first 20 before round 1's window end, the rest after
        pairs[i] = pair.model_copy(update={"ts": 1_000 + i})
    stronger = pairs[3].model_copy(update={"pair_id": "stronger", "evidence_level": pairs[3].evidence_level + 1,
                                           "ts": 5_000})
    malformed = json.dumps({**json.loads(to_bytes(pairs[1])), "winner_ctr": 7.5}).encode()
    items = [(p.group_id.encode(), to_bytes(p)) for p in pairs]
    items += [(b"x", malformed), (stronger.group_id.encode(), to_bytes(stronger)), (b"y", to_bytes(pairs[5]))]
    bootstrap, topic = env["OSMF_KAFKA_BOOTSTRAP"], env["OSMF_TOPICS__PREFERENCE_PAIRS"]
    ensure_topics(bootstrap, [topic], 2)
    produce_raw(bootstrap, topic, items)
    history = tmp_path / "rounds.jsonl"
    append_round(history, RoundRecord(1, 0.0, (1_000, 1_019), {}, 4, [], {}, "promoted", 2, 1))
    append_round(history, RoundRecord(2, 0.0, (1_000, 1_030), {}, 4, [], {}, "kept: no gain", 2, 2))

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "pairs", "--out", str(out), "--traffic", str(traffic),
                                 "--history", str(history)])
    assert result.exit_code == 0, result.output
    assert "wrote 40 pairs of 2 groups" in result.output and "43 messages read, 1 malformed" in result.output
    assert "winner_ctr" in result.output  # the malformed message's field is named

    data = datasets.load_dataset("parquet", data_files=str(out / "pairs.parquet"), split="train")
    assert data.column_names == SCHEMA.names and len(data) == 40
    rows = {row["pair_id"]: row for row in data}
    assert "stronger" in rows and pairs[3].pair_id not in rows  # one row per identity, the most evidence kept
    features = read_group_features(tiny_log)
    for pair in pairs[:3]:
        row = rows[pair.pair_id]
        group = features[pair.group_id]
        assert (row["chosen"], row["rejected"]) == (pair.winner_prompt, pair.loser_prompt)
        assert (row["chosen_impressions"], row["chosen_clicks"]) == (pair.winner_impressions, pair.winner_clicks)
        assert row["group_text"] == group.to_text() and row["group_likes"] == list(group.likes)
        assert row["group_ctr"] == pytest.approx(group.ctr) and row["group_share"] == pytest.approx(group.share)
        assert dict(zip(row["group_lift_keys"], row["group_lift_values"])) == pytest.approx(group.lifts)
        assert row["prompt"].startswith(group.to_text()) and "<image>" in row["prompt"]
        assert Path(row["image_ref"]).is_file() and row["product_title"] == tiny_log.products[pair.product_id].title
    assert rows[pairs[0].pair_id]["first_round"] == 1 and rows[pairs[0].pair_id]["first_version"] == 2
    assert rows[pairs[25].pair_id]["first_round"] == 2 and rows[pairs[25].pair_id]["first_version"] is None
    assert rows[pairs[35].pair_id]["first_round"] is None  # newer than every logged round
    assert {r["split"] for r in rows.values()} == {"train", "heldout"}
    meta = json.loads((out / "export.json").read_text())
    assert meta["rows"] == 40 and meta["malformed"] == 1 and meta["columns"] == SCHEMA.names

    again = runner.invoke(app, ["export", "pairs", "--out", str(out), "--traffic", str(traffic)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output


@pytest.mark.broker
def test_export_errors_name_the_option(env, tmp_path: Path) -> None:  # noqa: ANN001
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = runner.invoke(app, ["export", "pairs", "--out", str(a_file)])
    assert result.exit_code == 2 and "--out" in result.output and "directory" in result.output
    bad = runner.invoke(app, ["export", "pairs", "--out", str(tmp_path / "o"), "--traffic", str(tmp_path)])
    assert bad.exit_code == 2 and "--traffic" in bad.output and "log.json" in bad.output
