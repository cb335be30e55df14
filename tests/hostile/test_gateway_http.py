"""Hostile HTTP clients against a real `uvicorn` serving the gateway (over the fake backends of the unit tests, on
127.0.0.1), on raw sockets: a body that trickles in (slowloris) is 408 after GATEWAY_BODY_TIMEOUT and its connection
closed; a body declared or grown past GATEWAY_MAX_BODY_BYTES is 413 without the rest being waited for; a request
without the key is 401 before its body arrives; many slow clients at once do not keep a normal request waiting.

Not bounded by the gateway (uvicorn has no header timeout): a client that never finishes its headers keeps its
connection open; see the README's threat model for the proxy settings that bound it.

Run: .venv/bin/python -m pytest tests/hostile/test_gateway_http.py
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.launcher import ManagedProcess

KEY = "hostile-test-key"
BODY_TIMEOUT = 1.0
MAX_BODY = 65536
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    port = free_port()
    log = Path(tmp_path_factory.mktemp("gateway-http")) / "uvicorn.log"
    argv = [sys.executable, "-m", "uvicorn", "tests.hostile.gateway_app:app", "--host", "127.0.0.1",
            "--port", str(port)]
    env = {"GATEWAY_BODY_TIMEOUT": str(BODY_TIMEOUT), "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
           "GATEWAY_API_KEYS": KEY}
    process = ManagedProcess("gateway", argv, log, env)
    try:
        process.wait_for(r"Uvicorn running on", timeout=180)
        yield port
    finally:
        process.stop()


def head(length: int | None = None, auth: bool = True, extra: bytes = b"") -> bytes:
    lines = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        lines += f"Content-Length: {length}\r\n".encode()
    return lines + (AUTH if auth else b"") + extra + b"\r\n"


def read_response(sock: socket.socket, deadline: float) -> tuple[int, dict, bool]:
    """Read a response to its end; return its status, its JSON body and whether the server then closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock, deadline, eof_ok=False)
    header, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += _recv(sock, deadline, eof_ok=False)
    try:
        closed = _recv(sock, deadline, eof_ok=True) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:  # it closed with bytes of ours unread (a client still sending): the kernel resets
        closed = True
    return int(header.split(b" ")[1]), json.loads(body[:length]), closed


def _recv(sock: socket.socket, deadline: float, eof_ok: bool) -> bytes:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        raise TimeoutError("no response in time") from None
    if not chunk and not eof_ok:
        raise ConnectionError("the server closed the connection before a whole response")
    return chunk


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_body_that_trickles_in_is_408_after_the_body_timeout(port):
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(head(length=1000) + b"{")
        sock.settimeout(0.2)
        while True:  # one byte every 0.2 s: each arrives well within any per-read timeout, the whole never does
            try:
                first = sock.recv(1, socket.MSG_PEEK)
                break
            except TimeoutError:
                sock.sendall(b" ")
                assert time.monotonic() - started < 10, "the trickling body was never cut off"
        elapsed = time.monotonic() - started
        status, body, closed = read_response(sock, time.monotonic() + 5)
    assert first and status == 408 and body["error"]["code"] == "request_timeout" and closed
    assert BODY_TIMEOUT * 0.9 < elapsed < BODY_TIMEOUT + 3


def test_a_body_declared_too_large_is_413_before_it_is_sent(port):
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(head(length=10**9))
        status, body, closed = read_response(sock, started + 5)
    assert status == 413 and body["error"]["code"] == "request_too_large" and closed
    assert time.monotonic() - started < BODY_TIMEOUT  # answered at once, not after waiting for the body


def test_a_chunked_body_that_grows_past_the_limit_is_413(port):
    size = 8192
    chunk = b"%x\r\n%s\r\n" % (size, b" " * size)
    with connect(port) as sock:
        sock.sendall(head(extra=b"Transfer-Encoding: chunked\r\n"))
        for _ in range(MAX_BODY // size + 1):  # one chunk past the limit, and no more: unread bytes would reset
            sock.sendall(chunk)                  # the connection before the client reads the answer
        status, body, closed = read_response(sock, time.monotonic() + 5)
    assert status == 413 and body["error"]["code"] == "request_too_large" and closed


def test_without_the_key_a_request_is_401_before_its_body_arrives(port):
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(head(length=1000, auth=False))  # the body never comes
        status, body, closed = read_response(sock, started + 5)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and closed
    assert time.monotonic() - started < BODY_TIMEOUT


def test_many_slow_clients_do_not_keep_a_normal_request_waiting(port):
    slow = [connect(port) for _ in range(30)]
    try:
        for sock in slow:
            sock.sendall(head(length=500) + b'{"model": ')
        started = time.monotonic()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 4})
        assert response.status_code == 200 and time.monotonic() - started < BODY_TIMEOUT
        statuses = [read_response(sock, time.monotonic() + BODY_TIMEOUT + 5)[0] for sock in slow]
        assert statuses == [408] * len(slow)
    finally:
        for sock in slow:
            sock.close()
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
