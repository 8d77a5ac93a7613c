"""The mark rule with streamed quotes (issue 11): any source, newest valid quote by its own time wins.

A `Q` event of the options stream, a chain snapshot and the single-contract snapshot all move the mark;
an invalid or older quote changes nothing and is counted. Exits fire on the quote that crosses the
trigger, at that quote's bid. The peak is written at most once a second; the SELL carries the final one.
"""

from __future__ import annotations

import pytest
from builders import TICKER, at, burst_bars, chain, engine, quote
from test_engine import ENTRY_BAR_START, START, closes, feed, opened

from events import Alert, ContractSnapshot, Tick, UpdatePosition
from feed import FeedDecoder
from polygon_client import parse_ws_frame

ENTRY = 1.02  # the ask paid; the stop is a mid at or below 0.867, the hard giveback 30 % off the peak


def q_event(t: int, bid: float, ask: float, sym: str = TICKER) -> dict:
    return {
        "ev": "Q",
        "sym": sym,
        "bx": 302,
        "ax": 313,
        "bp": bid,
        "ap": ask,
        "bs": 12,
        "as": 30,
        "t": t,
        "q": 1,
    }


def streamed(received_ms: int, bid: float, ask: float, quote_ms: int | None = None) -> ContractSnapshot:
    """What the decoder makes of one `Q` event received at `received_ms`."""
    frame = [q_event(quote_ms if quote_ms is not None else received_ms - 5, bid, ask)]
    (event,) = FeedDecoder("IWM", "SPY").ws(received_ms, frame)
    assert isinstance(event, ContractSnapshot) and event.source == "stream"
    return event


def holding():
    eng = engine()
    feed(eng, [chain(START + 110_000, quote())])
    assert len(opened(feed(eng, burst_bars(START)))) == 1
    return eng


def test_a_q_event_parses_to_a_quote_of_its_contract():
    parsed = parse_ws_frame([q_event(1_759_415_400_123, 1.42, 1.45)], 0, frozenset({"IWM"}))
    (q,) = parsed.quotes
    assert (q.ticker, q.strike, q.expiry, q.right, q.bid, q.ask, q.bid_size, q.ask_size, q.quote_ms) == (
        TICKER, 242.0, "2025-10-02", "call", 1.42, 1.45, 12, 30, 1_759_415_400_123,
    )  # fmt: skip
    stock = parse_ws_frame([{"ev": "Q", "sym": "IWM", "bp": 1, "ap": 2, "t": 1}], 0, frozenset({"IWM"}))
    broken = parse_ws_frame(
        [{"ev": "Q", "sym": "O:IWMX", "t": 1}, {"ev": "Q", "sym": TICKER}], 0, frozenset()
    )
    assert (stock.quotes, stock.ignored) == ((), 1) and broken.bad == 1
    # Without a time or prices it is still its contract's quote (taken untimed), and no mark can use it.
    ((untimed,),) = [broken.quotes]
    assert (untimed.ticker, untimed.bid, untimed.ask, untimed.quote_ms) == (TICKER, None, None, None)


def test_a_stop_loss_between_two_snapshots_fires_on_the_streamed_quote_at_its_bid():
    eng = holding()
    t = ENTRY_BAR_START + 2000
    assert closes(feed(eng, [streamed(t, 0.95, 0.97), streamed(t + 300, 0.90, 0.92)])) == []
    actions = feed(eng, [streamed(t + 600, 0.86, 0.87)])  # mid 0.865: the first quote past the stop
    (close,) = closes(actions)
    assert (close.reason, close.exit_price, close.exit_ms) == ("Stop loss", 0.86, t + 600)
    assert eng.marks.stream == 3 and eng.position is None


def test_a_hard_giveback_from_a_peak_seen_only_on_the_stream():
    eng = holding()
    t = ENTRY_BAR_START + 2000
    feed(eng, [streamed(t, 1.59, 1.61)])  # a peak of 1.60 that no snapshot shows
    assert closes(feed(eng, [streamed(t + 200, 1.13, 1.15)])) == []  # 28 % off the peak
    (close,) = closes(feed(eng, [streamed(t + 400, 1.11, 1.13)]))  # mid 1.12: 30 % off 1.60
    assert (close.reason, close.exit_price, close.peak) == ("Hard giveback", 1.11, 1.6)


def test_invalid_crossed_zero_bid_and_older_quotes_change_nothing():
    eng = holding()
    t = ENTRY_BAR_START + 2000
    feed(eng, [streamed(t, 1.20, 1.22)])
    before = eng.position
    ignored = [
        streamed(t + 100, 0.0, 0.50),  # zero bid
        streamed(t + 200, 0.90, 0.80),  # crossed
        streamed(t + 300, 0.50, 0.52, quote_ms=t - 1000),  # older than the quote behind the mark
        ContractSnapshot(t + 400, quote(bid=0.5, ask=0.52, quote_ms=t - 500)),  # an older REST snapshot
    ]
    actions = feed(eng, ignored)
    assert closes(actions) == [] and eng.position == before
    assert (eng.marks.invalid, eng.marks.stale) == (2, 2)
    newer = feed(eng, [ContractSnapshot(t + 500, quote(bid=0.5, ask=0.52, quote_ms=t + 450))])
    assert [c.reason for c in closes(newer)] == ["Stop loss"]  # a newer REST quote counts like any other


def test_a_glitch_quote_neither_marks_nor_sets_the_peak_and_a_wide_real_market_still_does():
    """One absurd quote (an offer of $999.99, a 0.05 x 1.50 flicker) set the mark: the next normal quote
    fired a Hard giveback from a $500 peak, or the flicker's mid fired a Stop loss at a $0.05 bid."""
    eng = holding()
    t = ENTRY_BAR_START + 2000
    feed(eng, [streamed(t, 1.00, 1.02)])
    before = eng.position
    glitches = [streamed(t + 100, 1.00, 999.99), streamed(t + 200, 0.05, 1.50), streamed(t + 300, 0.01, 0.60)]
    assert closes(feed(eng, glitches)) == [] and eng.position == before
    assert eng.marks.invalid == 3
    assert closes(feed(eng, [streamed(t + 400, 1.00, 1.02)])) == [] and eng.position.peak == before.peak
    # Wide but plausible: spread above $0.50 yet below its mid, or above its mid yet at most $0.50.
    feed(eng, [streamed(t + 500, 1.30, 1.85)])
    assert eng.position.mark == pytest.approx(1.575)
    (close,) = closes(feed(eng, [streamed(t + 600, 0.10, 0.60)]))  # mid 0.35, spread 0.50 exactly
    assert (close.reason, close.exit_price) == ("Stop loss", 0.1)


@pytest.mark.parametrize("lead_ms", [86_400_000, 61_000], ids=["a day", "just past the skew"])
def test_a_quote_stamped_far_ahead_cannot_freeze_the_mark_of_the_stop(lead_ms):
    """One quote (streamed or REST) stamped a day ahead used to make every real quote after it "older":
    the mark froze and the stop never fired. One 61 s ahead froze it for a minute: judged again at each
    quote, its stamp looked plausible (within the 60 s skew) a second after it came."""
    t = ENTRY_BAR_START + 2000
    for ahead in (
        streamed(t, 1.20, 1.22, quote_ms=t + lead_ms),
        ContractSnapshot(t, quote(bid=1.2, ask=1.22, quote_ms=t + lead_ms)),
    ):
        eng = holding()
        assert closes(feed(eng, [ahead])) == [] and eng.position.mark == 1.21
        assert closes(feed(eng, [streamed(t + 1000, 0.70, 0.72)])) == [], "within the 2 s a stamp may lead"
        (close,) = closes(feed(eng, [streamed(t + 3500, 0.70, 0.72)]))
        assert (close.reason, close.exit_price) == ("Stop loss", 0.7)
        assert eng.marks.stale == 1


def test_a_feed_whose_clock_runs_ahead_keeps_its_quotes_in_their_own_order():
    """Stamps 10 s ahead of the daemon's clock: the mark's stamp used to be capped at the clock + 2 s, so an
    older quote (by its own stamp, still ahead of that cap) passed and fired a false stop."""
    eng = holding()
    t = ENTRY_BAR_START + 2000
    skew = 10_000
    feed(eng, [streamed(t, 1.20, 1.22, quote_ms=t + skew)])
    assert closes(feed(eng, [streamed(t + 1000, 0.50, 0.52, quote_ms=t + skew - 500)])) == []
    assert eng.position.mark == 1.21 and eng.marks.stale == 1
    (close,) = closes(feed(eng, [streamed(t + 2000, 0.50, 0.52, quote_ms=t + skew + 2000)]))
    assert close.reason == "Stop loss"


@pytest.mark.parametrize("ahead_ms", [3_000, 12_000])
def test_a_rest_quote_older_than_a_streamed_mark_stamped_ahead_of_the_clock_is_refused(ahead_ms):
    """Streamed stamps ahead of this machine's clock (a clock a few seconds behind, a skewed feed) must not let
    an older REST snapshot, stamped within the clock's reach, past the streamed mark: it fired a Hard giveback
    from a $1.45 peak on a 1.00 x 1.02 snapshot that was 2 s older than the 1.44 x 1.46 quote."""
    eng = holding()
    t = ENTRY_BAR_START + 2000
    feed(eng, [streamed(t, 1.44, 1.46, quote_ms=t + ahead_ms)])
    older = ContractSnapshot(t + 300, quote(bid=1.00, ask=1.02, quote_ms=t - 2000))
    assert closes(feed(eng, [older])) == [] and eng.position.mark == 1.45 and eng.marks.stale == 1
    # A snapshot stamped just before the mark's quote, come when the clock has caught up with its stamp.
    later = ContractSnapshot(t + ahead_ms, quote(bid=1.00, ask=1.02, quote_ms=t + ahead_ms - 500))
    assert closes(feed(eng, [later])) == [] and eng.position.mark == 1.45 and eng.marks.stale == 2


def test_a_chain_snapshot_older_than_the_streamed_mark_is_ignored():
    eng = holding()
    t = ENTRY_BAR_START + 2000
    feed(eng, [streamed(t, 1.30, 1.32)])
    feed(eng, [chain(t + 1000, quote(bid=0.5, ask=0.52, quote_ms=t - 3000))])
    assert eng.position.mark == 1.31 and eng.marks.stale == 1


def test_a_quote_storm_writes_the_peak_at_most_once_a_second_and_the_sell_carries_the_last():
    eng = holding()
    t = ENTRY_BAR_START + 2000
    events = []
    for i in range(600):  # 3 s of a rising contract at 200 quotes a second
        price = round(1.02 + 0.001 * i, 3)
        events.append(streamed(t + i * 5, price, price + 0.02))
        if i % 200 == 199:
            events.append(Tick(t + i * 5 + 1))
    actions = feed(eng, events)
    updates = [a for a in actions if isinstance(a, UpdatePosition)]
    assert 1 <= len(updates) <= 4
    assert all(b.peak > a.peak for a, b in zip(updates, updates[1:], strict=False))
    (close,) = closes(feed(eng, [streamed(t + 3500, 1.0, 1.02)]))
    assert close.peak == round(1.02 + 0.001 * 599 + 0.01, 3)
    assert close.peak > updates[-1].peak  # the last second of peak rides on the SELL, not on an fsync


def test_a_restart_refuses_quotes_older_than_the_one_behind_the_saved_mark(tmp_path):
    """The journal kept no quote time, so after a kill -9 the first valid quote set the mark whatever its
    age: a REST snapshot older than the streamed mark re-marked the position and fired a Hard giveback."""
    from pnl_tracker import Journal

    journal = Journal(tmp_path / "journal.sqlite3")
    eng = engine()
    journal.record(feed(eng, [chain(START + 110_000, quote()), *burst_bars(START)]))
    t = ENTRY_BAR_START + 2000
    journal.record(feed(eng, [streamed(t, 1.44, 1.46)]))  # a new peak: saved with its quote's stamp
    journal.record(feed(eng, [Tick(t + 1000), streamed(t + 4000, 1.40, 1.42), Tick(t + 10_000)]))
    restarted = engine()
    restarted.restore(journal.restored_state("2025-10-02"), "2025-10-02")
    assert restarted.position is not None and restarted.position.mark == 1.41
    older = ContractSnapshot(t + 12_000, quote(bid=1.00, ask=1.02, quote_ms=t - 1000))  # the entry's quote
    assert closes(feed(restarted, [older])) == [] and restarted.position.mark == 1.41
    assert restarted.marks.stale == 1
    newer = ContractSnapshot(t + 13_000, quote(bid=1.30, ask=1.32, quote_ms=t + 12_500))
    assert closes(feed(restarted, [newer])) == [] and restarted.position.mark == 1.31


def test_a_quiet_contracts_standing_quote_keeps_the_mark_fresh():
    """A REST snapshot repeating an unchanged quote (same stamp, same prices) is the contract's market: it
    keeps the mark fresh, and a time stop after it books that bid without an "Old price" line."""
    eng = holding()
    t = ENTRY_BAR_START + 2000
    standing = quote(bid=1.20, ask=1.22, quote_ms=t - 5)
    feed(eng, [ContractSnapshot(t + n * 2000, standing) for n in range(40)])
    assert eng.mark_set_ms == t + 78_000
    feed(eng, [ContractSnapshot(at(15, 54, 50), standing)])  # REST still answers, with the same quote
    message = sell_text(feed(eng, [Tick(at(15, 55))]))
    assert message.startswith("Reason: Time stop\n") and "Old price" not in message


def test_a_restart_dates_a_standing_quote_by_its_last_stamp_not_its_last_price_change(tmp_path):
    """Only a price change saved the quote's stamp: after a restart at 15:55, a quote repeated unchanged
    until half a second before the kill was dated back to 15:22, and the SELL said "Old price: no quote
    of this contract for 33 min" (the replay of the same tape said nothing)."""
    from pnl_tracker import Journal

    journal = Journal(tmp_path / "journal.sqlite3")
    eng = engine()
    journal.record(feed(eng, [chain(START + 110_000, quote()), *burst_bars(START)]))
    journal.record(feed(eng, [streamed(at(15, 22), 1.30, 1.32)]))
    repeats = [streamed(at(15, 22) + n * 2000, 1.30, 1.32) for n in range(1, 985)]  # to 15:54:48
    journal.record(feed(eng, [*repeats, Tick(at(15, 54, 59))]))
    restarted = engine()
    restarted.restore(journal.restored_state("2025-10-02"), "2025-10-02")
    message = sell_text(feed(restarted, [Tick(at(15, 55))]))
    assert message.startswith("Reason: Time stop\n") and "Old price" not in message, message


def sell_text(actions) -> str:
    (sell,) = [a for a in actions if isinstance(a, Alert) and a.kind == "SELL"]
    return sell.message


def test_an_exit_booked_at_an_old_bid_says_its_price_and_pnl_are_estimates():
    """A 15:55 time stop with every quote source dead booked a 34-minute-old bid like any other exit."""
    eng = holding()
    t = at(15, 21)
    feed(eng, [streamed(t, 1.30, 1.32)])
    message = sell_text(feed(eng, [Tick(at(15, 55))]))
    assert message.splitlines()[:2] == [
        "Reason: Time stop",
        "Old price: no quote of this contract for 34 min; the exit and the P&L are estimates, check its bid.",
    ]
    fresh = holding()
    feed(fresh, [streamed(at(15, 54, 40), 1.30, 1.32)])
    assert "Old price" not in sell_text(feed(fresh, [Tick(at(15, 55))])), (
        "20 s is under MAX_QUOTE_AGE_SECONDS"
    )
