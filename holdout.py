"""Out-of-sample days for backtests: `--holdout K` keeps the last days out of a sweep's ranking.

K is a count of days (an integer >= 1) or a share of them (a fraction in (0, 1), rounded, at least one day).
Either way at least one day stays in sample. The held-out days are always the *latest* dates (the CLI runs
tapes in session-date order): a ranking chosen on earlier days is then judged on later ones, as it would be
used. Each part is a run of its days alone, in a sweep and a single run alike: a trade counts on the day it
closed, and a position open when the in-sample days end counts in neither part. A sweep ranks its cells on the in-sample
days alone (each a run over those days only), and reports the chosen cell on both parts side by side; the
held-out days never reach the ranking. Walk-forward windows (several train/test splits rolled forward) are
not built.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from alert_text import money

if TYPE_CHECKING:
    from backtest_report import Stats


@dataclass(frozen=True, slots=True)
class Holdout:
    """A parsed `--holdout`: exactly one of `count` (days) and `fraction` (share of the days) is set."""

    text: str
    count: int | None = None
    fraction: float | None = None

    def days(self, total: int) -> int:
        """How many of `total` days are held out; ValueError when none would stay in sample."""
        held = self.count if self.count is not None else max(1, round((self.fraction or 0.0) * total))
        if held >= total:
            raise ValueError(
                f"--holdout {self.text} holds out {held} of {total} day(s) and leaves none in sample; "
                + (
                    f"hold out at most {total - 1} (or run more days)"
                    if total > 1
                    else "a holdout needs two days or more"
                )
            )
        return held


def parse_holdout(text: str) -> Holdout:
    """`--holdout`'s argparse type: an integer >= 1 or a fraction strictly between 0 and 1."""
    raw = text.strip()
    try:
        if raw.isdigit() or (raw.startswith("-") and raw[1:].isdigit()):
            count = int(raw)
            if count <= 0:
                raise argparse.ArgumentTypeError(f"{text!r}: hold out at least 1 day")
            return Holdout(raw, count=count)
        fraction = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a number of days (e.g. 5) or a fraction in (0, 1) (e.g. 0.25)"
        ) from None
    if not (0.0 < fraction < 1.0) or math.isnan(fraction):
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the days must be strictly between 0 and 1")
    return Holdout(raw, fraction=fraction)


@dataclass(frozen=True, slots=True)
class Split:
    """Session dates in sample and held out, each in run (date) order."""

    in_sample: tuple[str, ...]
    held_out: tuple[str, ...]


def split_dates(dates: Sequence[str], held: int) -> Split:
    """The last `held` dates held out, the rest in sample (`dates` in date order: the latest are held out)."""
    cut = len(dates) - held
    return Split(tuple(dates[:cut]), tuple(dates[cut:]))


def print_held_out(split: Split, out: TextIO) -> None:
    """The line that says which days were held out."""
    total = len(split.in_sample) + len(split.held_out)
    print(
        f"Held out: the last {len(split.held_out)} of {total} day(s), {', '.join(split.held_out)};"
        f" in sample: {len(split.in_sample)} day(s), {split.in_sample[0]} to {split.in_sample[-1]}.",
        file=out,
    )


def print_side_by_side(inside: Stats, outside: Stats, split: Split, out: TextIO) -> None:
    """In-sample and out-of-sample statistics in two columns."""
    rows = [
        ("days", str(len(split.in_sample)), str(len(split.held_out))),
        ("trades", str(inside.trades), str(outside.trades)),
        ("win rate", _pct(inside.win_rate_pct), _pct(outside.win_rate_pct)),
        ("total P&L", money(inside.total_pnl), money(outside.total_pnl)),
        ("profit factor", _factor(inside.profit_factor), _factor(outside.profit_factor)),
        ("max drawdown", money(-inside.max_drawdown), money(-outside.max_drawdown)),
    ]
    print(f"{'':<16}{'in sample':>14}{'out of sample':>16}", file=out)
    for label, left, right in rows:
        print(f"{label:<16}{left:>14}{right:>16}", file=out)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _factor(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.2f}"
