"""Sessions to a peer on the same host over a Unix socket instead of two p2pd daemons and a loopback TCP hop.

    server = await serve(directory, peer_id, handler.handle_local)     # the peer: DIR/<peer_id>.sock
    p2p = LocalFirst(p2p, directory, INFERENCE_HANDLER)                # a client on the same host: its streams
                                                                       # to that peer go through the socket

The frames are the inference stream's own (swarm.codec), so the handler serves them exactly as it serves a p2p
stream. `make serve`'s gateway and its embedded peer use this: a token's two legs through the daemons cost ~1 ms
each, through a Unix socket ~0.1 ms.

Trust: the socket lives in a directory that only this user can enter (owned by us, no group or other bits), which
both sides check before using it, so only processes of the same user (who could read our memory anyway) connect, and
a socket named after a peer id was put there by one of them. A peer's id is not otherwise authenticated here: the
directory is what vouches for it. Everything else is as on a p2p stream: the handler bounds and validates every
frame, and the connection counts against the peer's limits as the client "local".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

logger = logging.getLogger(__name__)

LONGEST_PEER_ID = 52  # base58 characters of an Ed25519 identity's id ("12D3KooW..."); RSA ids ("Qm...") are 46
MAX_PATH_BYTES = 104  # sun_path: 108 bytes on Linux, 104 on macOS; its terminating NUL included
PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,64}$")  # base58, as hivemind writes peer ids
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
    return path


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
    if not PEER_ID.match(peer_id):
        raise ValueError(f"not a peer id: {peer_id[:80]!r}")
    path = Path(directory) / f"{peer_id}.sock"
    if len(os.fsencode(path)) >= MAX_PATH_BYTES:
        raise ValueError(f"{path} is too long for a Unix socket ({MAX_PATH_BYTES - 1} bytes at most)")
    return path


async def serve(directory: str | os.PathLike, peer_id: str,
                handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> asyncio.Server:
    """Listen at socket_path(directory, peer_id) (a stale socket of ours there is replaced); every connection is
    handed to `handle`. Close with stop()."""
    path = socket_path(check_directory(directory), peer_id)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BadDirectory(f"{path} exists and is not a socket")
        path.unlink()  # a peer of this id that died without removing it
    server = await asyncio.start_unix_server(handle, path)
    os.chmod(path, 0o600)
    logger.info("sessions from this host: unix socket %s", path)
    return server


async def stop(server: asyncio.Server) -> None:
    """Stop listening and remove the socket (live connections are ended by their handlers)."""
    paths = [sock.getsockname() for sock in server.sockets]
    server.close()
    for path in paths:
        with contextlib.suppress(OSError, TypeError, ValueError):
            os.unlink(path)


class LocalPeers:
    """A client's view of the peers on its host: those with a socket in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, peer_id: str) -> Path | None:
        """The socket of peer `peer_id`, if the directory is safe and holds one; else None."""
        try:
            path = socket_path(check_directory(self.directory), peer_id)
            return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
        except BadDirectory as e:
            logger.warning("not using local sockets: %s", e)
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
                return await asyncio.open_unix_connection(path)
        except (OSError, TimeoutError) as e:
            logger.debug("local socket of %s: %r", peer_id, e)
            return None


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
        return getattr(self.p2p, name)
