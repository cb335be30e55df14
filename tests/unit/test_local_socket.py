"""swarm.local_socket: the private directory both sides check, the socket's life, and the client's fallback to P2P."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from swarm import local_socket
from swarm.local_socket import BadDirectory, LocalFirst, LocalPeers, check_directory, check_listen_directory

PEER = "QmdNmvU8aerw6CGSXGFJ3xAe46eVyGg58fNymFWmdZi89Q"
OTHER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


@pytest.fixture
def private():
    """A private directory short enough for sockets (pytest's tmp_path may be too long for their addresses)."""
    directory = Path(tempfile.mkdtemp(prefix="sock-"))
    yield directory
    directory.chmod(0o700)
    shutil.rmtree(directory)


def test_only_a_private_directory_of_ours_is_accepted(private, tmp_path, monkeypatch):
    assert check_directory(private) == private
    for mode in (0o750, 0o705, 0o777, 0o710):
        private.chmod(mode)
        with pytest.raises(BadDirectory, match="open to others"):
            check_directory(private)
    private.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(BadDirectory, match="not a directory"):
        check_directory(link)
    (tmp_path / "file").write_text("")
    with pytest.raises(BadDirectory, match="not a directory"):
        check_directory(tmp_path / "file")
    with pytest.raises(BadDirectory):
        check_directory(tmp_path / "missing")
    monkeypatch.setattr(os, "geteuid", lambda: os.lstat(private).st_uid + 1)
    with pytest.raises(BadDirectory, match="another user"):
        check_directory(private)


def test_socket_names_are_peer_ids_and_fit_an_address(private):
    assert local_socket.socket_path(private, PEER) == private / f"{PEER}.sock"
    for bad in ("../x", "a/b", "", "0OIl" * 10, PEER + "/", PEER + "\n", "x" * 65):
        with pytest.raises(ValueError):
            local_socket.socket_path(private, bad)
    deep = private / ("d" * 60)
    deep.mkdir(mode=0o700)
    with pytest.raises(BadDirectory, match="too long"):
        check_listen_directory(deep)
    with pytest.raises(ValueError, match="too long"):
        local_socket.socket_path(deep, OTHER)
    assert check_listen_directory(private) == private


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(5))
    await writer.drain()
    writer.close()


async def test_a_peer_serves_on_its_socket_and_removes_it(private):
    server = await local_socket.serve(private, PEER, echo)
    path = private / f"{PEER}.sock"
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        reader, writer = await LocalPeers(private).connect(PEER, timeout=5)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        assert await LocalPeers(private).connect(OTHER, timeout=5) is None  # no socket of that peer
    finally:
        await server.stop()
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_anything_else_refused(private):
    dead = socket.socket(socket.AF_UNIX)  # as a peer that died: its socket file stays behind, nobody listens
    dead.bind(str(private / f"{PEER}.sock"))
    dead.close()
    assert (private / f"{PEER}.sock").exists()
    assert await LocalPeers(private).connect(PEER, timeout=5) is None  # nobody listens: the client goes by P2P
    second = await local_socket.serve(private, PEER, echo)
    try:
        reader, writer = await LocalPeers(private).connect(PEER, timeout=5)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()
    finally:
        await second.stop()
    (private / f"{PEER}.sock").write_text("not a socket")
    with pytest.raises(BadDirectory, match="not a socket"):
        await local_socket.serve(private, PEER, echo)
    assert LocalPeers(private).path(PEER) is None


async def test_a_client_ignores_sockets_in_a_directory_others_can_enter(private):
    server = await local_socket.serve(private, PEER, echo)
    try:
        private.chmod(0o777)  # someone opened it up: a socket there could be anyone's
        assert await LocalPeers(private).connect(PEER, timeout=5) is None
        private.chmod(0o700)
        assert await LocalPeers(private).connect(PEER, timeout=5) is not None
    finally:
        private.chmod(0o700)
        await server.stop()
    with pytest.raises(BadDirectory):
        private.chmod(0o755)
        await local_socket.serve(private, PEER, echo)


class FakePeerID:
    def __init__(self, text: str):
        self.text = text

    def to_base58(self) -> str:
        return self.text


class FakeP2P:
    def __init__(self):
        self.calls = []
        self.shut = False

    async def call_binary_stream_handler(self, peer_id, handler):
        self.calls.append((peer_id.to_base58(), handler))
        return "info", "reader", "writer"

    async def shutdown(self):
        self.shut = True


async def test_local_first_takes_the_socket_where_there_is_one_and_p2p_elsewhere(private):
    p2p = FakeP2P()
    transport = LocalFirst(p2p, private, "inference")
    server = await local_socket.serve(private, PEER, echo)
    try:
        info, reader, writer = await transport.call_binary_stream_handler(FakePeerID(PEER), "inference")
        assert info is None and isinstance(reader, asyncio.StreamReader) and transport.connections == 1
        writer.close()
        assert await transport.call_binary_stream_handler(FakePeerID(OTHER), "inference") == ("info", "reader",
                                                                                             "writer")
        assert await transport.call_binary_stream_handler(FakePeerID(PEER), "push") == ("info", "reader", "writer")
        assert p2p.calls == [(OTHER, "inference"), (PEER, "push")] and transport.connections == 1
        await transport.shutdown()  # everything else is the P2P's own
        assert p2p.shut
    finally:
        await server.stop()


async def test_a_live_socket_is_never_taken_over_nor_removed_by_another(private):
    first = await local_socket.serve(private, PEER, echo)
    try:
        with pytest.raises(BadDirectory, match="live"):  # a second peer of the same id
            await local_socket.serve(private, PEER, echo)
        os.unlink(private / f"{PEER}.sock")  # someone put another socket at the name meanwhile
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(private / f"{PEER}.sock"))
    finally:
        await first.stop()
    assert (private / f"{PEER}.sock").exists()  # not first's to remove
    other.close()


async def test_both_ends_check_the_other_is_this_user(private, monkeypatch):
    left, right = socket.socketpair(socket.AF_UNIX)
    assert local_socket.same_user(left) and local_socket.same_user(right)
    assert not local_socket.same_user(None)
    served = []

    async def record(reader, writer):
        served.append(True)
        writer.close()

    server = await local_socket.serve(private, PEER, record)
    try:
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # as if the other end were someone else
        assert not local_socket.same_user(left)
        assert await LocalPeers(private).connect(PEER, timeout=5) is None  # (the directory check refuses first)
        monkeypatch.setattr(local_socket, "check_directory", lambda d: Path(d))
        assert await LocalPeers(private).connect(PEER, timeout=5) is None  # the client refuses the server's uid
        reader, writer = await asyncio.open_unix_connection(private / f"{PEER}.sock")  # no client-side check
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hung up on it unserved
        writer.close()
        assert served == []
        monkeypatch.setattr(os, "geteuid", lambda: uid)
        reader, writer = await LocalPeers(private).connect(PEER, timeout=5)
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert served == [True]
    finally:
        left.close()
        right.close()
        await server.stop()
