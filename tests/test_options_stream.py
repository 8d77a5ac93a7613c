"""The live daemon against both clusters of the fake Polygon (issue 11): streamed marks and their fallback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from builders import at
from test_daemon import (
    API_KEY,
    SPEED,
    daemon_running,
    fakes,
    kinds,
    settings_for,
    start_daemon,
    stop_daemon,
    wait_for,
    wide_exits,
)

from clock import SimClock
from config import Rules
from daemon import Daemon
from market_calendar import MarketCalendar
from pnl_tracker import Journal
from replay import replay_tape
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover
from tape import TapeReader

START = at(10, 4)


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


def trades(pushover: FakePushover) -> list[str]:
    return [k for k in kinds(pushover) if k in ("BUY", "SELL")]


def feed_texts(pushover: FakePushover) -> list[str]:
    return [m.form["message"] for m in pushover.messages if "— FEED" in m.form["title"]]


def held_ticker(daemon: Daemon, seen: list[str]) -> bool:
    position = daemon.engine.position
    if position is not None and position.ticker not in seen:
        seen.append(position.ticker)
    return bool(seen)


@contextmanager
def holding_streamed_quotes(
    market: SyntheticMarket, tmp_path
) -> Iterator[tuple[FakePushover, FakePolygon, Daemon]]:
    """A daemon with exits too wide to close, once its held contract's quotes stream."""
    with (
        fakes(market, START) as (pushover, polygon, clock),
        daemon_running(wide_exits(settings_for(polygon, pushover, tmp_path)), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: daemon.engine.marks.stream > 0, 40)
        yield pushover, polygon, daemon


def test_the_held_contract_streams_from_buy_to_sell_and_the_replay_equals_the_live_alerts(market, tmp_path):
    with fakes(market, START) as (pushover, polygon, clock):
        daemon, stop, thread = start_daemon(settings_for(polygon, pushover, tmp_path), clock)
        held: list[str] = []
        try:
            assert wait_for(lambda: held_ticker(daemon, held), 40)
            assert wait_for(lambda: daemon.engine.marks.stream > 0 or "SELL" in kinds(pushover), 20)
            streamed = daemon.engine.marks.stream
            assert wait_for(lambda: "SELL" in kinds(pushover), 40)
            assert wait_for(
                lambda: daemon.options.stream is not None and daemon.options.stream.topics == (), 10
            )
            marks = daemon._snapshot()["marks"]
        finally:
            stop_daemon(stop, thread)
    assert streamed > 0 and trades(pushover) == ["BUY", "SELL"]
    assert f"Q.{held[0]}" in polygon.options_subscriptions and feed_texts(pushover) == []
    assert marks["quotes"]["stream"] >= streamed and marks["options_stream"].startswith("connected")
    statuses = [
        event.get("message", "")
        for line in TapeReader(tmp_path / "tapes" / "2025-10-02.jsonl.gz")
        if line.kind == "ws" and isinstance(line.payload, list)
        for event in line.payload
        if isinstance(event, dict) and event.get("ev") == "status"
    ]
    assert f"unsubscribed to: Q.{held[0]}" in statuses  # the fake's answer, as recorded on the tape
    live = [m for m in pushover.messages if m.form["title"].endswith(("BUY", "SELL"))]
    replayed = []
    rules = Rules()
    tape = tmp_path / "tapes" / "2025-10-02.jsonl.gz"
    replay_tape(tape, rules=rules, calendar=MarketCalendar(rules), journal=Journal(tmp_path / "r.sqlite3"),
                on_alerts=replayed.extend, on_log=lambda _l: None)  # fmt: skip
    mirrored = [a for a in replayed if a.kind in ("BUY", "SELL")][: len(live)]
    assert [(a.title, a.message, a.at_ms // 1000) for a in mirrored] == [
        (m.form["title"], m.form["message"], int(m.form["timestamp"])) for m in live
    ]


@pytest.mark.parametrize("fault", ["not_entitled", "subscription_refused"])
def test_a_plan_without_options_quotes_falls_back_to_rest_with_one_feed_alert(market, tmp_path, fault):
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=START, speed=SPEED) as polygon,
    ):
        if fault == "not_entitled":
            polygon.options_entitled(False)
        else:
            polygon.options_refuse_subscriptions(True)
        clock = SimClock(START, SPEED)
        daemon, stop, thread = start_daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
            assert wait_for(lambda: feed_texts(pushover) != [], 15)
            marks = daemon._snapshot()["marks"]
            assert thread.is_alive()
        finally:
            stop_daemon(stop, thread)
    texts = feed_texts(pushover)
    assert trades(pushover) == ["BUY", "SELL"] and len(texts) == 1
    assert "Marks come from REST polls" in texts[0]
    # Read after the SELL: the fallback ended with its position, the stream's trouble is still named.
    assert daemon.engine.marks.stream == 0 and marks["options_stream"].startswith("not streaming: ")


def test_a_dropped_options_stream_falls_back_then_comes_back(market, tmp_path):
    with fakes(market, START) as (pushover, polygon, clock):
        daemon, stop, thread = start_daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            assert wait_for(lambda: daemon.engine.marks.stream > 0, 40)
            before = polygon.options_connections
            polygon.drop_options_connections()
            assert wait_for(lambda: polygon.options_connections > before, 20)
            assert wait_for(lambda: "SELL" in kinds(pushover), 40)
            assert wait_for(lambda: any("streaming again" in t for t in feed_texts(pushover)), 20)
        finally:
            stop_daemon(stop, thread)
    texts = feed_texts(pushover)
    assert trades(pushover) == ["BUY", "SELL"]
    assert len(texts) == 2 and "disconnected" in texts[0] and "streaming again" in texts[1]


def test_an_options_stream_gone_quiet_after_quoting_falls_back_then_comes_back(market, tmp_path):
    """The socket stays up and answers pings but brings no quote while REST shows the contract quoting:
    this used to count as streaming for as long as the position lasted. Wide exits keep it held."""
    with holding_streamed_quotes(market, tmp_path) as (pushover, polygon, daemon):
        polygon.options_silent(True)
        assert wait_for(lambda: feed_texts(pushover) != [], 30), kinds(pushover)
        health = daemon._snapshot()["marks"]["options_stream"]
        polygon.options_silent(False)
        assert wait_for(lambda: len(feed_texts(pushover)) == 2, 30), feed_texts(pushover)
        held = daemon.engine.position is not None
    texts = feed_texts(pushover)
    assert held and trades(pushover) == ["BUY"]
    assert "no quote on the options stream while REST shows the contract quoting" in texts[0]
    assert health.startswith("fallback to REST") and "streaming again" in texts[1]


def test_a_stuck_options_socket_is_redialled_while_a_contract_is_held(market, tmp_path):
    # Pings answered, no quote: only a new connection can bring quotes back (an audit's fake did).
    with holding_streamed_quotes(market, tmp_path) as (pushover, polygon, daemon):
        dialled = polygon.options_connections
        polygon.options_silent(True)
        assert wait_for(lambda: polygon.options_connections > dialled, 30), "never redialled"
        polygon.options_silent(False)
        ticker = daemon.engine.position.ticker if daemon.engine.position else None
        assert wait_for(lambda: daemon.options.problem is None, 30), daemon.options.problem
        silent_redials = daemon.options.stream.silent_reconnects if daemon.options.stream else 0
    assert ticker is not None and polygon.options_subscriptions.count(f"Q.{ticker}") >= 2
    assert silent_redials >= 1


def test_a_held_contract_without_any_valid_quote_is_said_once_in_health_and_when_quotes_return(
    market, tmp_path
):
    """Stream silent and every REST poll failing: the stop and the giveback read an old mark. Health
    used to say ok and nothing reached the phone."""
    with holding_streamed_quotes(market, tmp_path) as (pushover, polygon, daemon):
        polygon.options_silent(True)
        polygon.fail_rest(500, path_prefix="/v3/snapshot/options")
        assert wait_for(lambda: any("No valid quote" in t for t in feed_texts(pushover)), 30)
        # degraded for the mark, failing too once no chain has come for a minute (both are true)
        assert wait_for(lambda: any("held contract" in p for p in daemon.health.get("problems", [])), 10)
        problems, status = daemon.health["problems"], daemon.health["status"]
        polygon.heal()
        assert wait_for(lambda: any("set the mark again" in t for t in feed_texts(pushover)), 30)
        held = daemon.engine.position is not None
    stale = [t for t in feed_texts(pushover) if "No valid quote" in t]
    assert held and trades(pushover) == ["BUY"] and len(stale) == 1
    assert "the VWAP exit and the time stop still fire" in stale[0] and "HTTP 500" in stale[0]
    assert any("no valid quote of the held contract" in p for p in problems), problems
    assert status in ("degraded", "failing")


def test_a_quote_storm_keeps_the_queue_short_and_the_alerts_right(market, tmp_path):
    with fakes(market, START) as (pushover, polygon, clock):
        daemon, stop, thread = start_daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            assert wait_for(lambda: daemon.engine.position is not None, 40)
            before = daemon.engine.marks.stream + daemon.engine.marks.stale
            polygon.quote_storm(5.0, 600.0)  # 5 a clock second at 40x: 200 quotes a wall second
            assert wait_for(lambda: "SELL" in kinds(pushover), 60)
            taken = daemon.engine.marks.stream + daemon.engine.marks.stale - before
            depth = daemon.inbox.depth_max
        finally:
            stop_daemon(stop, thread)
    assert trades(pushover) == ["BUY", "SELL"]
    assert taken > 0 and depth < 500


def test_a_restart_mid_position_subscribes_the_held_contract_again(market, tmp_path):
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=START, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path)
        daemon, stop, thread = start_daemon(settings, SimClock(START, SPEED))
        held: list[str] = []
        try:
            assert wait_for(lambda: held_ticker(daemon, held), 40)
        finally:
            stop_daemon(stop, thread)
        subscribed_before = polygon.options_subscriptions.count(f"Q.{held[0]}")
        second, stop2, thread2 = start_daemon(settings, SimClock(polygon.now_ms(), SPEED))
        try:
            assert wait_for(lambda: second.engine.position is not None, 10)
            assert second.engine.position.ticker == held[0]
            assert wait_for(
                lambda: polygon.options_subscriptions.count(f"Q.{held[0]}") > subscribed_before, 20
            )
            assert wait_for(lambda: "SELL" in kinds(pushover), 60)
        finally:
            stop_daemon(stop2, thread2)
    assert trades(pushover) == ["BUY", "SELL"]


def test_options_stream_off_never_dials_the_options_cluster(market, tmp_path):
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=START, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path, options_stream="off")
        daemon, stop, thread = start_daemon(settings, SimClock(START, SPEED))
        try:
            assert wait_for(lambda: "SELL" in kinds(pushover), 60)
        finally:
            stop_daemon(stop, thread)
    assert polygon.options_connections == 0 and feed_texts(pushover) == []
    assert daemon.engine.marks.stream == 0 and trades(pushover) == ["BUY", "SELL"]


def test_a_stream_that_comes_and_goes_while_one_contract_is_held_is_said_once_not_each_time(tmp_path):
    from config import Settings
    from events import FeedStatus
    from options_feed import OptionsFeed

    said: list[str] = []
    feed = OptionsFeed(Settings(data_dir=tmp_path), SimClock(at(10, 6), 1.0), lambda _item: None,
                       lambda kind, _text: said.append(kind))  # fmt: skip
    feed.follow("O:IWM251002C00243000", at(10, 6))
    for n in range(5):  # five drops, each followed by a streamed quote of the held contract
        feed.on_status(FeedStatus(at(10, 6, n * 10), False, "disconnected: connection lost"))
        assert feed.problem is not None
        feed.check(at(10, 6, n * 10 + 5), n + 1, at(10, 6, n * 10 + 5))
        assert feed.problem is None
    assert said == ["FEED", "FEED_RESTORED"]
    feed.follow(None, at(10, 8))
    feed.follow("O:IWM251002C00244000", at(10, 9))  # the next position's contract is said again
    feed.on_status(FeedStatus(at(10, 9, 5), False, "disconnected: connection lost"))
    assert said == ["FEED", "FEED_RESTORED", "FEED"]


def test_the_next_position_on_the_same_contract_is_said_again(tmp_path):
    """A second trade on the strike of the first got no FEED when its stream failed: the phone thought
    its exits streamed while they ran on REST polls."""
    from config import Settings
    from events import FeedStatus
    from options_feed import OptionsFeed

    said: list[str] = []
    feed = OptionsFeed(Settings(data_dir=tmp_path), SimClock(at(10, 6), 1.0), lambda _item: None,
                       lambda kind, _text: said.append(kind))  # fmt: skip
    for minute in (6, 9):
        feed.follow("O:IWM251002C00243000", at(10, minute))
        feed.on_status(FeedStatus(at(10, minute, 5), False, "disconnected: connection lost"))
        feed.follow(None, at(10, minute + 1))  # its SELL
    assert said == ["FEED", "FEED"]


def test_a_subscription_refused_for_one_contract_is_not_carried_to_the_next(tmp_path):
    """The cluster refused the first position's subscription, then accepted the next one's: a stale refusal
    sent a FEED at the second BUY and a FEED RESTORED at its first quote, and /health said "not streaming"
    while flat (an audit's find). Each subscription is judged on its own answer."""
    from config import Settings
    from events import FeedStatus
    from options_feed import OptionsFeed

    said: list[str] = []
    feed = OptionsFeed(Settings(data_dir=tmp_path), SimClock(at(10, 6), 1.0), lambda _item: None,
                       lambda kind, _text: said.append(kind))  # fmt: skip
    feed.follow("O:IWM251002C00243000", at(10, 6))
    feed.on_status(FeedStatus(at(10, 6, 1), True, "subscription_refused"))
    assert said == ["FEED"]
    feed.follow(None, at(10, 7))  # its SELL
    assert str(feed.health()["options_stream"]).endswith("(the next BUY's subscription is tried again)")
    feed.follow("O:IWM251002C00244000", at(10, 9))  # accepted: quotes stream
    feed.check(at(10, 9, 1), 1, at(10, 9, 1))
    assert said == ["FEED"] and feed.problem is None
    feed.follow(None, at(10, 10))
    feed.follow("O:IWM251002C00245000", at(10, 11))  # refused again: said for this position
    feed.on_status(FeedStatus(at(10, 11, 1), True, "subscription_refused"))
    assert said == ["FEED", "FEED"]


def test_a_fallback_ends_with_its_position_and_no_feed_restored_comes_after_the_sell(tmp_path):
    """A FEED RESTORED ("marks follow every quote of the held contract") came 51 s after the SELL, and
    /health still said "fallback to REST" with nothing held."""
    from config import Settings
    from events import FeedStatus
    from options_feed import OptionsFeed

    said: list[str] = []
    feed = OptionsFeed(Settings(data_dir=tmp_path), SimClock(at(10, 6), 1.0), lambda _item: None,
                       lambda kind, _text: said.append(kind))  # fmt: skip
    feed.follow("O:IWM251002C00243000", at(10, 6))
    feed.on_status(FeedStatus(at(10, 6, 5), False, "auth_failed"))
    assert said == ["FEED"] and "fallback to REST" in str(feed.health()["options_stream"])
    feed.follow(None, at(10, 7))  # the SELL
    assert feed.problem is None and str(feed.health()["options_stream"]).startswith("not streaming: ")
    feed.on_status(FeedStatus(at(10, 7, 50), True, "auth_success"))
    feed.check(at(10, 7, 51), 1, at(10, 7, 51))
    assert said == ["FEED"]
    feed.follow("O:IWM251002C00244000", at(10, 9))  # the stream's last word was a working connection
    assert said == ["FEED"] and feed.problem is None


def _feed_after_restart(tmp_path, journal: dict[str, str], said: list[str]):
    """An OptionsFeed as a (re)started daemon builds it: its SaidMemory read from and written to `journal`."""
    from config import Settings
    from options_feed import OptionsFeed
    from said_memory import SAID_META, SaidMemory

    memory = SaidMemory(journal.get(SAID_META), journal.__setitem__)
    return OptionsFeed(Settings(data_dir=tmp_path), SimClock(at(10, 6), 1.0), lambda _item: None,
                       lambda kind, _text: said.append(kind), memory)  # fmt: skip


def test_a_restart_mid_position_does_not_say_the_feed_alert_again(tmp_path):
    """The README promises one FEED per held contract; each restart (a deploy, a crash) said it again."""
    from events import FeedStatus

    journal: dict[str, str] = {}
    said: list[str] = []
    for minute in (6, 8, 10):  # the first run, then two restarts, the same position held throughout
        feed = _feed_after_restart(tmp_path, journal, said)
        feed.follow("O:IWM251002C00243000", at(10, minute), "2025-10-02-01")
        feed.on_status(FeedStatus(at(10, minute, 5), False, "auth_failed"))
        assert feed.problem is not None
    assert said == ["FEED"]
    feed = _feed_after_restart(tmp_path, journal, said)
    feed.follow("O:IWM251002C00243000", at(10, 20), "2025-10-02-02")  # the next trade, same contract
    feed.on_status(FeedStatus(at(10, 20, 5), False, "auth_failed"))
    assert said == ["FEED", "FEED"]


def test_a_feed_restored_owed_before_a_restart_comes_with_the_first_streamed_quote_after_it(tmp_path):
    from events import FeedStatus

    journal: dict[str, str] = {}
    said: list[str] = []
    feed = _feed_after_restart(tmp_path, journal, said)
    feed.follow("O:IWM251002C00243000", at(10, 6), "2025-10-02-01")
    feed.on_status(FeedStatus(at(10, 6, 5), False, "disconnected: connection lost"))
    assert said == ["FEED"]
    feed = _feed_after_restart(tmp_path, journal, said)  # the restart
    feed.follow("O:IWM251002C00243000", at(10, 7), "2025-10-02-01")
    assert "fallback to REST" in str(feed.health()["options_stream"])
    feed.check(at(10, 7, 5), 1, at(10, 7, 5))  # a quote streamed
    assert said == ["FEED", "FEED_RESTORED"] and feed.problem is None
    feed = _feed_after_restart(tmp_path, journal, said)  # a restart after both were said
    feed.follow("O:IWM251002C00243000", at(10, 8), "2025-10-02-01")
    feed.on_status(FeedStatus(at(10, 8, 5), False, "disconnected: connection lost"))
    feed.check(at(10, 8, 9), 1, at(10, 8, 9))
    assert said == ["FEED", "FEED_RESTORED"] and feed.problem is None


def test_a_daemon_restarted_mid_position_with_options_refused_says_feed_once(market, tmp_path):
    """The README promises one FEED per held contract; each restart (a deploy, a crash) said it again."""
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=START, speed=SPEED) as polygon,
    ):
        polygon.options_entitled(False)
        settings = wide_exits(settings_for(polygon, pushover, tmp_path))  # held through both runs
        daemon, stop, thread = start_daemon(settings, SimClock(START, SPEED))
        try:
            assert wait_for(lambda: feed_texts(pushover) != [], 60), kinds(pushover)
        finally:
            stop_daemon(stop, thread)
        next_minute = (polygon.now_ms() // 60_000 + 1) * 60_000  # alert keys differ by their minute
        assert wait_for(lambda: polygon.now_ms() > next_minute, 10)
        second, stop2, thread2 = start_daemon(settings, SimClock(polygon.now_ms(), SPEED))
        try:
            assert wait_for(lambda: second.options._status_problem is not None, 20)  # refused again
            assert second.engine.position is not None
            assert wait_for(lambda: second.outbox.pending_count() == 0, 10)
        finally:
            stop_daemon(stop2, thread2)
    assert "fallback to REST" in str(second.options.health()["options_stream"])
    assert trades(pushover) == ["BUY"] and len(feed_texts(pushover)) == 1
