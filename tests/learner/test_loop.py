"""The learner loop without Kafka: offer and trigger, round numbering across restarts, promote and refuse."""

from __future__ import annotations

import doctest
import random
from pathlib import Path

import pytest

import learner.loop
from infra.settings import LearnerSettings, load_settings
from features.group import read_group_features
from learner.history import RoundRecord, append_round, read_rounds
from learner.loop import DUPLICATE, NEW, UNKNOWN_PRODUCT, LearnerLoop, group_feature_source, history_path
from learner.model.artifact import verify_artifact
from learner.model.gmllm import GMLLM
from learner.publish import publish_version, read_announcement, versions
from streams.pairs import PairMinerConfig

SETTINGS = LearnerSettings(
    dpo={"max_steps": 10, "batch_size": 8, "learning_rate": 3e-3, "beta": 0.5, "epochs": 10},
    loop={"min_new_pairs": 50, "max_wait_s": 60.0, "buffer_capacity": 1000},
)


@pytest.fixture(scope="module")
def features(tiny_log):  # noqa: ANN001, ANN201
    return read_group_features(tiny_log)


@pytest.fixture(scope="module")
def pairs(tiny_log):  # noqa: ANN001, ANN201
    from learner.dpo.data import pairs_from_traffic

    mined = pairs_from_traffic(tiny_log, PairMinerConfig(min_impressions=20, confidence=0.9))
    random.Random(0).shuffle(mined)
    return mined[:120]


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory, tiny_model, tiny_log, features) -> Path:  # noqa: ANN001
    corpus = [f.to_text() for f in features.values()] + [r.prompt for r in tiny_log.records[:200]]
    gmllm = GMLLM.build(tiny_model, corpus=corpus, seed=0)
    return gmllm.save(tmp_path_factory.mktemp("base") / "model")


def _loop(tmp_path: Path, base_artifact: Path, tiny_log, features, settings=SETTINGS, **kw) -> LearnerLoop:  # noqa: ANN001
    repo = tmp_path / "repo"
    published = publish_version(base_artifact, repo, "gmllm", verify=verify_artifact)
    return LearnerLoop(GMLLM.load(published.path), published.version, tiny_log.products,
                       lambda ids: {g: features[g] for g in ids if g in features}, settings, repo,
                       history_path(repo, "gmllm"), started_at=0.0, **kw)


def test_docstring_example() -> None:
    assert doctest.testmod(learner.loop).failed == 0


def test_offer_dedupes_skips_unknown_products_and_triggers_on_count_or_time(tiny_log, pairs) -> None:  # noqa: ANN001
    loop = LearnerLoop(None, None, tiny_log.products, lambda ids: {}, SETTINGS, Path("/nonexistent"),
                       Path("/nonexistent/rounds.jsonl"), started_at=100.0)
    assert [loop.offer(p) for p in pairs[:49]] == [NEW] * 49
    assert loop.offer(pairs[0]) == DUPLICATE
    assert loop.offer(pairs[1].model_copy(update={"evidence_level": pairs[1].evidence_level + 1})) == NEW
    assert loop.offer(pairs[2].model_copy(update={"product_id": "kettle-9"})) == UNKNOWN_PRODUCT
    counts = loop.counts
    assert (counts.offered, counts.new, counts.duplicates, counts.unknown_product) == (52, 50, 1, 1)
    assert counts.unknown_product_ids == {"kettle-9": 1}
    assert len(loop.buffer) == 49 and loop.buffer.new_pairs == 50
    assert loop.due(now=100.0)  # 50 new pairs = min_new_pairs

    quiet = LearnerLoop(None, None, tiny_log.products, lambda ids: {}, SETTINGS, Path("/nonexistent"),
                        Path("/nonexistent/rounds.jsonl"), started_at=100.0)
    assert not quiet.due(now=1000.0)  # time alone does not train: no new pair
    quiet.offer(pairs[0])
    assert not quiet.due(now=159.0) and quiet.seconds_to_wait(now=159.0) == pytest.approx(1.0)
    assert quiet.due(now=160.0)


def test_round_numbers_continue_from_the_history_and_replayed_pairs_are_not_new(tmp_path, tiny_log, pairs) -> None:  # noqa: ANN001, E501
    history = tmp_path / "rounds.jsonl"
    cut = sorted(p.ts for p in pairs)[len(pairs) // 2]
    for number in (1, 2):
        append_round(history, RoundRecord(round=number, started_at=0, data_window=(0, cut), pairs_per_group={},
                                          heldout_pairs=0, losses=[], gate={}, decision="promoted", version=number,
                                          reference_version=number - 1))
    loop = LearnerLoop(None, 2, tiny_log.products, lambda ids: {}, SETTINGS, tmp_path, history, started_at=0.0)
    assert loop.next_round == 3
    for pair in pairs:
        loop.offer(pair)
    assert loop.buffer.new_pairs == len(pairs)
    assert loop.replayed() == sum(p.ts > cut for p in pairs)


def test_a_better_candidate_is_published_as_the_next_version_and_logged(tmp_path, base_artifact, tiny_log, features,  # noqa: ANN001
                                                                         pairs, one_thread) -> None:  # noqa: ANN001
    # promotion=model: this buffer holds too few held-out pairs per group (min_group_pairs) for per-group promotion
    # to move a group on its own evidence (test_group_promotion_... covers that mode, with a judge)
    settings = SETTINGS.model_copy(update={"loop": SETTINGS.loop.model_copy(update={"promotion": "model"})})
    loop = _loop(tmp_path, base_artifact, tiny_log, features, settings)
    stranger = [p.model_copy(update={"group_id": "mugs/g9"}) for p in pairs[:7]]
    for pair in pairs + stranger:
        loop.offer(pair)
    assert loop.due(now=0.0)
    base = loop.incumbent
    summary = loop.train_round(now=10.0)

    assert summary.decision == "promoted", summary.outcome.record.gate
    assert (summary.number, summary.version, loop.version) == (1, 2, 2)
    assert loop.incumbent is summary.outcome.promoted and loop.incumbent is not base
    assert summary.unknown_group_pairs == 7 and loop.counts.unknown_group_ids == {"mugs/g9": 7}
    assert versions(loop.repository, "gmllm") == [1, 2]
    assert read_announcement(loop.repository, "gmllm")["version"] == 2
    GMLLM.load(loop.repository / "gmllm" / "2")  # verifies the manifest
    [record] = read_rounds(loop.history)
    assert record["round"] == 1 and record["decision"] == "promoted" and record["version"] == 2
    assert record["reference_version"] == 1 and set(record["pairs_per_group"]) == {"mugs/g0", "mugs/g1"}
    assert record["pairs_left_out"] == {"mugs/g9": 7}
    assert sum(record["pairs_per_group"].values()) + record["heldout_pairs"] == len(pairs)
    assert record["gate"]["promote"] and record["losses"]
    assert loop.buffer.new_pairs == 0 and not loop.due(now=10.0 + SETTINGS.loop.max_wait_s)
    assert loop.next_round == 2


def test_known_groups_without_pairs_are_protected_in_a_round(tmp_path, base_artifact, tiny_log, features,  # noqa: ANN001
                                                               pairs, one_thread) -> None:  # noqa: ANN001
    only_g0 = [p for p in pairs if p.group_id == "mugs/g0"]
    # one fit for the category's groups: mugs/g1 is in it without pairs (one fit per group never touches it)
    settings = SETTINGS.model_copy(update={"loop": SETTINGS.loop.model_copy(update={"lineage": "category"})})
    quiet = _loop(tmp_path / "a", base_artifact, tiny_log, features, settings, known_groups=["mugs/g1"])
    alone = _loop(tmp_path / "b", base_artifact, tiny_log, features, settings)
    for loop in (quiet, alone):
        for pair in only_g0:
            loop.offer(pair)
    protected = quiet.train_round(now=10.0).outcome.record
    unprotected = alone.train_round(now=10.0).outcome.record
    assert set(protected.pairs_per_group) == {"mugs/g0"}
    trained = sum(protected.pairs_per_group.values())
    assert protected.training["mirrored"] == 2 * trained, "g0's pairs, both ways, under mugs/g1's prefix"
    assert unprotected.training["mirrored"] == 0, "without known groups only groups with pairs are read"


def test_a_round_anchors_groups_without_pairs_on_the_incumbents_own_samples(tmp_path, base_artifact, tiny_log,  # noqa: ANN001
                                                                             features, pairs, one_thread) -> None:  # noqa: ANN001
    settings = SETTINGS.model_copy(deep=True)
    settings.dpo.preserve, settings.dpo.anchor_products, settings.loop.onpolicy_candidates = "both", 1, 4
    settings.loop.lineage = "category"  # mugs/g1 shares g0's fit, without pairs
    loop = _loop(tmp_path, base_artifact, tiny_log, features, known_groups=["mugs/g1"], settings=settings)
    for pair in (p for p in pairs if p.group_id == "mugs/g0"):
        loop.offer(pair)
    record = loop.train_round(now=10.0).outcome.record
    assert record.training["anchors"] == 4, "mugs/g1 (no pairs): 4 samples of the incumbent on 1 product"
    assert record.training["mirrored"] > 0, "both: mirrored pairs beside the anchors"


def test_a_candidate_the_gate_refuses_publishes_nothing_and_the_reason_is_logged(tmp_path, base_artifact, tiny_log,  # noqa: ANN001
                                                                                  features, pairs, one_thread) -> None:  # noqa: ANN001
    settings = SETTINGS.model_copy(update={  # only the simulated CTR can refuse it here
        "dpo": SETTINGS.dpo.model_copy(update={"max_steps": 2}),
        "loop": SETTINGS.loop.model_copy(update={"accuracy_tolerance": 1.0, "promotion": "model"}),
    })
    judged: list[str] = []

    def judge_for(round_features):  # noqa: ANN001, ANN202
        incumbent = loop.incumbent

        def served_ctr(gmllm, one_size=False):  # noqa: ANN001, ANN202 - the candidate serves worse creatives
            judged.append("incumbent" if gmllm is incumbent else "candidate")
            return {g: 0.05 if gmllm is incumbent else 0.01 for g in round_features}

        return served_ctr

    loop = _loop(tmp_path, base_artifact, tiny_log, features, settings, judge=judge_for)
    base = loop.incumbent
    for pair in pairs[:60]:
        loop.offer(pair)
    summary = loop.train_round(now=1.0)

    assert sorted(judged) == ["candidate", "incumbent"]
    assert summary.decision.startswith("kept: group mugs/g0: simulated CTR 0.0100 < 0.0500")
    assert (summary.version, loop.version) == (1, 1) and loop.incumbent is base
    assert versions(loop.repository, "gmllm") == [1]
    assert read_announcement(loop.repository, "gmllm")["version"] == 1
    assert not [p for p in (loop.repository / "gmllm").iterdir() if p.name.startswith(".") and p.is_dir()]
    [record] = read_rounds(loop.history)
    assert record["decision"] == summary.decision and record["version"] == 1
    assert record["gate"]["promote"] is False and "simulated CTR" in record["gate"]["reason"]


def test_a_candidate_refused_for_one_group_is_refitted_without_that_groups_pairs(tmp_path, base_artifact, tiny_log,  # noqa: ANN001
                                                                                 features, pairs, one_thread) -> None:  # noqa: ANN001
    settings = SETTINGS.model_copy(update={
        "dpo": SETTINGS.dpo.model_copy(update={"max_steps": 2, "min_steps": 1, "preserve": "mirror"}),
        "loop": SETTINGS.loop.model_copy(update={"accuracy_tolerance": 1.0, "repair_fits": 1,
                                                  "promotion": "model"}),
    })
    candidates: list[object] = []

    def judge_for(round_features):  # noqa: ANN001, ANN202
        incumbent = loop.incumbent

        def served_ctr(gmllm, one_size=False):  # noqa: ANN001, ANN202 - the first fit lowers mugs/g0, the repair does not
            if gmllm is incumbent:
                return {g: 0.05 for g in round_features}
            if gmllm not in candidates:
                candidates.append(gmllm)
            first = gmllm is candidates[0]
            return {g: (0.01 if first and g == "mugs/g0" else 0.06) for g in round_features}

        return served_ctr

    loop = _loop(tmp_path, base_artifact, tiny_log, features, settings, judge=judge_for)
    for pair in pairs[:60]:
        loop.offer(pair)
    summary = loop.train_round(now=1.0)

    assert len(candidates) == 2 and summary.version == 2, "the repaired candidate is promoted"
    [record] = read_rounds(loop.history)
    training = record["training"]
    assert training["held_back"] == ["mugs/g0"]
    assert training["repairs"][0]["reason"].startswith("group mugs/g0: simulated CTR 0.0100 < 0.0500")
    assert training["mirrored"] > 0, "mugs/g0, now without pairs, is held by mirrored pairs of mugs/g1"


def test_group_promotion_publishes_a_version_for_the_groups_it_raises_and_fits_each_version_on_its_groups(  # noqa: ANN001
        tmp_path, base_artifact, tiny_log, features, pairs, one_thread) -> None:  # noqa: ANN001
    from learner.publish import published_groups, routing

    settings = SETTINGS.model_copy(update={
        "dpo": SETTINGS.dpo.model_copy(update={"max_steps": 2, "min_steps": 1}),
        "loop": SETTINGS.loop.model_copy(update={"accuracy_tolerance": 1.0, "promotion": "group",
                                                 "lineage": "category"}),
    })
    seen: list[object] = []
    served: list[list[str]] = []

    def judge_for(round_features):  # noqa: ANN001, ANN202
        served.append(sorted(round_features))

        def served_ctr(gmllm, one_size=False):  # noqa: ANN001, ANN202 - each newer model: g0 up, g1 down
            if not any(gmllm is m for m in seen):
                seen.append(gmllm)
            k = next(i for i, m in enumerate(seen) if m is gmllm)
            return {g: (0.05 + 0.01 * k if g == "mugs/g0" else 0.05 - 0.01 * k) for g in round_features}

        return served_ctr

    loop = _loop(tmp_path, base_artifact, tiny_log, features, settings, judge=judge_for)
    seen.append(loop.incumbent)
    base = loop.incumbent
    for pair in pairs[:60]:
        loop.offer(pair)
    first = loop.train_round(now=1.0)
    assert first.decision.startswith("promoted for 1 of 2 groups (mugs/g0)"), first.decision
    assert first.outcome.groups == ["mugs/g0"] and published_groups(loop.repository, "gmllm", 2) == ["mugs/g0"]
    assert (loop.version, loop.incumbent) == (1, base), "the default version still serves mugs/g1"
    assert routing(loop.repository, "gmllm") == loop.routing
    assert (loop.routing.version_for("mugs/g0"), loop.routing.version_for("mugs/g1")) == (2, 1)

    for pair in pairs[60:120]:
        loop.offer(pair)
    second = loop.train_round(now=2.0)
    assert served[1:] == [["mugs/g1"], ["mugs/g0"]], "each version is fitted and judged on its own groups"
    assert [s.outcome.record.reference_version for s in second.lineages] == [1, 2]
    assert [set(s.outcome.record.pairs_per_group) for s in second.lineages] == [{"mugs/g1"}, {"mugs/g0"}]
    assert second.lineages[0].decision.startswith("version 1: kept"), second.decision
    assert loop.routing.version_for("mugs/g0") == 3 and loop.routing.version_for("mugs/g1") == 1
    logged = read_rounds(loop.history)
    assert [r["round"] for r in logged] == [1, 2, 3]
    assert logged[0]["decision"] == "promoted" and logged[0]["gate"]["promoted_groups"] == ["mugs/g0"], \
        "the record's decision stays 'promoted' (dashboard, metrics); the groups are in the gate figures"
    restarted = LearnerLoop(base, 1, tiny_log.products, lambda ids: {}, settings, loop.repository, loop.history)
    assert restarted.routing == loop.routing and restarted.next_round == 4


def test_lineage_group_fits_each_group_of_a_version_on_its_own_pairs(  # noqa: ANN001
        tmp_path, base_artifact, tiny_log, features, pairs, one_thread) -> None:  # noqa: ANN001
    from learner.publish import published_groups

    settings = SETTINGS.model_copy(update={
        "dpo": SETTINGS.dpo.model_copy(update={"max_steps": 2, "min_steps": 1}),
        "loop": SETTINGS.loop.model_copy(update={"accuracy_tolerance": 1.0, "promotion": "group",
                                                 "lineage": "group"}),
    })
    served: list[list[str]] = []

    def judge_for(round_features):  # noqa: ANN001, ANN202
        served.append(sorted(round_features))
        return lambda gmllm, one_size=False: {g: (0.05 if gmllm is base else 0.06) for g in round_features}

    loop = _loop(tmp_path, base_artifact, tiny_log, features, settings, judge=judge_for)
    base = loop.incumbent
    for pair in pairs[:60]:
        loop.offer(pair)
    first = loop.train_round(now=1.0)
    assert served == [["mugs/g0"], ["mugs/g1"]], "one fit per group of the version, each judged on its group"
    assert [set(s.outcome.record.pairs_per_group) for s in first.lineages] == [{"mugs/g0"}, {"mugs/g1"}]
    assert [s.outcome.record.reference_version for s in first.lineages] == [1, 1]
    assert published_groups(loop.repository, "gmllm", 2) == ["mugs/g0"]
    assert published_groups(loop.repository, "gmllm", 3) == ["mugs/g1"]
    assert (loop.routing.version_for("mugs/g0"), loop.routing.version_for("mugs/g1")) == (2, 3)
    assert (loop.version, loop.incumbent) == (1, base), "a fit on one group's pairs never becomes the default"


def test_group_features_come_from_the_traffic_log_when_the_store_is_off_or_not_applied(tmp_path, features) -> None:  # noqa: ANN001, E501
    for enabled in (False, True):
        settings = load_settings(data_dir=tmp_path, features={"enabled": enabled})
        features_for, source = group_feature_source(settings, features)
        assert source == "traffic log of the base run"
        assert features_for(["mugs/g0", "mugs/g9"]) == {"mugs/g0": features["mugs/g0"]}


def test_group_features_come_from_the_store_first_and_the_traffic_log_fills_the_gaps(tmp_path, features,  # noqa: ANN001
                                                                                     monkeypatch) -> None:  # noqa: ANN001
    import features.group as feature_group
    import features.store as feature_store

    live = {"mugs/g1": "group mugs/g1 | from the store"}
    calls: list[list[str]] = []

    def store_group_features(reader, group_ids):  # noqa: ANN001, ANN202
        calls.append(list(group_ids))
        if "boom" in group_ids:
            raise RuntimeError("online store unreachable")
        return {g: live[g] for g in group_ids if g in live}

    monkeypatch.setattr(feature_store, "is_applied", lambda settings: True)
    monkeypatch.setattr(feature_group, "store_group_features", store_group_features)
    features_for, source = group_feature_source(load_settings(data_dir=tmp_path), features, reader=object())
    assert source.startswith("feature store sqlite")
    assert features_for(["mugs/g0", "mugs/g1", "mugs/g9"]) == {"mugs/g1": live["mugs/g1"], "mugs/g0": features["mugs/g0"]}
    assert features_for(["boom", "mugs/g1"]) == {"mugs/g1": features["mugs/g1"]}  # a failed read falls back
    assert calls == [["mugs/g0", "mugs/g1", "mugs/g9"], ["boom", "mugs/g1"]]
