"""The gateway's swarm: join an existing one, or start an embedded DHT + one local peer hosting every block.

The embedded peer is a child process (`python -m swarm.server`) so that its compute never competes with the
gateway's event loop for the GIL; it is stopped by PID when the gateway stops, stops by itself when the gateway is
gone (killed: it watches its parent), and is started again when it exits on its own (crashed, killed), a second
later at first and up to a minute later when it keeps failing; what its process group left is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence

import torch

from swarm.client.embeddings import SwarmEmbeddingService
from swarm.client.textgen import SwarmTextService
from swarm.dht import start_dht, stop_dht, visible_maddrs
from swarm.local_socket import BadDirectory, check_listen_directory
from swarm.model.source import resolve_model
from swarm.protocol import PARENT_ENV
from swarm_kernels import cpu

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_swarm_backend(model: str, initial_peers: Sequence[str], num_threads: int = 0,
                             startup_timeout: float = 600.0, embedding_model: str | None = None,
                             client_threads: int = 0, activations: str = "float32", kv_dtype: str = "float32",
                             local_socket: bool = True,
                             draft_model: str = "", draft_kv_tokens: int = 32768,
                             **client_options) -> AsyncIterator[tuple[SwarmTextService, SwarmEmbeddingService | None]]:
    """The text service (and, with `embedding_model`, the embedding service) over a joined (or embedded) swarm;
    client_options go to SwarmClient.connect. client_threads: torch threads of this process (the client's head);
    0: one beside an embedded swarm (its peer computes on every core; the head's few rows per round need one), torch's
    default when joining peers elsewhere. An LM head on the native kernel (swarm.model.head.native_head) shares its
    calls among every CPU this process may run on, beside an embedded peer too: a round's head runs while the chain
    waits for its tokens. activations, kv_dtype: the embedded peers' --activations and --kv-dtype; local_socket:
    the client's streams to them through Unix sockets in a private directory (swarm.local_socket) rather than the
    p2p daemons; draft_model: a local model drafting for speculative decoding (swarm.client.drafting), its caches
    holding draft_kv_tokens."""
    threads = client_threads or (1 if not initial_peers else 0)
    if threads:
        torch.set_num_threads(threads)
    if cpu.available():
        cpu.set_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    async with contextlib.AsyncExitStack() as stack:
        if not initial_peers:
            models = [model] + ([embedding_model] if embedding_model else [])
            sockets = ""
            if local_socket:
                sockets = stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-"))  # mode 700
                try:
                    check_listen_directory(sockets)
                except BadDirectory as e:  # e.g. a TMPDIR too long for socket addresses: the p2p daemons then
                    logger.warning("embedded swarm without a local socket: %s", e)
                    sockets = ""
            initial_peers = await stack.enter_async_context(_embedded_swarm(models, num_threads, activations, kv_dtype,
                                                                            sockets))
            if sockets:
                client_options.setdefault("local_sockets", sockets)
        service = await SwarmTextService.connect(list(initial_peers), model, **client_options)
        stack.push_async_callback(service.close)
        if draft_model:
            await service.load_draft_model(draft_model, draft_kv_tokens)
        embeddings = None
        if embedding_model:
            embeddings = await SwarmEmbeddingService.connect(list(initial_peers), embedding_model, **client_options)
            stack.push_async_callback(embeddings.close)
        logger.info("waiting for a complete chain of %s", service.model_id)
        await service.client.wait_for_chain(timeout=startup_timeout)
        if embeddings is not None:
            logger.info("waiting for a complete chain of %s", embeddings.model_id)
            await embeddings.client.wait_for_chain(timeout=startup_timeout)
        yield service, embeddings


@contextlib.asynccontextmanager
async def _embedded_swarm(models: list[str], num_threads: int, activations: str = "float32", kv_dtype: str = "float32",
                          local_sockets: str = "") -> AsyncIterator[list[str]]:
    """An embedded DHT and one local peer per model, each hosting every block of it; with `local_sockets`, each
    also listens on a Unix socket there (swarm.local_socket)."""
    loop = asyncio.get_running_loop()
    for model in models:  # convert the default model once, here, with a log
        await loop.run_in_executor(None, resolve_model, model)
    dht = await loop.run_in_executor(None, start_dht)
    maddrs = visible_maddrs(dht)
    peers: list[subprocess.Popen] = []
    watch = None
    try:
        argvs = []
        for model in models:
            argv = [sys.executable, "-m", "swarm.server", "--model", model, "--blocks", "all", "--initial-peers",
                    *maddrs]
            if num_threads:
                argv += ["--num-threads", str(num_threads)]
            if activations != "float32":
                argv += ["--activations", activations]
            if kv_dtype != "float32":
                argv += ["--kv-dtype", kv_dtype]
            if local_sockets:
                argv += ["--local-socket", local_sockets]
            argvs.append(argv)
            peers.append(_start_peer(argv))
            logger.info("embedded swarm: DHT %s, peer of %s pid %d", " ".join(maddrs), model, peers[-1].pid)
        watch = asyncio.create_task(_keep_running(peers, argvs), name="embedded-peers")
        yield maddrs
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):  # its own failure must not keep the peers from stopping
                await watch
        for peer in peers:
            if peer.poll() is None:
                peer.send_signal(signal.SIGTERM)
        for peer in peers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await loop.run_in_executor(None, peer.wait, 20)
            _kill_group(peer)  # what it left running (its DHT, its p2p daemon), or itself past the wait
        await loop.run_in_executor(None, stop_dht, dht)


def _start_peer(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, start_new_session=True, env={**os.environ, PARENT_ENV: str(os.getpid())})


def _kill_group(peer: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(peer.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        peer.wait(5)


async def _keep_running(peers: list[subprocess.Popen], argvs: list[list[str]], check: float = 1.0) -> None:
    """Start an embedded peer again when it exits on its own (its group's leftovers killed), after a delay that
    doubles while it keeps exiting within a minute of its start (1 s to 60 s); a start that fails is tried again
    the same way."""
    loop = asyncio.get_running_loop()
    delays = [1.0] * len(peers)
    started = [loop.time()] * len(peers)
    while True:
        await asyncio.sleep(check)
        for i, peer in enumerate(peers):
            if peer.poll() is None:
                continue
            if loop.time() - started[i] >= 60:  # it ran a while: a first failure again
                delays[i] = 1.0
            logger.error("the embedded peer (pid %d) exited with %s: starting it again in %.0f s", peer.pid,
                         peer.returncode, delays[i])
            await loop.run_in_executor(None, _kill_group, peer)
            await asyncio.sleep(delays[i])
            delays[i], started[i] = min(60.0, delays[i] * 2), loop.time()
            try:
                peers[i] = _start_peer(argvs[i])
            except OSError as e:  # no process to be had now (EMFILE, EAGAIN): the next check tries again
                logger.error("the embedded peer could not be started: %s", e)
                continue
            logger.info("embedded peer started again: pid %d", peers[i].pid)
