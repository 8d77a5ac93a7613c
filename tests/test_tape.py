"""Tape format: round trip, appending, durability, damage counting, retention."""

from __future__ import annotations

import datetime
import gzip
import json
import math
import zlib
from pathlib import Path

import pytest

from tape import TAPE_FORMAT, TapeLine, TapeReader, TapeWriter, prune_tapes, strip_api_key, tape_path

START = 1759415400000


def _writer(path: Path) -> TapeWriter:
    return TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=START)


def _member_count(path: Path) -> int:
    data = path.read_bytes()
    count = 0
    while data:
        decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        decomp.decompress(data)
        assert decomp.eof
        count += 1
        data = decomp.unused_data
    return count


def test_round_trip_keeps_meta_frames_and_rest_answers(tmp_path: Path) -> None:
    path = tmp_path / "tapes" / "2025-10-02.jsonl.gz"
    bar = {"ev": "A", "sym": "IWM", "v": 100, "c": 240.1, "s": START, "e": START + 1000}
    with _writer(path) as writer:
        writer.write_ws(START + 10, [bar])
        writer.write_ws(START + 20, '[{"ev":"status","status":"connected"}]')
        writer.write_ws(START + 30, "not json {")
        writer.write_rest(
            START + 40,
            "/v3/snapshot/options/IWM?apiKey=SECRET123&expiration_date=2025-10-02&limit=250",
            200,
            {"results": [], "next_url": "https://api.massive.com/v3/x?cursor=p2&apiKey=SECRET123"},
        )
        writer.write_rest(START + 50, "/v3/snapshot/options/IWM?apiKey=SECRET123", 429, {"status": "ERROR"})

    reader = TapeReader(path)
    lines = list(reader)
    assert reader.meta == {"format": TAPE_FORMAT, "underlying": "IWM", "benchmark": "SPY"}
    assert reader.bad_lines == 0
    assert lines[0] == TapeLine(1, START, "meta", reader.meta)
    assert lines[1] == TapeLine(2, START + 10, "ws", [bar])
    assert lines[2] == TapeLine(3, START + 20, "ws", [{"ev": "status", "status": "connected"}])
    assert lines[3] == TapeLine(4, START + 30, "ws", "not json {")
    assert lines[4] == TapeLine(
        5,
        START + 40,
        "rest",
        {"results": [], "next_url": "https://api.massive.com/v3/x?cursor=p2"},
        path="/v3/snapshot/options/IWM?expiration_date=2025-10-02&limit=250",
        status=200,
    )
    assert lines[5].path == "/v3/snapshot/options/IWM" and lines[5].status == 429
    assert b"SECRET123" not in gzip.decompress(path.read_bytes())


def test_lines_are_compact_json_with_the_documented_shape(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [{"ev": "A"}])
        writer.write_ws(START + 2, "garbage")
        writer.write_rest(START + 3, "/v3/x", 200, {"a": 1})
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert text == [
        '{"t":1759415400000,"meta":{"format":"tape/1","underlying":"IWM","benchmark":"SPY"}}',
        '{"t":1759415400001,"ws":[{"ev":"A"}]}',
        '{"t":1759415400002,"ws_raw":"garbage"}',
        '{"t":1759415400003,"rest":"/v3/x","status":200,"body":{"a":1}}',
    ]


def test_strip_api_key_keeps_everything_else_byte_for_byte() -> None:
    assert (
        strip_api_key("/v3/x?cursor=YXA9Mg%3D%3D&apiKey=k&limit=250") == "/v3/x?cursor=YXA9Mg%3D%3D&limit=250"
    )
    assert strip_api_key("/v3/x?APIKEY=k") == "/v3/x"
    assert strip_api_key("/v3/x") == "/v3/x"


def test_nan_in_a_frame_is_kept_so_the_parser_can_count_it(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [{"ev": "A", "c": float("nan")}])
        writer.write_rest(START + 2, "/v3/x", 200, {"iv": float("inf")})
    raw = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert raw[1] == '{"t":1759415400001,"ws":[{"ev":"A","c":NaN}]}'
    assert raw[2] == '{"t":1759415400002,"rest":"/v3/x","status":200,"body":{"iv":Infinity}}'
    lines = list(TapeReader(path))
    assert math.isnan(lines[1].payload[0]["c"])
    assert lines[2].payload == {"iv": math.inf}


def test_second_writer_appends_a_member_without_a_second_meta_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [{"n": 1}])
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=START + 999) as writer:
        writer.write_ws(START + 2, [{"n": 2}])

    assert _member_count(path) == 2
    lines = list(TapeReader(path))
    assert [(line.kind, line.t) for line in lines] == [("meta", START), ("ws", START + 1), ("ws", START + 2)]
    with gzip.open(path, "rt") as fh:
        assert sum(1 for _ in fh) == 3


def test_flush_is_durable_and_unflushed_lines_are_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    writer = _writer(path)
    writer.write_ws(START + 1, [{"n": 1}])
    writer.flush()
    writer.write_ws(START + 2, [{"n": 2}])
    # Read while the writer is still open, as after a kill -9 at this instant.
    assert [line.t for line in TapeReader(path)] == [START, START + 1]
    writer.close()
    writer.close()
    assert [line.t for line in TapeReader(path)] == [START, START + 1, START + 2]
    with pytest.raises(ValueError):
        writer.write_ws(START + 3, [])


def test_truncated_trailing_member_yields_what_is_readable_and_counts_one_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [{"n": 1}])
        writer.flush()
        for n in range(2, 200):
            writer.write_ws(START + n, [{"n": n, "pad": "x" * (n % 7)}])
    data = path.read_bytes()
    path.write_bytes(data[:-10])

    reader = TapeReader(path)
    lines = list(reader)
    assert reader.bad_lines == 1
    assert [line.t for line in lines[:2]] == [START, START + 1]
    assert [line.t - START for line in lines] == list(range(len(lines)))
    assert len(lines) > 2


def test_torn_header_at_the_end_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [])
    path.write_bytes(path.read_bytes() + gzip.compress(b'{"t":1,"ws":[]}\n', mtime=0)[:7])
    reader = TapeReader(path)
    assert [line.t for line in reader] == [START, START + 1]
    assert reader.bad_lines == 1


def test_damaged_member_in_the_middle_is_skipped_and_later_members_read(tmp_path: Path) -> None:
    good = gzip.compress(b'{"t":1,"meta":{"format":"tape/1"}}\n', mtime=0)
    broken = bytearray(gzip.compress(b'{"t":2,"ws":[]}\n' * 50, mtime=0))
    broken[12:20] = b"\xff" * 8
    last = gzip.compress(b'{"t":3,"ws":[]}\n', mtime=0)
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(good + bytes(broken) + last)
    reader = TapeReader(path)
    assert [line.t for line in reader] == [1, 3]
    assert reader.bad_lines == 1


def test_reopening_after_a_crash_cuts_the_torn_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, [])
    intact = path.stat().st_size
    torn = gzip.compress(b'{"t":5,"ws":[]}\n' * 100, mtime=0)
    path.write_bytes(path.read_bytes() + torn[: len(torn) // 2])

    with _writer(path) as writer:
        assert path.stat().st_size == intact
        writer.write_ws(START + 2, [])
    reader = TapeReader(path)
    assert [line.t for line in reader] == [START, START + 1, START + 2]
    assert reader.bad_lines == 0


def test_a_file_with_no_complete_member_starts_over_with_meta(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"t":5,"ws":[]}\n', mtime=0)[:15])
    with _writer(path) as writer:
        writer.write_ws(START + 1, [])
    reader = TapeReader(path)
    assert [line.kind for line in reader] == ["meta", "ws"]
    assert reader.bad_lines == 0


def test_writer_refuses_to_append_to_a_file_that_is_not_a_gzip_tape(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(b'{"t":1,"ws":[]}\n')
    with pytest.raises(ValueError, match="not a gzip tape"):
        _writer(path)
    assert path.read_bytes() == b'{"t":1,"ws":[]}\n'
    assert [line.t for line in TapeReader(path)] == [1]


def test_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    rows = [
        '{"t":1,"meta":{"format":"tape/1","underlying":"IWM","benchmark":"SPY"}}',
        "not json",
        '{"t":2,"ws":[{"ev":"A"}]',
        "[1,2,3]",
        '{"ws":[]}',
        '{"t":"3","ws":[]}',
        '{"t":4.0,"ws":[]}',
        '{"t":true,"ws":[]}',
        '{"t":5,"other":1}',
        '{"t":6,"rest":"/v3/x","body":{}}',
        '{"t":7,"rest":"/v3/x","status":"200","body":{}}',
        '{"t":8,"meta":"x"}',
        '{"t":9,"ws_raw":5}',
        "",
        '{"t":10,"ws":[]}',
        '{"t":11,"rest":"/v3/x","status":503,"body":null}',
    ]
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0))
    reader = TapeReader(path)
    lines = list(reader)
    assert reader.bad_lines == 12
    assert [(line.line_no, line.t, line.kind) for line in lines] == [
        (1, 1, "meta"),
        (14, 10, "ws"),
        (15, 11, "rest"),
    ]
    assert lines[2].payload is None and lines[2].status == 503
    assert reader.meta == {"format": "tape/1", "underlying": "IWM", "benchmark": "SPY"}


def test_reader_of_a_tape_without_meta_has_none(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps({"t": 1, "ws": []}).encode() + b"\n", mtime=0))
    assert TapeReader(path).meta is None


def test_writer_output_is_deterministic(tmp_path: Path) -> None:
    paths = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
    for path in paths:
        with _writer(path) as writer:
            writer.write_ws(START + 1, [{"n": 1}])
            writer.flush()
            writer.write_rest(START + 2, "/v3/x", 200, {"n": 2})
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_tape_path_is_per_session_day() -> None:
    assert tape_path(Path("/var/data"), datetime.date(2025, 10, 2)) == Path(
        "/var/data/tapes/2025-10-02.jsonl.gz"
    )


def test_prune_deletes_only_tapes_older_than_the_retention(tmp_path: Path) -> None:
    names = [
        "2025-09-10.jsonl.gz",
        "2025-09-11.jsonl.gz",
        "2025-09-12.jsonl.gz",
        "2025-10-02.jsonl.gz",
        "notes.txt",
        "2025-13-01.jsonl.gz",
        "2025-09-01.jsonl",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    deleted = prune_tapes(tmp_path, 20, datetime.date(2025, 10, 2))
    assert deleted == [tmp_path / "2025-09-10.jsonl.gz", tmp_path / "2025-09-11.jsonl.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        set(names) - {deleted[0].name, deleted[1].name}
    )
    assert prune_tapes(tmp_path, 0, datetime.date(2025, 10, 2)) == [tmp_path / "2025-09-12.jsonl.gz"]
    assert prune_tapes(tmp_path / "missing", 5, datetime.date(2025, 10, 2)) == []
