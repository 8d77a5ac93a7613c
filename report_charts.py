"""Charts of a backtest report and of the daily summary: plain data in, a PNG out.

The day chart shows the underlying's close and its rolling VWAP with the trades (top) and, beneath, one
small panel per trade zoomed to it: the option mark with the entry, stop, peak, hard-giveback and exit
levels of the run's rules; the equity chart shows the closed-trade equity curve with its
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

from alert_text import contract_label, fixed, money
from config import Rules
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


def day_chart(path: Path, day: ChartDay, rules: Rules | None = None) -> Path:
    """The backtest report's day chart (DAY_PX at CHART_DPI), written to `path`.

    `rules` are the run's rules: the trade panels draw their stop and giveback levels from them.
    """
    figure = day_figure(day, DAY_PX, CHART_DPI, "IWM", rules)
    path.write_bytes(_png_bytes(figure))
    return path


def day_chart_png(
    day: ChartDay,
    size_px: tuple[int, int],
    dpi: int,
    underlying: str = "IWM",
    rules: Rules | None = None,
) -> bytes:
    """The day chart as PNG bytes of exactly `size_px`, optimised for size (a phone attachment)."""
    return _png_bytes(day_figure(day, size_px, dpi, underlying, rules))


# A day chart has a few flat colours and their anti-aliased edges: a full 8-bit palette keeps the markers'
# exact colours and makes the PNG about a third of its full-colour size (the phone fetches the summary's).
PNG_COLORS = 256


def _png_bytes(figure: Any) -> bytes:
    """The drawn figure as a palette PNG (Pillow, which matplotlib itself requires), no text chunks."""
    from PIL import Image

    canvas = figure.canvas
    canvas.draw()
    width, height = canvas.get_width_height(physical=True)
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buffer = io.BytesIO()
    image.convert("RGB").quantize(colors=PNG_COLORS).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


# The day chart's trade panels: one row up to PANELS_PER_ROW trades (the default MAX_TRADES_PER_DAY is 4),
# two rows beyond; more than MAX_TRADE_PANELS trades would make every panel too small to read.
PANELS_PER_ROW = 4
MAX_TRADE_PANELS = 6

# Colours and line styles shared by the price panel, the trade panels and their legend.
CLOSE_STYLE = {"color": "#1a1a1a", "linewidth": 0.7}
VWAP_STYLE = {"color": "#f07f00", "linewidth": 2.2, "linestyle": (0, (4, 2)), "alpha": 0.85}
ENTRY_COLOR, EXIT_COLOR = "#1e9e3e", "#d62728"
LEVEL_STYLES = {
    "entry": {"color": ENTRY_COLOR, "linewidth": 1.1, "linestyle": "-"},
    "stop": {"color": "#d62728", "linewidth": 1.1, "linestyle": (0, (4, 2))},
    "peak": {"color": "#1f5fbf", "linewidth": 1.3, "linestyle": (0, (1, 1.5))},
    "giveback": {"color": "#8e44ad", "linewidth": 1.1, "linestyle": (0, (5, 2, 1, 2))},
}


@dataclass(frozen=True, slots=True)
class TradeLevels:
    """The prices a trade panel draws: the fills and the exit rules' triggers at the trade's peak."""

    entry: float  # the ask paid
    stop: float  # entry x (1 - STOP_LOSS_PERCENT/100)
    peak: float  # the highest mark while held
    giveback: float  # peak x (1 - MAX_GIVEBACK_PERCENT/100): the hard giveback fires at or below it
    exit: float  # the bid received


def trade_levels(trade: TradeRow, rules: Rules) -> TradeLevels:
    """Entry, stop, peak, hard-giveback trigger and exit of `trade` under `rules` (as `risk_manager` checks)."""
    return TradeLevels(
        entry=trade.entry_price,
        stop=trade.entry_price * (1 - rules.stop_loss_percent / 100),
        peak=trade.peak,
        giveback=trade.peak * (1 - rules.max_giveback_percent / 100),
        exit=trade.exit_price,
    )


@dataclass(frozen=True, slots=True)
class TradePanel:
    """Where one trade's panel goes: its number in the day (1-based) and its cell in the panel grid."""

    number: int
    trade: TradeRow
    row: int
    col: int


def panel_grid(count: int, per_row: int = PANELS_PER_ROW) -> tuple[int, int]:
    """(rows, columns) for `count` panels: as few rows as `per_row` allows, the panels spread evenly."""
    if count <= 0:
        return 0, 0
    rows = math.ceil(count / per_row)
    return rows, math.ceil(count / rows)


def trade_panels(trades: Sequence[TradeRow], limit: int = MAX_TRADE_PANELS) -> list[TradePanel]:
    """One panel per trade, in the day's order, for the first `limit` trades, laid out row by row."""
    shown = list(trades)[: max(limit, 0)]
    _, cols = panel_grid(len(shown))
    return [TradePanel(i + 1, trade, i // cols, i % cols) for i, trade in enumerate(shown)]


def panel_title(number: int, trade: TradeRow) -> str:
    """`#1 241C 10:06:25-10:06:34` over `Stop loss 0.63→0.53 -15.9 %`: the trade, its fills and its end."""
    held = f"{ny_datetime(trade.entry_ms):%H:%M:%S}-{ny_datetime(trade.exit_ms):%H:%M:%S}"
    fills = f"{trade.entry_price:.2f}→{trade.exit_price:.2f}"
    result = f"{fixed(trade.pnl_percent, 1, sign=True)} %"
    return f"#{number} {contract_label(trade.ticker)} {held}\n{trade.reason} {fills} {result}"


def panel_span_ms(trade: TradeRow) -> tuple[int, int]:
    """The panel's time range: the trade's span plus 10 % of it (at least 3 s) on each side."""
    margin = max(3_000, (trade.exit_ms - trade.entry_ms) // 10)
    return trade.entry_ms - margin, trade.exit_ms + margin


def day_figure(
    day: ChartDay, size_px: tuple[int, int], dpi: int, underlying: str = "IWM", rules: Rules | None = None
) -> Any:
    """The day chart's Figure: the underlying's close and rolling VWAP with the trades (top), one panel per
    trade beneath with its option mark and levels (`trade_panels`)."""
    rules = rules if rules is not None else Rules()
    panels = trade_panels(day.trades)
    rows, cols = panel_grid(len(panels))
    figure = _figure(size_px, dpi)
    figure.set_layout_engine("constrained", h_pad=0.02, w_pad=0.02, hspace=0.02, wspace=0.02)
    # The price panel keeps about half of the height however many rows of trades sit beneath it.
    grid = figure.add_gridspec(1 + rows, max(cols, 1), height_ratios=[max(rows, 1) * 1.1, *[1.0] * rows])
    top = figure.add_subplot(grid[0, :])
    _price_axis(top, day, underlying, rules)
    for panel in panels:
        _trade_axis(figure.add_subplot(grid[1 + panel.row, panel.col]), panel, day, rules)
    if panels:
        _panel_legend(figure, rules)
    return figure


def _day_title(day: ChartDay, shown: int) -> str:
    count = len(day.trades)
    trades = f"{count} trade" + ("" if count == 1 else "s")
    source = ""
    if day.reconstructed:
        method = getattr(day, "option_quotes", None)
        source = " — reconstructed data" + (" (minute-bar approximation)" if method == "minute" else "")
    more = f" — panels show the first {shown}" if shown < count else ""
    return _plain_text(f"{day.session_date}: {trades}, P&L {money(day.pnl)}{source}{more}")


def _price_axis(ax: Any, day: ChartDay, underlying: str, rules: Rules) -> None:
    """Close (thin, dark) over the rolling VWAP (thick, dashed, orange); each trade shaded and numbered."""
    from matplotlib.dates import DateFormatter

    times = [_clock(p.t_ms) for p in day.prices]
    vwap_label = f"{rules.vwap_window_seconds:g} s VWAP"
    # The VWAP lies beneath, wide; the close runs thin on top of it: where they overlap both stay visible.
    ax.plot(times, [p.close for p in day.prices], label=f"{underlying} close", zorder=3, **CLOSE_STYLE)
    ax.plot(times, [p.vwap for p in day.prices], label=vwap_label, zorder=2, **VWAP_STYLE)
    _trade_spans(ax, day)
    _fill_markers(ax, day)
    if not day.trades:
        ax.text(0.5, 0.04, "no trades", transform=ax.transAxes, ha="center", va="bottom", color="grey")
    ax.set_title(_day_title(day, min(len(day.trades), MAX_TRADE_PANELS)), fontsize="medium")
    ax.set_ylabel(f"{underlying} ($)", fontsize="small")
    ax.tick_params(labelsize="small")
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    ax.legend(loc="best", fontsize="x-small", ncols=2, framealpha=0.8)
    ax.grid(alpha=0.3)


def _fill_markers(ax: Any, day: ChartDay) -> None:
    """▲ at the underlying's close when each trade opened, ▼ when it closed (no legend entry without any)."""
    for kind, marker, color in (("entry", "^", ENTRY_COLOR), ("exit", "v", EXIT_COLOR)):
        levels = [lv for lv in day.levels if lv.kind == kind and math.isfinite(lv.close)]
        x, y = [_clock(lv.t_ms) for lv in levels], [lv.close for lv in levels]
        label = kind if levels else "_nolegend_"
        style = {"s": 45, "color": color, "edgecolors": "white", "linewidths": 0.5, "zorder": 4}
        ax.scatter(x, y, marker=marker, label=label, **style)


def label_rows(starts_ms: Sequence[int], min_gap_ms: int) -> list[int]:
    """A text row for each label at `starts_ms` (in order): the first row whose previous label starts at
    least `min_gap_ms` earlier, so the numbers of trades close in time do not print over each other."""
    last_in_row: list[int] = []
    rows = []
    for start in starts_ms:
        row = next((i for i, last in enumerate(last_in_row) if start - last >= min_gap_ms), len(last_in_row))
        if row == len(last_in_row):
            last_in_row.append(start)
        last_in_row[row] = start
        rows.append(row)
    return rows


def _trade_spans(ax: Any, day: ChartDay) -> None:
    """Each trade's time shaded (green a win, red a loss) and numbered at the top, as its panel is."""
    times = [p.t_ms for p in day.prices] + [t.entry_ms for t in day.trades] + [t.exit_ms for t in day.trades]
    # Labels closer than 3 % of the chart's time range would touch: they drop to the next row.
    min_gap_ms = (max(times) - min(times)) * 3 // 100 if times else 0
    rows = label_rows([t.entry_ms for t in day.trades], min_gap_ms)
    for number, (trade, row) in enumerate(zip(day.trades, rows, strict=True), start=1):
        color = ENTRY_COLOR if trade.pnl_dollars > 0 else EXIT_COLOR
        ax.axvspan(_clock(trade.entry_ms), _clock(trade.exit_ms), color=color, alpha=0.12, linewidth=0)
        ax.annotate(
            str(number), (_clock(trade.entry_ms), 1.0), xycoords=("data", "axes fraction"),
            xytext=(0, -2 - 10 * row), textcoords="offset points", ha="left", va="top", fontsize="small",
            weight="bold",
        )  # fmt: skip


def _trade_axis(ax: Any, panel: TradePanel, day: ChartDay, rules: Rules) -> None:
    """One trade zoomed to its span: the mark (mid) as a step line, the levels as horizontal lines."""
    trade = panel.trade
    levels = trade_levels(trade, rules)
    points = [m for m in day.marks if m.trade_id == trade.trade_id]
    if points:
        # The mark holds its last value until the exit, so the line reaches the exit marker.
        x = [_clock(m.t_ms) for m in points] + [_clock(trade.exit_ms)]
        y = [m.mark for m in points] + [points[-1].mark]
        ax.step(x, y, where="post", color="black", linewidth=1.0, zorder=3)
    for name in ("entry", "stop", "peak", "giveback"):
        ax.axhline(getattr(levels, name), zorder=2, **LEVEL_STYLES[name])
    ax.scatter([_clock(trade.entry_ms)], [levels.entry], marker="^", s=40, color=ENTRY_COLOR, zorder=4)
    ax.scatter([_clock(trade.exit_ms)], [levels.exit], marker="v", s=40, color=EXIT_COLOR, zorder=4)
    start, end = panel_span_ms(trade)
    ax.set_xlim(_clock(start), _clock(end))
    _time_ticks(ax, trade)
    ax.set_title(_plain_text(panel_title(panel.number, trade)), fontsize="small", linespacing=1.1)
    ax.tick_params(labelsize="x-small")
    ax.grid(alpha=0.25)


def _time_ticks(ax: Any, trade: TradeRow) -> None:
    """The entry and exit times as the only ticks (the span's margin keeps their labels apart)."""
    from matplotlib.dates import DateFormatter

    ax.set_xticks([_clock(trade.entry_ms), _clock(trade.exit_ms)])
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))


def _panel_legend(figure: Any, rules: Rules) -> None:
    """One legend for every trade panel, naming the rules' percentages behind the stop and giveback lines."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="black", linewidth=1.0, label="option mark (mid)"),
        Line2D([], [], marker="^", linestyle="none", color=ENTRY_COLOR, label="entry (ask)"),
        Line2D([], [], label=f"stop (entry -{rules.stop_loss_percent:g} %)", **LEVEL_STYLES["stop"]),
        Line2D([], [], label="peak", **LEVEL_STYLES["peak"]),
        Line2D(
            [],
            [],
            label=f"hard giveback (peak -{rules.max_giveback_percent:g} %)",
            **LEVEL_STYLES["giveback"],
        ),
        Line2D([], [], marker="v", linestyle="none", color=EXIT_COLOR, label="exit (bid)"),
    ]
    figure.legend(
        handles=handles, loc="outside lower center", ncols=len(handles), fontsize="x-small", frameon=False
    )
