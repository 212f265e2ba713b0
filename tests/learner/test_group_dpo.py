"""Group-DPO pinned to TRL's DPO loss, group balancing, and opposite preferences in two groups."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from helpers.tiny_lm import sequence_logprob, tiny_lm, tiny_tokenizer
from learner.dpo import GroupDPOConfig
from learner.dpo.trainer import GroupDPOTrainer

X = "background=dots; palette=red,white"
Y = "background=solid; palette=navy,gray"


def _prompt(group: str) -> str:
    return f"group {group} | product p1 -> "


def _cpu_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        save_strategy="no", logging_strategy="no", per_device_train_batch_size=4, seed=0, **kw,
    )


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [_prompt(g) + c for g in ("A", "B", "C") for c in (X, Y)] * 20
    return tiny_tokenizer(corpus)


def test_one_group_unit_weights_equals_trl_sigmoid_loss(tokenizer, tmp_path) -> None:
    rows = {"prompt": [_prompt("A")] * 4, "chosen": [X, Y, X, Y], "rejected": [Y, X, Y, X], "group_id": ["A"] * 4}
    dataset = Dataset.from_dict(rows)
    model = tiny_lm(tokenizer)
    trl_trainer = DPOTrainer(
        model=copy.deepcopy(model), ref_model=copy.deepcopy(model), processing_class=tokenizer,
        args=_cpu_args(DPOConfig, tmp_path / "trl", loss_type=["sigmoid"]), train_dataset=dataset,
    )
    group_trainer = GroupDPOTrainer(
        model=copy.deepcopy(model), ref_model=copy.deepcopy(model), processing_class=tokenizer,
        args=_cpu_args(GroupDPOConfig, tmp_path / "group", loss_type=["sigmoid"]), train_dataset=dataset,
    )
    assert group_trainer.pair_weights.tolist() == [1.0] * 4
    batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = trl_trainer.compute_loss(trl_trainer.model, batch)
        got = group_trainer.compute_loss(group_trainer.model, batch)
    assert abs(float(expected) - float(got)) < 1e-6


def test_inverse_share_sampling_balances_groups(tokenizer, tmp_path) -> None:
    groups = ["big"] * 36 + ["small"] * 4
    dataset = Dataset.from_dict(
        {"prompt": [_prompt("A")] * 40, "chosen": [X] * 40, "rejected": [Y] * 40, "group_id": groups}
    )
    trainer = GroupDPOTrainer(
        model=tiny_lm(tokenizer), ref_model=tiny_lm(tokenizer), processing_class=tokenizer,
        args=_cpu_args(GroupDPOConfig, tmp_path), train_dataset=dataset,
    )
    assert trainer.group_shares() == pytest.approx({"big": 0.5, "small": 0.5})
    sampler = trainer._get_train_sampler()
    drawn = Counter(groups[i] for _ in range(50) for i in sampler)
    assert 0.4 < drawn["small"] / sum(drawn.values()) < 0.6  # 10 % of pairs, ~50 % of draws


def test_one_size_mode_weighs_every_pair_alike(tokenizer, tmp_path) -> None:
    dataset = Dataset.from_dict(
        {"prompt": [_prompt("A")] * 5, "chosen": [X] * 5, "rejected": [Y] * 5, "group_id": ["a"] * 4 + ["b"]}
    )
    trainer = GroupDPOTrainer(
        model=tiny_lm(tokenizer), ref_model=tiny_lm(tokenizer), processing_class=tokenizer,
        args=_cpu_args(GroupDPOConfig, tmp_path, one_size=True), train_dataset=dataset,
    )
    assert trainer.pair_weights.tolist() == [1.0] * 5


def test_reversed_pairs_move_two_groups_in_opposite_directions(tokenizer, tmp_path) -> None:
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": [], "group_id": []}
    for _ in range(16):
        for group, (win, lose) in (("A", (X, Y)), ("B", (Y, X))):
            rows["prompt"].append(_prompt(group))
            rows["chosen"].append(win)
            rows["rejected"].append(lose)
            rows["group_id"].append(group)
    model = tiny_lm(tokenizer)

    def margin(m, group: str) -> float:
        return sequence_logprob(m, tokenizer, _prompt(group), X) - sequence_logprob(m, tokenizer, _prompt(group), Y)

    before = {g: margin(model, g) for g in ("A", "B")}
    trainer = GroupDPOTrainer(
        model=model, ref_model=copy.deepcopy(model), processing_class=tokenizer,
        args=_cpu_args(GroupDPOConfig, tmp_path, learning_rate=5e-3, num_train_epochs=6, beta=0.5),
        train_dataset=Dataset.from_dict(rows),
    )
    trainer.train()
    after = {g: margin(trainer.model, g) for g in ("A", "B")}
    assert after["A"] - before["A"] > 1.0, (before, after)  # A learned to prefer X
    assert after["B"] - before["B"] < -1.0, (before, after)  # B learned to prefer Y
