"""The gateway's HTTP client for its backends (gateway/backends/client.py) against a raw loopback server
that answers each request with scripted bytes: framing, pooling, limits and failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.backends.client import ConnectFailed, ConnectionBroke, HttpClient, ReplyTooLarge
from tests.servers import free_port

pytestmark = pytest.mark.timeout(60)

Script = Callable[[int, bytes], bytes | None]  # (request number, raw request) -> bytes to send (None: close)


class RawServer:
    """Reads one request head (and a Content-Length body), sends what the script says, keeps the connection."""

    def __init__(self, script: Script, *, close_after: bool = False, delay_s: float = 0.0) -> None:
        self.script = script
        self.close_after = close_after
        self.delay_s = delay_s
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                answer = self.script(len(self.requests), request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def ok(body: bytes = b'{"ok":true}') -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def client(port: int, *, url_extra: str = "", max_body: int = 1000, keepalive_s: float = 4.0) -> HttpClient:
    return HttpClient(
        f"http://{url_extra}127.0.0.1:{port}/ml/",
        max_connections=4,
        keepalive_s=keepalive_s,
        connect_timeout_s=2.0,
        max_body=max_body,
    )


def test_requests_reuse_a_connection_and_send_what_they_are_given() -> None:
    async def run() -> None:
        async with RawServer(lambda n, r: ok(b"%d" % n)) as server:
            http = client(server.port, url_extra="user:p%40ss@")
            first = await http.request("POST", "/ml/predict?token=T", {"X-Request-ID": "r1"}, b"body-1")
            second = await http.request("GET", "/ml/ping", {}, None)
            await http.close()
        assert (first.status, first.content_type, first.body) == (200, "application/json", b"1")
        assert second.body == b"2" and server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /ml/predict?token=T HTTP/1.1" and body == b"body-1"
        assert b"Host: 127.0.0.1:%d" % server.port in lines and b"X-Request-ID: r1" in lines
        assert b"Authorization: Basic dXNlcjpwQHNz" in lines  # user:p@ss, as httpx sent it
        assert server.requests[1].startswith(b"GET /ml/ping HTTP/1.1\r\n")

    asyncio.run(run())


def test_chunked_and_close_delimited_replies_are_read_whole() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"

    async def run() -> None:
        async with RawServer(lambda n, r: chunked) as server:
            assert (await client(server.port).request("GET", "/", {}, None)).body == b"abcde"
        async with RawServer(lambda n, r: until_close, close_after=True) as server:
            http = client(server.port)
            assert (await http.request("GET", "/", {}, None)).body == b"all of it"
            assert (await http.request("GET", "/", {}, None)).body == b"all of it"  # a new connection
            assert server.connections == 2

    asyncio.run(run())


def test_replies_over_the_limit_are_refused() -> None:
    big_declared = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000
    chunk = b"3e8\r\n" + b"y" * 1000 + b"\r\n"  # 1000 bytes: the second one passes the limit
    big_chunked = b"HTTP/1.1 502 Bad\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    huge_head = b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"z" * 70_000 + b"\r\n\r\n"

    async def run() -> None:
        for answer, status in ((big_declared, 200), (big_chunked, 502)):
            async with RawServer(lambda n, r, a=answer: a) as server:
                with pytest.raises(ReplyTooLarge, match="GATEWAY_MAX_RESPONSE_BYTES=1000") as caught:
                    await client(server.port, max_body=1000).request("GET", "/", {}, None)
                assert caught.value.status == status
        async with RawServer(lambda n, r: huge_head) as server:
            with pytest.raises(ConnectionBroke, match="head larger"):
                await client(server.port).request("GET", "/", {}, None)

    asyncio.run(run())


def test_failures_are_told_apart() -> None:
    async def run() -> None:
        with pytest.raises(ConnectFailed):
            await client(free_port()).request("GET", "/", {}, None)
        async with RawServer(lambda n, r: None) as server:  # closes without a reply
            with pytest.raises(ConnectionBroke):
                await client(server.port).request("GET", "/", {}, None)
        async with RawServer(lambda n, r: b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as server:
            with pytest.raises(ConnectionBroke, match="invalid HTTP reply"):
                await client(server.port).request("GET", "/", {}, None)
        cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"
        async with RawServer(lambda n, r: cut, close_after=True) as server:
            with pytest.raises(ConnectionBroke):
                await client(server.port).request("GET", "/", {}, None)
        with pytest.raises(Exception, match="line break"):
            await client(free_port()).request("GET", "/", {"X-Key": "a\r\nInjected: 1"}, None)

    asyncio.run(run())


def test_a_cancelled_request_never_leaves_its_reply_to_the_next() -> None:
    async def run() -> None:
        async with RawServer(lambda n, r: ok(b"%d" % n), delay_s=0.3) as server:
            http = client(server.port)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await http.request("GET", "/", {}, None)
            reply = await http.request("GET", "/", {}, None)
            assert reply.body == b"2" and server.connections == 2  # its own reply, on a new connection

    asyncio.run(run())
