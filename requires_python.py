"""Imported first by main.py: on a Python older than 3.11 every command stops with one line saying so,
before a module that needs 3.11 (`datetime.UTC`, `tomllib`) fails with a traceback."""

from __future__ import annotations

import sys

MINIMUM = (3, 11)
EXIT_CONFIG = 2  # main.py's "nothing was done"


def too_old(version: tuple[int, ...], executable: str) -> str | None:
    """The line to print when `version` is older than MINIMUM, else None."""
    if tuple(version[:2]) >= MINIMUM:
        return None
    found = ".".join(str(part) for part in version[:3])
    return (
        f"The alerter needs Python {MINIMUM[0]}.{MINIMUM[1]} or newer; {executable} is Python {found}. "
        "Run it with a newer python3 (and install the requirements with that one)."
    )


_problem = too_old(tuple(sys.version_info), sys.executable)
if _problem is not None:
    print(_problem, file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)
