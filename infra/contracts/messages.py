"""Messages the stream worker emits: preference pairs, drift alerts, dead letters (JSON, schema-versioned).

Same rules as the input events in :mod:`infra.contracts.events`: frozen pydantic models,
unknown fields rejected, a ``schema`` version on the wire, one ``parse_*``
function per topic that raises :class:`infra.contracts.events.EventError` naming the bad
field. ``SCHEMA_VERSION`` here versions these messages, apart from the events.

>>> alert = DriftAlert(alert_id="a1", ts=5, group_id="lipstick/3", category="lipstick",
...     detector="adwin", ctr_before=0.02, ctr_after=0.1, n_observations=4000)
>>> parse_drift_alert(to_bytes(alert)) == alert
True
>>> letter = DeadLetter.from_error(EventError("ts", "missing"), b"{}", source_topic="osmf.clicks",
...     partition=0, offset=7, ts=9)
>>> parse_dead_letter(to_bytes(letter)).original
b'{}'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Annotated, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from infra.contracts.events import EventError, Id, Name, _first_error

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})
MAX_ORIGINAL_BYTES = 64 * 1024
"""Dead letters keep at most this many bytes of the original message (Kafka's default limit is 1 MB)."""

PromptText = Annotated[str, StringConstraints(min_length=1, max_length=512)]
TopicName = Annotated[str, StringConstraints(min_length=1, max_length=249)]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    ts: int = Field(ge=0, description="Event time the worker produced this at, epoch milliseconds.")
    schema_version: int = Field(SCHEMA_VERSION, alias="schema", description="Message contract version.")


class PreferencePair(_Message):
    """In one group, for one product, the winner creative's CTR beats the loser's with high probability.

    ``pair_id`` is :func:`pair_id` of (group, product, winner, loser, evidence level),
    so a pair re-sent after a restart carries the same id.
    """

    pair_id: Id
    group_id: Id
    category: Name
    product_id: Id
    winner_creative_id: Id
    loser_creative_id: Id
    winner_prompt: PromptText = Field(description="Canonical prompt text of the winner creative.")
    loser_prompt: PromptText = Field(description="Canonical prompt text of the loser creative.")
    winner_impressions: Count
    winner_clicks: Count
    loser_impressions: Count
    loser_clicks: Count
    winner_ctr: Rate
    loser_ctr: Rate
    prob_winner_better: Rate = Field(description="P(CTR_winner > CTR_loser) under Beta posteriors.")
    evidence_level: Count = Field(
        description="floor(log2(min(winner_impressions, loser_impressions) / min_impressions))."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.winner_creative_id == self.loser_creative_id:
            raise ValueError("winner_creative_id and loser_creative_id must differ")
        if self.winner_clicks > self.winner_impressions or self.loser_clicks > self.loser_impressions:
            raise ValueError("clicks cannot exceed impressions")
        return self


class DriftAlert(_Message):
    """A group's click-through rate changed: the detector saw a drift in its click stream."""

    alert_id: Id = Field(description="Deterministic: hash of category, group, detector, n_observations.")
    group_id: Id
    category: Name
    detector: Name = Field(description="Drift detector that fired, e.g. 'adwin'.")
    ctr_before: Rate = Field(description="Estimated CTR before the change.")
    ctr_after: Rate = Field(description="Estimated CTR after the change.")
    n_observations: Count = Field(description="Observations the group had fed when the alert fired.")


class DeadLetter(_Message):
    """A message the worker could not process, with the reason and the original bytes.

    On the wire ``original`` is standard base64 (RFC 4648 section 4, with padding).
    """

    source_topic: TopicName
    partition: Count
    offset: Count
    reason: Annotated[str, StringConstraints(max_length=2048)] = Field(description="What was wrong, and the fix.")
    field: Annotated[str, StringConstraints(max_length=256)] = Field(
        "<event>", description="Field that failed, dotted; '<event>' for the whole message."
    )
    original: Annotated[bytes, Field(max_length=MAX_ORIGINAL_BYTES)] = Field(
        description="The original message bytes, cut to MAX_ORIGINAL_BYTES."
    )

    @field_validator("original", mode="before")
    @classmethod
    def _decode_base64(cls, value: object, info: ValidationInfo) -> object:
        if info.mode != "json":
            return value
        if not isinstance(value, str):
            raise ValueError("must be a base64 string (RFC 4648, standard alphabet)")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64 ({exc})") from None

    @field_serializer("original", when_used="json")
    def _encode_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @classmethod
    def from_error(
        cls, error: EventError, original: bytes, *, source_topic: str, partition: int, offset: int, ts: int
    ) -> DeadLetter:
        """Dead letter for ``original`` that failed with ``error``; cuts ``original`` if it is too long.

        Examples
        --------
        >>> big = DeadLetter.from_error(EventError("<event>", "too big"), b"x" * 100_000,
        ...     source_topic="osmf.impressions", partition=1, offset=2, ts=3)
        >>> len(big.original), big.reason
        (65536, 'too big (original cut to its first 65536 of 100000 bytes)')
        """
        reason = error.reason
        if len(original) > MAX_ORIGINAL_BYTES:
            reason = f"{reason} (original cut to its first {MAX_ORIGINAL_BYTES} of {len(original)} bytes)"
            original = original[:MAX_ORIGINAL_BYTES]
        return cls(
            ts=ts,
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            reason=reason[:2048],
            field=error.field[:256],
            original=original,
        )


Message = PreferencePair | DriftAlert | DeadLetter
_M = TypeVar("_M", PreferencePair, DriftAlert, DeadLetter)


def pair_id(
    group_id: str, product_id: str, winner_creative_id: str, loser_creative_id: str, evidence_level: int
) -> str:
    """Deterministic id of a preference pair: 32 hex digits of a BLAKE2b hash of its key.

    >>> pair_id("g", "p", "a", "b", 0) == pair_id("g", "p", "a", "b", 0) != pair_id("g", "p", "b", "a", 0)
    True
    """
    return _digest(group_id, product_id, winner_creative_id, loser_creative_id, str(evidence_level))


def alert_id(category: str, group_id: str, detector: str, n_observations: int) -> str:
    """Deterministic id of a drift alert: 32 hex digits of a BLAKE2b hash of its key."""
    return _digest(category, group_id, detector, str(n_observations))


def to_bytes(message: Message) -> bytes:
    """Serialise a message to its JSON wire form."""
    return message.model_dump_json(by_alias=True).encode()


def dead_letter_bytes(error: EventError, original: bytes, *, source_topic: str, partition: int, offset: int) -> bytes:
    """The wire bytes of the dead letter for ``original`` read at ``source_topic[partition]@offset``, stamped now.

    The one way the worker and the learner build a dead letter.
    """
    letter = DeadLetter.from_error(
        error, original, source_topic=source_topic, partition=partition, offset=offset, ts=int(time.time() * 1000)
    )
    return to_bytes(letter)


def parse_pair(data: bytes) -> PreferencePair:
    """Parse wire bytes into a :class:`PreferencePair`, or raise :class:`EventError`."""
    return _parse(PreferencePair, data)


def parse_drift_alert(data: bytes) -> DriftAlert:
    """Parse wire bytes into a :class:`DriftAlert`, or raise :class:`EventError`."""
    return _parse(DriftAlert, data)


def parse_dead_letter(data: bytes) -> DeadLetter:
    """Parse wire bytes into a :class:`DeadLetter`, or raise :class:`EventError`."""
    return _parse(DeadLetter, data)


def _parse(model: type[_M], data: bytes) -> _M:
    try:
        message = model.model_validate_json(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    if message.schema_version not in SUPPORTED_SCHEMAS:
        raise EventError(
            "schema",
            f"unsupported version {message.schema_version}; this build reads {sorted(SUPPORTED_SCHEMAS)}",
        )
    return message


def _digest(*parts: str) -> str:
    # Unit separator between parts: ids cannot be shifted from one part into the next.
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()
