"""The G-MLLM: a group-aware multimodal language model that writes creative prompts.

A :class:`transformers.LlavaForConditionalGeneration` (CLIP-style vision tower,
LLaVA projector, Llama-family language model) and its
:class:`transformers.LlavaProcessor`. Embedded default: a tiny model built
from :class:`infra.settings.ModelSettings` with a byte-level BPE tokenizer
trained offline; production: any local LLaVA-style checkpoint directory
(``learner.model.base_checkpoint``). It reads the group's text prefix, the
product image and the product text (:mod:`learner.model.inputs`) and

* writes a creative prompt (:meth:`GMLLM.generate`), constrained by the prompt
  grammar so that what it emits parses (:mod:`learner.model.grammar`);
* predicts whether a group clicks a creative (:meth:`GMLLM.click_probability`).

Model and processor are plain transformers objects, usable as they are by
TRL's ``DPOTrainer`` (``processing_class=gmllm.processor``).

>>> from infra.settings import ModelSettings
>>> from learner.data import ProductRecord
>>> tiny = ModelSettings(vocab_size=400, hidden_size=32, layers=1, heads=2, intermediate_size=64,
...                      vision_hidden_size=16, vision_layers=1, image_size=16, patch_size=8)
>>> gmllm = GMLLM.build(tiny, corpus=["group mugs/g0"], seed=0)
>>> out = gmllm.generate("group mugs/g0", ProductRecord("p1", "mugs", "Mug", 9.0), n=2, seed=1, max_new_tokens=80)
>>> all(g.prompt is not None for g in out)  # constrained decoding: even an untrained model writes valid prompts
True
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.settings import ModelSettings
from learner.data import ProductRecord
from features.group import GroupFeatures
from learner.model import grammar
from learner.model.artifact import ARTIFACT_FORMAT, read_info, verify_artifact, write_artifact
from learner.model.inputs import IMAGE_TOKEN, NO, YES, task_input, task_segments
from infra.contracts.prompt import CreativePrompt, PromptError, parse_prompt

PROMPT_FORMAT = "infra.contracts.prompt/canonical-v1"
"""Identifier of the output format (the canonical prompt text of ``infra/contracts/prompt.py``)."""
CANDIDATES_CHECKED = 64
"""Constrained decoding checks this many most likely tokens before scanning the whole vocabulary."""


@dataclass(frozen=True)
class Generation:
    """One sampled creative prompt: the decoded text and, when it parses, the prompt."""

    text: str
    prompt: CreativePrompt | None
    constrained: bool

    @property
    def valid(self) -> bool:
        """True when the text is a canonical prompt."""
        return self.prompt is not None


class GMLLM:
    """The group-aware multimodal LM with its processor (tokenizer + image processor).

    Parameters
    ----------
    model
        A ``LlavaForConditionalGeneration``.
    processor
        Its ``LlavaProcessor``; ``<image>`` must be a token of its tokenizer.
    info
        OSMF's description of the model (formats, training summary); saved as ``gmllm.json``.
    """

    def __init__(self, model: Any, processor: Any, info: dict[str, Any] | None = None) -> None:
        self.model = model
        self.processor = processor
        self.info = dict(info or {})
        tokenizer = processor.tokenizer
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.yes_id = _single_token(tokenizer, YES)
        self.no_id = _single_token(tokenizer, NO)
        self.image_tokens = _image_tokens(processor)
        self._token_text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self._special = set(tokenizer.all_special_ids)
        self._segment_ids: dict[str, list[int]] = {}
        self._pixels: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- building

    @classmethod
    def build(cls, settings: ModelSettings, corpus: Iterable[str] = (), seed: int = 0) -> GMLLM:
        """A fresh model: the tiny LLaVA from ``settings`` (tokenizer trained on ``corpus``), or the base checkpoint."""
        if settings.base_checkpoint is not None:
            return cls.from_checkpoint(settings.base_checkpoint)
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from learner.model.tokenizer import build_tokenizer

        _quiet_transformers()
        tokenizer = build_tokenizer(corpus, vocab_size=settings.vocab_size, seed=seed)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": settings.image_size},
            crop_size={"height": settings.image_size, "width": settings.image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=settings.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        vision = CLIPVisionConfig(
            hidden_size=settings.vision_hidden_size,
            intermediate_size=4 * settings.vision_hidden_size,
            num_hidden_layers=settings.vision_layers,
            num_attention_heads=4,
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            projection_dim=settings.vision_hidden_size,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden_size,
            intermediate_size=settings.intermediate_size,
            num_hidden_layers=settings.layers,
            num_attention_heads=settings.heads,
            num_key_value_heads=settings.heads,
            max_position_embeddings=settings.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.eval()
        return cls(model, processor, {"base": "tiny-from-config", "model_settings": settings.model_dump(mode="json")})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> GMLLM:
        """A LLaVA-style checkpoint from a local directory (safetensors only, no remote code, offline)."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        _quiet_transformers()
        root = Path(path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root}: no config.json; give a local LLaVA-style checkpoint directory")
        model = LlavaForConditionalGeneration.from_pretrained(
            root, use_safetensors=True, local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
        processor = AutoProcessor.from_pretrained(root, local_files_only=True, trust_remote_code=False)
        model.eval()
        return cls(model, processor, {"base": str(root)})

    # ---------------------------------------------------------------- artifact

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the model as a verified artifact directory (see :mod:`learner.model.artifact`)."""
        info = {
            **self.info,
            "kind": "osmf-gmllm",
            "artifact_format": ARTIFACT_FORMAT,
            "prompt_format": PROMPT_FORMAT,
            "image_tokens": self.image_tokens,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.processor.save_pretrained(tmp)

        _quiet_transformers()
        return write_artifact(directory, write, info)

    @classmethod
    def load(cls, directory: str | Path) -> GMLLM:
        """Load an artifact after checking every file against its manifest (refuses pickles and tampering)."""
        verify_artifact(directory)
        gmllm = cls.from_checkpoint(directory)
        gmllm.info = read_info(directory)
        return gmllm

    # ---------------------------------------------------------------- encoding

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    def encode(self, segments: Sequence[str]) -> list[int]:
        """Token ids of an input given as lines; ``<image>`` becomes the vision tower's patch tokens.

        Lines end in a newline, so encoding them one by one gives the ids of
        the joined text (what the LLaVA processor produces); ids are cached per line.
        """
        ids: list[int] = []
        for segment in segments:
            cached = self._segment_ids.get(segment)
            if cached is None:
                if segment == IMAGE_TOKEN + "\n":
                    cached = [self.image_token_id] * self.image_tokens + self._ids("\n")
                else:
                    cached = self._ids(segment)
                self._segment_ids[segment] = cached
            ids.extend(cached)
        return ids

    def encode_completion(self, text: str) -> list[int]:
        """Ids of a completion (a prompt or a description) followed by EOS."""
        return self._ids(text) + [self.eos_id]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def pixel_values(self, product: ProductRecord) -> torch.Tensor:
        """The product image as the vision tower's input, ``(3, S, S)`` (cached per product id)."""
        cached = self._pixels.get(product.id)
        if cached is None:
            processed = self.processor.image_processor(images=[product.rgb_image()], return_tensors="pt")
            cached = self._pixels[product.id] = processed["pixel_values"][0]
        return cached

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def click_probability(
        self,
        items: Sequence[tuple[GroupFeatures | str, ProductRecord, str]],
        batch_size: int = 64,
    ) -> np.ndarray:
        """P(the group clicks) for each ``(group, product, prompt text)``: the model's yes/(yes+no) answer."""
        self.model.eval()
        scores = np.zeros(len(items), dtype=np.float64)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            sequences = [self.encode(task_segments("click", group=g, product=p, creative=c)) for g, p, c in chunk]
            pixels = torch.stack([self.pixel_values(p) for _, p, _ in chunk])
            logits = self.answer_logits(sequences, pixels)
            pair = torch.log_softmax(logits[:, [self.yes_id, self.no_id]].float(), dim=-1)
            scores[start : start + len(chunk)] = pair[:, 0].exp().numpy()
        return scores

    def click_loss(self, sequences: list[list[int]], pixels: torch.Tensor | None, targets: Sequence[float]) -> torch.Tensor:
        """Soft yes/no cross-entropy of the click answer against click shares ``targets`` (with gradients)."""
        logits = self.answer_logits(sequences, pixels)
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(list(targets), dtype=torch.float32)
        return -(target * logp[:, self.yes_id] + (1 - target) * logp[:, self.no_id]).mean()

    @torch.no_grad()
    def completion_logprobs(
        self,
        items: Sequence[tuple[GroupFeatures | str, ProductRecord, str]],
        batch_size: int = 32,
    ) -> np.ndarray:
        """``log p(completion + EOS | generation input)`` for each ``(group, product, completion text)``.

        The generation input is the one Group-DPO trains on, so the difference
        of two models' values is the implicit reward of DPO (divided by β).
        """
        self.model.eval()
        out = np.zeros(len(items), dtype=np.float64)
        for start in range(0, len(items), batch_size):
            input_ids, attention, pixels, mask = self.completion_batch(items[start : start + batch_size])
            logits = self.model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels,
                                use_cache=False).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            out[start : start + len(mask)] = (logps * mask).sum(dim=1).double().numpy()
        return out

    def completion_batch(
        self, items: Sequence[tuple[GroupFeatures | str, ProductRecord, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs of ``(group, product, completion text)`` items: ``(input_ids, attention_mask,
        pixel_values, completion_mask)``; ``completion_mask[r, i]`` is 1 where the logits at position ``i``
        predict a completion token (or its EOS) of row ``r``."""
        prompts = [self.encode(task_segments("generate", group=g, product=p)) for g, p, _ in items]
        targets = [self.encode_completion(text) for _, _, text in items]
        input_ids, attention = self.pad([a + b for a, b in zip(prompts, targets, strict=True)])
        mask = torch.zeros((len(items), input_ids.shape[1] - 1), dtype=torch.float32)
        for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            first = len(prompt) - 1  # logits at position i predict token i + 1
            mask[row, first : first + len(target)] = 1.0
        pixels = torch.stack([self.pixel_values(p) for _, p, _ in items])
        return input_ids, attention, pixels, mask

    def copy(self) -> GMLLM:
        """An independent copy of the weights (the processor is shared: it is not trained).

        Built from the config and the state dict rather than ``deepcopy``: a
        model a trainer has prepared carries a wrapped ``forward`` bound to the
        original module, which a deep copy would keep calling.
        """
        import copy as _copy

        clone = type(self.model)(self.model.config)
        clone.load_state_dict(self.model.state_dict())
        clone.generation_config = _copy.deepcopy(self.model.generation_config)
        clone.eval()
        return GMLLM(clone, self.processor, dict(self.info))

    def answer_logits(self, sequences: list[list[int]], pixels: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits after each (right-padded) input sequence, ``(batch, vocab)``."""
        input_ids, attention = self.pad(sequences)
        out = self.model(input_ids=input_ids, attention_mask=attention, pixel_values=pixels, use_cache=False)
        last = attention.sum(dim=1) - 1
        return out.logits[torch.arange(len(sequences)), last]

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to one tensor; returns ``(input_ids, attention_mask)``."""
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[row, : len(seq)] = 1
        return input_ids, attention

    @torch.no_grad()
    def generate(
        self,
        group: GroupFeatures | str,
        product: ProductRecord,
        *,
        n: int = 1,
        seed: int = 0,
        temperature: float = 1.0,
        constrained: bool = True,
        max_new_tokens: int = 64,
    ) -> list[Generation]:
        """Sample ``n`` creative prompts for ``group`` and ``product``.

        The same weights, inputs and ``seed`` give the same prompts. With
        ``constrained`` only tokens that keep the text a valid prompt prefix
        are allowed and EOS only once it is complete; without it the raw
        samples are returned (their parse rate is what the model learned).
        ``temperature`` 0 decodes greedily.
        """
        self.model.eval()
        prompt_ids = self.encode(task_segments("generate", group=group, product=product))
        input_ids = torch.tensor([prompt_ids] * n, dtype=torch.long)
        pixels = self.pixel_values(product).unsqueeze(0).expand(n, -1, -1, -1).contiguous()
        generator = torch.Generator().manual_seed(seed)
        out = self.model(input_ids=input_ids, pixel_values=pixels, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
        tokens: list[list[int]] = [[] for _ in range(n)]
        texts = [""] * n
        done = [False] * n
        for _ in range(max_new_tokens):
            logits = logits.float()
            if constrained:
                logits = self._constrain(logits, texts, done)
            if temperature <= 0:
                chosen = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            for row in range(n):
                if done[row]:
                    chosen[row] = self.pad_id
                    continue
                token = int(chosen[row])
                if token == self.eos_id:
                    done[row] = True
                else:
                    tokens[row].append(token)
                    texts[row] += self._token_text[token]
            if all(done):
                break
            out = self.model(input_ids=chosen.unsqueeze(1), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
        return [Generation(text, _parse(text), constrained) for text in texts]

    def _constrain(self, logits: torch.Tensor, texts: list[str], done: list[bool]) -> torch.Tensor:
        """Mask every token that would make a row's text stop being a valid prompt prefix."""
        masked = torch.full_like(logits, float("-inf"))
        top = torch.topk(logits, min(CANDIDATES_CHECKED, logits.shape[1]), dim=-1).indices.tolist()
        for row, text in enumerate(texts):
            if done[row]:
                masked[row, self.pad_id] = 0.0
                continue
            allowed = [t for t in top[row] if self._allowed(text, t)]
            if not allowed:
                allowed = [t for t in range(logits.shape[1]) if self._allowed(text, t)]
            if not allowed:  # cannot happen for a valid prefix; end the row rather than loop
                allowed = [self.eos_id]
            index = torch.tensor(allowed)
            masked[row, index] = logits[row, index]
        return masked

    def _allowed(self, text: str, token: int) -> bool:
        if token == self.eos_id:
            return grammar.complete(text)
        if token in self._special:
            return False
        piece = self._token_text[token]
        return bool(piece) and grammar.prefix_ok(text + piece)

    def describe(self, task: str, *, group: GroupFeatures | str | None = None, product: ProductRecord | None = None,
                 max_new_tokens: int = 96) -> str:
        """Greedy answer of the group-analysis or product-comprehension task (for inspection)."""
        if task not in ("group", "product"):
            raise ValueError("describe answers the 'group' and 'product' tasks; use generate / click_probability")
        ids = self.encode(task_segments(task, group=group, product=product))
        pixels = self.pixel_values(product).unsqueeze(0) if product is not None and task == "product" else None
        out: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=torch.tensor([ids + out]), pixel_values=pixels).logits[0, -1]
                token = int(logits.argmax())
                if token == self.eos_id:
                    break
                out.append(token)
        return "".join(self._token_text[t] for t in out)

    def input_text(self, task: str, **kwargs: Any) -> str:
        """The text input of ``task`` (with one ``<image>`` placeholder), as a TRL dataset holds it."""
        return task_input(task, **kwargs)


def _parse(text: str) -> CreativePrompt | None:
    try:
        prompt = parse_prompt(text)
    except PromptError:
        return None
    return prompt if prompt.to_text() == text else None


def _single_token(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {word!r} into {len(ids)} tokens; the click answer needs one")
    return int(ids[0])


def _image_tokens(processor: Any) -> int:
    size = processor.image_processor.crop_size
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    count = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return int(count)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
