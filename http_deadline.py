"""An httpx transport whose every request ends by a deadline, however slowly the peer answers.

httpx's timeouts bound each network operation (a connect, one read, one write), so a peer that sends
one byte every few seconds keeps a request alive for ever: an alert queued behind it never goes out,
a chain poll never ends (encode/httpx#1450; the maintainers place the fix in httpcore). This transport
gives httpcore a network backend whose every connect, read and write gets at most what is left of
the request's deadline; past it they raise httpcore's own timeouts, which reach the caller as the
usual `httpx.ConnectTimeout`, `httpx.ReadTimeout` or `httpx.WriteTimeout`.

The deadline belongs to the thread that sends (clients here are shared between threads), from the
start of `handle_request` until its response is closed (callers stream the body and close it when read).
Proxies from the environment are not used: the daemon talks to its two vendors directly.

`read_capped` reads a streamed body no further than a limit, counted after decompression: a 2 MB
gzip answer that inflates to 2 GB took a daemon to 1.5 GB of memory within the request's deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import certifi
import httpcore
import httpx


@dataclass(frozen=True, slots=True)
class CappedBody:
    """A response body read up to a limit; `complete` is False when the body ran past it."""

    content: bytes
    complete: bool


# The codings read here, each inflated by `_inflated` (wbits for zlib: gzip's header, or zlib's).
INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def read_capped(response: httpx.Response, limit: int) -> CappedBody:
    """The decoded body of a streamed response (`client.stream(...)`), read no further than `limit`
    bytes. Every coding is inflated here, at most `limit` + 1 bytes from each piece of input, stacked
    ones too (`gzip, gzip`): httpx inflates a whole network chunk at once, so 64 KiB of a bomb became
    64 MB, and a 1.8 KB body coded twice became 2 GB. A body that cannot be inflated, or a coding not
    in INFLATE_WBITS (nobody asked for it), raises `httpx.DecodingError`, as httpx's own decoding does."""
    if response.is_stream_consumed:  # read already (a transport that hands over whole, decoded responses)
        return _collected([response.content], limit)
    header = response.headers.get("content-encoding", "")
    codings = [c for c in (part.strip().lower() for part in header.split(",")) if c not in ("", "identity")]
    unknown = [c for c in codings if c not in INFLATE_WBITS]
    if unknown:
        raise httpx.DecodingError(
            f"content-encoding {', '.join(unknown)} is not read", request=response.request
        )
    chunks: Iterable[bytes] = response.iter_raw()
    for coding in reversed(codings):  # the last coding applied is the first undone
        chunks = _inflated(chunks, coding, limit + 1, response.request)
    return _collected(chunks, limit)


def _collected(chunks: Iterable[bytes], limit: int) -> CappedBody:
    kept: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            kept.append(chunk[: len(chunk) - (size - limit)])
            return CappedBody(b"".join(kept), complete=False)
        kept.append(chunk)
    return CappedBody(b"".join(kept), complete=True)


def _inflated(chunks: Iterable[bytes], coding: str, most: int, request: httpx.Request) -> Iterator[bytes]:
    """`chunks` inflated by `coding` in pieces of at most `most` bytes, as the collector asks for them.
    A "deflate" body that is raw deflate (no zlib header, as some servers send) is read as such."""
    inflater = zlib.decompressobj(INFLATE_WBITS[coding])
    started = False
    try:
        for raw in chunks:
            data = raw
            while data:
                try:
                    piece = inflater.decompress(data, most)
                except zlib.error:
                    if coding != "deflate" or started:
                        raise
                    inflater, started = zlib.decompressobj(-zlib.MAX_WBITS), True
                    continue
                started = True
                yield piece
                data = inflater.unconsumed_tail
        yield inflater.flush()
    except zlib.error as exc:
        raise httpx.DecodingError(f"{coding}: {exc}", request=request) from exc


class DeadlineTransport(httpx.BaseTransport):
    """Plain HTTP/1.1 over a connection pool; each request ends within `total_s` seconds."""

    def __init__(
        self,
        total_s: float,
        *,
        max_connections: int = 10,
        keepalive_expiry: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._total_s = total_s
        self._monotonic = monotonic
        self._local = threading.local()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl.create_default_context(cafile=certifi.where()),
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            network_backend=_DeadlineBackend(self._seconds_left),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` under a fresh deadline; the deadline ends when its response is closed."""
        self._local.deadline = self._monotonic() + self._total_s
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )
        try:
            with httpx_errors(request):
                response = self._pool.handle_request(core_request)
        except BaseException:
            self._local.deadline = None
            raise
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, request, self._end_deadline),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()

    def _seconds_left(self) -> float | None:
        deadline = getattr(self._local, "deadline", None)
        return None if deadline is None else deadline - self._monotonic()

    def _end_deadline(self) -> None:
        self._local.deadline = None


@contextlib.contextmanager
def httpx_errors(request: httpx.Request) -> Iterator[None]:
    """httpcore's exceptions as the httpx exceptions of the same name (httpx's own mapping)."""
    try:
        yield
    except httpcore.UnsupportedProtocol as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
        kind = getattr(httpx, type(exc).__name__, httpx.TransportError)
        raise kind(str(exc) or type(exc).__name__, request=request) from exc


class _Body(httpx.SyncByteStream):
    """The response body as httpcore streams it, with its errors as httpx's; closing ends the deadline."""

    def __init__(self, stream: Iterable[bytes], request: httpx.Request, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._request = request
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        with httpx_errors(self._request):
            yield from self._stream

    def close(self) -> None:
        try:
            if hasattr(self._stream, "close"):
                self._stream.close()
        finally:
            self._on_close()


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's synchronous sockets, each operation bounded by what is left of the deadline."""

    def __init__(self, seconds_left: Callable[[], float | None]) -> None:
        self._inner = httpcore.SyncBackend()
        self._seconds_left = seconds_left
        self._lookups = threading.BoundedSemaphore(LOOKUPS_AT_ONCE)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = bound(timeout, self._seconds_left(), httpcore.ConnectTimeout)
        addresses = resolve(host, port, left, slots=self._lookups)
        failure: Exception | None = None
        for address in addresses:  # in the resolver's order, as socket.create_connection tries them
            bounded = bound(timeout, self._seconds_left(), httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(address, port, bounded, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            return _DeadlineStream(stream, self._seconds_left)
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = bound(timeout, self._seconds_left(), httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_unix_socket(path, bounded, socket_options), self._seconds_left
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, seconds_left: Callable[[], float | None]) -> None:
        self._inner = inner
        self._seconds_left = seconds_left

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, bound(timeout, self._seconds_left(), httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, bound(timeout, self._seconds_left(), httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        bounded = bound(timeout, self._seconds_left(), httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, bounded), self._seconds_left
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


# Name lookups under way at once per client (each on a thread of its own; see `resolve`).
LOOKUPS_AT_ONCE = 4


def resolve(
    host: str,
    port: int,
    timeout: float | None,
    lookup: Callable[..., list[Any]] = socket.getaddrinfo,
    slots: threading.Semaphore | None = None,
) -> list[str]:
    """The addresses of `host`, looked up within `timeout` seconds (httpcore's ConnectTimeout after it,
    ConnectError when the name is unknown). The lookup (`getaddrinfo`) runs in a thread of its own: it has
    no timeout, and a resolver that never answered held each Pushover request 90 s past its deadline (and
    the daemon's stop behind it). `slots` bounds the lookups under way: hung ones are not piled up, one
    thread per poll, for as long as the resolver stays silent."""
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host))]
    if slots is not None and not slots.acquire(blocking=False):
        raise httpcore.ConnectTimeout(f"looking up {host}: earlier lookups still wait for the resolver")
    answer: list[Any] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            answer.append(lookup(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)
        finally:
            done.set()
            if slots is not None:
                slots.release()

    threading.Thread(target=look_up, name="dns", daemon=True).start()  # daemon: a hung one never holds exit
    if not done.wait(timeout):
        raise httpcore.ConnectTimeout(f"looking up {host} took more than {timeout:.1f} s")
    found = answer[0]
    if isinstance(found, OSError):
        raise httpcore.ConnectError(f"looking up {host}: {found}")
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def bound(timeout: float | None, left: float | None, expired: type[Exception]) -> float | None:
    """The timeout for one network operation: `timeout`, shortened to what is left of the deadline
    (None: no deadline); raises `expired` once nothing is left."""
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the request's deadline passed")
    return left if timeout is None else min(timeout, left)
