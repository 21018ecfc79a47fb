"""A minimal asyncio HTTP/1.1 keep-alive client for the closed-loop benchmark, and nothing more.

Why it exists: on a 2-core machine the load generator shares the CPUs with the server it loads,
so every millisecond of client CPU per request is a millisecond the server does not get, and the
in-process ceiling it is compared with pays none of it. httpx's layers (request/response models,
header normalisation, the connection pool, httpcore's h11 state machine, per-request timeouts
and its transport abstraction) cost several times what the bytes on the wire need. This client
sends a request serialised once up front (request line, Host, Content-Length, keep-alive, the
body) with one ``write`` and parses only what it must to find the end of the response: the
status line, the headers, then a ``Content-Length`` body, a ``Transfer-Encoding: chunked`` body
(trailers skipped) or, with neither, a body that ends when the server closes. ``connections``
closed-loop clients get one connection each (a connection serves one request at a time).

A connection that the server closes (``Connection: close`` in a response, an HTTP/1.0 answer
without keep-alive, a body delimited by EOF) is reopened for the next request. A reused
connection found dead before any byte of the answer arrived (the server's keep-alive timeout
closed it while it was idle) is reopened and the request sent once more, as browsers and httpx
do. Any status, 4xx and 5xx included, is returned as a value; only transport failures raise.

What it does not do: TLS, redirects, cookies, proxies, compression, HTTP/2, pipelining, request
bodies streamed from a generator, ``Expect: 100-continue`` on its own initiative (an interim 1xx
answer is skipped). It is a load generator, not a general HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["HttpConnection", "LoadClient", "Response", "prepare_request"]

_MAX_HEADER_BYTES = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class ProtocolError(Exception):
    """The server's bytes are not a well-formed HTTP/1.x response."""


@dataclass(frozen=True)
class Response:
    """One answer: status, headers (names lower-cased; a repeated name keeps its last value), body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


def prepare_request(host: str, port: int, method: str, path: str, body: bytes = b"",
                    headers: Mapping[str, str] | None = None) -> bytes:
    """The whole request as bytes, built once and written as is for every request of a level.

    Host and Content-Length are always set from the arguments (a Content-Length or Host in
    ``headers`` is replaced), ``Connection: keep-alive`` unless ``headers`` says otherwise.
    """
    extra = {k.lower(): v for k, v in (headers or {}).items()}
    extra.pop("host", None)
    extra.pop("content-length", None)
    extra.pop("transfer-encoding", None)
    extra.setdefault("connection", "keep-alive")
    lines = [f"{method.upper()} {path} HTTP/1.1", f"host: {host}:{port}", f"content-length: {len(body)}",
             *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpConnection:
    """One keep-alive connection to ``host:port``: opened on first use, reopened after a server close."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.opened = 0  # connections opened so far: 1 for a connection reused throughout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def request(self, raw: bytes, head_only: bool = False) -> Response:
        """Send ``raw`` (from :func:`prepare_request`) and read the answer; ``head_only`` for HEAD requests."""
        reused = self._writer is not None
        try:
            try:
                return await self._exchange(raw, head_only)
            except _StaleConnection:
                self.drop()
                if not reused:
                    raise
            # A reused connection the server had closed while it sat idle: once more on a new one.
            return await self._exchange(raw, head_only)
        except _StaleConnection:
            self.drop()
            raise ConnectionResetError("the server closed the connection without answering") from None
        except BaseException:  # a failure or a timeout mid-answer: the connection's state is unknown
            self.drop()
            raise

    async def _exchange(self, raw: bytes, head_only: bool) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=_MAX_HEADER_BYTES)
            self.opened += 1
        reader, writer = self._reader, self._writer
        assert reader is not None
        try:
            writer.write(raw)
            await writer.drain()
        except ConnectionError as exc:
            raise _StaleConnection from exc
        first = True
        while True:  # skip interim 1xx answers (100 Continue) to the final one
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if first and not exc.partial:
                    raise _StaleConnection from None
                raise
            except ConnectionError as exc:
                if first:
                    raise _StaleConnection from exc
                raise
            except asyncio.LimitOverrunError as exc:
                raise ProtocolError(f"response head larger than {_MAX_HEADER_BYTES} bytes") from exc
            first = False
            version, status, headers = _parse_head(head)
            if not 100 <= status < 200 or status == 101:
                break
        keep_alive = _keep_alive(version, headers)
        if head_only or status in _NO_BODY_STATUS:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError as exc:
                raise ProtocolError(f"bad content-length {headers['content-length']!r}") from exc
            body = await reader.readexactly(length)
        else:  # delimited by the server closing the connection
            body = await reader.read()
            keep_alive = False
        if not keep_alive:
            self.drop()
        return Response(status, headers, body)

    def drop(self) -> None:
        """Close the socket without waiting (the next request opens a new one)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer = self._writer
        self.drop()
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _StaleConnection(Exception):
    """EOF where the status line should be, before any byte of it."""


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], int(parts[1]), headers


def _keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "close" in tokens:
        return False
    return version != "HTTP/1.0" or "keep-alive" in tokens


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size {line!r}") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")


class LoadClient:
    """``connections`` keep-alive connections to one server, handed out one per request in flight.

    With as many connections as closed-loop clients, every client always finds one idle and keeps
    using the same one (last in, first out), so a level opens each connection once.
    """

    def __init__(self, base_url: str, connections: int, timeout_s: float | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"plain http://host:port URLs only, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.timeout_s = timeout_s
        self.connections = [HttpConnection(self.host, self.port) for _ in range(connections)]
        self._idle: asyncio.LifoQueue[HttpConnection] = asyncio.LifoQueue()
        for conn in reversed(self.connections):
            self._idle.put_nowait(conn)

    def prepare(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> bytes:
        return prepare_request(self.host, self.port, method, path, body, headers)

    async def send(self, raw: bytes, head_only: bool = False) -> Response:
        """One request on an idle connection (waiting for one if all are busy), within ``timeout_s``."""
        conn = await self._idle.get()
        try:
            async with asyncio.timeout(self.timeout_s):  # None: no limit; no extra task either way
                return await conn.request(raw, head_only)
        finally:
            self._idle.put_nowait(conn)

    @property
    def opened(self) -> int:
        """Connections opened so far, reconnects included."""
        return sum(c.opened for c in self.connections)

    async def aclose(self) -> None:
        for conn in self.connections:
            await conn.close()

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
