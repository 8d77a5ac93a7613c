"""Tests of the pure parsers in polygon_client against real response shapes and hand-made frames."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from events import Bar, OptionQuote
from polygon_client import (
    AggsPage,
    ChainPage,
    ParsedFrame,
    StatusMessage,
    error_text,
    occ_ticker,
    parse_aggs_page,
    parse_chain_page,
    parse_contract_snapshot,
    parse_occ_ticker,
    parse_option_result,
    parse_ws_frame,
    to_ms,
)

# Copied from the team's shared fixtures (provenance: fixtures/polygon/SOURCES.md); the repository owns them.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "polygon"

MC_MOCKS = "massive-com_client-python/test_rest/mocks"
MC_CHAIN = f"{MC_MOCKS}/v3/snapshot/options/AAPL.json"
MC_CONTRACT = f"{MC_MOCKS}/v3/snapshot/options/AAPL/O;AAPL230616C00150000.json"
MC_AGGS_0401 = f"{MC_MOCKS}/v2/aggs/ticker/AAPL/range/1/day/2005-04-01/2005-04-04.json"
MC_AGGS_0402 = f"{MC_MOCKS}/v2/aggs/ticker/AAPL/range/1/day/2005-04-02/2005-04-04.json"
MC_PREV = f"{MC_MOCKS}/v2/aggs/ticker/AAPL/prev.json"
GO_CHAIN_PAGE1 = "polygon-io_client-go/v3_snapshot_options_AAPL.page1.json"
GO_CHAIN_PAGE2 = "polygon-io_client-go/v3_snapshot_options_AAPL.page2_cursor.json"
GO_AGGS_PAGE1 = "polygon-io_client-go/v2_aggs_AAPL_range_1_day.page1.json"
OPENAPI_CHAIN = "openapi-examples/v3_snapshot_options_underlyingAsset.example.json"
OPENAPI_CONTRACT = "openapi-examples/v3_snapshot_options_underlyingAsset_optionContract.example.json"
OPENAPI_STOCK_AGGS = "openapi-examples/v2_aggs_stocksTicker_range.example.json"
OPENAPI_OPTION_AGGS = "openapi-examples/v2_aggs_optionsTicker_range.example.json"
OPENAPI_WS_A = "openapi-examples/ws_stocks_A.example.json"
OPENAPI_WS_AM = "openapi-examples/ws_stocks_AM.example.json"
SPY_EXCERPT = "third-party/spy_chain_results_excerpt_2024-05-30.json"
WS_RKT = "websocket/A_second_agg_RKT_issue131.json"
WS_TRADES = "websocket/mock_server_trades_T.AMZN.json"
WS_STATUS_FRAMES = {
    "websocket/connected.json": ("connected", "Connected Successfully"),
    "websocket/auth_success.json": ("auth_success", "authenticated"),
    "websocket/auth_failed.json": ("auth_failed", "authentication failed"),
    "websocket/auth_timeout.json": ("auth_timeout", "No authentication request received."),
    "websocket/max_connections.json": ("max_connections", "Maximum number of connections exceeded."),
    "websocket/subscribe_success_A.IWM.json": ("success", "subscribed to: A.IWM"),
}
# Fixtures of endpoints this parser does not read (quotes, contract reference, universal snapshot).
OUT_OF_SCOPE = {
    f"{MC_MOCKS}/v3/snapshot.json",
    f"{MC_MOCKS}/v3/quotes/AAPL.json",
    f"{MC_MOCKS}/v3/quotes/AAPL&cursor=YXA9MTkyODgxNjYmYXM9JmxpbWl0PTEwJm9yZGVyPWRlc2Mmc29ydD10aW1lc3RhbXAm"
    "dGltZXN0YW1wLmx0ZT0yMDIyLTA1LTEwVDE0JTNBMTElM0ExMi42OTA2NjExODla.json",
    f"{MC_MOCKS}/v3/reference/options/contracts.json",
    f"{MC_MOCKS}/v3/reference/options/contracts&cursor=YXA9JTdCJTIySUQlMjIlM0ElMjIy.json",
    f"{MC_MOCKS}/v3/reference/options/contracts/OEVRI240119C00002500.json",
    "openapi-examples/v3_quotes_optionsTicker.example.json",
    "openapi-examples/v3_reference_options_contracts.example.json",
}
TESTED = {
    MC_CHAIN,
    MC_CONTRACT,
    MC_AGGS_0401,
    MC_AGGS_0402,
    MC_PREV,
    GO_CHAIN_PAGE1,
    GO_CHAIN_PAGE2,
    GO_AGGS_PAGE1,
    OPENAPI_CHAIN,
    OPENAPI_CONTRACT,
    OPENAPI_STOCK_AGGS,
    OPENAPI_OPTION_AGGS,
    OPENAPI_WS_A,
    OPENAPI_WS_AM,
    SPY_EXCERPT,
    WS_RKT,
    WS_TRADES,
    *WS_STATUS_FRAMES,
}

RECEIVED_MS = 1_759_415_401_950
IWM_SPY = frozenset({"IWM", "SPY"})


def changed(record: dict, changes: dict[str, object]) -> dict:
    """`record` with `changes` applied; a change to `...` removes that key."""
    for key, value in changes.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return record


def fixture_text(relative: str) -> str:
    """The raw text of one fixture file."""
    return (FIXTURES / relative).read_text(encoding="utf-8")


def fixture_json(relative: str) -> object:
    """One fixture file, decoded."""
    return json.loads(fixture_text(relative))


def a_event(sym: str = "IWM", start: int = 1_759_415_400_000, **changes: object) -> dict:
    """A valid `A` event starting at `start`; `changes` overrides fields, and a value of ... removes one."""
    event: dict = {
        "ev": "A",
        "sym": sym,
        "v": 1500,
        "av": 2_000_000,
        "op": 241.5,
        "vw": 242.013,
        "o": 242.0,
        "c": 242.03,
        "h": 242.05,
        "l": 241.99,
        "a": 241.8,
        "z": 100,
        "s": start,
        "e": start + 1000,
    }
    return changed(event, changes)


def iwm_bar(s: int = 1_759_415_400_000, received_ms: int = RECEIVED_MS) -> Bar:
    """The Bar that `a_event("IWM", s)` must become, received at `received_ms`."""
    return Bar(
        "IWM", s, s + 1000, 242.0, 242.05, 241.99, 242.03, 1500, 242.013, 241.8, 2_000_000, received_ms
    )


def chain_result(**changes: object) -> dict:
    """A valid IWM 0DTE chain result; top-level `changes` replace fields, ... removes them."""
    result: dict = {
        "break_even_price": 243.6,
        "day": {"volume": 5120, "close": 1.1},
        "details": {
            "contract_type": "call",
            "exercise_style": "american",
            "expiration_date": "2025-10-02",
            "shares_per_contract": 100,
            "strike_price": 242.5,
            "ticker": "O:IWM251002C00242500",
        },
        "greeks": {"delta": 0.38, "gamma": 0.2, "theta": -0.5, "vega": 0.03},
        "implied_volatility": 0.21,
        "last_quote": {
            "ask": 1.12,
            "ask_size": 40,
            "bid": 1.08,
            "bid_size": 55,
            "last_updated": 1_759_416_000_123_456_789,
            "midpoint": 1.1,
        },
        "last_trade": {"price": 1.1, "size": 3, "sip_timestamp": 1_759_416_000_000_000_000},
        "open_interest": 1800,
        "underlying_asset": {"price": 242.2, "ticker": "IWM", "change_to_break_even": 1.4},
    }
    return changed(result, changes)


def iwm_quote(**changes: object) -> OptionQuote:
    """The OptionQuote that `chain_result()` must become, with `changes` applied."""
    fields: dict = {
        "ticker": "O:IWM251002C00242500",
        "strike": 242.5,
        "expiry": "2025-10-02",
        "right": "call",
        "delta": 0.38,
        "iv": 0.21,
        "bid": 1.08,
        "ask": 1.12,
        "bid_size": 55,
        "ask_size": 40,
        "volume": 5120,
        "open_interest": 1800,
        "quote_ms": 1_759_416_000_123,
        "underlying_price": 242.2,
    }
    fields.update(changes)
    return OptionQuote(**fields)


AAPL_MOCK_QUOTE = OptionQuote(
    ticker="O:AAPL230616C00150000",
    strike=150,
    expiry="2023-06-16",
    right="call",
    delta=0.6436614934293701,
    iv=0.3570277203465058,
    bid=28.9,
    ask=29.25,
    bid_size=294,
    ask_size=209,
    volume=8,
    open_interest=8133,
    quote_ms=1_651_254_260_800,
    underlying_price=159.9606,
)


# Fixture coverage


def test_every_fixture_of_a_parsed_endpoint_is_tested() -> None:
    on_disk = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.json")}
    assert on_disk - OUT_OF_SCOPE == TESTED


# Chain pages and single-contract snapshots (fixtures)


def test_massive_mock_chain_page() -> None:
    assert parse_chain_page(fixture_json(MC_CHAIN)) == ChainPage((AAPL_MOCK_QUOTE,), None, 0)


def test_massive_mock_single_contract() -> None:
    assert parse_contract_snapshot(fixture_json(MC_CONTRACT)) == AAPL_MOCK_QUOTE


def test_go_chain_page1_has_empty_greeks_and_next_url() -> None:
    page = parse_chain_page(fixture_json(GO_CHAIN_PAGE1))
    expected = OptionQuote(
        ticker="O:AAPL230106C00050000",
        strike=50,
        expiry="2023-01-06",
        right="call",
        delta=None,
        iv=None,
        bid=74.85,
        ask=75.05,
        bid_size=43,
        ask_size=48,
        volume=22,
        open_interest=5,
        quote_ms=1_672_775_256_862,
        underlying_price=124.94,
    )
    assert page == ChainPage(
        (expected, expected, expected),
        "https://api.massive.com/v3/snapshot/options/AAPL?cursor=YXA9MSZhcz0mbGltaXQ9MSZzb3J0PXRpY2tlcg",
        0,
    )


def test_go_chain_page2_empty_object_is_an_empty_last_page() -> None:
    assert parse_chain_page(fixture_json(GO_CHAIN_PAGE2)) == ChainPage((), None, 0)


def test_openapi_chain_example_keeps_details_over_ticker_typo() -> None:
    page = parse_chain_page(fixture_json(OPENAPI_CHAIN))
    quote = OptionQuote(
        ticker="O:AAPL211022C000150000",
        strike=150,
        expiry="2022-01-21",
        right="call",
        delta=1,
        iv=5,
        bid=120.28,
        ask=120.3,
        bid_size=8,
        ask_size=4,
        volume=868,
        open_interest=1543,
        quote_ms=1_605_195_918_507,
        underlying_price=147,
    )
    assert page == ChainPage((quote,), None, 0)
    assert parse_occ_ticker(quote.ticker) is None


def test_openapi_single_contract_example() -> None:
    assert parse_contract_snapshot(fixture_json(OPENAPI_CONTRACT)) == OptionQuote(
        ticker="O:AAPL230616C00150000",
        strike=150,
        expiry="2023-06-16",
        right="call",
        delta=0.5520187372272933,
        iv=0.3048997097864957,
        bid=20.9,
        ask=21.25,
        bid_size=172,
        ask_size=110,
        volume=37,
        open_interest=8921,
        quote_ms=1_636_573_458_756,
        underlying_price=147.951,
    )


def test_spy_excerpt_with_empty_day_and_last_trade_and_zero_open_interest() -> None:
    page = parse_chain_page(fixture_json(SPY_EXCERPT))
    common = {"expiry": "2024-06-04", "right": "call", "bid_size": 75, "ask_size": 75, "open_interest": 0}
    first = OptionQuote(
        ticker="O:SPY240604C00451000",
        strike=451,
        delta=0.9892951434244974,
        iv=0.5624305671328997,
        bid=73.74,
        ask=74.16,
        volume=3706,
        quote_ms=1_717_077_435_713,
        underlying_price=524.56,
        **common,
    )
    second = OptionQuote(
        ticker="O:SPY240604C00452000",
        strike=452,
        delta=0.9892190761936802,
        iv=0.5550287269185773,
        bid=72.74,
        ask=73.16,
        volume=0,
        quote_ms=1_717_077_435_712,
        underlying_price=524.56,
        **common,
    )
    assert page == ChainPage((first, second), None, 0)


# Aggregates pages (fixtures)


def test_massive_mock_daily_aggs() -> None:
    day_ms = 86_400_000
    for relative in (MC_AGGS_0401, MC_AGGS_0402):
        page = parse_aggs_page(fixture_json(relative), "AAPL", day_ms, RECEIVED_MS)
        first = Bar(
            "AAPL",
            1_112_331_600_000,
            1_112_418_000_000,
            1.5032,
            1.5064,
            1.4489,
            1.4604,
            642_646_396.0,
            1.469,
            None,
            None,
            RECEIVED_MS,
        )
        second = Bar(
            "AAPL",
            1_112_587_200_000,
            1_112_673_600_000,
            1.4639,
            1.4754,
            1.4343,
            1.4675,
            578_172_308.0,
            1.4589,
            None,
            None,
            RECEIVED_MS,
        )
        assert page == AggsPage((first, second), None, 0)


def test_massive_mock_previous_close_ignores_extra_ticker_field() -> None:
    page = parse_aggs_page(fixture_json(MC_PREV), "AAPL", 86_400_000, RECEIVED_MS)
    bar = Bar(
        "AAPL",
        1_651_003_200_000,
        1_651_089_600_000,
        162.25,
        162.34,
        156.72,
        156.8,
        95_595_226.0,
        158.6074,
        None,
        None,
        RECEIVED_MS,
    )
    assert page == AggsPage((bar,), None, 0)


def test_go_aggs_page_with_next_url() -> None:
    page = parse_aggs_page(fixture_json(GO_AGGS_PAGE1), "AAPL", 1000, RECEIVED_MS)
    assert page.next_url == (
        "https://api.massive.com/v2/aggs/ticker/AAPL/range/1/day/1626912000000/1629590400000?cursor=AGGSCURSOR"
    )
    assert page.bad == 0
    assert page.bars == (
        Bar(
            "AAPL",
            1_577_941_200_000,
            1_577_941_201_000,
            74.06,
            75.15,
            73.7975,
            75.0875,
            135_647_456,
            74.6099,
            None,
            None,
            RECEIVED_MS,
        ),
        Bar(
            "AAPL",
            1_578_027_600_000,
            1_578_027_601_000,
            74.2875,
            75.145,
            74.125,
            74.3575,
            146_535_512,
            74.7026,
            None,
            None,
            RECEIVED_MS,
        ),
    )


def test_openapi_stock_aggs_example_matches_go_page_bars() -> None:
    openapi = parse_aggs_page(fixture_json(OPENAPI_STOCK_AGGS), "AAPL", 1000, RECEIVED_MS)
    go = parse_aggs_page(fixture_json(GO_AGGS_PAGE1), "AAPL", 1000, RECEIVED_MS)
    assert openapi.bars == go.bars
    assert openapi.bad == 0
    assert openapi.next_url == (
        "https://api.massive.com/v2/aggs/ticker/AAPL/range/1/day/1578114000000/2020-01-10"
        "?cursor=bGltaXQ9MiZzb3J0PWFzYw"
    )


def test_openapi_option_aggs_example() -> None:
    sym = "O:RDFN211119C00025000"
    page = parse_aggs_page(fixture_json(OPENAPI_OPTION_AGGS), sym, 1000, 7)
    assert page == AggsPage(
        (
            Bar(sym, 1_632_369_600_000, 1_632_369_601_000, 26.2, 26.2, 26.2, 26.2, 2, 26.2, None, None, 7),
            Bar(sym, 1_632_456_000_000, 1_632_456_001_000, 28.3, 28.3, 28.3, 28.3, 2, 28.3, None, None, 7),
        ),
        None,
        0,
    )


# WebSocket frames (fixtures)


@pytest.mark.parametrize("relative", sorted(WS_STATUS_FRAMES))
def test_status_frames(relative: str) -> None:
    status, message = WS_STATUS_FRAMES[relative]
    frame = parse_ws_frame(fixture_text(relative), RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((), (StatusMessage(status, message),), 0, 0)


def test_real_rkt_second_aggregate() -> None:
    frame = parse_ws_frame(fixture_text(WS_RKT), RECEIVED_MS, frozenset({"RKT"}))
    bar = Bar(
        "RKT",
        1_614_371_820_000,
        1_614_371_821_000,
        21.805,
        21.805,
        21.805,
        21.805,
        241,
        21.805,
        22.4898,
        47_467_961,
        RECEIVED_MS,
    )
    assert frame == ParsedFrame((bar,), (), 0, 0)


def test_real_rkt_second_aggregate_of_an_unwanted_symbol_is_ignored() -> None:
    assert parse_ws_frame(fixture_text(WS_RKT), RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 0, 1)


def test_trades_frame_is_ignored() -> None:
    frame = parse_ws_frame(fixture_text(WS_TRADES), RECEIVED_MS, frozenset({"AMZN"}))
    assert frame == ParsedFrame((), (), 0, 2)


def test_openapi_a_example_is_an_event_not_a_frame() -> None:
    text = fixture_text(OPENAPI_WS_A)
    symbols = frozenset({"SPCE"})
    assert parse_ws_frame(text, RECEIVED_MS, symbols) == ParsedFrame((), (), 1, 0)
    bar = Bar(
        "SPCE",
        1_610_144_868_000,
        1_610_144_869_000,
        25.39,
        25.39,
        25.39,
        25.39,
        200,
        25.3981,
        25.3714,
        8_642_007,
        RECEIVED_MS,
    )
    assert parse_ws_frame(f"[{text}]", RECEIVED_MS, symbols) == ParsedFrame((bar,), (), 0, 0)


def test_openapi_am_example_is_ignored() -> None:
    frame = parse_ws_frame(f"[{fixture_text(OPENAPI_WS_AM)}]", RECEIVED_MS, frozenset({"GTE"}))
    assert frame == ParsedFrame((), (), 0, 1)


# WebSocket frames (hand-made)


def test_several_events_in_one_frame_keep_their_order() -> None:
    spy = a_event("SPY", start=1_759_415_401_000, o=669.1, h=669.2, l=669.0, c=669.15, vw=669.12, v=900.5)
    status = {"ev": "status", "status": "success", "message": "subscribed to: A.IWM,A.SPY"}
    frame = parse_ws_frame(json.dumps([a_event(), spy, status]), RECEIVED_MS, IWM_SPY)
    spy_bar = Bar(
        "SPY",
        1_759_415_401_000,
        1_759_415_402_000,
        669.1,
        669.2,
        669.0,
        669.15,
        900.5,
        669.12,
        241.8,
        2_000_000,
        RECEIVED_MS,
    )
    assert frame == ParsedFrame(
        (iwm_bar(), spy_bar), (StatusMessage("success", "subscribed to: A.IWM,A.SPY"),), 0, 0
    )


def test_unknown_event_types_are_ignored() -> None:
    events = [
        {"ev": "T", "sym": "IWM", "p": 242.0, "s": 10},
        {"ev": "Q", "sym": "IWM", "bp": 241.99, "ap": 242.0},
        a_event(ev="AM"),
        {"ev": "LULD", "T": "IWM"},
        a_event(),
    ]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((iwm_bar(),), (), 0, 4)


def test_unknown_symbol_is_ignored_even_when_invalid() -> None:
    events = [a_event("QQQ"), a_event("TSLA", c="abc"), a_event()]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((iwm_bar(),), (), 0, 2)


@pytest.mark.parametrize(
    "payload",
    [
        '[{"ev":"A","sym":"IWM","o":242.0',
        "",
        "not json",
        '{"ev":"A","sym":"IWM"}',
        '"text"',
        "42",
        "null",
        b"\xff\xfe[",
    ],
)
def test_frame_that_is_not_a_json_array_is_one_bad(payload: str | bytes) -> None:
    assert parse_ws_frame(payload, RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 1, 0)


def test_payload_of_another_type_is_one_bad() -> None:
    assert parse_ws_frame({"ev": "A"}, RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 1, 0)  # type: ignore[arg-type]


def test_empty_array_is_nothing() -> None:
    assert parse_ws_frame("[]", RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 0, 0)


@pytest.mark.parametrize(
    "changes",
    [
        {"c": "abc"},
        {"o": True},
        {"v": False},
        {"h": None},
        {"l": -241.99},
        {"o": 0},
        {"c": 0.0},
        {"v": -1},
        {"c": ...},
        {"v": ...},
        {"s": ...},
        {"s": None},
        {"s": 1_759_415_401_000.5},
        {"e": 1_759_415_402_000.25},
        {"s": float("nan")},
        {"e": float("nan")},
        {"s": float("inf")},
        {"e": float("-inf")},
        {"s": -1000},
        {"e": -1},
        {"s": -1000.0},
        {"e": "1759415402000"},
        {"s": "1759415401000"},
        {"s": True},
        {"e": False},
        {"vw": "242.0"},
        {"vw": 0},
        {"vw": -1.5},
        {"h": 10**400},
        {"h": [242.05]},
        {"sym": 5},
        {"e": 1_999_999},  # ends before it starts
        {"h": 241.0},  # a high below the low
        {"l": 242.5},
    ],
    ids=repr,
)
def test_invalid_a_event_is_bad_and_neighbours_are_kept(changes: dict) -> None:
    events = [a_event(start=1_000_000), a_event(start=2_000_000, **changes), a_event(start=3_000_000)]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((iwm_bar(1_000_000), iwm_bar(3_000_000)), (), 1, 0)


def test_a_event_without_e_ends_one_second_after_s() -> None:
    # A per-second aggregate's window is one second; `e` adds nothing `s` does not say (null is absent).
    for changes in ({"e": ...}, {"e": None}):
        frame = parse_ws_frame(json.dumps([a_event(start=2_000_000, **changes)]), RECEIVED_MS, IWM_SPY)
        assert frame == ParsedFrame((iwm_bar(2_000_000),), (), 0, 0)
    assert parse_ws_frame([a_event(start=0, e=...)], RECEIVED_MS, IWM_SPY).bars == (iwm_bar(0),)


def test_a_event_window_written_as_integral_floats_becomes_ints() -> None:
    s = 1_759_411_800_000
    for changes in ({"s": float(s)}, {"e": float(s + 1000)}, {"s": float(s), "e": float(s + 1000)}):
        text = json.dumps([a_event(start=s, **changes)])
        assert ".0" in text  # the JSON really writes a float
        (bar,) = parse_ws_frame(text, RECEIVED_MS, IWM_SPY).bars
        assert bar == iwm_bar(s)
        # Ints, so the bar is keyed (dedup by (sym, s), features_vector.bar_key) as the int frame's bar.
        assert type(bar.start_ms) is int and type(bar.end_ms) is int
    (bar,) = parse_ws_frame([a_event(start=s, s=float(s), e=...)], RECEIVED_MS, IWM_SPY).bars
    assert (bar.start_ms, bar.end_ms, type(bar.end_ms)) == (s, s + 1000, int)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["s", "e"])
def test_non_finite_window_literal_is_bad(key: str, literal: str) -> None:
    marker = 123456.5
    bad_event = json.dumps(a_event(start=2_000_000, **{key: marker})).replace(str(marker), literal)
    text = f"[{json.dumps(a_event(start=1_000_000))},{bad_event}]"
    assert parse_ws_frame(text, RECEIVED_MS, IWM_SPY) == ParsedFrame((iwm_bar(1_000_000),), (), 1, 0)


def option_q_event(**changes: object) -> dict:
    """A valid options-cluster `Q` event; `changes` overrides fields, and a value of ... removes one."""
    event: dict = {
        "ev": "Q",
        "sym": "O:IWM251002C00242500",
        "bx": 302,
        "ax": 313,
        "bp": 1.08,
        "ap": 1.12,
        "bs": 55,
        "as": 40,
        "t": 1_759_416_000_123,
        "q": 7,
    }
    return changed(event, changes)


def streamed_quote(**changes: object) -> OptionQuote:
    """The OptionQuote that `option_q_event()` must become, with `changes` applied."""
    no_greeks = {"delta": None, "iv": None, "volume": 0.0, "open_interest": 0.0, "underlying_price": None}
    return iwm_quote(**(no_greeks | changes))


def test_option_q_event_without_a_time_is_taken_untimed() -> None:
    # README "Marks in real time": a quote without a time of its own is taken, but cannot displace a
    # timed one's order: quote_ms None (the engine never lets an untimed quote move its order stamp).
    frame = parse_ws_frame(json.dumps([option_q_event(t=...), option_q_event(t=None)]), 9, frozenset())
    assert frame == ParsedFrame((), (), 0, 0, (streamed_quote(quote_ms=None), streamed_quote(quote_ms=None)))
    timed = parse_ws_frame([option_q_event()], 9, frozenset())
    assert timed.quotes == (streamed_quote(),)


@pytest.mark.parametrize("t", ["1759416000123", -5, 0, True, float("nan"), float("inf"), [1]], ids=repr)
def test_option_q_event_with_an_unreadable_time_is_bad(t: object) -> None:
    frame = parse_ws_frame([option_q_event(t=t), option_q_event()], 9, frozenset())
    assert frame == ParsedFrame((), (), 1, 0, (streamed_quote(),))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["o", "h", "l", "c", "v", "vw"])
def test_non_finite_number_is_bad(key: str, literal: str) -> None:
    marker = 123456.789
    bad_event = json.dumps(a_event(start=2_000_000, **{key: marker})).replace(str(marker), literal)
    text = f"[{json.dumps(a_event(start=1_000_000))},{bad_event}]"
    assert parse_ws_frame(text, RECEIVED_MS, IWM_SPY) == ParsedFrame((iwm_bar(1_000_000),), (), 1, 0)


def test_missing_or_invalid_session_fields_become_none_not_bad() -> None:
    events = [
        a_event(start=1_000_000, vw=..., a=..., av=...),
        a_event(start=2_000_000, a=float("nan"), av=-5),
        a_event(start=3_000_000, a="x", av=True, vw=None),
    ]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    expected = tuple(
        Bar("IWM", s, s + 1000, 242.0, 242.05, 241.99, 242.03, 1500, None, None, None, RECEIVED_MS)
        for s in (1_000_000, 3_000_000)
    )
    middle = Bar(
        "IWM", 2_000_000, 2_001_000, 242.0, 242.05, 241.99, 242.03, 1500, 242.013, None, None, RECEIVED_MS
    )
    assert frame == ParsedFrame((expected[0], middle, expected[1]), (), 0, 0)


def test_fractional_and_zero_volume_and_extra_fields_are_accepted() -> None:
    events = [
        a_event(start=1_000_000, v=12.5, otc=True, dv="12.5", dav="2000000.5", z=None, op="x"),
        a_event(start=2_000_000, v=0),
    ]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    assert [bar.v for bar in frame.bars] == [12.5, 0]
    assert (frame.bad, frame.ignored) == (0, 0)


def test_malformed_event_shapes_are_bad() -> None:
    events = [
        ["A", "IWM"],
        "A",
        None,
        {"sym": "IWM", "o": 1},
        {"ev": 7},
        {"ev": "status", "message": "no status"},
        a_event(),
    ]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((iwm_bar(),), (), 6, 0)


def test_status_without_message_has_empty_message() -> None:
    frame = parse_ws_frame('[{"ev":"status","status":"error"}]', RECEIVED_MS, IWM_SPY)
    assert frame == ParsedFrame((), (StatusMessage("error", ""),), 0, 0)


def test_bytes_and_pre_decoded_payloads_parse_like_text() -> None:
    events = [a_event(), {"ev": "status", "status": "connected", "message": "Connected Successfully"}]
    text = json.dumps(events)
    expected = ParsedFrame((iwm_bar(),), (StatusMessage("connected", "Connected Successfully"),), 0, 0)
    assert parse_ws_frame(text, RECEIVED_MS, IWM_SPY) == expected
    assert parse_ws_frame(text.encode(), RECEIVED_MS, IWM_SPY) == expected
    assert parse_ws_frame(json.loads(text), RECEIVED_MS, IWM_SPY) == expected


def test_received_ms_is_stamped_on_every_bar() -> None:
    frame = parse_ws_frame([a_event(start=1_000_000), a_event("SPY", start=1_000_000)], 42, IWM_SPY)
    assert [bar.received_ms for bar in frame.bars] == [42, 42]


# Chain results (hand-made)


def test_valid_chain_result() -> None:
    assert parse_option_result(chain_result()) == iwm_quote()


def test_missing_greeks_quote_trade_day_and_underlying_price() -> None:
    result = chain_result(
        greeks=..., implied_volatility=..., last_quote=..., last_trade=..., day=..., open_interest=...
    )
    result["underlying_asset"] = {"ticker": "IWM", "change_to_break_even": 1.4}
    assert parse_option_result(result) == iwm_quote(
        delta=None,
        iv=None,
        bid=None,
        ask=None,
        bid_size=0,
        ask_size=0,
        volume=0,
        open_interest=0,
        quote_ms=None,
        underlying_price=None,
    )


def test_empty_objects_behave_like_missing_ones() -> None:
    result = chain_result(greeks={}, last_quote={}, last_trade={}, day={}, underlying_asset={})
    assert parse_option_result(result) == iwm_quote(
        delta=None,
        bid=None,
        ask=None,
        bid_size=0,
        ask_size=0,
        volume=0,
        quote_ms=None,
        underlying_price=None,
    )


def test_invalid_market_numbers_become_none_or_zero() -> None:
    result = chain_result(
        greeks={"delta": float("nan")},
        implied_volatility=-0.2,
        last_quote={"bid": True, "ask": "1.12", "bid_size": -3, "ask_size": None, "last_updated": "soon"},
        day={"volume": float("inf")},
        open_interest=-1,
        underlying_asset={"price": 0},
    )
    assert parse_option_result(result) == iwm_quote(
        delta=None,
        iv=None,
        bid=None,
        ask=None,
        bid_size=0,
        ask_size=0,
        volume=0,
        open_interest=0,
        quote_ms=None,
        underlying_price=None,
    )


def test_crossed_and_zero_bid_quotes_are_kept_as_given() -> None:
    crossed = chain_result(last_quote={"bid": 1.2, "ask": 1.1, "bid_size": 5, "ask_size": 6})
    zero_bid = chain_result(last_quote={"bid": 0, "ask": 0.05, "bid_size": 0, "ask_size": 100})
    assert parse_option_result(crossed) == iwm_quote(bid=1.2, ask=1.1, bid_size=5, ask_size=6, quote_ms=None)
    assert parse_option_result(zero_bid) == iwm_quote(
        bid=0, ask=0.05, bid_size=0, ask_size=100, quote_ms=None
    )


def test_put_keeps_its_negative_delta() -> None:
    result = chain_result(greeks={"delta": -0.41})
    result["details"] = {**result["details"], "contract_type": "put", "ticker": "O:IWM251002P00242500"}
    assert parse_option_result(result) == iwm_quote(ticker="O:IWM251002P00242500", right="put", delta=-0.41)


@pytest.mark.parametrize(
    "details_changes",
    [
        {"ticker": ...},
        {"ticker": ""},
        {"ticker": 12},
        {"strike_price": "242.5"},
        {"strike_price": 0},
        {"strike_price": float("nan")},
        {"expiration_date": "2025/10/02"},
        {"expiration_date": "20251002"},
        {"expiration_date": "2025-02-30"},
        {"contract_type": "other"},
        {"contract_type": 1},
        # Missing terms are read from the ticker only when it is an OCC ticker.
        {"strike_price": ..., "ticker": "IWM-242.5-C"},
        {"expiration_date": None, "ticker": "O:IWM251002C0024250"},
        {"contract_type": ..., "ticker": "O:IWM251302C00242500"},
        {"strike_price": ..., "ticker": "O:IWM251002C00000000"},
    ],
    ids=repr,
)
def test_result_without_usable_identity_is_bad(details_changes: dict) -> None:
    broken = chain_result()
    details = dict(broken["details"])
    for key, value in details_changes.items():
        if value is ...:
            del details[key]
        else:
            details[key] = value
    broken["details"] = details
    assert parse_option_result(broken) is None
    page = parse_chain_page({"status": "OK", "results": [chain_result(), broken]})
    assert page == ChainPage((iwm_quote(),), None, 1)


def with_details(**details_changes: object) -> dict:
    """`chain_result()` with `details` fields replaced (a value of ... removes one)."""
    result = chain_result()
    details = dict(result["details"])
    for key, value in details_changes.items():
        if value is ...:
            del details[key]
        else:
            details[key] = value
    result["details"] = details
    return result


@pytest.mark.parametrize(
    "details_changes",
    [
        {"strike_price": ...},
        {"expiration_date": ...},
        {"contract_type": ...},
        {"strike_price": None, "contract_type": None},
        {"strike_price": ..., "expiration_date": ..., "contract_type": ...},
    ],
    ids=repr,
)
def test_missing_contract_terms_are_read_from_the_occ_ticker(details_changes: dict) -> None:
    result = with_details(**details_changes)
    assert parse_option_result(result) == iwm_quote()
    assert parse_chain_page({"results": [result]}) == ChainPage((iwm_quote(),), None, 0)
    assert parse_contract_snapshot({"status": "OK", "results": result}) == iwm_quote()


def test_only_the_ticker_and_a_put() -> None:
    result = with_details(
        ticker="O:IWM251002P00242500", strike_price=..., expiration_date=..., contract_type=...
    )
    assert parse_option_result(result) == iwm_quote(ticker="O:IWM251002P00242500", right="put")


def test_details_that_are_there_win_over_a_ticker_whose_root_or_strike_differs() -> None:
    # details.* are the contract's terms: an adjusted contract's ticker can differ in its root and strike
    # (polygon.md section 5); the ticker only fills what details lack.
    result = with_details(ticker="O:IWM1251002C00250000")
    assert parse_option_result(result) == iwm_quote(ticker="O:IWM1251002C00250000")


@pytest.mark.parametrize(
    ("ticker", "changes"),
    [
        ("O:IWM251002P00242500", {}),
        ("O:IWM251003C00242500", {}),
        ("O:IWM251003P00250000", {"expiration_date": ...}),
    ],
    ids=["a put's ticker", "tomorrow's ticker", "the ticker filling the expiry"],
)
def test_a_ticker_naming_another_right_or_expiry_than_details_is_no_contract(ticker, changes) -> None:
    """No corporate action changes a contract's right or expiry, and the BUY names the ticker: a put's
    ticker under a call's details had been named in a CALL alert."""
    assert parse_option_result(with_details(ticker=ticker, **changes)) is None


def test_results_that_are_not_objects_or_lack_details_are_bad() -> None:
    page = parse_chain_page({"results": [None, 3, "x", [], {}, chain_result(details=...), chain_result()]})
    assert page == ChainPage((iwm_quote(),), None, 6)


def test_chain_page_envelopes() -> None:
    assert parse_chain_page(None) == ChainPage((), None, 1)
    assert parse_chain_page([chain_result()]) == ChainPage((), None, 1)
    assert parse_chain_page({"status": "OK"}) == ChainPage((), None, 0)
    assert parse_chain_page({"results": {"a": 1}, "next_url": ""}) == ChainPage((), None, 0)
    assert parse_chain_page({"results": [], "next_url": "http://x/v3?cursor=c"}) == ChainPage(
        (), "http://x/v3?cursor=c", 0
    )
    assert parse_chain_page({"results": [], "next_url": 5}) == ChainPage((), None, 0)


def test_contract_snapshot_needs_an_object_result() -> None:
    assert parse_contract_snapshot({"status": "OK", "results": chain_result()}) == iwm_quote()
    assert parse_contract_snapshot({"status": "OK", "results": [chain_result()]}) is None
    assert parse_contract_snapshot({"status": "NOT_FOUND"}) is None
    assert parse_contract_snapshot(None) is None
    assert parse_contract_snapshot("{}") is None


# Aggregates (hand-made)


def test_aggs_page_drops_invalid_results_and_keeps_the_rest() -> None:
    good = {"o": 242.0, "h": 242.05, "l": 241.99, "c": 242.03, "v": 1500, "vw": 242.013, "t": 5_000, "n": 12}
    results = [
        good,
        {key: value for key, value in good.items() if key != "vw"} | {"t": 6_000},
        {**good, "t": None},
        {**good, "t": 7_000.0},
        {**good, "c": float("nan")},
        {**good, "v": -2},
        "row",
    ]
    page = parse_aggs_page({"results": results}, "IWM", 1000, 9)
    assert page == AggsPage(
        (
            Bar("IWM", 5_000, 6_000, 242.0, 242.05, 241.99, 242.03, 1500, 242.013, None, None, 9),
            Bar("IWM", 6_000, 7_000, 242.0, 242.05, 241.99, 242.03, 1500, None, None, None, 9),
        ),
        None,
        5,
    )


def test_aggs_page_envelopes() -> None:
    assert parse_aggs_page(None, "IWM", 1000, 0) == AggsPage((), None, 1)
    assert parse_aggs_page({"status": "OK", "resultsCount": 0}, "IWM", 1000, 0) == AggsPage((), None, 0)
    assert parse_aggs_page({"results": [], "next_url": "u"}, "IWM", 1000, 0) == AggsPage((), "u", 0)


# Timestamps


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_651_254_260_800_059_648, 1_651_254_260_800),
        (1_651_254_260_800_059, 1_651_254_260_800),
        (1_651_254_260_800, 1_651_254_260_800),
        (1_651_254_260, 1_651_254_260_000),
        (1_672_434_000_000, 1_672_434_000_000),
        (1.6052e18, 1_605_200_000_000),
        (1_717_077_435.713, 1_717_077_435_713),
        (1_651_254_260_800.9, 1_651_254_260_800),
    ],
)
def test_to_ms_normalises_by_magnitude(ts: float, expected: int) -> None:
    result = to_ms(ts)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("ts", [None, "1651254260800", True, 0, -5, float("nan"), float("inf"), [1], 10**400])
def test_to_ms_rejects_unusable_values(ts: object) -> None:
    assert to_ms(ts) is None


# Option tickers


def test_occ_ticker_builds_polygon_tickers() -> None:
    day = datetime.date(2025, 10, 2)
    assert occ_ticker("IWM", day, "call", 242.5) == "O:IWM251002C00242500"
    assert occ_ticker("IWM", day, "C", 242) == "O:IWM251002C00242000"
    assert occ_ticker("iwm", day, "Put", 0.5) == "O:IWM251002P00000500"
    assert occ_ticker("SPY", datetime.date(2024, 6, 4), "call", 451) == "O:SPY240604C00451000"
    assert occ_ticker("IWM", day, "call", 242.4999999) == "O:IWM251002C00242500"


@pytest.mark.parametrize(
    ("root", "right", "strike"),
    [("", "call", 242.0), ("IWM", "x", 242.0), ("IWM", "call", 0), ("IWM", "call", 1e6)],
)
def test_occ_ticker_refuses_what_does_not_fit(root: str, right: str, strike: float) -> None:
    with pytest.raises(ValueError):
        occ_ticker(root, datetime.date(2025, 10, 2), right, strike)


def test_parse_occ_ticker() -> None:
    assert parse_occ_ticker("O:IWM251002C00242500") == ("IWM", datetime.date(2025, 10, 2), "call", 242.5)
    assert parse_occ_ticker("O:AAPL230616C00150000") == ("AAPL", datetime.date(2023, 6, 16), "call", 150.0)
    assert parse_occ_ticker("O:EVRI240119P00002500") == ("EVRI", datetime.date(2024, 1, 19), "put", 2.5)
    assert parse_occ_ticker("O:IWM1251002C00242500") == ("IWM1", datetime.date(2025, 10, 2), "call", 242.5)
    assert parse_occ_ticker("O:BRK.B251219C00500000") == ("BRK.B", datetime.date(2025, 12, 19), "call", 500.0)


@pytest.mark.parametrize(
    "ticker",
    [
        "IWM251002C00242500",
        "O:IWM251002C0024250",
        "O:IWM251002C002425000",
        "O:IWM251002X00242500",
        "O:iwm251002C00242500",
        "O:251002C00242500",
        "O:IWM251302C00242500",
        "O:IWM250230C00242500",
        "O:IWM251002C00242500\n",
        "",
        None,
        242.5,
    ],
)
def test_parse_occ_ticker_rejects_malformed(ticker: object) -> None:
    assert parse_occ_ticker(ticker) is None  # type: ignore[arg-type]


def test_occ_round_trip() -> None:
    day = datetime.date(2026, 1, 16)
    for strike in (1.0, 99.5, 242.5, 1234.125):
        assert parse_occ_ticker(occ_ticker("IWM", day, "call", strike)) == ("IWM", day, "call", strike)


# REST error bodies


def test_error_text() -> None:
    assert error_text(None) == ""
    assert error_text({"status": "ERROR", "request_id": "a", "error": "Unknown API Key"}) == "Unknown API Key"
    forbidden = {
        "status": "NOT_AUTHORIZED",
        "message": "You are not entitled to this data. Please upgrade your plan at https://massive.com/pricing",
    }
    assert error_text(forbidden) == forbidden["message"]
    assert error_text({"error": "", "message": "Your plan doesn't include this data timeframe."}) == (
        "Your plan doesn't include this data timeframe."
    )
    assert error_text({"status": "NOT_FOUND"}) == "{'status': 'NOT_FOUND'}"
    assert error_text({}) == "{}"
    assert error_text("  <html>Bad Gateway</html>\n") == "<html>Bad Gateway</html>"
    assert error_text(b"Too Many Requests") == "Too Many Requests"
    assert error_text(503) == "503"


def test_error_text_is_short() -> None:
    text = error_text({"status": "ERROR", "detail": "x" * 1000})
    assert len(text) == 200
    assert text.endswith("...")
    assert text.startswith("{'status': 'ERROR', 'detail': 'xxx")


# Absurd numbers: counted (bars) or unusable (quotes), never passed on


@pytest.mark.parametrize(
    "changes",
    [
        {"c": 1e7 + 1},
        {"h": 5e300},
        {"o": float("inf")},
        {"l": -0.01},
        {"vw": 2e7},
        {"v": 1e12 + 1},
        {"v": float("nan")},
    ],
    ids=repr,
)
def test_absurd_bar_numbers_make_the_bar_bad_in_frames_and_rest_pages(changes: dict) -> None:
    events = [a_event(start=1_000_000), a_event(start=2_000_000, **changes)]
    frame = parse_ws_frame(json.dumps(events), RECEIVED_MS, IWM_SPY)
    good_agg = {"o": 242.0, "h": 242.05, "l": 241.99, "c": 242.03, "v": 1500, "t": 5_000}
    page = parse_aggs_page({"results": [good_agg, {**good_agg, "t": 6_000, **changes}]}, "IWM", 1000, 9)
    assert frame == ParsedFrame((iwm_bar(1_000_000),), (), 1, 0)
    assert len(page.bars) == 1 and page.bad == 1


def test_bounds_are_inclusive_and_session_fields_over_them_become_none() -> None:
    from polygon_client import MAX_STOCK_PRICE, MAX_VOLUME

    at_bounds = a_event(start=1_000_000, o=MAX_STOCK_PRICE, h=MAX_STOCK_PRICE, v=MAX_VOLUME, a=2e7, av=2e12)
    (bar,) = parse_ws_frame(json.dumps([at_bounds]), RECEIVED_MS, IWM_SPY).bars
    assert (bar.o, bar.v, bar.day_vwap, bar.day_volume) == (MAX_STOCK_PRICE, MAX_VOLUME, None, None)


@pytest.mark.parametrize(
    ("bid", "ask"),
    [(1e5 + 1, 1e5 + 2), (1.0, 1e9), (float("nan"), 1.1), (1.0, float("inf")), (-1.0, 1.1), (1.0, -1.1)],
    ids=repr,
)
def test_absurd_option_prices_become_none_and_the_quote_is_unusable(bid: float, ask: float) -> None:
    from feed import quote_is_usable

    quote = parse_option_result(
        chain_result(last_quote={"bid": bid, "ask": ask, "bid_size": 5, "ask_size": 6})
    )
    assert quote is not None and (quote.bid is None or quote.ask is None)
    assert not quote_is_usable(quote)


def test_crossed_zero_and_valid_quotes_for_marking() -> None:
    from feed import quote_is_usable

    def usable(bid: float, ask: float) -> bool:
        quote = parse_option_result(chain_result(last_quote={"bid": bid, "ask": ask}))
        assert quote is not None
        return quote_is_usable(quote)

    assert usable(1.0, 1.1) and usable(1e5, 1e5)
    assert not usable(1.2, 1.1) and not usable(0, 0.05)


def test_absurd_iv_sizes_and_underlying_price_become_none_or_zero() -> None:
    result = chain_result(
        implied_volatility=101.0,
        last_quote={"bid": 1.08, "ask": 1.12, "bid_size": 1e13, "ask_size": 40},
        open_interest=1e13,
        underlying_asset={"price": 1e8},
    )
    quote = parse_option_result(result)
    assert quote is not None
    assert (quote.iv, quote.bid_size, quote.open_interest, quote.underlying_price) == (None, 0.0, 0.0, None)
    assert (quote.bid, quote.ask, quote.ask_size) == (1.08, 1.12, 40)


def test_a_frame_nested_too_deep_is_one_bad_frame_as_text_and_bytes() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    assert parse_ws_frame(deep, RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 1, 0)
    assert parse_ws_frame(deep.encode(), RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 1, 0)
    assert parse_ws_frame(b"\xff\xfe\x00", RECEIVED_MS, IWM_SPY) == ParsedFrame((), (), 1, 0)


@pytest.mark.parametrize(
    ("status", "message", "refused"),
    [
        ("error", "Your plan doesn't include options quotes: Q.O:IWM251002C00243000", True),
        ("error", "You are not entitled to this data. Please upgrade your plan", True),
        ("error", "not authorized: A.IWM.", True),
        ("error", "Q.O:IWM251002C00243000 is not available", True),
        ("error", "bad request: unknown action", False),
        ("success", "subscribed to: Q.O:IWM251002C00243000", False),
        ("auth_failed", "authentication failed", False),
        # A refusal that names only channels nobody here asked for is not ours (an audit's "Q.X" was).
        ("error", "not authorized: Q.X", False),
        ("error", "Your plan doesn't include options quotes: Q.O:IWM251003C00250000", False),
    ],
)
def test_a_refused_subscription_is_known_by_more_than_one_wording(
    status: str, message: str, refused: bool
) -> None:
    # The vendor's wording is undocumented: an error naming the plan, access or one of our channels is a refusal.
    from polygon_client import StatusMessage, _refuses_subscription

    topics = ("A.IWM", "A.SPY", "Q.O:IWM251002C00243000")
    assert _refuses_subscription(StatusMessage(status, message), topics) is refused


def test_a_contract_twice_in_one_chain_keeps_its_newest_quote_for_ranking_and_marks():
    """Pages are fetched one after another while the chain moves, so one contract can come twice: its
    older, dearer copy won the ranking (a BUY at a stale ask) while marks took whichever came first."""
    from feed import LazyChain

    newer_ns = 1_759_416_000_123_456_789
    older = chain_result(last_quote={"ask": 1.34, "ask_size": 40, "bid": 1.30, "bid_size": 55,
                                     "last_updated": newer_ns - 20 * 10**9})  # fmt: skip
    newer = chain_result()
    other = changed(
        chain_result(), {"details": {**chain_result()["details"], "ticker": "O:IWM251002C00243000"}}
    )
    for pages in (
        ({"results": [older, other]}, {"results": [newer]}),
        ({"results": [newer, other]}, {"results": [older]}),
    ):
        assert LazyChain(pages).find("O:IWM251002C00242500").ask == 1.12
        quotes = list(LazyChain(pages))
        assert [q.ticker for q in quotes] == ["O:IWM251002C00242500", "O:IWM251002C00243000"]
        assert quotes[0].ask == 1.12
