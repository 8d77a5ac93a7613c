"""Decoded tapes: cached once, read back equal; stale, damaged or unwritable caches lose nothing."""

from __future__ import annotations

import ast
import gzip
import io
import os
import pickle
from pathlib import Path

import pytest
from builders import at, burst_bars, calendar
from structlog.testing import capture_logs

from backtest import run_day
from config import Rules
from events import Bar, ChainSnapshot, Event
from pnl_tracker import Journal
from signals import FeatureEngine, Features, RecordedFeatures, RecordingFeatures
from tape import RawJson, loads_json
from tape_cache import (
    DECODING_MODULES,
    FEATURE_MODULES,
    DecodedTape,
    cache_path,
    decode_tape,
    features_path,
    load_decoded,
)

RULES = Rules()
ROOT = Path(__file__).resolve().parents[1]


def trades_of(tape: Path, cache_dir: Path | None) -> tuple:
    return run_day(tape, RULES, calendar(RULES), Journal(Path(":memory:")), cache_dir=cache_dir).trades


def events_of(decoded: DecodedTape) -> list[Event]:
    return [e for _t, kind, events in decoded.lines if kind == "events" for e in events]  # type: ignore[attr-defined]


def test_a_cached_tape_reads_back_as_it_was_decoded(short_tapes, tmp_path):
    tape = short_tapes[0]
    fresh = decode_tape(tape, RULES)
    first = load_decoded(tape, RULES, tmp_path)
    path = cache_path(tape, RULES, tmp_path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
    written = path.stat().st_mtime_ns
    cached = load_decoded(tape, RULES, tmp_path)
    assert path.stat().st_mtime_ns == written, "the second load only reads"
    assert (cached.session_date, cached.bad_lines, len(cached.lines)) == (
        fresh.session_date,
        fresh.bad_lines,
        len(fresh.lines),
    )
    assert first.session_date == "2025-10-06" and len(cached.lines) > 3000
    assert [e for e in events_of(cached) if type(e) is Bar] == [e for e in events_of(fresh) if type(e) is Bar]
    chains = [e for e in events_of(cached) if type(e) is ChainSnapshot]
    fresh_chains = [e for e in events_of(fresh) if type(e) is ChainSnapshot]
    assert [c.received_ms for c in chains] == [c.received_ms for c in fresh_chains] and len(chains) > 100
    assert list(chains[-1].quotes) == list(fresh_chains[-1].quotes) != []
    assert trades_of(tape, tmp_path) == trades_of(tape, None) != ()


def test_the_cache_key_follows_the_tape_and_the_decoder_rules(short_tapes, tmp_path):
    tape = tmp_path / "copy.jsonl.gz"
    tape.write_bytes(short_tapes[0].read_bytes())
    before = cache_path(tape, RULES, tmp_path)
    assert cache_path(tape, Rules(volume_profile_days=5), tmp_path) != before
    assert cache_path(tape, Rules(max_giveback_percent=40.0), tmp_path) == before, "exit rules do not decode"
    os.utime(tape, ns=(1, 1))
    assert cache_path(tape, RULES, tmp_path) == before, "the key is the content: touching it decodes nothing"


def test_a_damaged_cache_file_is_decoded_again(short_tapes, tmp_path):
    tape = short_tapes[0]
    path = cache_path(tape, RULES, tmp_path)
    path.write_bytes(b"not a pickle at all")
    with capture_logs() as logs:
        assert trades_of(tape, tmp_path) == trades_of(tape, None)
    assert [entry["event"] for entry in logs] == ["cache_unreadable"]
    assert path.read_bytes() != b"not a pickle at all", "the damaged copy was replaced"
    assert len(load_decoded(tape, RULES, tmp_path).lines) == len(decode_tape(tape, RULES).lines)


def test_an_unwritable_cache_is_skipped_and_the_run_goes_on(short_tapes, tmp_path):
    blocker = tmp_path / "decoded"
    blocker.write_text("a file where the cache folder should be")
    with capture_logs() as logs:
        decoded = load_decoded(short_tapes[0], RULES, blocker)
    assert decoded.session_date == "2025-10-06" and blocker.read_text().startswith("a file")
    assert [entry["event"] for entry in logs] == ["cache_not_written"]


def test_raw_json_pickles_compressed_and_inflates_only_when_read():
    text = b'{"results":[{"ticker":"O:IWM251006C00240000"}],"next_url":"https://x/page2"}'
    packed = pickle.dumps(RawJson(text))
    assert len(packed) < len(text) + 200 and text not in packed
    restored = pickle.loads(packed)
    assert restored.top_level_string("next_url") == "https://x/page2"
    assert restored.value() == {
        "results": [{"ticker": "O:IWM251006C00240000"}],
        "next_url": "https://x/page2",
    }
    decoded = pickle.loads(pickle.dumps(restored))
    assert decoded.value() == restored.value()


def test_loads_json_reads_what_the_stdlib_reads():
    assert loads_json(b'{"a":[1,2.5,"x"]}') == {"a": [1, 2.5, "x"]}
    nan = loads_json(b'{"v": NaN}')["v"]
    assert nan != nan, "orjson refuses NaN; the stdlib fallback keeps its reading"
    beyond_float = b'{"big": 1' + b"0" * 400 + b"}"
    assert loads_json(beyond_float)["big"] == 10**400


def test_features_are_cached_per_market_rules_and_served_back_exactly(short_tapes, tmp_path):
    tape = short_tapes[1]
    assert trades_of(tape, tmp_path) == trades_of(tape, None) != ()
    path = features_path(tape, RULES, tmp_path)
    recorded = pickle.loads(path.read_bytes())
    assert len(recorded) > 3000 and recorded == sorted(recorded, key=lambda f: f.start_ms)
    written = path.stat().st_mtime_ns
    assert trades_of(tape, tmp_path) == trades_of(tape, None)
    assert path.stat().st_mtime_ns == written, "the re-run read the features"
    assert features_path(tape, Rules(stop_loss_percent=10.0), tmp_path) == path, "exit rules share features"
    assert features_path(tape, Rules(vwap_window_seconds=90), tmp_path) != path


def test_recorded_features_refuse_a_bar_they_were_not_computed_for():
    bars = burst_bars(at(10, 0))
    engine = FeatureEngine(RULES)
    recorded: list[Features] = []
    recording = RecordingFeatures(engine, recorded)
    for b in bars[:5]:
        recording.update(b)
    served = RecordedFeatures(recorded)
    assert [served.update(b) for b in bars[:4]] == recorded[:4]
    with pytest.raises(ValueError, match="offered for"):
        served.update(bars[5])
    served.update(bars[4])
    with pytest.raises(ValueError, match="no recorded features left"):
        served.update(bars[5])


def test_writing_a_copy_removes_the_copies_other_code_wrote(short_tapes, tmp_path):
    tape = short_tapes[0]
    current = cache_path(tape, RULES, tmp_path)
    stem = tape.name.split(".")[0]
    stale = [
        tmp_path / f"{stem}-0123456789abcdef0123.decoded",  # named before generations existed
        tmp_path / f"{stem}-0123456789abcdef0123-g0000000000.decoded",
        tmp_path / "2025-10-07-0123456789abcdef0123-g0000000000.decoded",  # another day, same old code
    ]
    kept = [
        tmp_path
        / f"{stem}-0123456789abcdef0123-g0000000000.features",  # another kind: its own writes prune it
        tmp_path / f".{current.name}.999.partial",  # another process's copy being written
        tmp_path / "notes.txt",
    ]
    for path in stale + kept:
        path.write_bytes(b"old")
    with capture_logs() as logs:
        load_decoded(tape, RULES, tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted([current, *kept])
    assert [(e["event"], e["files"]) for e in logs] == [("cache_pruned", 3)]
    assert len(load_decoded(tape, RULES, tmp_path).lines) == len(decode_tape(tape, RULES).lines)


def test_a_features_write_removes_features_of_other_code_only(short_tapes, tmp_path):
    tape = short_tapes[1]
    stem = tape.name.split(".")[0]
    old_features = tmp_path / f"{stem}-0123456789abcdef0123-g0000000000.features"
    old_features.write_bytes(b"old")
    assert trades_of(tape, tmp_path) == trades_of(tape, None) != ()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [cache_path(tape, RULES, tmp_path).name, features_path(tape, RULES, tmp_path).name]
    )


def gzipped(data: bytes, pad: int) -> bytes:
    """`data` gzipped with a file name of `pad` bytes in its header (the name only changes the size)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="x" * pad, mode="wb", fileobj=buffer, mtime=0) as handle:
        handle.write(data)
    return buffer.getvalue()


def test_a_tape_replaced_by_one_of_the_same_size_and_mtime_is_decoded_again(short_tapes, tmp_path):
    # cp -p, rsync -t or a restore keep size and mtime: only the content tells the two tapes apart.
    whole = gzip.decompress(short_tapes[0].read_bytes())
    shorter = b"".join(whole.splitlines(keepends=True)[:-50])
    before = gzipped(whole, 1)
    after = gzipped(shorter, 1 + len(before) - len(gzipped(shorter, 1)))
    assert len(after) == len(before) and after != before
    tape, cache = tmp_path / "2025-10-06.jsonl.gz", tmp_path / "decoded"
    tape.write_bytes(before)
    os.utime(tape, ns=(1_700_000_000_000_000_000,) * 2)
    stamp = (tape.stat().st_size, tape.stat().st_mtime_ns)
    first = load_decoded(tape, RULES, cache)
    tape.write_bytes(after)
    os.utime(tape, ns=(1_700_000_000_000_000_000,) * 2)
    assert (tape.stat().st_size, tape.stat().st_mtime_ns) == stamp
    second = load_decoded(tape, RULES, cache)
    assert len(second.lines) == len(decode_tape(tape, RULES).lines) < len(first.lines)
    assert len(list(cache.glob("*.decoded"))) == 2


def test_the_features_key_covers_every_module_that_computes_them():
    # The modules that compute the features and all they import of this project: an edit of any
    # must make cached features stale. Rules reach them as values (keyed by value, not config.py's
    # source); events.py is keyed with the decoded tape; day_runner.py plans, records and serves them.
    keyed = set(FEATURE_MODULES) | set(DECODING_MODULES) | {"config.py"}
    todo, seen = ["features_vector.py", "signals.py", "market_state.py"], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            if name == "config.py":
                continue  # its settings validation is not what the features read: the `Rules` values
            tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
            found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            todo += [f"{module}.py" for module in found if (ROOT / f"{module}.py").is_file()]
    assert "market_calendar.py" in seen and seen <= keyed, sorted(seen - keyed)
    assert "day_runner.py" in FEATURE_MODULES
