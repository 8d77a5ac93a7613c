"""A fresh clone with nothing beside it collects the whole suite: the tests read only the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_TESTS = 400


def test_a_fresh_clone_alone_in_a_folder_collects_the_suite(tmp_path):
    """Clone the repository's committed HEAD (uncommitted files are not part of it, on purpose: this
    tests what a new user gets) into an otherwise empty folder, and collect its tests there.

    Collection imports every test module and its fixtures' modules, so a test that reads a file outside
    the repository at import time (such as ../shared) fails here.
    """
    git = shutil.which("git")
    assert git is not None, "git is needed to clone the repository"
    clone = tmp_path / "clone"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    cloned = subprocess.run([git, "clone", "--quiet", str(ROOT), str(clone)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert cloned.returncode == 0, cloned.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert collected.returncode == 0, (collected.stdout + collected.stderr)[-3000:]
    count = re.search(r"^(\d+) tests? collected", collected.stdout, flags=re.M)
    assert count is not None, collected.stdout[-2000:]
    assert int(count.group(1)) > MIN_TESTS
    assert "error" not in collected.stdout.splitlines()[-1].lower()
