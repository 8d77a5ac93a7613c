"""What the phone was told once, kept in the journal: read back after a restart, damaged values ignored."""

from __future__ import annotations

import json

import pytest

from pnl_tracker import Journal
from said_memory import SAID_META, SaidMemory


def test_what_was_said_is_read_back_from_a_real_journal_after_a_restart(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite3")
    memory = SaidMemory(journal.meta(SAID_META), journal.set_meta)
    memory.put("feed_delayed", "2025-10-02")
    memory.put("options_feed", "2025-10-02-01 FEED")
    journal.close()
    reopened = Journal(tmp_path / "journal.sqlite3")
    again = SaidMemory(reopened.meta(SAID_META), reopened.set_meta)
    assert again.get("feed_delayed") == "2025-10-02"
    assert again.get("options_feed") == "2025-10-02-01 FEED"
    assert again.get("clock_behind_feed") is None


@pytest.mark.parametrize(
    "raw",
    ["", "not json", "[1, 2]", '{"a": 1, "b": ["x"]}', "[" * 100_000 + "]" * 100_000, '"text"'],
)
def test_a_damaged_value_is_an_empty_memory_not_an_error(raw):
    memory = SaidMemory(raw)
    assert memory.get("a") is None and memory.get("b") is None


def test_a_repeated_value_is_not_written_again():
    writes: list[tuple[str, str]] = []
    memory = SaidMemory(json.dumps({"feed_delayed": "2025-10-01"}), lambda k, v: writes.append((k, v)))
    memory.put("feed_delayed", "2025-10-02")
    memory.put("feed_delayed", "2025-10-02")
    assert len(writes) == 1 and json.loads(writes[0][1]) == {"feed_delayed": "2025-10-02"}
