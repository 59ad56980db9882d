"""The fault proxy itself, against an echo server: it forwards, a cut resets
every link, a stall holds the bytes back and then lets them through."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Proxy("127.0.0.1", server.server_address[1]) as p:
            yield p
    finally:
        server.shutdown()
        server.server_close()


def connect(proxy: Proxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.settimeout(5)
    return s


def echo(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_then_cut_resets_the_link(proxy: Proxy) -> None:
    with connect(proxy) as s:
        assert echo(s, b"hello") == b"hello"
        assert proxy.cut() == 1
        with pytest.raises(OSError):
            # A reset link fails at once, or reads its end.
            if s.recv(1) == b"":
                raise ConnectionResetError("closed")
    with connect(proxy) as s:
        assert echo(s, b"again") == b"again"


def test_a_stall_holds_bytes_back_until_it_ends(proxy: Proxy) -> None:
    with connect(proxy) as s:
        assert echo(s, b"before") == b"before"
        stall = threading.Thread(target=proxy.stall, args=(1.0,))
        started = time.monotonic()
        stall.start()
        time.sleep(0.1)
        assert echo(s, b"during") == b"during"
        assert time.monotonic() - started >= 0.9
        stall.join(timeout=5)
