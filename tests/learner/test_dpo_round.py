"""Group-DPO on the G-MLLM itself: pairs from logs, the TRL dataset, a fit that learns each group's taste."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from infra.settings import DPOSettings, ModelSettings
from learner.dpo.data import one_size_prefix, pairs_from_traffic, preference_dataset, usable_pairs
from learner.dpo.heldout import heldout_figures, pair_logprobs
from learner.dpo.train import fit_group_dpo, fit_steps
from features.group import read_group_features
from learner.model.gmllm import GMLLM
from streams.pairs import PairMinerConfig

PINK, NAVY = "palette=pink", "palette=navy"


@pytest.fixture(scope="module")
def pairs(tiny_log):  # noqa: ANN001, ANN201
    return pairs_from_traffic(tiny_log, PairMinerConfig(min_impressions=20, confidence=0.9))


@pytest.fixture(scope="module")
def features(tiny_log):  # noqa: ANN001, ANN201
    return read_group_features(tiny_log)


def test_mined_pairs_follow_each_groups_taste(pairs) -> None:  # noqa: ANN001
    wins = Counter((p.group_id, p.winner_prompt.split("; ")[1].split(",")[0]) for p in pairs)
    assert wins[("mugs/g0", PINK)] > 5 * max(1, wins[("mugs/g0", NAVY)])
    assert wins[("mugs/g1", NAVY)] > 5 * max(1, wins[("mugs/g1", PINK)])
    assert len({p.pair_id for p in pairs}) == len(pairs)


def test_dataset_rows_carry_prompt_image_eos_and_group(pairs, features, tiny_log) -> None:  # noqa: ANN001
    dataset = preference_dataset(pairs[:6], features, tiny_log.products, "<eos>")
    assert set(dataset.column_names) == {"prompt", "images", "chosen", "rejected", "group_id"}
    row = dataset[0]
    assert row["prompt"].startswith(f"group {row['group_id']}")
    assert row["prompt"].count("<image>") == 1 and len(row["images"]) == 1
    assert row["chosen"].endswith("<eos>") and row["rejected"].endswith("<eos>")


def test_one_size_rows_cannot_tell_groups_apart(pairs, tiny_log) -> None:  # noqa: ANN001
    g0 = next(p for p in pairs if p.group_id == "mugs/g0")
    g1 = next(p for p in pairs if p.group_id == "mugs/g1" and p.product_id == g0.product_id)
    dataset = preference_dataset([g0, g1], {}, tiny_log.products, "<eos>", one_size=True)
    assert dataset[0]["prompt"] == dataset[1]["prompt"]
    assert dataset[0]["prompt"].startswith(one_size_prefix("mugs"))


def test_pairs_of_unknown_groups_or_products_are_skipped_and_counted(pairs, features, tiny_log) -> None:  # noqa: ANN001
    only_g0 = {"mugs/g0": features["mugs/g0"]}
    kept, skipped = usable_pairs(pairs, only_g0, tiny_log.products)
    assert {p.group_id for p in kept} == {"mugs/g0"}
    assert skipped.unknown_group == sum(p.group_id == "mugs/g1" for p in pairs)
    with pytest.raises(ValueError, match="no usable preference pair"):
        preference_dataset(pairs, {}, {}, "<eos>")


def test_fit_steps_follow_epochs_and_cap() -> None:
    settings = DPOSettings(epochs=2, batch_size=8, max_steps=50, min_steps=1)
    assert fit_steps(40, settings) == 10
    assert fit_steps(1000, settings) == 50
    assert fit_steps(1, settings) == 1


def test_fit_steps_have_a_floor_below_the_cap() -> None:
    settings = DPOSettings(epochs=2, batch_size=8, max_steps=50, min_steps=20)
    assert fit_steps(4, settings) == 20  # a handful of pairs still gets the KL anchors' steps
    assert fit_steps(400, settings) == 50
    assert fit_steps(4, settings.model_copy(update={"max_steps": 12})) == 12  # max_steps caps the floor too


def _taste_gap(gmllm: GMLLM, features, log, group: str) -> float:  # noqa: ANN001
    """Mean log p(pink creative) − log p(navy creative) for ``group`` over the logged pink/navy prompts."""
    prompts = sorted({r.prompt for r in log.records})
    pink = [p for p in prompts if PINK + "," in p][:4]
    navy = [p for p in prompts if NAVY + "," in p][:4]
    product = log.products["mug-0"]
    lp = gmllm.completion_logprobs([(features[group], product, p) for p in pink + navy])
    return float(lp[: len(pink)].mean() - lp[len(pink) :].mean())


def test_group_dpo_teaches_the_gmllm_opposite_tastes_one_size_cannot(pairs, features, tiny_log, one_thread) -> None:  # noqa: ANN001, E501
    corpus = [f.to_text() for f in features.values()] + [r.prompt for r in tiny_log.records[:200]]
    base = GMLLM.build(ModelSettings(vocab_size=500, hidden_size=48, layers=2, heads=4, intermediate_size=96,
                                     vision_hidden_size=16, vision_layers=1, image_size=16, patch_size=8),
                       corpus=corpus, seed=0)
    settings = DPOSettings(beta=0.5, learning_rate=3e-3, batch_size=8, max_steps=60, epochs=10)
    before = {g: _taste_gap(base, features, tiny_log, g) for g in features}

    grouped = base.copy()
    fit = fit_group_dpo(grouped, base, pairs, features, tiny_log.products, settings)
    assert fit.steps == 60 and fit.losses[-1] < fit.losses[0]
    after = {g: _taste_gap(grouped, features, tiny_log, g) for g in features}
    assert after["mugs/g0"] - before["mugs/g0"] > 1.0, (before, after)  # g0 moved towards pink
    assert after["mugs/g1"] - before["mugs/g1"] < -1.0, (before, after)  # g1 towards navy

    heldout = pairs[::5]
    new, old = heldout_figures(grouped, base, heldout, features, tiny_log.products, settings.beta)
    assert all(f.accuracy > 0.6 for f in new.values()), new
    assert all(f.accuracy == 0.5 and f.mean_margin == 0.0 for f in old.values())

    # The base is unchanged by being the frozen reference, and copies taken after a fit are independent.
    assert {g: _taste_gap(base, features, tiny_log, g) for g in features} == pytest.approx(before)
    again = base.copy()
    winners, losers = pair_logprobs(again, heldout[:4], features, tiny_log.products)
    base_w, base_l = pair_logprobs(base, heldout[:4], features, tiny_log.products)
    assert np.allclose(winners, base_w) and np.allclose(losers, base_l)
    moved_w, _ = pair_logprobs(grouped, heldout[:4], features, tiny_log.products)
    assert not np.allclose(moved_w, base_w)


def test_the_optional_sft_term_on_winners_trains(pairs, features, tiny_log, tiny_gmllm, one_thread) -> None:  # noqa: ANN001
    policy = tiny_gmllm.copy()
    fit = fit_group_dpo(policy, tiny_gmllm, pairs[:16], features, tiny_log.products,
                        DPOSettings(sft_weight=0.5, batch_size=4, max_steps=3))
    assert fit.steps == 3 and all(np.isfinite(fit.losses))
    assert fit.losses[0] > 0.6931  # sigmoid DPO starts at log 2; the SFT term adds the winners' NLL
