"""Shared builders for hand-made bars, quotes and chains (exact values, no randomness)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_tape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo day as a tape, built once per test session (it takes a few seconds)."""
    from sim.market import build_demo_tape

    return build_demo_tape(tmp_path_factory.mktemp("demo") / "2025-10-02.jsonl.gz")
