"""The creative-prompt grammar as a prefix test, for constrained decoding.

:func:`prefix_ok` says whether a text can still be completed into a prompt
that :func:`infra.contracts.prompt.parse_prompt` accepts; :func:`complete` whether it
already is one. A decoder that only picks tokens keeping ``prefix_ok`` true,
and stops only when ``complete`` is true, always writes a valid prompt.

>>> prefix_ok("background=grad")
True
>>> prefix_ok("background=gravel")
False
>>> complete('background=solid; palette=red,white; position=left; scale=0.5; copy="Sale"; style=bold')
True
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

from infra.contracts.prompt import (
    BACKGROUNDS,
    COLORS,
    FIELDS,
    MAX_COPY_CHARS,
    MAX_STYLE_WORDS,
    POSITIONS,
    SCALES,
    STYLE_WORDS,
    PromptError,
    parse_prompt,
)

SEPARATOR = "; "
_COPY_CHAR = re.compile(r"[A-Za-z0-9 %!.,'&+-]")


def _closed_values() -> dict[str, frozenset[str]]:
    styles = [
        ",".join(combo)
        for k in range(MAX_STYLE_WORDS + 1)
        for combo in itertools.combinations(sorted(STYLE_WORDS), k)
    ]
    return {
        "background": frozenset(BACKGROUNDS),
        "palette": frozenset(f"{a},{b}" for a in COLORS for b in COLORS),
        "position": frozenset(POSITIONS),
        "scale": frozenset(str(s) for s in SCALES),
        "style": frozenset(styles),
    }


_VALUES = _closed_values()
_PREFIXES = {field: frozenset(v[:i] for v in values for i in range(len(v) + 1)) for field, values in _VALUES.items()}


def _copy_state(value: str) -> str:
    """``open`` (a prefix of a copy value), ``closed`` (a whole quoted copy) or ``bad``."""
    if not value:
        return "open"
    if value[0] != '"':
        return "bad"
    body = value[1:]
    closed = body.endswith('"')
    if closed:
        body = body[:-1]
    if '"' in body or len(body) > MAX_COPY_CHARS or not all(_COPY_CHAR.fullmatch(ch) for ch in body):
        return "bad"
    return "closed" if closed else "open"


def _value_complete(field: str, value: str) -> bool:
    if field == "copy":
        return _copy_state(value) == "closed"
    return value in _VALUES[field]


def _value_prefix(field: str, value: str) -> bool:
    if field == "copy":
        return _copy_state(value) != "bad"
    return value in _PREFIXES[field]


@lru_cache(maxsize=200_000)
def prefix_ok(text: str) -> bool:
    """True when ``text`` is the beginning of at least one valid canonical prompt."""
    position = 0
    for index, field in enumerate(FIELDS):
        head = f"{field}="
        rest = text[position:]
        if len(rest) <= len(head):
            return head.startswith(rest)
        if not rest.startswith(head):
            return False
        value_start = position + len(head)
        last = index == len(FIELDS) - 1
        if last:
            return _value_prefix(field, text[value_start:])
        end = text.find(";", value_start) if field != "copy" else _copy_end(text, value_start)
        if end < 0:  # the value is still being written
            return _value_prefix(field, text[value_start:])
        if not _value_complete(field, text[value_start:end]):
            return False
        separator = text[end : end + len(SEPARATOR)]
        if len(separator) < len(SEPARATOR):
            return SEPARATOR.startswith(separator)
        if separator != SEPARATOR:
            return False
        position = end + len(SEPARATOR)
    return False  # pragma: no cover - the loop returns at the last field


def _copy_end(text: str, start: int) -> int:
    """Index just past a closed quoted copy value starting at ``start``, or -1 while it is open."""
    if start >= len(text) or text[start] != '"':
        return -1 if start >= len(text) else start  # let the caller reject a value without quotes
    close = text.find('"', start + 1)
    return -1 if close < 0 else close + 1


@lru_cache(maxsize=200_000)
def complete(text: str) -> bool:
    """True when ``text`` is a whole canonical prompt (what :func:`~infra.contracts.prompt.parse_prompt` accepts)."""
    try:
        parsed = parse_prompt(text)
    except PromptError:
        return False
    return parsed.to_text() == text
