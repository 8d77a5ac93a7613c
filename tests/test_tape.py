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


# Hostile input: the writer raises only OSError, the reader never raises and stays bounded.

DEEP_TEXT = "[" * 50_000 + "]" * 50_000
BAR_FRAME = '[{"ev":"A","sym":"IWM","v":100,"o":240,"h":240,"l":240,"c":240,"s":1,"e":1001}]'
HOSTILE_FRAMES: list[str | bytes] = [
    b"\xff\xfe\x00not utf-8",  # binary, not UTF-8: kept as bytes
    b"\x80" + BAR_FRAME.encode(),  # binary, invalid UTF-8 start
    BAR_FRAME.encode(),  # binary but UTF-8 JSON: read like the text frame
    "\ufeff[]".encode(),  # UTF-8 with a BOM: json.loads of bytes accepts it (stored decoded)
    "[]".encode("utf-16"),  # UTF-16 JSON: json.loads of bytes detects it
    b"not json but utf-8",
    DEEP_TEXT,  # nested 50k deep: RecursionError in the parser, counted bad
    DEEP_TEXT.encode(),
    "[" * 990 + "]" * 990,  # decodes; re-encoding may hit the recursion limit (then kept as text)
    BAR_FRAME,
]


def test_hostile_frames_are_recorded_and_replay_to_the_live_counters(tmp_path: Path) -> None:
    from events import Received
    from feed import FeedDecoder

    path = tmp_path / "hostile.jsonl.gz"
    live = FeedDecoder("IWM", "SPY")
    with _writer(path) as writer:
        for n, frame in enumerate(HOSTILE_FRAMES):
            live.ws(START + n, frame)
            writer.write_ws(START + n, frame)
        raw_lines = writer.raw_lines
    replayed = FeedDecoder("IWM", "SPY")
    reader = TapeReader(path)
    for line in reader:
        if line.kind == "ws":
            replayed.decode(Received(line.t, "ws", line.payload))
    assert reader.bad_lines == 0
    assert replayed.counters == live.counters
    assert live.counters.frames == len(HOSTILE_FRAMES) and live.counters.bad_frames >= 6
    # The two non-UTF-8 frames, the non-JSON text, both 50k-deep ones; maybe the 990-deep one.
    assert raw_lines in (5, 6)


def test_binary_frames_are_stored_as_text_when_utf8_json_and_base64_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "binary.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, BAR_FRAME.encode())
        writer.write_ws(START + 2, b"\xff\x00")
        writer.write_ws(START + 3, bytearray(b"plain text"))
        assert writer.raw_lines == 2
    with gzip.open(path, "rt") as fh:
        stored = [json.loads(line) for line in fh.read().splitlines()[1:]]
    assert stored == [
        {"t": START + 1, "ws": json.loads(BAR_FRAME)},
        {"t": START + 2, "ws_bin": "/wA="},
        {"t": START + 3, "ws_raw": "plain text"},
    ]
    assert [line.payload for line in TapeReader(path)][1:] == [
        json.loads(BAR_FRAME),
        b"\xff\x00",
        "plain text",
    ]


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_rest_body_too_deep_to_encode_becomes_a_placeholder_that_replays_as_a_bad_line(
    tmp_path: Path,
) -> None:
    from tape import encode_line

    deep = nested_list(100_000)
    with pytest.raises(ValueError):
        encode_line({"t": 1, "body": deep})
    path = tmp_path / "deep.jsonl.gz"
    with _writer(path) as writer:
        writer.write_rest(START + 1, "/v3/snapshot/options/IWM?apiKey=SECRET", 200, {"results": deep})
        writer.write_control(START + 2, {"paused": True, "odd": nested_list(5_000)})
        writer.write_ws(START + 3, nested_list(5_000))
        writer.write_rest(START + 4, "/v3/snapshot/options/IWM", 200, {"results": []})
        assert writer.raw_lines == 3
    reader = TapeReader(path)
    lines = list(reader)
    assert reader.bad_lines == 3
    assert [(line.kind, line.t) for line in lines] == [("meta", START), ("rest", START + 4)]
    with gzip.open(path, "rt") as fh:
        assert "SECRET" not in fh.read()


def test_a_line_over_the_record_cap_is_a_short_placeholder(tmp_path: Path) -> None:
    from tape import MAX_RECORD_BYTES

    path = tmp_path / "big.jsonl.gz"
    huge = "x" * (MAX_RECORD_BYTES + 1)
    with _writer(path) as writer:
        writer.write_rest(START + 1, "/v2/aggs/ticker/IWM/range/1/second/1/2", 200, {"results": huge})
        writer.write_ws(START + 2, huge)  # not JSON: raw text, but too long even so
        writer.write_ws(START + 3, "[]")
        assert writer.raw_lines == 2
    assert path.stat().st_size < 100_000
    reader = TapeReader(path)
    lines = list(reader)
    assert reader.bad_lines == 2 and [line.t for line in lines] == [START, START + 3]
    with gzip.open(path, "rt") as fh:
        placeholder = json.loads(fh.read().splitlines()[1])
    assert placeholder["oversize"]["kind"] == "rest" and placeholder["oversize"]["bytes"] > MAX_RECORD_BYTES


def test_decoding_never_raises_recursion_error() -> None:
    from tape import RawJson, loads_json

    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ValueError):
        loads_json(deep)
    raw = RawJson(deep)
    assert raw.is_object() is False and raw.value() is None
    assert RawJson(b'{"a":1}').is_object() and not RawJson(b'"text"').is_object()


def append_member(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(gzip.compress(data, mtime=0))


def test_a_line_nested_200k_deep_is_one_bad_line_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "deep-line.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, "[]")
    deep = b"[" * 200_000 + b"]" * 200_000
    append_member(path, b'{"t":1759415400002,"ws":' + deep + b"}\n")
    append_member(
        path, b'{"t":1759415400003,"rest":"/v3/snapshot/options/IWM","status":200,"body":' + deep + b"}\n"
    )
    append_member(path, b'{"t":1759415400004,"ws":[]}\n')
    plain = TapeReader(path)
    plain_lines = list(plain)
    lazy = TapeReader(path, lazy_bodies=True)
    lazy_lines = list(lazy)
    assert plain.bad_lines == 2 and [line.t for line in plain_lines] == [START, START + 1, START + 4]
    # Lazily, the REST line is read (its body is decoded on use, to None: a failed answer downstream).
    assert lazy.bad_lines == 1 and [line.t for line in lazy_lines] == [START, START + 1, START + 3, START + 4]
    assert lazy_lines[2].payload.value() is None


def write_gzip_bomb(path: Path, megabytes: int) -> None:
    """One member that inflates to `megabytes` MiB of b"x" without a newline, written in slices."""
    block = b"x" * (1 << 20)
    with path.open("ab") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0) as gz:
        for _ in range(megabytes):
            gz.write(block)


def test_a_gzip_member_inflating_to_200_mb_without_a_newline_is_one_bad_line_in_bounded_memory(
    tmp_path: Path,
) -> None:
    import tracemalloc

    from tape import MAX_LINE_BYTES

    path = tmp_path / "bomb.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, "[]")
    append_member(path, b'{"t":1759415400002,"ws":[')  # a line the bomb's bytes then run on from
    write_gzip_bomb(path, 200)
    append_member(path, b'\n{"t":1759415400003,"ws":[]}\n{"t":1759415400004,"ws":[]}\n')
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        reader = TapeReader(path)
        lines = list(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [line.t for line in lines] == [START, START + 1, START + 3, START + 4]
    assert reader.bad_lines == 1
    assert peak < 2 * MAX_LINE_BYTES + 16 * 2**20 < 200 * 2**20


def test_reopening_a_tape_with_a_gzip_bomb_keeps_it_and_stays_bounded(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "bomb.jsonl.gz"
    with _writer(path) as writer:
        writer.write_ws(START + 1, "[]")
    write_gzip_bomb(path, 100)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with _writer(path) as writer:
            writer.write_ws(START + 2, "[]")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    assert path.stat().st_size > size  # the complete bomb member was kept, the new line appended
    reader = TapeReader(path)
    assert [line.t for line in reader] == [START, START + 1, START + 2] and reader.bad_lines == 1


def test_a_secret_a_peer_echoed_never_reaches_the_tape(tmp_path: Path) -> None:
    """An audit found the API key on the tape: a 401 body and a status message echoing it, and a link
    carrying it as `api_key=`. The writer knows the secrets and writes each as ***."""
    key, token = "K" * 10 + "secretkey1234567890", "tokentokentoken12345"
    path = tmp_path / "t.jsonl.gz"
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=1, secrets=(key, token, "")) as tape:
        tape.write_ws(2, [{"ev": "status", "status": "auth_failed", "message": f"bad key {key}"}])
        tape.write_ws(3, f"not json {token}")
        tape.write_rest(
            4, f"/v3/x?api_key={key}&cursor=p2", 401, {"error": f"key {key} unknown", "status": "ERR"}
        )
        tape.write_rest(
            5, "/v3/y", 200, {"results": [], "next_url": f"https://h/v3/y?cursor=p3&API-KEY={key}"}
        )
        tape.write_ws(6, b"\xff bad key " + key.encode())  # not UTF-8: stored as base64
    text = gzip.decompress(path.read_bytes())
    assert key.encode() not in text and token.encode() not in text
    lines = list(TapeReader(path))
    assert [line.kind for line in lines] == ["meta", "ws", "ws", "rest", "rest", "ws"]
    assert lines[5].payload == b"\xff bad key ***"
    assert lines[1].payload[0]["message"] == "bad key ***" and lines[2].payload == "not json ***"
    assert (lines[3].path, lines[3].payload["error"]) == ("/v3/x?cursor=p2", "key *** unknown")
    assert lines[4].payload["next_url"] == "https://h/v3/y?cursor=p3"


T0 = 1_759_411_800_000  # 2025-10-02 09:30 ET
DAY_MS = 86_400_000


def read_stamps(tmp_path: Path, stamps: list[int]) -> tuple[list[int], int]:
    """The stamps a reader yields of a tape whose lines carry `stamps` (the first one is the meta line)."""
    meta = {"format": "tape/1", "underlying": "IWM", "benchmark": "SPY"}
    rows = [json.dumps({"t": stamps[0], "meta": meta})]
    rows += [json.dumps({"t": t, "ws": []}) for t in stamps[1:]]
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0))
    reader = TapeReader(path)
    return [line.t for line in reader], reader.bad_lines


@pytest.mark.parametrize("stray", [T0 + 30 * DAY_MS, T0 + 3_600_000, T0 - 5 * DAY_MS, 1])
def test_a_line_stamped_far_from_its_neighbours_is_a_bad_line(tmp_path: Path, stray: int) -> None:
    """Taken, a line a month ahead made the replay tick through every second to it (a STALL and a
    SUMMARY per day on the way) and every later bar late: the day's trades were lost."""
    stamps, bad = read_stamps(tmp_path, [T0, T0 + 1000, stray, T0 + 2000, T0 + 3000])
    assert (stamps, bad) == ([T0, T0 + 1000, T0 + 2000, T0 + 3000], 1)


def test_a_leap_the_next_lines_confirm_is_kept(tmp_path: Path) -> None:
    """A restart after hours of downtime: the lines after the gap carry on from it."""
    later = T0 + 6 * 3_600_000
    stamps = [T0, T0 + 1000, later, later + 1000, later + 2000]
    assert read_stamps(tmp_path, stamps) == (stamps, 0)


@pytest.mark.parametrize("last", [T0 + 30 * DAY_MS, T0 + DAY_MS + 2000, 2**70])
def test_a_last_line_a_day_ahead_or_past_2100_is_a_bad_line(tmp_path: Path, last: int) -> None:
    assert read_stamps(tmp_path, [T0, T0 + 1000, last]) == ([T0, T0 + 1000], 1)


def test_a_last_line_hours_ahead_is_kept(tmp_path: Path) -> None:
    """A daemon down from 09:30 to 10:06 that wrote one line and stopped."""
    stamps = [T0, T0 + 1000, T0 + 36 * 60_000]
    assert read_stamps(tmp_path, stamps) == (stamps, 0)


def test_a_stamp_past_2100_read_by_the_stdlib_fallback_is_a_bad_line(tmp_path: Path) -> None:
    """orjson refuses the NaN, the stdlib reads the huge stamp as an int: it ticked for ever."""
    path = tmp_path / "t.jsonl.gz"
    rows = [f'{{"t":{T0},"ws":[]}}', '{"t":1180591620717411303424,"ws":[{"ev":"A","c":NaN}]}']
    rows.append(f'{{"t":{T0 + 1000},"ws":[]}}')
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode(), mtime=0))
    reader = TapeReader(path)
    assert ([line.t for line in reader], reader.bad_lines) == ([T0, T0 + 1000], 1)
