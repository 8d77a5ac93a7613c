"""The day chart: its trade panels (layout, levels from the run's rules, titles), the price panel's close and
VWAP told apart, and the PNG's exact size and weight. Hand-made days, no tapes."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from builders import at

from config import Rules
from pnl_tracker import TradeRow
from report_charts import (
    MAX_TRADE_PANELS,
    Level,
    MarkPoint,
    PricePoint,
    TradeLevels,
    day_chart,
    day_chart_png,
    day_figure,
    label_rows,
    panel_grid,
    panel_span_ms,
    panel_title,
    trade_levels,
    trade_panels,
)

OPEN_MS = at(9, 30)


def trade(
    number: int, *, entry_ms: int | None = None, seconds: int = 120, reason: str = "Stop loss"
) -> TradeRow:
    """A round trip every 30 minutes from 10:00: entry 1.00 at the ask, peak 1.20, exit 0.85 at the bid."""
    entry = entry_ms if entry_ms is not None else at(10, 0) + (number - 1) * 1_800_000
    return TradeRow(
        f"2025-10-02-{number:02d}", "2025-10-02", "O:IWM251002C00241000", 1,
        1.00, 0.85, entry, entry + seconds * 1000, reason, 1.20, -15.0, -15.0,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Day:
    """A `ChartDay`: IWM every 10 s from 09:30 to 16:00, marks and levels for its trades."""

    trades: tuple[TradeRow, ...]
    session_date: str = "2025-10-02"
    reconstructed: bool = False

    @property
    def prices(self) -> tuple[PricePoint, ...]:
        return tuple(
            PricePoint(OPEN_MS + i * 10_000, 240 + math.sin(i / 40), 240 + math.sin((i - 6) / 40))
            for i in range(2340)
        )

    @property
    def marks(self) -> tuple[MarkPoint, ...]:
        return tuple(
            MarkPoint(t.entry_ms + k * 10_000, t.trade_id, mark)
            for t in self.trades
            for k, mark in enumerate((1.02, 1.20, 0.95, 0.86))
        )

    @property
    def levels(self) -> tuple[Level, ...]:
        return tuple(
            Level(t.trade_id, kind, ms, 240.0)
            for t in self.trades
            for kind, ms in (("entry", t.entry_ms), ("exit", t.exit_ms))
        )

    @property
    def pnl(self) -> float:
        return round(sum(t.pnl_dollars for t in self.trades), 2)


def day_of(count: int) -> Day:
    return Day(tuple(trade(n) for n in range(1, count + 1)))


def decoded_size(png: bytes) -> tuple[int, int]:
    """(width, height) of the image as matplotlib decodes it."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")
    return pixels.shape[1], pixels.shape[0]


# Levels: from the rules of the run


def test_the_stop_and_giveback_levels_come_from_the_rules_given():
    default = trade_levels(trade(1), Rules())
    assert default == TradeLevels(
        entry=1.00, stop=pytest.approx(0.85), peak=1.20, giveback=pytest.approx(0.84), exit=0.85
    )
    tighter = trade_levels(trade(1), Rules(stop_loss_percent=10, max_giveback_percent=25))
    assert tighter.stop == pytest.approx(0.90) and tighter.giveback == pytest.approx(0.90)
    assert (tighter.entry, tighter.peak, tighter.exit) == (default.entry, default.peak, default.exit)


def test_a_panel_draws_its_horizontal_lines_at_the_levels_of_the_rules_given():
    for rules, stop, giveback in (
        (Rules(), 0.85, 0.84),
        (Rules(stop_loss_percent=10, max_giveback_percent=25), 0.90, 0.90),
    ):
        panel = day_figure(day_of(1), (900, 500), 90, "IWM", rules).axes[1]
        flat = sorted(line.get_ydata()[0] for line in panel.get_lines() if len(set(line.get_ydata())) == 1)
        assert flat == pytest.approx(sorted([1.00, stop, 1.20, giveback]))


def test_the_panel_legend_names_the_rules_percentages():
    figure = day_figure(
        day_of(2), (900, 500), 90, "IWM", Rules(stop_loss_percent=12.5, max_giveback_percent=40)
    )
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "stop (entry -12.5 %)" in labels and "hard giveback (peak -40 %)" in labels


# Layout: one panel per trade, up to MAX_TRADE_PANELS


@pytest.mark.parametrize(
    ("count", "grid"),
    [(0, (0, 0)), (1, (1, 1)), (3, (1, 3)), (4, (1, 4)), (5, (2, 3)), (6, (2, 3)), (8, (2, 4))],
)
def test_the_panel_grid_keeps_one_row_up_to_four_trades_then_spreads_two_rows_evenly(count, grid):
    assert panel_grid(count) == grid


def test_trade_panels_number_the_first_trades_and_lay_them_out_row_by_row():
    trades = [trade(n) for n in range(1, 10)]
    assert [(p.number, p.row, p.col) for p in trade_panels(trades[:4])] == [
        (1, 0, 0),
        (2, 0, 1),
        (3, 0, 2),
        (4, 0, 3),
    ]
    five = trade_panels(trades[:5])
    assert [(p.row, p.col) for p in five] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [p.trade for p in five] == trades[:5]
    assert len(trade_panels(trades)) == MAX_TRADE_PANELS == 6
    assert [p.number for p in trade_panels(trades, limit=2)] == [1, 2] and trade_panels([]) == []


@pytest.mark.parametrize("count", [0, 1, 4, 6, 9])
def test_the_figure_has_the_price_panel_and_one_panel_per_trade_shown(count):
    figure = day_figure(day_of(count), (1200, 700), 100)
    assert len(figure.axes) == 1 + min(count, MAX_TRADE_PANELS)
    titles = [ax.get_title() for ax in figure.axes[1:]]
    assert [t.split()[0] for t in titles] == [f"#{n}" for n in range(1, min(count, MAX_TRADE_PANELS) + 1)]
    more = "panels show the first 6" in figure.axes[0].get_title()
    assert more == (count > MAX_TRADE_PANELS)


def test_a_panel_is_zoomed_to_its_trade_with_a_margin():
    long_trade, short_trade = trade(1, seconds=600), trade(2, seconds=9)
    assert panel_span_ms(long_trade) == (long_trade.entry_ms - 60_000, long_trade.exit_ms + 60_000)
    assert panel_span_ms(short_trade) == (short_trade.entry_ms - 3_000, short_trade.exit_ms + 3_000)
    figure = day_figure(Day((long_trade, short_trade)), (900, 500), 90)
    width_days = [ax.get_xlim()[1] - ax.get_xlim()[0] for ax in figure.axes[1:]]
    assert width_days == pytest.approx([720 / 86_400, 15 / 86_400])
    ticks = figure.axes[2].get_xticks()  # the entry and exit, 9 s apart
    assert len(ticks) == 2 and ticks[1] - ticks[0] == pytest.approx(9 / 86_400)


def test_a_panel_title_names_the_contract_times_reason_fills_and_result():
    row = TradeRow(
        "2025-10-02-01", "2025-10-02", "O:IWM251002C00241000", 1,
        0.63, 0.53, at(10, 6, 25), at(10, 6, 34), "Stop loss", 0.665, -10.0, -15.87,
    )  # fmt: skip
    assert panel_title(1, row) == "#1 241C 10:06:25-10:06:34\nStop loss 0.63→0.53 -15.9 %"


def test_trade_numbers_close_in_time_drop_to_another_row():
    assert label_rows([0, 1_000, 2_000, 100_000, 101_000], 5_000) == [0, 1, 2, 0, 1]
    assert label_rows([0, 10_000, 20_000], 5_000) == [0, 0, 0]


# The price panel: close and VWAP told apart


def test_the_close_is_thin_and_solid_the_vwap_thick_dashed_and_labelled_by_its_window():
    price = day_figure(day_of(1), (900, 500), 90, "IWM", Rules(vwap_window_seconds=30)).axes[0]
    lines = {line.get_label(): line for line in price.get_lines()}
    close, vwap = lines["IWM close"], lines["30 s VWAP"]
    assert close.get_linestyle() == "-" and vwap.get_linestyle() == "--"
    assert vwap.get_linewidth() >= 2.5 * close.get_linewidth()
    assert close.get_color() != vwap.get_color() and close.get_zorder() > vwap.get_zorder()


# The PNG: exact size, small enough for a phone


def test_the_summary_png_has_the_exact_size_and_stays_small_with_six_trades():
    png = day_chart_png(day_of(6), (900, 500), 90, "IWM", Rules())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert decoded_size(png) == (900, 500) and 10_000 < len(png) < 150_000


def test_the_report_chart_is_written_at_1200_by_700(tmp_path: Path):
    path = day_chart(tmp_path / "day.png", day_of(3), Rules(stop_loss_percent=10))
    png = path.read_bytes()
    assert decoded_size(png) == (1200, 700) and len(png) < 150_000


def test_a_day_without_trades_has_no_entry_or_exit_in_its_legend():
    price = day_figure(day_of(0), (900, 500), 90).axes[0]
    labels = [text.get_text() for text in price.get_legend().get_texts()]
    assert labels == ["IWM close", "60 s VWAP"]
    assert [ax.get_legend_handles_labels()[1] for ax in day_figure(day_of(1), (900, 500), 90).axes[:1]] == [
        ["IWM close", "60 s VWAP", "entry", "exit"]
    ]
