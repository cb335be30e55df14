"""One peer's life: join the DHT, load its span, serve RPCs, announce itself, withdraw on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import torch

from swarm.dht import announce, load_identity, owner_marker, start_dht, visible_maddrs, withdraw
from swarm.model.anatomy import is_encoder, load_config
from swarm.model.precision import choose_precision
from swarm.model.source import resolve_model
from swarm.model.span import load_span
from swarm.protocol import SpanInfo
from swarm.server.backend import Limits, SpanBackend
from swarm.server.handler import SpanHandler
from swarm.server.memory import KVBudget, default_budget_tokens, kv_bytes_per_token
from swarm.server.settings import PeerSettings

logger = logging.getLogger(__name__)

SHUTDOWN_STEP_TIMEOUT = 5.0


def run_peer(settings: PeerSettings) -> None:
    """Blocking: serve until SIGTERM or SIGINT."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    source = resolve_model(settings.model, settings.model_id)
    config = load_config(source.path)
    start, end = settings.block_range(config.num_hidden_layers)
    # Embedding models are small and their users compare vectors closely: unquantized unless asked (all-MiniLM-L6-v2
    # through int8 spans: cosine 0.9993-0.9997 to fp32, int4 0.96-0.98).
    quant = "none" if settings.quant == "auto" and is_encoder(config) else settings.quant
    precision = choose_precision(settings.device, settings.dtype, quant, source.native_quant)
    identity_path, key = load_identity(settings.identity)
    # The DHT forks a child process: start it before the weights are in memory so that the child stays small.
    dht = start_dht(settings.initial_peers, settings.host, settings.port, identity_path, signing_key=key)
    if settings.identity is None:
        os.unlink(identity_path)  # a throwaway identity: p2pd has read it
    try:
        span = load_span(source, start, end, precision=precision)
        max_length = min(settings.max_length or config.max_position_embeddings, config.max_position_embeddings)
        limits = Limits(settings.max_sessions, max_length, settings.max_batch, settings.max_chunk_tokens,
                        settings.max_batch_sessions, settings.prefill_chunk, settings.batch_wait_ms / 1000,
                        settings.admission_wait)
        per_token = kv_bytes_per_token(config, end - start, precision.dtype)
        budget = KVBudget(settings.kv_budget_tokens or default_budget_tokens(per_token))
        backend = SpanBackend(span, limits, budget, settings.fault_nan_after)
        if settings.fault_nan_after:
            logger.warning("fault injection: this peer answers NaN after %d steps", settings.fault_nan_after)

        def info() -> SpanInfo:
            return SpanInfo(
                peer_id=dht.peer_id.to_base58(),
                model_id=source.model_id,
                start=start,
                end=end,
                num_blocks=config.num_hidden_layers,
                hidden_size=config.hidden_size,
                dtype=precision.dtype_name,
                quant=precision.quant,
                device=precision.device,
                max_length=max_length,
                kv_budget_tokens=budget.total,
                free_kv_tokens=budget.free,
                active_sessions=len(backend.sessions),
                decode_forwards=backend.decode_forwards,
                decode_rows=backend.decode_rows,
                public_name=settings.public_name,
            )

        asyncio.run(_serve(dht, backend, info, settings, owner_marker(key)))
    finally:
        dht.shutdown()


async def _serve(dht, backend: SpanBackend, info, settings: PeerSettings, owner: bytes) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    p2p = await dht.replicate_p2p()
    await SpanHandler(backend, info, settings.idle_timeout, set(settings.allowed_clients)).register(p2p)
    ttl = 3 * settings.announce_period
    first = info()
    await announce(dht, first, ttl, owner)
    logger.info("peer ready: model=%s blocks=%d:%d %s/%s/%s peer_id=%s maddrs=%s", first.model_id, first.start,
                first.end, first.device, first.dtype, first.quant, first.peer_id, " ".join(visible_maddrs(dht)))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.announce_period)
        if not stop.is_set():
            try:
                await announce(dht, info(), ttl, owner)
            except Exception as e:  # a DHT hiccup must not take the peer down; the next period retries
                logger.warning("announcement failed: %r", e)
    logger.info("shutting down: withdrawing %s from the DHT", first.peer_id)
    try:  # bounded: with the rest of the swarm gone, a DHT store may never complete
        await asyncio.wait_for(withdraw(dht, info(), ttl, owner), SHUTDOWN_STEP_TIMEOUT)
    except Exception as e:
        logger.warning("could not withdraw from the DHT (%r); the record expires in %.0f s", e, ttl)
    backend.shutdown()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(p2p.shutdown(), SHUTDOWN_STEP_TIMEOUT)
