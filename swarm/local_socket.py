"""Sessions to a peer on the same host over a Unix socket instead of two p2pd daemons and a loopback TCP hop.

    server = await serve(directory, peer_id, handler.handle_local)     # the peer: DIR/<peer_id>.sock; server.stop()
    p2p = LocalFirst(p2p, directory, INFERENCE_HANDLER)                # a client on the same host: its streams
                                                                       # to that peer go through the socket

The frames are the inference stream's own (swarm.codec), so the handler serves them exactly as it serves a p2p
stream. `make serve`'s gateway and its embedded peer use this: a hop costs ~0.6 ms less than through the daemons
(benchmarks.hops: 1.25 vs 1.86 ms).

Trust: only processes of this user (who could read our memory anyway) are served or trusted. The socket lives in a
directory owned by this user with no group or other bits (both sides check it before using it; the socket itself is
600), and both ends of every connection check the other's uid from the kernel (SO_PEERCRED: Linux; elsewhere no
connection is trusted and the client goes through P2P), so a directory swapped after its check gains nobody
anything. A peer's id is not otherwise authenticated here: the user is what vouches for it. Everything else is as on
a p2p stream: the handler bounds and validates every frame, and the connection counts against the peer's limits as
the client "local".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

logger = logging.getLogger(__name__)

LONGEST_PEER_ID = 52  # base58 characters of an Ed25519 identity's id ("12D3KooW..."); RSA ids ("Qm...") are 46
MAX_PATH_BYTES = 104  # sun_path: 108 bytes on Linux, 104 on macOS; its terminating NUL included
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,64}")  # base58, as hivemind writes peer ids (fullmatch)
CLIENT = "local"  # the client name a Unix-socket stream is served under (fairness, pending limits, allowlists)


class BadDirectory(ValueError):
    """Not a directory for sockets: one others could enter or write into (a socket there could be anyone's), or a
    path too long for a socket's address."""


def check_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a Path, if it is a real directory (not a link), owned by this user, with no group or other
    permission bits; else BadDirectory."""
    path = Path(directory)
    try:
        info = os.lstat(path)
    except OSError as e:
        raise BadDirectory(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise BadDirectory(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise BadDirectory(f"{path} belongs to another user")
    if info.st_mode & 0o077:
        raise BadDirectory(f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):o}; 700 is needed)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadDirectory(f"{path} is not writable and searchable by its owner (mode {stat.S_IMODE(info.st_mode):o})")
    return path


def same_user(connection: socket.socket | None) -> bool:
    """Whether the other end of a Unix-socket connection runs as this user (the kernel's word: SO_PEERCRED); False
    where that cannot be asked."""
    option = getattr(socket, "SO_PEERCRED", None)
    if connection is None or option is None:
        return False
    try:
        _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return False
    return uid == os.geteuid()


def check_listen_directory(directory: str | os.PathLike) -> Path:
    """check_directory, and short enough for any peer's socket in it (BadDirectory if not): a peer checks this
    before it starts anything."""
    path = check_directory(directory)
    if len(os.fsencode(path / f"{'1' * LONGEST_PEER_ID}.sock")) >= MAX_PATH_BYTES:
        raise BadDirectory(f"{path} is too long for sockets in it ({MAX_PATH_BYTES - 1} bytes at most with the "
                           "socket's name)")
    return path


def socket_path(directory: str | os.PathLike, peer_id: str) -> Path:
    """Where the peer `peer_id` listens in `directory` (ValueError for an id that is not base58, or a path longer
    than a Unix socket's address may be)."""
    if not PEER_ID.fullmatch(peer_id):
        raise ValueError(f"not a peer id: {peer_id[:80]!r}")
    path = Path(directory) / f"{peer_id}.sock"
    if len(os.fsencode(path)) >= MAX_PATH_BYTES:
        raise ValueError(f"{path} is too long for a Unix socket ({MAX_PATH_BYTES - 1} bytes at most)")
    return path


class LocalServer:
    """A peer's listening socket (serve()); stop() ends it."""

    def __init__(self, server: asyncio.Server, path: Path):
        self.server, self.path = server, path
        made = os.lstat(path)
        self._made = (made.st_dev, made.st_ino)

    async def stop(self) -> None:
        """Stop listening and remove the socket, if it is still the one serve() made (live connections are ended by
        their handlers)."""
        self.server.close()
        with contextlib.suppress(OSError):
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == self._made:
                self.path.unlink()


async def serve(directory: str | os.PathLike, peer_id: str,
                handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> LocalServer:
    """Listen at socket_path(directory, peer_id) (a stale socket there, one nobody listens on, is replaced; a live
    one is BadDirectory: another peer of this id); every connection of this user is handed to `handle`, any other
    closed at once."""
    path = socket_path(check_directory(directory), peer_id)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BadDirectory(f"{path} exists and is not a socket")
        if await _listening(path):
            raise BadDirectory(f"{path} is another live peer's (the same id)")
        path.unlink()  # a peer of this id that died without removing it

    async def checked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if same_user(writer.get_extra_info("socket")):
            await handle(reader, writer)
        else:
            logger.warning("refused a connection to %s from another user", path)
            writer.close()

    server = await asyncio.start_unix_server(checked, path)
    os.chmod(path, 0o600)
    logger.info("sessions from this host: unix socket %s", path)
    return LocalServer(server, path)


async def _listening(path: Path) -> bool:
    try:
        async with asyncio.timeout(2.0):
            _, writer = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


class LocalPeers:
    """A client's view of the peers on its host: those with a socket in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._warned = False

    def path(self, peer_id: str) -> Path | None:
        """The socket of peer `peer_id`, if the directory is safe and holds one; else None."""
        try:
            path = socket_path(check_directory(self.directory), peer_id)
            return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
        except BadDirectory as e:
            if not self._warned:
                logger.warning("not using local sockets: %s", e)
                self._warned = True
            return None
        except (OSError, ValueError):
            return None

    async def connect(self, peer_id: str, timeout: float
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to peer `peer_id`'s socket; None where it has none or it does not answer (the caller goes
        through hivemind's P2P instead)."""
        path = self.path(peer_id)
        if path is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except (OSError, TimeoutError) as e:
            logger.debug("local socket of %s: %r", peer_id, e)
            return None
        if not same_user(writer.get_extra_info("socket")):
            logger.warning("the socket %s is served by another user: not used", path)
            writer.close()
            return None
        return reader, writer


class LocalFirst:
    """A hivemind P2P whose inference streams to peers with a socket in `directory` go through that socket (every
    other call, and a peer without one, through the P2P itself): what a client is given in place of its P2P."""

    def __init__(self, p2p, directory: str | os.PathLike, handler: str, timeout: float = 5.0):
        self.p2p = p2p
        self.local = LocalPeers(directory)
        self.handler = handler  # the stream handler the socket serves (swarm.protocol.INFERENCE_HANDLER)
        self.timeout = timeout
        self.connections = 0  # streams opened through the socket (for tests and logs)

    async def call_binary_stream_handler(self, peer_id, handler: str):
        if handler == self.handler:
            connection = await self.local.connect(peer_id.to_base58(), self.timeout)
            if connection is not None:
                self.connections += 1
                return None, *connection
        return await self.p2p.call_binary_stream_handler(peer_id, handler)

    def __getattr__(self, name: str):
        if name == "p2p":  # not set yet (a copy being made): never look it up through itself
            raise AttributeError(name)
        return getattr(self.p2p, name)
