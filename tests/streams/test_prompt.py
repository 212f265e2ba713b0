"""The creative prompt: canonical text form and strict parser."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.contracts.prompt import CreativePrompt, PromptError, parse_prompt, random_prompt


@given(st.integers(0, 2**32))
def test_random_prompts_round_trip_through_text(seed: int) -> None:
    prompt = random_prompt(random.Random(seed))
    assert parse_prompt(prompt.to_text()) == prompt


def test_canonical_text_is_stable() -> None:
    prompt = CreativePrompt("gradient", ("blue", "white"), "left", 0.6, "Summer sale", ("bold", "minimal"))
    assert prompt.to_text() == (
        'background=gradient; palette=blue,white; position=left; scale=0.6; copy="Summer sale"; style=bold,minimal'
    )


GOOD = 'background=dots; palette=red,white; position=center; scale=0.5; copy="Sale"; style=bold'


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (GOOD.replace("dots", "plasma"), "background"),
        (GOOD.replace("red,white", "red"), "palette"),
        (GOOD.replace("red,white", "red,mauve"), "palette"),
        (GOOD.replace("center", "middle"), "position"),
        (GOOD.replace("0.5", "0.55"), "scale"),
        (GOOD.replace("0.5", "big"), "scale"),
        (GOOD.replace('"Sale"', "Sale"), "copy"),
        (GOOD.replace("Sale", "x" * 30), "copy"),
        (GOOD.replace("style=bold", "style=bold,bold"), "style"),
        (GOOD.replace("style=bold", "style=minimal,bold"), "style"),
        (GOOD.replace("style=bold", "style=shiny"), "style"),
        (GOOD.replace("; style=bold", ""), "<prompt>"),
        (GOOD.replace("position=", "pos="), "position"),
    ],
)
def test_parser_names_the_bad_field(text: str, field: str) -> None:
    with pytest.raises(PromptError) as err:
        parse_prompt(text)
    assert err.value.field == field


@given(st.text(max_size=120))
def test_parser_only_raises_prompt_error(text: str) -> None:
    try:
        parse_prompt(text)
    except PromptError:
        pass


def test_attributes_are_discrete_and_named() -> None:
    attrs = parse_prompt(GOOD).attributes()
    assert attrs == {
        "background": "dots", "primary": "red", "secondary": "white",
        "position": "center", "scale": "0.5", "copy": "yes",
    }
