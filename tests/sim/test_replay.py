"""Taobao replay: both input formats, missing values, bad rows, errors, pacing."""

from __future__ import annotations

import csv
import gzip
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.replay import BadRow, ReplayError, paced, read_taobao
from infra.contracts.events import Click, Impression, parse_event, to_bytes

Event = Impression | Click
REPO = Path(__file__).resolve().parents[2]
SAMPLE_NAMES = ("fuxictr_taobao_train_sample.csv", "fuxictr_taobao_test_sample.csv")


def _samples_dir() -> Path:
    candidates = [REPO / "shared/data/taobao", REPO.parent / "shared/data/taobao"]
    if "OSMF_TAOBAO_DIR" in os.environ:
        candidates.insert(0, Path(os.environ["OSMF_TAOBAO_DIR"]))
    for path in candidates:
        if all((path / name).is_file() for name in SAMPLE_NAMES):
            return path
    pytest.skip(f"Taobao samples not found in {[str(c) for c in candidates]} (set OSMF_TAOBAO_DIR)")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _impressions(events: list[Event]) -> list[Impression]:
    return [e for e in events if isinstance(e, Impression)]


def _clicks(events: list[Event]) -> list[Click]:
    return [e for e in events if isinstance(e, Click)]


def _check_stream(events: list[Event]) -> None:
    """Ids unique, time order, every click after the impression it names."""
    assert len({e.event_id for e in events}) == len(events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    seen: dict[str, Impression] = {}
    for event in events:
        if isinstance(event, Impression):
            seen[event.event_id] = event
        else:
            imp = seen[event.impression_id]
            assert event.ts > imp.ts
            assert (event.user_id, event.product_id, event.creative_id) == (
                imp.user_id, imp.product_id, imp.creative_id,
            )


# --------------------------------------------------------------------------- joined samples


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_gives_one_impression_per_row_and_a_click_per_clk(name: str) -> None:
    path = _samples_dir() / name
    with path.open(newline="") as fh:
        clk_sum = sum(int(row["clk"]) for row in csv.DictReader(fh))
    stream, report = read_taobao([path])
    events = list(stream)
    assert len(_impressions(events)) == 100
    assert len(_clicks(events)) == clk_sum
    assert (report.rows_read, report.impressions, report.clicks) == (100, 100, clk_sum)
    assert report.bad_rows == [] and report.missing_profiles == 0 and report.out_of_order == 0
    _check_stream(events)


def test_sample_row_mapping() -> None:
    path = _samples_dir() / "fuxictr_taobao_test_sample.csv"
    stream, _ = read_taobao([path])
    first = next(stream)
    # 0,2017-05-06 00:00:00,874257,172298,430548_1007,5443,160194,864,339907,3.9,0,3,2,3,,3,0,,
    assert first == Impression(
        event_id="tb-fuxictr_taobao_test_sample-2", ts=1494028800000, user_id="874257",
        user={
            "gender": "female", "age_level": 3, "pvalue_level": None, "shopping_level": 3,
            "occupation": 0, "new_user_class_level": None, "cms_segid": 0, "cms_group_id": 3,
        },
        product_id="172298", category="cate_5443",
        product={"price": 3.9, "brand": "339907", "campaign_id": "160194", "customer": "864"},
        creative_id="ad_172298", prompt=None, model_version="logged", placement="430548_1007",
    )


def test_both_samples_merge_in_time_order_and_round_trip() -> None:
    d = _samples_dir()
    stream, report = read_taobao([d / n for n in SAMPLE_NAMES])
    events = list(stream)
    assert report.impressions == 200 and report.bad_rows == []
    _check_stream(events)
    for event in events:
        assert parse_event(to_bytes(event)) == event


# --------------------------------------------------------------------------- raw three files

RAW_SAMPLE = """user,time_stamp,adgroup_id,pid,nonclk,clk
581738,1494137644,1,430548_1007,1,0
449818,1494638778,3,430548_1007,0,1
914836,1494650879,4,430548_1007,1,0
999999,1494000000,1,430539_1007,0,1
"""
# The public file's last header has a trailing space (kept explicit here).
USER_PROFILE = (
    "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,"
    "occupation,new_user_class_level \n"
) + """581738,0,1,2,1,,3,0,
449818,5,3,1,2,2,3,0,4
914836,0,8,1,2,3,3,1,2
"""
AD_FEATURE = """adgroup_id,cate_id,campaign_id,customer,brand,price
1,6406,83237,1,95471,170.0
3,1665,167959,3,NULL,2000.0
4,7655,200000,4,NULL,60.0
"""


def _raw_files(tmp_path: Path, sample: str = RAW_SAMPLE) -> list[Path]:
    # Names say nothing and the order is shuffled: the header decides.
    return [
        _write(tmp_path / "b.csv", AD_FEATURE),
        _write(tmp_path / "raw_sample.csv", sample),
        _write(tmp_path / "a.csv", USER_PROFILE),
    ]


def test_raw_files_are_joined_sorted_and_missing_values_are_none(tmp_path: Path) -> None:
    stream, report = read_taobao(_raw_files(tmp_path))
    events = list(stream)
    _check_stream(events)
    imps = {e.user_id: e for e in _impressions(events)}
    assert [e.user_id for e in _impressions(events)] == ["999999", "581738", "449818", "914836"]
    a = imps["581738"]
    assert a.event_id == "tb-raw_sample-2" and a.ts == 1494137644000
    assert a.user == {
        "gender": "female", "age_level": 1, "pvalue_level": None, "shopping_level": 3,
        "occupation": 0, "new_user_class_level": None, "cms_segid": 0, "cms_group_id": 1,
    }
    assert (a.product_id, a.category, a.creative_id, a.placement) == ("1", "cate_6406", "ad_1", "430548_1007")
    assert a.product == {"price": 170.0, "brand": "95471", "campaign_id": "83237", "customer": "1"}
    assert imps["449818"].product["brand"] is None
    assert imps["449818"].user["gender"] == "male" and imps["449818"].user["new_user_class_level"] == 4
    assert imps["999999"].user == dict.fromkeys(imps["581738"].user)
    assert sorted(c.impression_id for c in _clicks(events)) == ["tb-raw_sample-3", "tb-raw_sample-5"]
    assert (report.rows_read, report.impressions, report.clicks) == (4, 4, 2)
    assert report.missing_profiles == 1 and report.bad_rows == []
    for event in events:
        assert parse_event(to_bytes(event)) == event


def test_raw_sample_without_companions_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no user_profile file"):
        read_taobao(_raw_files(tmp_path)[1:2] + _raw_files(tmp_path)[:1])


def test_raw_bad_rows_are_reported(tmp_path: Path) -> None:
    sample = RAW_SAMPLE + "581738,1494137645,77,430548_1007,1,0\n581738,notatime,1,430548_1007,1,0\n"
    files = _raw_files(tmp_path, sample)
    _write(files[2], USER_PROFILE + "581738,0,1,2,1,,3,0,\n123,0,1,9,1,,3,0,\n")
    stream, report = read_taobao(files)
    assert len(_impressions(list(stream))) == 4
    assert report.rows_read == 6
    assert report.bad_rows == [
        BadRow("a.csv", 5, "duplicate userid 581738, first one kept"),
        BadRow("a.csv", 6, "final_gender_code 9 is not 1 (male) or 2 (female)"),
        BadRow("raw_sample.csv", 7, "time_stamp 'notatime' is neither epoch seconds nor YYYY-MM-DD HH:MM:SS"),
        BadRow("raw_sample.csv", 6, "adgroup_id 77 not in ad_feature"),
    ]


# --------------------------------------------------------------------------- bad joined rows

JOINED_HEADER = (
    "clk,time_stamp,userid,adgroup_id,pid,cate_id,campaign_id,customer,brand,price,cms_segid,"
    "cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
    "new_user_class_level,click_sequence\n"
)
GOOD = "{clk},2017-05-06 00:00:0{s},874257,172298,430548_1007,5443,160194,864,NULL,3.9,0,3,2,3,,3,0,,\n"


def test_bad_joined_rows_are_reported_and_good_rows_still_come_out(tmp_path: Path) -> None:
    rows = [
        GOOD.format(clk=0, s=0),                                                      # line 2
        "0,2017-05-06 00:00:00,874257,172298\n",                                      # 3
        GOOD.format(clk="x", s=0),                                                    # 4
        GOOD.format(clk=2, s=0),                                                      # 5
        GOOD.format(clk=1, s=0).replace("2017-05-06 00:00:00", "yesterday"),          # 6
        GOOD.format(clk=1, s=0).replace("874257", ""),                                # 7
        GOOD.format(clk=1, s=0).replace(",5443,", ",,"),                              # 8
        GOOD.format(clk=1, s=0).replace(",3.9,", ",cheap,"),                          # 9
        "\n",                                                                          # 10: blank, skipped
        GOOD.format(clk=1, s=1),                                                      # 11
    ]
    path = _write(tmp_path / "joined.csv", JOINED_HEADER + "".join(rows))
    stream, report = read_taobao([path])
    events = list(stream)
    assert [e.event_id for e in events] == ["tb-joined-2", "tb-joined-11", "tb-joined-11-clk"]
    assert _impressions(events)[0].product["brand"] is None
    assert report.bad_rows == [
        BadRow("joined.csv", 3, "4 columns, expected 19"),
        BadRow("joined.csv", 4, "clk 'x' is not a number"),
        BadRow("joined.csv", 5, "clk 2 is not 0 or 1"),
        BadRow("joined.csv", 6, "time_stamp 'yesterday' is neither epoch seconds nor YYYY-MM-DD HH:MM:SS"),
        BadRow("joined.csv", 7, "missing userid"),
        BadRow("joined.csv", 8, "missing cate_id"),
        BadRow("joined.csv", 9, "price 'cheap' is not a number"),
    ]
    assert (report.rows_read, report.impressions, report.clicks) == (9, 2, 1)
    assert report.rows_read == report.impressions + len(report.bad_rows)


def test_contract_violations_are_bad_rows(tmp_path: Path) -> None:
    long_pid = "p" * 65
    path = _write(tmp_path / "j.csv", JOINED_HEADER + GOOD.format(clk=0, s=0).replace("430548_1007", long_pid))
    stream, report = read_taobao([path])
    assert list(stream) == []
    assert len(report.bad_rows) == 1
    assert report.bad_rows[0][:2] == ("j.csv", 2) and "placement" in report.bad_rows[0].reason


# --------------------------------------------------------------------------- file errors


def test_unknown_header_names_file_and_expected_headers(tmp_path: Path) -> None:
    path = _write(tmp_path / "weird.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(ReplayError) as info:
        read_taobao([path])
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "'a,b,c'" in message
    for expected in ("clk,time_stamp,userid,adgroup_id", "user,time_stamp,adgroup_id,pid,nonclk,clk",
                     "userid,cms_segid", "adgroup_id,cate_id,campaign_id,customer,brand,price"):
        assert expected in message


def test_missing_and_empty_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"nope\.csv: no such file.*clk,time_stamp"):
        read_taobao([tmp_path / "nope.csv"])
    with pytest.raises(ReplayError, match="<empty file>"):
        read_taobao([_write(tmp_path / "empty.csv", "")])


# --------------------------------------------------------------------------- pacing


class FakeClock:
    """A clock that only moves when slept on (or advanced by the consumer)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _clicks_at(*ts: int) -> list[Event]:
    return [Click(event_id=f"c{t}", ts=t, impression_id="i", user_id="u", product_id="p", creative_id="c")
            for t in ts]


def _yield_times(events: list[Event], speedup: float, clock: FakeClock, work: float = 0.0) -> list[float]:
    times = []
    out: Iterator[Event] = paced(events, speedup, clock=clock, sleep=clock.sleep)
    for _ in out:
        times.append(clock.now - 100.0)
        clock.now += work
    return times


def test_paced_divides_gaps_by_speedup() -> None:
    events = _clicks_at(1_000, 2_000, 2_000, 6_000)
    clock = FakeClock()
    assert _yield_times(events, 2.0, clock) == pytest.approx([0.0, 0.5, 0.5, 2.5])
    assert _yield_times(events, 1.0, FakeClock()) == pytest.approx([0.0, 1.0, 1.0, 5.0])


def test_paced_does_not_add_consumer_time() -> None:
    clock = FakeClock()
    times = _yield_times(_clicks_at(0, 1_000, 2_000), 1.0, clock, work=0.3)
    assert times == pytest.approx([0.0, 1.0, 2.0])
    assert clock.sleeps == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize("speedup", [0.0, math.inf])
def test_paced_unlimited(speedup: float) -> None:
    clock = FakeClock()
    events = _clicks_at(0, 10_000, 20_000)
    assert list(paced(events, speedup, clock=clock, sleep=clock.sleep)) == events
    assert clock.sleeps == []


@pytest.mark.parametrize("speedup", [-1.0, math.nan])
def test_paced_rejects_negative_speedup(speedup: float) -> None:
    with pytest.raises(ValueError, match="speedup must be >= 0"):
        paced(_clicks_at(0), speedup)


def test_gzip_input_and_file_order_without_sorting(tmp_path: Path) -> None:
    files = _raw_files(tmp_path)
    gz = tmp_path / "raw_sample.csv.gz"
    gz.write_bytes(gzip.compress(files[1].read_bytes()))
    stream, report = read_taobao([files[0], gz, files[2]], sort_raw=False)
    imps = _impressions(list(stream))
    assert [i.event_id for i in imps] == [f"tb-raw_sample-{n}" for n in (2, 3, 4, 5)]
    assert report.out_of_order == 1


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no files given"):
        read_taobao([])
    with pytest.raises(ValueError, match="click_delay_ms must be > 0"):
        read_taobao(_raw_files(tmp_path), click_delay_ms=0)
