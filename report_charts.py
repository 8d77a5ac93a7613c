"""Charts of a backtest report and of the daily summary: plain data in, a PNG out.

The day chart shows the underlying's close with its rolling VWAP and the entries and exits (top) and
each trade's option mark (bottom); the equity chart shows the closed-trade equity curve with its
drawdown. `backtest.py` writes both into its report; the live daemon attaches a smaller day chart to
the close's DAILY SUMMARY alert (`summary_chart.py`).

matplotlib is imported inside the drawing functions only, so importing this module costs nothing:
the daemon pays for matplotlib when it draws its first chart, after the close.
"""

from __future__ import annotations

import datetime
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alert_text import money
from market_calendar import ny_datetime

if TYPE_CHECKING:
    from pnl_tracker import TradeRow

# Chart sizes in pixels (width, height) at CHART_DPI; the PNGs come out exactly this size.
CHART_DPI = 100
EQUITY_PX = (1000, 400)
DAY_PX = (1200, 700)


@dataclass(frozen=True, slots=True)
class PricePoint:
    """IWM's close and rolling VWAP as the engine saw them after a bar (downsampled)."""

    t_ms: int
    close: float
    vwap: float


@dataclass(frozen=True, slots=True)
class MarkPoint:
    """The held option's mark whenever it changed."""

    t_ms: int
    trade_id: str
    mark: float


@dataclass(frozen=True, slots=True)
class Level:
    """IWM's last close at the moment a trade opened or closed, for chart markers."""

    trade_id: str
    kind: str  # "entry" | "exit"
    t_ms: int
    close: float


class ChartDay(Protocol):
    """What the day chart reads: backtest's `DayResult` is one."""

    @property
    def session_date(self) -> str: ...

    @property
    def reconstructed(self) -> bool: ...

    @property
    def trades(self) -> Sequence[TradeRow]: ...

    @property
    def prices(self) -> Sequence[PricePoint]: ...

    @property
    def marks(self) -> Sequence[MarkPoint]: ...

    @property
    def levels(self) -> Sequence[Level]: ...

    @property
    def pnl(self) -> float: ...


def equity_curve(trades: Sequence[TradeRow]) -> list[float]:
    """Cumulative closed-trade P&L after each trade (in the order given)."""
    equity, total = [], 0.0
    for trade in trades:
        total = round(total + trade.pnl_dollars, 2)
        equity.append(total)
    return equity


def max_drawdown(equity: Sequence[float]) -> float:
    """Largest fall from a running peak of the equity curve, which starts at 0 before the first trade."""
    peak, worst = 0.0, 0.0
    for value in equity:
        peak = max(peak, value)
        worst = max(worst, peak - value)
    return round(worst, 2)


def _figure(size_px: tuple[int, int], dpi: int = CHART_DPI) -> Any:
    """A matplotlib Figure of exactly `size_px` at `dpi`, without pyplot's global state (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def equity_chart(path: Path, trades: Sequence[TradeRow], *, reconstructed: bool = False) -> Path:
    """The closed-trade equity curve (step per trade) with its drawdown shaded."""
    figure = _figure(EQUITY_PX)
    ax = figure.add_subplot(1, 1, 1)
    equity = [0.0, *equity_curve(trades)]
    x = list(range(len(equity)))
    peaks = list(itertools.accumulate(equity, max))
    ax.plot(x, equity, color="tab:blue", marker="o", markersize=3, linewidth=1.2, label="equity")
    ax.fill_between(x, equity, peaks, color="tab:red", alpha=0.25, label="drawdown")
    ax.axhline(0, color="grey", linewidth=0.8)
    note = " (reconstructed data)" if reconstructed else ""
    total = round(sum(t.pnl_dollars for t in trades), 2)
    drawdown = max_drawdown(equity[1:])
    ax.set_title(
        _plain_text(
            f"Closed-trade equity{note}: {len(trades)} trades, total {money(total)},"
            f" max drawdown {money(-drawdown)}"
        )
    )
    ax.set_xlabel("trade #")
    ax.set_ylabel("P&L ($)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)
    return path


def _plain_text(text: str) -> str:
    """Escape dollar signs, which matplotlib would otherwise read as maths."""
    return text.replace("$", r"\$")


def _clock(ms: int) -> datetime.datetime:
    return ny_datetime(ms).replace(tzinfo=None)


def day_chart(path: Path, day: ChartDay) -> Path:
    """The backtest report's day chart (DAY_PX at CHART_DPI), written to `path`."""
    figure = _day_figure(day, DAY_PX, CHART_DPI, "IWM")
    figure.savefig(path, dpi=CHART_DPI)
    return path


def day_chart_png(day: ChartDay, size_px: tuple[int, int], dpi: int, underlying: str = "IWM") -> bytes:
    """The day chart as PNG bytes of exactly `size_px`, optimised for size (a phone attachment)."""
    figure = _day_figure(day, size_px, dpi, underlying)
    buffer = io.BytesIO()
    # No "Software" text chunk, and Pillow's optimiser: a few kB less for the phone to fetch.
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None}, pil_kwargs={"optimize": True})
    return buffer.getvalue()


def _day_figure(day: ChartDay, size_px: tuple[int, int], dpi: int, underlying: str) -> Any:
    """IWM with its rolling VWAP and the entries/exits (top); each trade's option mark (bottom)."""
    from matplotlib.dates import DateFormatter

    figure = _figure(size_px, dpi)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    times = [_clock(p.t_ms) for p in day.prices]
    top.plot(times, [p.close for p in day.prices], color="black", linewidth=0.8, label=f"{underlying} close")
    top.plot(times, [p.vwap for p in day.prices], color="tab:orange", linewidth=0.8, label="rolling VWAP")
    for kind, marker, color in (("entry", "^", "tab:green"), ("exit", "v", "tab:red")):
        levels = [lv for lv in day.levels if lv.kind == kind and math.isfinite(lv.close)]
        x, y = [_clock(lv.t_ms) for lv in levels], [lv.close for lv in levels]
        top.scatter(x, y, marker=marker, s=60, color=color, zorder=3, label=kind)
    _option_axis(bottom, day)
    label = " — reconstructed data" if day.reconstructed else ""
    top.set_title(_plain_text(f"{day.session_date}: {len(day.trades)} trade(s), P&L {money(day.pnl)}{label}"))
    top.set_ylabel(f"{underlying} ($)")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    figure.tight_layout()
    return figure


def _option_axis(ax: Any, day: ChartDay) -> None:
    for trade in day.trades:
        points = [m for m in day.marks if m.trade_id == trade.trade_id]
        if points:
            x, y = [_clock(m.t_ms) for m in points], [m.mark for m in points]
            ax.step(x, y, where="post", linewidth=1, label=f"{trade.trade_id} {trade.ticker} mark")
        ax.scatter([_clock(trade.entry_ms)], [trade.entry_price], marker="^", color="tab:green", zorder=3)
        ax.scatter([_clock(trade.exit_ms)], [trade.exit_price], marker="v", color="tab:red", zorder=3)
    if not day.trades:
        ax.text(0.5, 0.5, "no trades", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel("option mark ($)\n▲ ask in, ▼ bid out")
    ax.grid(alpha=0.3)
    if day.trades:
        ax.legend(loc="upper left", fontsize="small")
