"""The dependency files agree: requirements.lock pins every runtime package at a version its range in
requirements.txt allows, and both the Render build and the development install use the lock."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def requirement_lines(path: Path) -> list[str]:
    """Lines that name a package: comments, blank lines and options such as `-r` dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def locked_versions() -> dict[str, Version]:
    """requirements.lock as {canonical name: pinned version}; every package line must be an exact pin."""
    pins = {}
    for line in requirement_lines(ROOT / "requirements.lock"):
        match = PIN.match(line)
        assert match, f"requirements.lock: {line!r} is not an exact name==version pin"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def test_every_runtime_package_is_pinned_inside_its_range():
    pins = locked_versions()
    requirements = [Requirement(line) for line in requirement_lines(ROOT / "requirements.txt")]
    assert len(requirements) >= 8
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, (
            f"{requirement.name} is not in requirements.lock: regenerate it (README Dependencies)"
        )
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


def test_the_lock_admits_the_right_calendar_and_current_releases():
    pins = locked_versions()
    # exchange_calendars before 4.7 treats 2025-01-09 (a market closure) as a session.
    assert pins["exchange-calendars"] >= Version("4.7")
    assert pins["websockets"] >= Version("16") and pins["structlog"] >= Version("26")


def test_the_range_check_would_catch_a_pin_outside_the_range():
    # The test above relies on SpecifierSet.contains; make sure it rejects what it must.
    assert not Requirement("httpx>=0.27,<1").specifier.contains(Version("1.0.0"), prereleases=True)
    assert not Requirement("exchange_calendars>=4.7").specifier.contains(Version("4.6"))


def test_render_and_development_install_the_lock():
    build = re.search(r"^\s*buildCommand:\s*(.+)$", (ROOT / "render.yaml").read_text(), flags=re.M)
    assert build is not None and build.group(1).strip() == "pip install -r requirements.lock"
    dev = ROOT / "requirements-dev.txt"
    assert "-r requirements.lock" in dev.read_text().splitlines()
    assert "packaging" in {Requirement(line).name for line in requirement_lines(dev)}


def test_the_lock_says_how_it_was_made():
    header = (ROOT / "requirements.lock").read_text().splitlines()[:3]
    assert any("uv pip compile requirements.txt --python-version 3.11" in line for line in header)
