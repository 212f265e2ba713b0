"""The production renderer: a tiny random SD + ControlNet pipeline built from configs, saved, loaded offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.settings import ConfigError, RenderSettings, load_settings
from serving.render.base import Renderer
from serving.render.diffusion import DiffusionRenderer, RendererLoadError, canny, describe
from serving.render.factory import make_renderer
from serving.render.template import TemplateRenderer
from infra.contracts.prompt import parse_prompt

GREEN = (20, 160, 60)
PROMPT = parse_prompt('background=stripes; palette=blue,white; position=left; scale=0.6; copy="Sale"; style=bold')
PLAIN = parse_prompt('background=solid; palette=red,white; position=center; scale=0.5; copy=""; style=')


def _clip_tokenizer_files(directory: Path) -> int:
    """A tiny byte-level CLIP vocabulary and merges, written by hand: every printable character, a few merges."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        vocab.setdefault(chr(code), len(vocab))
        vocab.setdefault(chr(code) + "</w>", len(vocab))
    merges = ["a n", "a n</w>", "i n", "o n</w>", "r e", "e d</w>", "t h", "th e</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SD1.5-style pipeline + canny ControlNet, from configs only, saved as safetensors."""
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    vocab_size = _clip_tokenizer_files(root / "tokenizer-source")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer-source", model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77, projection_dim=32,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=2,
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    pipeline = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "sd", safe_serialization=True)  # writes controlnet/ beside unet/
    assert not list((root / "sd").rglob("*.bin"))
    return root / "sd"


@pytest.fixture(scope="module")
def renderer(checkpoint: Path) -> DiffusionRenderer:
    return DiffusionRenderer(checkpoint, size=64, steps=2, guidance_scale=2.0)


def _product() -> Image.Image:
    image = Image.new("RGBA", (40, 80), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (30, 70), (*GREEN, 255)), (5, 5))
    return image


def test_tiny_pipeline_renders_64px_offline_and_deterministically(renderer: DiffusionRenderer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(renderer, Renderer)
    first = renderer.render(PROMPT, _product())
    assert first.size == (64, 64) and first.mode == "RGB"
    assert first.tobytes() == renderer.render(PROMPT, _product()).tobytes()


def test_the_product_stays_intact_where_the_layout_puts_it(renderer: DiffusionRenderer) -> None:
    image = renderer.render(PLAIN, _product())
    left, top, right, bottom = TemplateRenderer(64).product_box(PLAIN, _product())
    centre = image.getpixel(((left + right) // 2, (top + bottom) // 2))
    assert centre == GREEN
    banner = renderer.render(PROMPT, _product())
    rows = TemplateRenderer(64).banner_rows(PROMPT)
    strip = np.asarray(banner)[rows[0] + 2 : rows[1] - 2, 2:8]
    assert strip.std() < 1.0  # the copy banner's flat fill, as the template draws it


def test_control_image_is_the_canny_outline_of_the_placed_product(renderer: DiffusionRenderer) -> None:
    control = np.asarray(renderer.control_image(PLAIN, _product()).convert("L")) > 0
    left, top, right, bottom = TemplateRenderer(64).product_box(PLAIN, _product())
    assert control[top:bottom, left - 2 : left + 3].any() and control[top:bottom, right - 3 : right + 2].any()
    assert not control[: top - 3].any() and not control[(top + bottom) // 2, left + 6 : right - 6].any()


def test_renderer_is_chosen_by_settings(checkpoint: Path, tmp_path: Path) -> None:
    assert isinstance(make_renderer(RenderSettings(size=32)), TemplateRenderer)
    diffusion = make_renderer(RenderSettings(kind="diffusion", checkpoint=checkpoint, size=64, steps=1))
    assert isinstance(diffusion, DiffusionRenderer) and diffusion.steps == 1
    with pytest.raises(ConfigError, match="render.checkpoint"):
        load_settings(render={"kind": "diffusion"})
    with pytest.raises(RendererLoadError, match="no model_index.json"):
        DiffusionRenderer(tmp_path)


def test_prompt_words_and_canny_helper() -> None:
    assert "blue and white diagonal striped background" in describe(PROMPT)
    assert "product on the left" in describe(PROMPT) and "bold style" in describe(PROMPT)
    square = np.zeros((32, 32))
    square[8:24, 8:24] = 1.0
    edges = canny(square)
    assert edges[8:24, 6:10].any(axis=1).all() and not edges[12:20, 12:20].any()
