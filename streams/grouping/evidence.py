"""Which click evidence a split test reads: per-creative profiles and profiles over the creatives' visual attributes.

A creative is described by ``name=value`` tokens (``CreativePrompt.attribute_tokens()``:
``background=dots``, ``primary=red``, ``scale=0.6``, ``style=bold``, …). Every
token name is a *field*. A name that a creative carries at most once
(``primary``) is a categorical field with one column per value, plus
``missing`` for creatives without it; a name a creative may carry several
times (``style``) gives one yes/no field per token. Each creative falls in
exactly one column of every field, so clicks pooled over a field's columns
are pooled across creatives and products of the category: a taste for red
shows in every red creative, not only in one creative's few clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EVIDENCE_KINDS = ("creatives", "attributes", "both")
"""``GroupingConfig.evidence``: per-creative profiles, attribute profiles, or both (Bonferroni over the tests)."""


@dataclass(frozen=True)
class Evidence:
    """The tests a split runs: per creative, and one per attribute field.

    Attributes
    ----------
    per_creative
        Run the per-creative profile test.
    columns
        ``(creatives, columns)`` 0/1 matrix: the column of every field each creative falls in.
    fields
        ``(columns, fields)`` 0/1 matrix: the field of each column.
    names
        Name of each field (``primary``, ``style=bold``).
    appeal
        Also run the appeal test (one direction over the creatives: does a
        part's share follow the creatives' overall appeal; see
        :func:`~streams.grouping.statistics._log_p_appeal`).
    """

    per_creative: bool
    columns: np.ndarray
    fields: np.ndarray
    names: tuple[str, ...]
    appeal: bool = True

    @property
    def n_tests(self) -> int:
        """How many taste tests a split runs (the Bonferroni factor; the level test, where asked, adds one)."""
        return int(self.per_creative) + len(self.names) + int(self.appeal)


def creatives_only(n_creatives: int) -> Evidence:
    """Evidence with the per-creative test alone.

    >>> creatives_only(3).n_tests  # the per-creative test and the appeal test
    2
    """
    return Evidence(True, np.zeros((n_creatives, 0)), np.zeros((0, 0)), ())


def build_evidence(tokens: Sequence[Sequence[str] | None], kind: str = "both") -> Evidence:
    """The evidence of creatives described by ``tokens`` (``None``: not described).

    Parameters
    ----------
    tokens
        Per creative, its ``name=value`` tokens, or ``None`` when unknown.
    kind
        One of :data:`EVIDENCE_KINDS`. Without any described creative the
        attribute tests are left out and the per-creative test runs.

    Examples
    --------
    >>> ev = build_evidence([("primary=red", "style=bold", "style=dark"), ("primary=blue",), None])
    >>> ev.names
    ('primary', 'style=bold', 'style=dark')
    >>> ev.columns.astype(int).tolist()  # primary: blue, red, missing; bold: yes, no; dark: yes, no
    [[0, 1, 0, 1, 0, 1, 0], [1, 0, 0, 0, 1, 0, 1], [0, 0, 1, 0, 1, 0, 1]]
    """
    if kind not in EVIDENCE_KINDS:
        raise ValueError(f"evidence must be one of {EVIDENCE_KINDS}, got {kind!r}")
    described = [list(t) for t in tokens if t is not None]
    if kind == "creatives" or not described:
        return creatives_only(len(tokens))
    counts: dict[str, int] = {}
    for creative in described:
        seen: dict[str, int] = {}
        for token in creative:
            name = token.partition("=")[0]
            seen[name] = seen.get(name, 0) + 1
        for name, k in seen.items():
            counts[name] = max(counts.get(name, 0), k)
    field_columns: list[tuple[str, list[str]]] = []  # field name, its column labels
    for name in sorted(counts):
        if counts[name] == 1:
            values = sorted({t for c in described for t in c if t.partition("=")[0] == name})
            field_columns.append((name, values + [f"{name}=missing"]))
        else:
            for token in sorted({t for c in described for t in c if t.partition("=")[0] == name}):
                field_columns.append((token, [token, f"not {token}"]))
    n_columns = sum(len(labels) for _, labels in field_columns)
    columns = np.zeros((len(tokens), n_columns))
    fields = np.zeros((n_columns, len(field_columns)))
    start = 0
    for f, (field, labels) in enumerate(field_columns):
        fields[start : start + len(labels), f] = 1.0
        for c, described_as in enumerate(tokens):
            have = set(described_as or ())
            if labels[-1].startswith("not "):
                columns[c, start + (0 if field in have else 1)] = 1.0
            else:
                hit = [k for k, label in enumerate(labels[:-1]) if label in have]
                columns[c, start + (hit[0] if hit else len(labels) - 1)] = 1.0
        start += len(labels)
    return Evidence(kind == "both", columns, fields, tuple(name for name, _ in field_columns))
