"""The G-MLLM: inputs, constrained decoding, artifacts (manifest, tampering, pickles), TRL compatibility."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.data import ProductRecord
from learner.model import grammar
from learner.model.artifact import ArtifactError, verify_artifact
from learner.model.gmllm import GMLLM
from learner.model.inputs import generation_input, task_input, task_segments
from infra.contracts.prompt import parse_prompt, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = "group mugs/g0 | 50% of mugs | ctr 3.0% | likes primary=pink | avoids nothing yet"
CREATIVE = 'background=solid; palette=red,white; position=center; scale=0.5; copy="Sale"; style=bold'


def _product(tiny_log) -> ProductRecord:  # noqa: ANN001
    return tiny_log.products["mug-1"]


# ------------------------------------------------------------------ grammar


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), cut=st.floats(0, 1))
def test_every_prefix_of_a_valid_prompt_is_accepted(seed: int, cut: float) -> None:
    text = random_prompt(random.Random(seed)).to_text()
    assert grammar.complete(text)
    assert grammar.prefix_ok(text[: round(cut * len(text))])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), where=st.floats(0, 1), junk=st.sampled_from(["#", "X", ";", '"', "  ", "=", "9"]))
def test_a_corrupted_prompt_is_never_a_complete_prompt(seed: int, where: float, junk: str) -> None:
    text = random_prompt(random.Random(seed)).to_text()
    i = min(len(text) - 1, round(where * len(text)))
    bad = text[:i] + junk + text[i + 1 :]
    if bad == text:
        return
    try:
        valid = parse_prompt(bad).to_text() == bad
    except ValueError:
        valid = False
    assert grammar.complete(bad) == valid
    if not grammar.prefix_ok(bad):
        assert not valid


# ------------------------------------------------------------------ inputs


def test_inputs_put_the_group_first_and_one_image_placeholder(tiny_log) -> None:  # noqa: ANN001
    product = _product(tiny_log)
    text = generation_input(GROUP, product)
    assert text.startswith(GROUP + "\n<image>\n") and text.count("<image>") == 1 and text.endswith("\n")
    assert task_input("product", product=product).startswith("<image>\n")
    assert "group" not in task_input("product", product=product)
    with pytest.raises(ValueError, match="needs the creative"):
        task_input("click", group=GROUP, product=product)


def test_line_wise_encoding_equals_the_llava_processors(tiny_gmllm, tiny_log) -> None:  # noqa: ANN001
    product = _product(tiny_log)
    for task in ("click", "generate", "product"):
        segments = task_segments(task, group=GROUP, product=product, creative=CREATIVE)
        processed = tiny_gmllm.processor(images=[product.rgb_image()], text=["".join(segments)], return_tensors="pt")
        assert processed["input_ids"][0].tolist() == tiny_gmllm.encode(segments)
        assert torch.allclose(processed["pixel_values"][0], tiny_gmllm.pixel_values(product))


# ------------------------------------------------------------------ generation


def test_constrained_generation_always_parses_even_untrained(tiny_gmllm, tiny_log) -> None:  # noqa: ANN001
    out = tiny_gmllm.generate(GROUP, _product(tiny_log), n=6, seed=3, temperature=1.0, max_new_tokens=120)
    assert all(g.valid for g in out), [g.text for g in out]
    assert all(parse_prompt(g.text).to_text() == g.text for g in out)
    raw = tiny_gmllm.generate(GROUP, _product(tiny_log), n=6, seed=3, constrained=False, max_new_tokens=20)
    assert not any(g.valid for g in raw)  # an untrained model writes noise: the raw rate is reported honestly


def test_same_seed_same_prompts_other_seed_other_prompts(tiny_gmllm, tiny_log) -> None:  # noqa: ANN001
    product = _product(tiny_log)
    first = [g.text for g in tiny_gmllm.generate(GROUP, product, n=3, seed=7, max_new_tokens=120)]
    again = [g.text for g in tiny_gmllm.generate(GROUP, product, n=3, seed=7, max_new_tokens=120)]
    other = [g.text for g in tiny_gmllm.generate(GROUP, product, n=3, seed=8, max_new_tokens=120)]
    assert first == again != other


def test_click_probability_is_a_probability_per_item(tiny_gmllm, tiny_log) -> None:  # noqa: ANN001
    product = _product(tiny_log)
    scores = tiny_gmllm.click_probability([(GROUP, product, CREATIVE), ("group mugs/g1", product, CREATIVE)] * 3,
                                          batch_size=4)
    assert scores.shape == (6,) and ((scores > 0) & (scores < 1)).all()
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)


# ------------------------------------------------------------------ artifacts


def test_save_load_generate_is_identical_for_the_same_seed(tiny_gmllm, tiny_log, tmp_path: Path) -> None:  # noqa: ANN001
    product = _product(tiny_log)
    path = tiny_gmllm.save(tmp_path / "v1", extra={"note": "test"})
    files = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" in files and "manifest.json" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    loaded = GMLLM.load(path)
    assert loaded.info["note"] == "test" and loaded.info["prompt_format"].startswith("infra.contracts.prompt")
    before = [g.text for g in tiny_gmllm.generate(GROUP, product, n=4, seed=11, max_new_tokens=120)]
    after = [g.text for g in loaded.generate(GROUP, product, n=4, seed=11, max_new_tokens=120)]
    assert before == after
    item = [(GROUP, product, CREATIVE)]
    assert loaded.click_probability(item)[0] == pytest.approx(tiny_gmllm.click_probability(item)[0], abs=1e-6)


@pytest.fixture
def saved(tiny_gmllm, tmp_path: Path) -> Path:  # noqa: ANN001
    return tiny_gmllm.save(tmp_path / "model")


def test_a_tampered_weight_file_is_refused_before_loading(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.safetensors: sha256 does not match the manifest"):
        GMLLM.load(saved)


def test_pickles_extra_and_missing_files_are_refused(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ArtifactError, match="pickle-based file refused"):
        verify_artifact(copy)
    (copy / "pytorch_model.bin").unlink()
    (copy / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="not in the manifest"):
        verify_artifact(copy)
    (copy / "notes.txt").unlink()
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        verify_artifact(copy)
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        GMLLM.load(saved)


def test_saving_over_a_version_replaces_it_whole(tiny_gmllm, tmp_path: Path) -> None:  # noqa: ANN001
    target = tmp_path / "v"
    tiny_gmllm.save(target, extra={"round": 1})
    tiny_gmllm.save(target, extra={"round": 2})
    assert GMLLM.load(target).info["round"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no temporaries left behind


# ------------------------------------------------------------------ TRL


def test_trl_dpo_trainer_takes_the_model_processor_and_prompt_format(tiny_gmllm, tiny_log, tmp_path: Path) -> None:  # noqa: ANN001
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    product = _product(tiny_log)
    eos = tiny_gmllm.tokenizer.eos_token
    chosen = random_prompt(random.Random(1)).to_text() + eos
    rejected = random_prompt(random.Random(2)).to_text() + eos
    rows = {"prompt": [generation_input(GROUP, product)] * 2, "chosen": [chosen] * 2, "rejected": [rejected] * 2,
            "images": [[product.rgb_image()]] * 2}
    model = GMLLM.load(tiny_gmllm.save(tmp_path / "policy")).model
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to=[], save_strategy="no", logging_strategy="no", per_device_train_batch_size=2,
                     max_steps=1, learning_rate=1e-3, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                         processing_class=tiny_gmllm.processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
