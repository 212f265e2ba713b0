"""Replay the public Taobao display-ad dataset as impressions and clicks.

Two input formats, told apart by their headers (file names do not matter):

* **joined** -- one file with ``clk,time_stamp,userid,adgroup_id,pid,cate_id,...``
  (raw_sample, user_profile and ad_feature already joined, as FuxiCTR ships it);
  ``time_stamp`` is ``YYYY-MM-DD HH:MM:SS`` in UTC (epoch seconds also accepted);
  ``click_sequence`` is a derived feature and is ignored.
* **raw** -- the three public files: ``raw_sample.csv`` (``user,time_stamp,
  adgroup_id,pid,nonclk,clk``, epoch seconds), ``user_profile.csv`` and
  ``ad_feature.csv``, joined here on user id and adgroup id. ``nonclk`` is ignored.

Each row becomes one :class:`~infra.contracts.events.Impression` (``event_id`` is
``tb-<file stem>-<line>``; ``creative_id`` is ``ad_<adgroup_id>`` since Taobao
shows one creative per ad; ``prompt`` is None, ``model_version`` "logged",
``placement`` the ``pid``), followed by a :class:`~infra.contracts.events.Click`
``click_delay_ms`` later when ``clk`` is 1 (the dataset has no click time).

Missing values: an empty user or product attribute (``pvalue_level`` and
``new_user_class_level`` are often empty), a ``brand`` of "NULL", and every user
attribute of a user absent from ``user_profile.csv`` become None; such users are
counted in :attr:`ReplayReport.missing_profiles`. Rows that cannot be replayed
(wrong column count, ``clk`` not 0/1, unparseable time, missing ids, adgroup
absent from ``ad_feature.csv``, values that fail the event contract) are listed
in :attr:`ReplayReport.bad_rows` with file, line and reason; the other rows
still come out. Blank lines are skipped.

Ordering: events are yielded in time order, assuming each joined file is
already sorted by time (the public joined files are); raw_sample rows are
sorted in memory (a few hundred bytes a row, plus the profile and ad tables:
several GB for the full 26M rows) unless ``sort_raw=False``. Events that still come out
of order are counted in :attr:`ReplayReport.out_of_order`.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import NamedTuple, TextIO, TypeVar

from pydantic import ValidationError

from infra.contracts.events import AttributeValue, Click, Impression

Event = Impression | Click
Row = dict[str, str]
Attrs = dict[str, AttributeValue]
T = TypeVar("T")

CLICK_DELAY_MS = 1_000
MODEL_VERSION = "logged"

JOINED = "joined"
RAW_SAMPLE = "raw_sample"
USER_PROFILE = "user_profile"
AD_FEATURE = "ad_feature"

#: Expected columns per format, in the order checked (joined contains the others' columns).
FORMATS: dict[str, tuple[str, ...]] = {
    JOINED: (
        "clk", "time_stamp", "userid", "adgroup_id", "pid", "cate_id", "campaign_id",
        "customer", "brand", "price", "cms_segid", "cms_group_id", "final_gender_code",
        "age_level", "pvalue_level", "shopping_level", "occupation",
        "new_user_class_level", "click_sequence",
    ),
    RAW_SAMPLE: ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"),
    USER_PROFILE: (
        "userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level",
        "pvalue_level", "shopping_level", "occupation", "new_user_class_level",
    ),
    AD_FEATURE: ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"),
}
_OPTIONAL_COLUMNS = frozenset({"click_sequence", "nonclk"})

#: Impression ``user`` attribute -> profile column.
USER_ATTRIBUTES: dict[str, str] = {
    "gender": "final_gender_code",
    "age_level": "age_level",
    "pvalue_level": "pvalue_level",
    "shopping_level": "shopping_level",
    "occupation": "occupation",
    "new_user_class_level": "new_user_class_level",
    "cms_segid": "cms_segid",
    "cms_group_id": "cms_group_id",
}
_GENDERS = {1: "male", 2: "female"}
_NULLS = frozenset({"", "NULL"})


class ReplayError(Exception):
    """A file cannot be replayed at all (missing, or a header of no known format)."""


class BadRow(NamedTuple):
    """A row that was not replayed: file name, 1-based line number, reason."""

    file: str
    line: int
    reason: str


@dataclass
class ReplayReport:
    """What a replay read and produced; complete once the event iterator is exhausted.

    ``rows_read`` counts data rows of the event files (joined and raw_sample), so
    ``rows_read == impressions + bad rows of those files``; ``bad_rows`` also lists
    bad rows of user_profile/ad_feature. ``missing_profiles`` counts distinct users
    absent from user_profile.
    """

    rows_read: int = 0
    impressions: int = 0
    clicks: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    missing_profiles: int = 0
    out_of_order: int = 0


class _Bad(ValueError):
    """Raised by row parsers; the message is the reason."""


@dataclass(frozen=True)
class _Source:
    path: Path
    kind: str
    header: tuple[str, ...]


class _Impression(NamedTuple):
    ts: int
    impression: Impression
    clicked: bool


class _RawRow(NamedTuple):
    ts: int
    line: int
    user: str
    adgroup_id: str
    pid: str
    clicked: bool


# --------------------------------------------------------------------------- API


def read_taobao(
    files: Iterable[Path | str],
    *,
    click_delay_ms: int = CLICK_DELAY_MS,
    sort_raw: bool = True,
) -> tuple[Iterator[Event], ReplayReport]:
    """Return the events of ``files`` in time order and the report they fill.

    Headers are checked now (raising :class:`ReplayError`); rows are read lazily,
    so the report is complete only once the iterator is exhausted.
    """
    if click_delay_ms <= 0:
        raise ValueError(f"click_delay_ms must be > 0 (a click follows its impression), got {click_delay_ms}")
    sources = [_detect(Path(f)) for f in files]
    if not sources:
        raise ReplayError(f"no files given; expected Taobao CSVs with a header of {_expected()}")
    kinds = {s.kind for s in sources}
    if RAW_SAMPLE in kinds or USER_PROFILE in kinds or AD_FEATURE in kinds:
        for needed in (RAW_SAMPLE, USER_PROFILE, AD_FEATURE):
            if needed not in kinds:
                given = ", ".join(str(s.path) for s in sources)
                raise ReplayError(
                    f"{given}: the raw format needs raw_sample, user_profile and ad_feature "
                    f"files; no {needed} file (header {','.join(FORMATS[needed])})"
                )
    report = ReplayReport()
    return _events(sources, report, click_delay_ms, sort_raw), report


def paced(
    events: Iterable[Event],
    speedup: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Event]:
    """Yield ``events`` so that wall-clock gaps are event-time gaps / ``speedup``.

    The schedule is anchored at the first event, so time spent by the consumer is
    not added on top. ``speedup`` 0 or infinity means as fast as possible; a
    negative (or NaN) one raises ValueError at once.
    """
    if math.isnan(speedup) or speedup < 0:
        raise ValueError(f"speedup must be >= 0 (0 or inf: no pacing), got {speedup}")
    if speedup == 0 or math.isinf(speedup):
        return iter(events)
    return _paced(events, speedup, clock, sleep)


def _paced(
    events: Iterable[Event], speedup: float, clock: Callable[[], float], sleep: Callable[[float], None],
) -> Iterator[Event]:
    start: tuple[float, int] | None = None
    for event in events:
        if start is None:
            start = (clock(), event.ts)
        else:
            delay = start[0] + (event.ts - start[1]) / 1000.0 / speedup - clock()
            if delay > 0:
                sleep(delay)
        yield event


# --------------------------------------------------------------------------- files


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _expected() -> str:
    return "; ".join(f"{kind}: {','.join(cols)}" for kind, cols in FORMATS.items())


def _detect(path: Path) -> _Source:
    """Read the header of ``path`` and tell its format, or raise :class:`ReplayError`."""
    try:
        with _open(path) as fh:
            first = next(csv.reader(fh), None)
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file; expected a Taobao CSV with a header of {_expected()}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReplayError(f"{path}: cannot read ({exc}); expected a Taobao CSV with a header of {_expected()}") from None
    header = tuple(col.strip() for col in first or ())
    for kind, columns in FORMATS.items():
        if set(columns) - _OPTIONAL_COLUMNS <= set(header):
            return _Source(path, kind, header)
    shown = ",".join(header) if header else "<empty file>"
    raise ReplayError(f"{path}: header {shown!r} matches no Taobao format; expected {_expected()}")


def _rows(source: _Source, report: ReplayReport) -> Iterator[tuple[int, Row]]:
    """Yield (line, row by column name); rows of the wrong width go to the report."""
    width = len(source.header)
    with _open(source.path) as fh:
        reader = csv.reader(fh)
        next(reader, None)
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                _bad(report, source, reader.line_num, f"unreadable CSV ({exc})")
                continue
            except UnicodeDecodeError as exc:
                raise ReplayError(f"{source.path}: not UTF-8 after line {reader.line_num} ({exc})") from None
            if not values:
                continue
            if source.kind in (JOINED, RAW_SAMPLE):
                report.rows_read += 1
            if len(values) != width:
                _bad(report, source, reader.line_num, f"{len(values)} columns, expected {width}")
                continue
            yield reader.line_num, {k: v.strip() for k, v in zip(source.header, values)}


def _bad(report: ReplayReport, source: _Source, line: int, reason: str) -> None:
    report.bad_rows.append(BadRow(source.path.name, line, reason))


def _event_id(source: _Source, line: int) -> str:
    stem = source.path.name.split(".")[0][:96]  # keeps event_id within its 128 characters
    return f"tb-{stem}-{line}"


# --------------------------------------------------------------------------- values


def _required(row: Row, column: str) -> str:
    value = row[column]
    if value in _NULLS:
        raise _Bad(f"missing {column}")
    return value


def _clicked(row: Row) -> bool:
    text = row["clk"]
    try:
        value = int(text)
    except ValueError:
        raise _Bad(f"clk {text!r} is not a number") from None
    if value not in (0, 1):
        raise _Bad(f"clk {value} is not 0 or 1")
    return value == 1


def _ts_ms(row: Row) -> int:
    """``time_stamp`` as epoch ms: epoch seconds, or ``YYYY-MM-DD HH:MM:SS`` in UTC."""
    text = _required(row, "time_stamp")
    if text.isdigit():
        return int(text) * 1000
    try:
        moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise _Bad(f"time_stamp {text!r} is neither epoch seconds nor YYYY-MM-DD HH:MM:SS") from None
    ms = int(moment.timestamp()) * 1000
    if ms < 0:
        raise _Bad(f"time_stamp {text!r} is before 1970")
    return ms


def _opt_int(row: Row, column: str) -> int | None:
    text = row[column]
    if text in _NULLS:
        return None
    try:
        number = float(text)
    except ValueError:
        raise _Bad(f"{column} {text!r} is not a number") from None
    if not number.is_integer():
        raise _Bad(f"{column} {text!r} is not an integer")
    return int(number)


def _opt_float(row: Row, column: str) -> float | None:
    text = row[column]
    if text in _NULLS:
        return None
    try:
        number = float(text)
    except ValueError:
        raise _Bad(f"{column} {text!r} is not a number") from None
    if not math.isfinite(number):
        raise _Bad(f"{column} {text!r} is not finite")
    return number


def _opt_str(row: Row, column: str) -> str | None:
    text = row[column]
    return None if text in _NULLS else text


def _user_attrs(row: Row) -> Attrs:
    """Profile columns -> readable user attributes (gender "male"/"female")."""
    attrs: Attrs = {name: _opt_int(row, column) for name, column in USER_ATTRIBUTES.items()}
    code = _opt_int(row, "final_gender_code")
    if code is not None and code not in _GENDERS:
        raise _Bad(f"final_gender_code {code} is not 1 (male) or 2 (female)")
    attrs["gender"] = None if code is None else _GENDERS[code]
    return attrs


def _no_profile() -> Attrs:
    return dict.fromkeys(USER_ATTRIBUTES)


def _category(row: Row) -> str:
    return f"cate_{_required(row, 'cate_id')}"


def _product_attrs(row: Row) -> Attrs:
    return {
        "price": _opt_float(row, "price"),
        "brand": _opt_str(row, "brand"),
        "campaign_id": _opt_str(row, "campaign_id"),
        "customer": _opt_str(row, "customer"),
    }


def _impression(
    event_id: str, ts: int, user_id: str, user: Attrs, adgroup_id: str,
    category: str, product: Attrs, pid: str,
) -> Impression:
    """Build the impression; a contract violation becomes a :class:`_Bad` reason."""
    try:
        return Impression(
            event_id=event_id, ts=ts, user_id=user_id, user=user, product_id=adgroup_id,
            category=category, product=product, creative_id=f"ad_{adgroup_id}", prompt=None,
            model_version=MODEL_VERSION, placement=pid,
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in err["loc"])
        raise _Bad(f"violates the event contract at {where}: {err['msg']}") from None


def _click(impression: Impression, delay_ms: int) -> Click:
    return Click(
        event_id=f"{impression.event_id}-clk", ts=impression.ts + delay_ms,
        impression_id=impression.event_id, user_id=impression.user_id,
        product_id=impression.product_id, creative_id=impression.creative_id,
    )


# --------------------------------------------------------------------------- formats


def _joined(source: _Source, report: ReplayReport) -> Iterator[_Impression]:
    """Impressions of a joined file, in file order."""
    for line, row in _rows(source, report):
        try:
            clicked = _clicked(row)
            ts = _ts_ms(row)
            imp = _impression(
                _event_id(source, line), ts, _required(row, "userid"), _user_attrs(row),
                _required(row, "adgroup_id"), _category(row), _product_attrs(row),
                _required(row, "pid"),
            )
        except _Bad as exc:
            _bad(report, source, line, str(exc))
            continue
        yield _Impression(ts, imp, clicked)


def _table(
    sources: list[_Source], key: str, parse: Callable[[Row], T], report: ReplayReport,
) -> dict[str, T]:
    """Load user_profile or ad_feature rows keyed by ``key``; duplicates keep the first."""
    table: dict[str, T] = {}
    for source in sources:
        for line, row in _rows(source, report):
            try:
                ident = _required(row, key)
                if ident in table:
                    raise _Bad(f"duplicate {key} {ident}, first one kept")
                table[ident] = parse(row)
            except _Bad as exc:
                _bad(report, source, line, str(exc))
    return table


def _ad(row: Row) -> tuple[str, Attrs]:
    """An ad_feature row -> (category, product attributes)."""
    return _category(row), _product_attrs(row)


def _raw_rows(source: _Source, report: ReplayReport) -> Iterator[_RawRow]:
    for line, row in _rows(source, report):
        try:
            yield _RawRow(
                _ts_ms(row), line, _required(row, "user"), _required(row, "adgroup_id"),
                _required(row, "pid"), _clicked(row),
            )
        except _Bad as exc:
            _bad(report, source, line, str(exc))


def _raw(
    source: _Source, profiles: dict[str, Attrs], ads: dict[str, tuple[str, Attrs]],
    missing: set[str], report: ReplayReport, sort: bool,
) -> Iterator[_Impression]:
    """Impressions of a raw_sample file, joined with the profile and ad tables."""
    rows: Iterable[_RawRow] = _raw_rows(source, report)
    if sort:
        rows = sorted(rows, key=lambda r: (r.ts, r.line))
    for r in rows:
        ad = ads.get(r.adgroup_id)
        if ad is None:
            _bad(report, source, r.line, f"adgroup_id {r.adgroup_id} not in ad_feature")
            continue
        user = profiles.get(r.user)
        if user is None:
            user = _no_profile()
            if r.user not in missing:
                missing.add(r.user)
                report.missing_profiles += 1
        try:
            imp = _impression(
                _event_id(source, r.line), r.ts, r.user, user, r.adgroup_id, ad[0], ad[1], r.pid,
            )
        except _Bad as exc:
            _bad(report, source, r.line, str(exc))
            continue
        yield _Impression(r.ts, imp, r.clicked)


def _events(
    sources: list[_Source], report: ReplayReport, click_delay_ms: int, sort_raw: bool,
) -> Iterator[Event]:
    """Merge all impression streams by time and interleave the clicks."""
    streams: list[Iterator[_Impression]] = [_joined(s, report) for s in sources if s.kind == JOINED]
    samples = [s for s in sources if s.kind == RAW_SAMPLE]
    if samples:
        profiles = _table([s for s in sources if s.kind == USER_PROFILE], "userid", _user_attrs, report)
        ads = _table([s for s in sources if s.kind == AD_FEATURE], "adgroup_id", _ad, report)
        missing: set[str] = set()
        streams.extend(_raw(s, profiles, ads, missing, report, sort_raw) for s in samples)
    pending: list[tuple[int, int, Click]] = []
    seq = count()
    last_ts = -1
    for item in heapq.merge(*streams, key=lambda i: i.ts):
        while pending and pending[0][0] <= item.ts:
            yield _emit(heapq.heappop(pending)[2], report)
        if item.ts < last_ts:
            report.out_of_order += 1
        last_ts = item.ts
        yield _emit(item.impression, report)
        if item.clicked:
            click = _click(item.impression, click_delay_ms)
            heapq.heappush(pending, (click.ts, next(seq), click))
    while pending:
        yield _emit(heapq.heappop(pending)[2], report)


def _emit(event: Event, report: ReplayReport) -> Event:
    if isinstance(event, Click):
        report.clicks += 1
    else:
        report.impressions += 1
    return event
