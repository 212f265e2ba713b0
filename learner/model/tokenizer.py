"""A byte-level BPE tokenizer trained offline on the texts the G-MLLM reads and writes.

Byte-level, so any text can be encoded (titles of worlds never seen, copy
lines); trained on the pre-training texts plus a sample of random creative
prompts, so prompts and group prefixes take few tokens. Wrapped in
:class:`transformers.PreTrainedTokenizerFast` and saved with the model.

>>> tokenizer = build_tokenizer(["task: write the creative prompt"] * 10, vocab_size=400)
>>> tokenizer.decode(tokenizer("yes").input_ids)
'yes'
>>> tokenizer.convert_ids_to_tokens(tokenizer("<image>").input_ids)
['<image>']
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from infra.contracts.prompt import BACKGROUNDS, COLORS, POSITIONS, STYLE_WORDS, random_prompt

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMAGE = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, IMAGE)


def prompt_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Random canonical prompts and the prompt vocabulary, so the tokenizer knows every field value."""
    rng = random.Random(f"tokenizer:{seed}")
    words = [*BACKGROUNDS, *COLORS, *POSITIONS, *STYLE_WORDS, "yes", "no"]
    return [random_prompt(rng).to_text() for _ in range(n)] + [" ".join(words)] * 20


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024, seed: int = 0):  # noqa: ANN201
    """Train a byte-level BPE on ``texts`` (plus :func:`prompt_corpus`) and wrap it for transformers.

    ``yes`` and ``no`` (the click answers) are guaranteed single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*texts, *prompt_corpus(seed=seed), *(["yes no"] * 50)]
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    for word in ("yes", "no"):
        if len(wrapped(word, add_special_tokens=False).input_ids) != 1:
            wrapped.add_tokens([word])
    return wrapped
