"""Alert text and delivery (DESIGN section 8): pure functions with exact expectations."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import at

from alert_text import (
    DEFAULT_DELIVERY,
    PUSHOVER_SOUNDS,
    SUMMARY_TRADE_LINES,
    BuyContext,
    DayTrade,
    ExitTrigger,
    SellContext,
    block_text,
    buy_message,
    contract_label,
    delivery_for,
    delivery_overrides,
    delivery_problems,
    exit_lines,
    exit_trigger,
    fixed,
    gapped,
    leadership_text,
    momentum_text,
    money,
    price,
    priority_for,
    rule_words,
    sell_message,
    signed_pct,
    sound_for,
    summary_message,
    summary_title,
    trigger_text,
)
from config import ConfigError, Rules, Settings, settings_from_env
from risk_manager import Lifetime, Position, check_exit

POSITION = Position(
    trade_id="2025-10-02-01",
    session_date="2025-10-02",
    ticker="O:IWM251002C00243000",
    strike=243.0,
    expiry="2025-10-02",
    contracts=1,
    entry_price=1.45,
    entry_mark=1.44,
    entry_ms=at(10, 6, 25),
    delta=0.41,
    iv=0.34,
    peak=1.44,
    mark=1.44,
    bid=1.43,
)


# Numbers


def test_a_rounded_zero_prints_without_a_sign():
    assert (fixed(-0.004, 2), fixed(-0.004, 2, sign=True), fixed(0.0, 2, sign=True)) == (
        "0.00",
        "0.00",
        "0.00",
    )
    assert (fixed(0.006, 2, sign=True), fixed(-0.006, 2, sign=True)) == ("+0.01", "-0.01")
    assert (signed_pct(-0.04), signed_pct(18.5)) == ("0.0%", "+18.5%")
    assert (money(-0.004), money(0.0), money(1234), money(-12.5)) == (
        "$0.00",
        "$0.00",
        "+$1,234.00",
        "-$12.50",
    )


def test_momentum_is_fixed_point_never_scientific():
    assert (momentum_text(3e-05), momentum_text(-8e-05), momentum_text(0.00119)) == (
        "+0.00003%/s",
        "-0.00008%/s",
        "+0.00119%/s",
    )
    assert (momentum_text(4e-07), momentum_text(None)) == ("0.00000%/s", "n/a")


def test_prices_keep_the_decimals_of_a_level_between_cents():
    assert [price(v) for v in (2.1, 1.45 * 0.85, 0.62 * 0.7, 0.5, 0.625)] == [
        "$2.10",
        "$1.2325",
        "$0.434",
        "$0.50",
        "$0.625",
    ]


def test_leadership_says_leads_or_lags_with_an_unsigned_size():
    assert leadership_text(0.04) == "IWM lags SPY by 0.04 pts"
    assert leadership_text(-0.04) == "IWM leads SPY by 0.04 pts"
    assert leadership_text(-0.004) == leadership_text(0.0) == "IWM level with SPY (0.00 pts)"


def test_rules_read_as_words():
    assert [
        rule_words(r) for r in ("spy_leadership", "relative_volume", "entry_blackout", "some_new_rule")
    ] == [
        "SPY leadership",
        "relative volume",
        "entry blackout",
        "some new rule",
    ]
    assert block_text("relative_volume", "0.60x", "1.50x min") == "relative volume (0.60x vs 1.50x min)"
    assert "--resume" in block_text("paused", "pause switch on", "resume to allow entries")


# Exit levels and gaps


def test_the_stop_level_is_the_one_check_exit_compares_the_mark_with():
    rules = Rules()
    stop = exit_trigger("Stop loss", POSITION, rules)
    assert stop is not None and price(stop.level) == "$1.2325"  # 1.45 x (1 - 15/100), on the ask paid
    at_level = replace(POSITION, mark=1.2325, bid=1.22)
    above = replace(POSITION, mark=1.235, bid=1.23)
    exit_at = check_exit(at_level, now_ms=0, time_stop_ms=1, last_close=None, last_vwap=None, rules=rules)
    exit_above = check_exit(above, now_ms=0, time_stop_ms=1, last_close=None, last_vwap=None, rules=rules)
    assert exit_at is not None and exit_at.reason == "Stop loss" and exit_above is None


def test_giveback_levels_follow_the_peak_and_time_rules_have_none():
    peaked = replace(POSITION, peak=2.10, mark=1.45)
    hard = exit_trigger("Hard giveback", peaked, Rules())
    tight = exit_trigger("VWAP giveback", peaked, Rules())
    assert hard is not None and tight is not None
    assert (price(hard.level), price(tight.level)) == ("$1.47", "$1.68")
    assert exit_trigger("Time stop", peaked, Rules()) is None
    assert exit_trigger("VWAP persistence", peaked, Rules()) is None


def test_far_means_two_points_of_the_base_and_more_than_a_cent():
    stop = ExitTrigger("stop", 1.2325, 15, "entry", 1.45)  # 2 points of 1.45 = 0.029
    assert not gapped(stop, 1.2325 - 0.028) and gapped(stop, 1.2325 - 0.030)
    cheap = ExitTrigger("stop", 0.238, 15, "entry", 0.28)  # 2 points = 0.0056: the cent decides
    assert not gapped(cheap, 0.23) and gapped(cheap, 0.225)


def test_the_trigger_line_says_plainly_when_the_mark_gapped():
    stop = ExitTrigger("stop", 1.2325, 15, "entry", 1.45)
    assert trigger_text(stop, 1.23) == "Trigger $1.2325 (15% off the $1.45 entry), marked $1.23"
    assert trigger_text(stop, 0.98) == (
        "The mark gapped past the stop between two quotes ($1.2325 trigger, marked $0.98)"
    )


# Whole messages


def buy_context(**changes: object) -> BuyContext:
    context = BuyContext(
        underlying="IWM",
        close=243.12,
        rolling_vwap=243.0,
        day_vwap=242.5,
        momentum_pct_per_sec=3e-05,
        volume_z=2.31,
        bid=1.43,
        mid=1.44,
        spread_pct=1.39,
        bid_size=153,
        ask_size=1_200_000,
        delta_source="greeks",
        filters="SPY leadership: IWM leads SPY by 0.04 pts; relative volume: 2.12x",
        exit_rules=exit_lines(POSITION, Rules(), "15:55"),
    )
    return replace(context, **changes)  # type: ignore[arg-type]


def test_buy_message_has_the_design_fields_the_quote_in_words_and_the_exit_levels():
    text = buy_message(POSITION, buy_context())
    assert text.splitlines() == [
        "IWM $243.12 | VWAP $243.00 (+0.05%) | day VWAP $242.50",
        "Momentum +0.00003%/s | Volume Z 2.3",
        "O:IWM251002C00243000",
        "Exp 2025-10-02 | Strike $243 | Delta 0.41 | IV 34.0%",
        "Entry ~$1.45 (ask) | Mid $1.44 | Spread 1.4%",
        "bid 1.43 × ask 1.45 | size 153 × 1,200,000 (bid × ask) | Contracts 1",
        "Filters: SPY leadership: IWM leads SPY by 0.04 pts; relative volume: 2.12x",
        "Stop $1.2325 (-15% of entry): sells when the mid is at or below it",
        "Giveback exit 30% off peak (now $1.008); 20% while IWM is below VWAP (now $1.152)",
        "Also exits after 60s below VWAP | time stop 15:55",
        "10:06:25 ET | trade 2025-10-02-01",
    ]


def test_buy_message_without_momentum_or_greeks_says_so():
    text = buy_message(POSITION, buy_context(momentum_pct_per_sec=None, delta_source="black_scholes"))
    assert "Momentum n/a" in text and "Delta 0.41 (BS)" in text


def sell_context(reason: str, position: Position, **changes: object) -> SellContext:
    context = SellContext(
        underlying="IWM",
        reason=reason,
        close=242.9,
        rolling_vwap=243.0,
        exit_price=position.bid,
        exit_ms=at(10, 30),
        pnl_dollars=23.0,
        pnl_percent=18.5,
        lifetime=Lifetime(1234.0, 12, 5),
        trigger=exit_trigger(reason, position, Rules()),
    )
    return replace(context, **changes)  # type: ignore[arg-type]


def test_sell_message_has_the_design_fields():
    closed = replace(POSITION, peak=2.10, mark=1.45, bid=1.44)
    text = sell_message(closed, sell_context("VWAP persistence", closed))
    assert text.splitlines() == [
        "Reason: VWAP persistence",
        "IWM $242.90 vs VWAP $243.00 (-0.04%)",
        "O:IWM251002C00243000",
        "Peak $2.10 → Now $1.45",
        "Entry $1.45 → Exit ~$1.44 (bid)",
        "P&L: +18.5% (+$23.00)",
        "LIFETIME: +$1,234.00 | 12W-5L (70.6%)",
        "10:30:00 ET | trade 2025-10-02-01",
    ]


def test_a_stop_sell_far_past_its_trigger_says_the_mark_gapped():
    gapped_position = replace(POSITION, mark=0.98, bid=0.97)
    text = sell_message(
        gapped_position, sell_context("Stop loss", gapped_position, pnl_dollars=-48.0, pnl_percent=-33.1)
    )
    lines = text.splitlines()
    assert lines[:2] == [
        "Reason: Stop loss",
        "The mark gapped past the stop between two quotes ($1.2325 trigger, marked $0.98)",
    ]
    assert "Peak $1.44 → Now $0.98" in text and "P&L: -33.1% (-$48.00)" in text
    near = replace(POSITION, mark=1.225, bid=1.22)
    assert "gapped" not in sell_message(near, sell_context("Stop loss", near))


def test_a_sell_with_no_bar_yet_says_so():
    text = sell_message(POSITION, sell_context("Time stop", POSITION, close=None, rolling_vwap=None))
    assert "IWM: no bar yet" in text and "Trigger" not in text


# Delivery: priority and sound per kind


def test_default_delivery_per_kind():
    assert delivery_for("BUY") == (1, "cashregister")
    assert delivery_for("SELL") == (1, "siren")
    assert [priority_for(k) for k in ("START", "STALL", "RECOVERED", "FEED_ERROR")] == [0, 0, 0, 0]
    assert delivery_for("CRITICAL_LOSS") == (2, "persistent")
    assert delivery_for("SOMETHING_NEW") == (0, None)
    assert all(sound is None or sound in PUSHOVER_SOUNDS for _, sound in DEFAULT_DELIVERY.values())


def test_overrides_replace_the_defaults_and_bad_ones_are_ignored_when_sending():
    overrides = {
        "ALERT_PRIORITY_BUY": 2,
        "ALERT_SOUND_BUY": " CashRegister ",
        "ALERT_SOUND_SELL": "none",
        "ALERT_SOUND_CRITICAL_LOSS": "",
        "ALERT_PRIORITY_STALL": 7,
        "ALERT_SOUND_STALL": "kazoo",
    }
    assert delivery_for("BUY", overrides) == (2, "cashregister")
    assert sound_for("SELL", overrides) == "none"  # Pushover's silent sound
    assert sound_for("CRITICAL_LOSS", overrides) is None  # empty: the app's default
    assert delivery_for("STALL", overrides) == (0, None)
    assert delivery_problems(overrides) == [
        "ALERT_PRIORITY_STALL=7: expected a Pushover priority from -2 to 2",
        "ALERT_SOUND_STALL='kazoo': expected a Pushover sound ("
        + ", ".join(sorted(PUSHOVER_SOUNDS))
        + ") or empty for the default",
    ]


def test_settings_defaults_are_the_delivery_table_and_the_environment_overrides_them():
    defaults = delivery_overrides(Settings())
    assert {k: delivery_for(k, defaults) for k in DEFAULT_DELIVERY} == DEFAULT_DELIVERY
    assert delivery_problems(defaults) == []
    settings = settings_from_env({"ALERT_PRIORITY_SELL": "2", "ALERT_SOUND_SELL": "bugle"})
    assert delivery_for("SELL", delivery_overrides(settings)) == (2, "bugle")


@pytest.mark.parametrize("raw", ["3", "-3", "high"])
def test_a_priority_outside_pushovers_range_stops_start_up(raw: str):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"ALERT_PRIORITY_BUY": raw})
    assert caught.value.problems[0].startswith(f"ALERT_PRIORITY_BUY={raw!r}")


# The daily summary


def day_trade(n: int, pnl: float, percent: float, reason: str, ticker: str = POSITION.ticker) -> DayTrade:
    entry_ms = at(10, 6 + n * 10, 25)
    exit_price = round(1.45 + pnl / 100, 2)
    return DayTrade(
        f"2025-10-02-{n:02d}", ticker, entry_ms, entry_ms + 400_000, 1.45, exit_price, reason, pnl, percent
    )


def test_summary_lists_each_trade_under_the_day_and_lifetime_totals():
    trades = [day_trade(1, 37.0, 25.52, "Hard giveback"), day_trade(2, -22.0, -15.17, "Stop loss")]
    text = summary_message("2025-10-02", trades, Lifetime(140.5, 6, 3))
    assert summary_title("IWM") == "IWM 0DTE — DAILY SUMMARY"
    assert text == "\n".join(
        (
            "2025-10-02 (Thu): 2 trades",
            "Day P&L: +$15.00 | 1W-1L (50.0%)",
            "LIFETIME: +$140.50 | 6W-3L (66.7%)",
            "1. 243C 10:16→10:23 $1.45→$1.82 +25.5% (+$37.00) Hard giveback",
            "2. 243C 10:26→10:33 $1.45→$1.23 -15.2% (-$22.00) Stop loss",
        )
    )


def test_a_flat_trade_counts_as_a_loss_and_a_long_day_keeps_its_totals_within_pushovers_limit():
    trades = [day_trade(n % 3, 0.0 if n == 0 else 5.0, 3.45, "VWAP persistence") for n in range(40)]
    text = summary_message("2025-10-03", trades, Lifetime(195.0, 39, 1))
    lines = text.splitlines()
    assert lines[:3] == [
        "2025-10-03 (Fri): 40 trades",
        "Day P&L: +$195.00 | 39W-1L (97.5%)",
        "LIFETIME: +$195.00 | 39W-1L (97.5%)",
    ]
    assert len(lines) == 3 + SUMMARY_TRADE_LINES + 1 and lines[-1] == "... and 30 more"
    assert len(text) <= 1024


def test_contract_labels_are_strike_and_right_and_other_tickers_pass_through():
    assert contract_label("O:IWM251002C00243000") == "243C"
    assert contract_label("O:IWM251002P00243500") == "243.5P"
    assert contract_label("SOMETHING") == "SOMETHING"
