"""One peer's life: join the DHT, choose and load its span, serve RPCs, announce itself, move when the swarm needs it
elsewhere, withdraw on SIGTERM/SIGINT.

Without --blocks the peer places itself (swarm.server.placement): it sizes its span by its memory budget, reads the
DHT, announces where it is going (state `joining`, so that peers starting at the same time spread out), loads the
blocks, measures its throughput (cached on disk) and goes online. Every --rebalance-period seconds it checks whether
the swarm would be clearly better balanced with it elsewhere (a peer left and opened a hole, peers joined where it
is); if so it moves without restarting: it announces `draining` (clients open no new sessions here), lets live
sessions finish for up to --drain-timeout seconds, hands the rest off (their next step is refused with `moved` and
their clients replay them on another peer from the inputs they keep: no session loses what it computed), frees the
old blocks, loads the new ones and goes online again under the same peer id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable

import psutil
import torch

from swarm import __version__, heap, local_socket
from swarm.client.router import probe
from swarm.dht import (
    announce,
    get_spans,
    load_identity,
    owner_marker,
    read_period,
    start_dht,
    stop_dht,
    visible_maddrs,
    withdraw,
)
from swarm.model.anatomy import is_encoder, load_config
from swarm.model.manifest import load_manifest
from swarm.model.precision import choose_precision
from swarm.model.source import resolve_model
from swarm.model.span import load_span, release_freed_memory
from swarm.protocol import PARENT_ENV, PeerState, SpanInfo
from swarm.server import latency, placement, throughput
from swarm.server.backend import Limits, SpanBackend
from swarm.server.faults import Faults
from swarm.server.handler import SpanHandler, StreamLimits
from swarm.server.health import write_health
from swarm.server.latency import NextHops
from swarm.server.memory import KVBudget, default_budget_tokens, head_dim, kv_bytes_per_token
from swarm.server.settings import PeerSettings
from swarm.server.sharing import WeightSharing, fetch_model, is_content_id
from swarm_kernels import attention, cpu

logger = logging.getLogger(__name__)

SHUTDOWN_STEP_TIMEOUT = 5.0
DRAIN_IDLE = 2.0  # seconds: while draining, a session without a step for this long is handed off
RECHECK_AFTER = 1.0  # seconds: a prefetch that took longer is followed by a second look at placement before moving
BUSY_WINDOW = 1.0  # seconds after a step during which the peer counts as computing for its sessions
JOIN_JITTER = 1.0  # seconds: peers started together read the DHT at different moments and see each other's choice


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a container's cpuset sets it), at most 16."""
    try:
        return max(1, min(16, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(16, os.cpu_count() or 1))


def run_peer(settings: PeerSettings) -> None:
    """Blocking: serve until SIGTERM or SIGINT."""
    if is_content_id(settings.model):  # the manifest and config from the swarm; the blocks come as they are placed
        settings = fetch_model(settings)
    peer = Peer(settings)
    torch_threads, kernel_threads = peer.threads()
    torch.set_num_threads(torch_threads)
    if kernel_threads > 1:
        kernel_threads = cpu.set_threads(kernel_threads)
    if settings.activations != "float32":
        cpu.set_activations(settings.activations)
    logger.info("computing with %d torch thread(s), %d native kernel thread(s); %s activations", torch_threads,
                kernel_threads, peer.activations())
    if settings.activations != peer.activations():
        logger.warning("--activations %s applies to int8 and int4 blocks on the native CPU kernel; these are %s: "
                       "%s activations", settings.activations, peer.precision.describe(), peer.activations())
    try:
        asyncio.run(peer.serve())
    finally:
        stop_dht(peer.dht)


class Peer:
    def __init__(self, settings: PeerSettings):
        self.settings = settings
        settings.announced_throughput()  # a bad --throughput fails before anything starts
        if settings.local_socket:  # so does a --local-socket directory others could enter
            local_socket.check_listen_directory(settings.local_socket)
        self.source = resolve_model(settings.model, settings.model_id)
        manifest = load_manifest(self.source.path)  # hashed once per model directory, then cached
        self.content_id: str = manifest["content_id"]
        logger.info("model %s: content id %s", self.source.model_id, self.content_id)
        self.sharing = WeightSharing(self.source.path, manifest, self.source.model_id, settings.cache_budget,
                                     settings.fault_corrupt_fetch, set(settings.allowed_clients),
                                     settings.share_weights, settings.share_rate * 2**20,
                                     settings.share_rate_busy * 2**20, self._busy, settings.model_source)
        self.config = load_config(self.source.path)
        self.num_blocks = self.config.num_hidden_layers
        self.fixed = settings.block_range(self.num_blocks)
        # Embedding models are small and their users compare vectors closely: unquantized unless asked
        # (all-MiniLM-L6-v2 through int8 spans: cosine 0.9993-0.9997 to fp32, int4 0.96-0.98).
        quant = "none" if settings.quant == "auto" and is_encoder(self.config) else settings.quant
        self.precision = choose_precision(settings.device, settings.dtype, quant, self.source.native_quant)
        self.kv_dtype = self._kv_dtype(settings.kv_dtype)
        self.length = self.fixed[1] - self.fixed[0] if self.fixed else self._span_length()
        self.max_length = min(settings.max_length or self.config.max_position_embeddings,
                              self.config.max_position_embeddings)
        identity_path, self.key = load_identity(settings.identity)
        # The DHT forks a child process: start it before the weights are in memory so that the child stays small.
        self.dht = start_dht(settings.initial_peers, settings.host, settings.port, identity_path,
                             signing_key=self.key)
        if settings.identity is None:
            os.unlink(identity_path)  # a throwaway identity: p2pd has read it
        self.peer_id = self.dht.peer_id.to_base58()
        self.owner = owner_marker(self.key)
        self.ttl = 3 * settings.announce_period
        self.state = PeerState.JOINING
        self.start, self.end = self.fixed or (0, 0)
        self.target: tuple[int, int] = (0, 0)
        self.backend: SpanBackend | None = None
        self.handler: SpanHandler | None = None
        self.local_server: local_socket.LocalServer | None = None  # --local-socket
        self.next_hops: NextHops | None = None  # round trips to the peers that may follow it (once serving)
        self.rate = throughput.Throughput(0.0, 0.0)
        self.moves = 0
        self._swarm_size = 0  # records in the last read of the swarm (stretches the rebalance period)

    def threads(self) -> tuple[int, int]:
        """(torch threads, native kernel threads) from --num-threads (0: the CPUs this process may run on).

        A CPU span of native-kernel linears runs torch on one thread and splits each kernel call's output rows over
        the threads (swarm_kernels.cpu.set_threads), and its decode rows' native attention their rows: torch's remaining
        ops, norms and rotary embeddings over a few rows, measured slower on 2 threads than on one (a 16-row decode of
        SmolLM2's 30 int4 blocks 110 vs 83 ms on 2 cores), while the kernel's calls split well
        (benchmarks/results/kernels_threads.json). Any other span: torch's threads (0: torch's default), the kernel
        unused, decode rows' attention on one thread."""
        wanted = self.settings.num_threads
        native = self.precision.device == "cpu" and self.precision.quant != "none" and self.precision.kernel == "native"
        if not native:
            return wanted or torch.get_num_threads(), 1
        return 1, wanted or available_cpus()

    def activations(self) -> str:
        """What this peer's blocks multiply with: "int8" where they are int8 or int4 on the native CPU kernel and
        --activations int8 took effect (swarm_kernels/cpu_a8.c), else "float32"."""
        precision = self.precision
        native = precision.device == "cpu" and precision.quant in ("int8", "int4") and precision.kernel == "native"
        return cpu.activations() if native else "float32"

    # -- sizing and placement --------------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Whether this peer computed for a session within the last second (sending weights slows down then)."""
        backend = getattr(self, "backend", None)
        return backend is not None and time.monotonic() - backend.last_step < BUSY_WINDOW

    @property
    def movable(self) -> bool:
        """Placed by itself (no --blocks) on part of the model: it rebalances."""
        return self.fixed is None and self.length < self.num_blocks

    def _memory_budget(self) -> int:
        if self.settings.memory_budget:
            return int(self.settings.memory_budget * 2**30)
        if self.precision.device == "cuda":
            free, _ = torch.cuda.mem_get_info()
            return int(0.9 * free)
        return psutil.virtual_memory().available // 2

    def _span_length(self) -> int:
        if self.settings.num_blocks:
            return min(self.settings.num_blocks, self.num_blocks)
        kv_tokens = self.settings.kv_budget_tokens or placement.SIZING_KV_TOKENS
        fit = placement.blocks_that_fit(self.config, self.precision, self._memory_budget(), kv_tokens)
        logger.info("%d of %d blocks fit in %.2f GiB (%s, %d KV tokens)", fit, self.num_blocks,
                    self._memory_budget() / 2**30, self.precision.describe(), kv_tokens)
        return fit

    async def _choose_span(self) -> tuple[int, int]:
        if self.fixed:
            return self.fixed
        if self.length >= self.num_blocks:
            return 0, self.num_blocks
        await asyncio.sleep(random.uniform(0, JOIN_JITTER))
        spans = await get_spans(self.dht, self.source.model_id, self.num_blocks)
        self._swarm_size = len(spans)
        return placement.choose_span(spans, self.num_blocks, self.length, exclude=self.peer_id)

    # -- the record ------------------------------------------------------------------------------------------------

    def info(self) -> SpanInfo:
        backend = self.backend
        budget = backend.budget if backend is not None else None
        parked = backend.parked() if backend is not None else (0, 0)
        start, end = (self.start, self.end) if self.end > self.start else self.target
        return SpanInfo(
            peer_id=self.peer_id,
            model_id=self.source.model_id,
            start=start,
            end=end,
            num_blocks=self.num_blocks,
            hidden_size=self.config.hidden_size,
            dtype=self.precision.dtype_name,
            quant=self.precision.quant,
            activations=self.activations(),
            kv_dtype=self.kv_dtype,
            device=self.precision.device,
            max_length=self.max_length,
            kv_budget_tokens=budget.total if budget else 0,
            # parked sessions (swarm.protocol: park) are freed at once for new ones: not load
            free_kv_tokens=(budget.free + parked[1]) if budget else 0,
            active_sessions=(len(backend.sessions) - parked[0]) if backend else 0,
            queued_steps=backend.queued_steps if backend else 0,
            pending_streams=self.handler.pending.total if self.handler else 0,
            decode_forwards=backend.decode_forwards if backend else 0,
            decode_rows=backend.decode_rows if backend else 0,
            throughput=self.rate.single,
            batch_throughput=self.rate.batched,
            state=self.state.value,
            target_start=self.target[0],
            target_end=self.target[1],
            public_name=self.settings.public_name,
            software=__version__,
            movable=self.movable,
            content_id=self.content_id,
            push=True,
            next_rtt=self.next_hops.announced() if self.next_hops else (),
        )

    async def _announce(self) -> None:
        info = self.info()
        self.sharing.refresh()
        if self.settings.health_file:
            write_health(self.settings.health_file, info.state, info.start, info.end)
        try:
            await announce(self.dht, info, self.ttl, self.owner)
            await self.sharing.announce(self.peer_id, self.ttl, self.owner)
        except Exception as e:  # a DHT hiccup must not take the peer down; the next period retries
            logger.warning("announcement failed: %r", e)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_period)
            await self._announce()

    def _kv_dtype(self, wanted: str) -> str:
        """--kv-dtype resolved: float16 only for float32 blocks on the CPU; auto, where the native attention also
        reads halves of this model's head size (else every step would convert the caches in torch)."""
        cpu_float32 = (self.precision.device, self.precision.dtype) == ("cpu", torch.float32)
        if wanted == "float16" and not cpu_float32:
            raise ValueError(f"--kv-dtype float16 is for float32 blocks on the CPU, not {self.precision.describe()}")
        if wanted == "auto":
            return "float16" if cpu_float32 and attention.kv16(head_dim(self.config)) else "float32"
        return wanted

    # -- loading ---------------------------------------------------------------------------------------------------

    async def _load(self, start: int, end: int) -> SpanBackend:
        """Load blocks [start, end) off the event loop, then measure (or recall) this peer's throughput."""
        settings, loop = self.settings, asyncio.get_running_loop()
        await self.sharing.prepare(start, end, self.peer_id)  # a model fetched by its id: this span's blocks first
        try:
            span = await loop.run_in_executor(None, lambda: load_span(self.source, start, end,
                                                                      precision=self.precision))
        except FileNotFoundError:
            if not self.sharing.remote:
                raise
            # a shard removed by another peer of the machine before this one pinned it: written again, once
            await self.sharing.prepare(start, end, self.peer_id)
            span = await loop.run_in_executor(None, lambda: load_span(self.source, start, end,
                                                                      precision=self.precision))
        await self.sharing.loaded(start, end)  # a model fetched by its id: shards of other spans are not kept
        # auto: off the lean path (a family it does not take), every step would read float16 caches back in torch
        self.kv_dtype = self._kv_dtype(settings.kv_dtype) if settings.kv_dtype != "auto" or span.runs_lean \
            else "float32"
        span.set_kv_dtype(self.kv_dtype)
        logger.info("the sessions' KV caches hold %s (--kv-dtype %s)", self.kv_dtype, settings.kv_dtype)
        limits = Limits(settings.max_sessions, self.max_length, settings.max_batch, settings.max_chunk_tokens,
                        settings.max_batch_sessions, settings.prefill_chunk, settings.batch_wait_ms / 1000,
                        settings.admission_wait)
        per_token = kv_bytes_per_token(self.config, end - start, span.kv_dtype or self.precision.dtype)
        if settings.kv_budget_tokens:
            tokens = settings.kv_budget_tokens
        elif settings.memory_budget:  # what the weights leave of the budget
            tokens = max(placement.SIZING_KV_TOKENS, (self._memory_budget() - span.weight_bytes()) // per_token)
        else:
            tokens = default_budget_tokens(per_token)
        faults = Faults(settings.fault_nan_after, settings.fault_step_delay, settings.fault_wrong_after,
                        settings.fault_push_wrong)
        faults.announce()
        backend = SpanBackend(span, limits, KVBudget(tokens), faults)
        fixed = settings.announced_throughput()
        if fixed is not None:
            self.rate = throughput.Throughput(fixed, fixed)
        elif not self.rate.single:  # measured once per process: moving keeps the per-block figure
            def measure() -> throughput.Throughput:
                return throughput.measure(throughput.probe(backend), end - start)

            if faults.step_delay:  # a peer slowed down for a test: measure it, but never cache that
                self.rate = await backend.run(measure)
            else:
                quant = self.precision.quant + ("+a8" if self.activations() == "int8" else "")
                key = throughput.cache_key(self.source.model_id, self.precision.device, self.precision.dtype_name,
                                           quant)
                self.rate = await backend.run(throughput.cached_or_measured, key, measure,
                                              settings.throughput == "eval")
        heap.settle()  # full collections from now on skip what serving these blocks needs (swarm.heap)
        return backend

    # -- serving ---------------------------------------------------------------------------------------------------

    def stream_limits(self) -> StreamLimits:
        settings = self.settings
        return StreamLimits(settings.idle_timeout, settings.open_timeout, settings.frame_timeout,
                            settings.max_pending_streams, settings.max_client_pending or settings.max_sessions)

    async def serve(self) -> None:
        self._stop = stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if parent := os.environ.get(PARENT_ENV, ""):  # a gateway's embedded peer: it stops when its gateway is gone
            threading.Thread(target=_stop_without_parent, args=(int(parent), loop, stop), daemon=True,
                             name="parent-watch").start()
        p2p = await self.dht.replicate_p2p()
        await self.sharing.start(p2p, self.dht)
        self.next_hops = NextHops(lambda peer: self._round_trip(p2p, peer))
        self.target = await self._choose_span()
        await self._announce()  # joining: peers placing themselves now count this span as taken
        announcer = asyncio.create_task(self._announce_loop(), name="announce")
        tasks = [announcer]
        try:
            self.backend = await self._load(*self.target)
            self.start, self.end = self.target
            self.target, self.state = (0, 0), PeerState.ONLINE
            self.handler = SpanHandler(self.backend, self.info, self.stream_limits(),
                                       set(self.settings.allowed_clients))
            await self.handler.register(p2p)
            if self.settings.local_socket:
                self.local_server = await local_socket.serve(self.settings.local_socket, self.peer_id,
                                                             self.handler.handle_local)
            await self._announce()
            first = self.info()
            logger.info("peer ready: model=%s blocks=%d:%d %s/%s/%s throughput=%.1f peer_id=%s maddrs=%s",
                        first.model_id, first.start, first.end, first.device, first.dtype, first.quant,
                        first.throughput, first.peer_id, " ".join(visible_maddrs(self.dht)))
            tasks.append(asyncio.create_task(self._latency_loop(), name="latency"))
            if self.movable:
                tasks.append(asyncio.create_task(self._rebalance_loop(), name="rebalance"))
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await self._shutdown(p2p)

    @staticmethod
    async def _round_trip(p2p, peer_id: str) -> float:
        return (await probe(p2p, peer_id, latency.PROBE_TIMEOUT))[1]

    async def _latency_loop(self) -> None:
        """Measure the round trips to the peers that may come next in a chain (swarm.server.latency)."""
        while True:
            pause = latency.PERIOD
            try:
                if self.state == PeerState.ONLINE and self.next_hops is not None:
                    spans = await get_spans(self.dht, self.source.model_id, self.num_blocks)
                    pending = await self.next_hops.measure(spans, self.info())
                    pause = read_period(latency.SOON if pending else latency.PERIOD, len(spans))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT hiccup: measure again next round
                logger.warning("measuring the next peers' round trips failed: %r", e)
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))

    async def _rebalance_loop(self) -> None:
        while True:  # every --rebalance-period, stretched in a large swarm (a check reads every record)
            period = read_period(self.settings.rebalance_period, self._swarm_size)
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            try:
                target = await self._better_span()
                if target is None:
                    continue
                # Of several peers able to fill a hole, the one with the smallest id goes (placement.move_for); a
                # random pause and a second look let a move announced meanwhile count.
                await asyncio.sleep(random.uniform(0, min(2.0, period / 2)))
                target = await self._better_span()
                if target is not None:
                    await self.move_to(*target, recheck=self._better_span)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.backend is None:  # the move failed and the old blocks could not be loaded back
                    logger.exception("no blocks loaded after a failed move; shutting down")
                    self._stop.set()
                    return
                logger.exception("rebalancing failed; serving %d:%d", self.start, self.end)

    async def _better_span(self) -> tuple[int, int] | None:
        spans = await get_spans(self.dht, self.source.model_id, self.num_blocks)
        self._swarm_size = len(spans)
        return placement.move_for(spans, self.info())

    async def move_to(self, start: int, end: int,
                      recheck: Callable[[], Awaitable[tuple[int, int] | None]] | None = None) -> None:
        """Drain the current span, hand off what is left, and serve [start, end) under the same peer id.
        recheck: placement's choice now; after a prefetch that took a while, the move goes on only if it is the same."""
        old = self.backend
        assert old is not None and self.handler is not None
        # a model fetched by its id: the new blocks come from the swarm while the old ones still serve (a prefetch),
        # so the gap without service is the load from local files only (without --prefetch, _load fetches them)
        if self.settings.prefetch:
            began = time.monotonic()
            try:
                await self.sharing.prepare(start, end, self.peer_id, keep=(self.start, self.end))
                stay = (recheck is not None and time.monotonic() - began > RECHECK_AFTER
                        and await recheck() != (start, end))
            except BaseException:
                self.sharing.repin(self.start, self.end)
                raise
            if stay:
                logger.info("the swarm changed while blocks %d:%d were fetched: staying on %d:%d", start, end,
                            self.start, self.end)
                self.sharing.repin(self.start, self.end)
                return
        logger.info("moving from blocks %d:%d to %d:%d: draining %d sessions", self.start, self.end, start, end,
                    len(old.sessions))
        out_of_service = time.monotonic()  # from here, no new session is taken
        self.state, self.target = PeerState.DRAINING, (start, end)
        reason = f"this peer is moving from blocks {self.start}:{self.end} to {start}:{end}; route elsewhere"
        old.drain(reason)
        await self._announce()
        # Sessions that are generating may finish here; idle ones (a gateway keeps finished chats open to reuse
        # their KV in the next turn) are handed off at once rather than holding the move up.
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        handed = 0
        while old.sessions and asyncio.get_running_loop().time() < deadline:
            handed += old.hand_off(reason, idle_for=DRAIN_IDLE)
            await asyncio.sleep(0.1)
        handed += old.hand_off(reason)
        if handed:
            logger.info("handed off %d sessions (idle for %.0f s, or still open after %.0f s)", handed, DRAIN_IDLE,
                        self.settings.drain_timeout)
        self.handler.backend = None
        self.backend = None
        old.shutdown()
        del old
        previous = self.start, self.end
        self.state, self.start, self.end = PeerState.JOINING, 0, 0
        await self._announce()
        release_freed_memory()
        try:
            self.backend = await self._load(start, end)
        except Exception:  # e.g. out of memory for the new blocks: serve the old ones again rather than nothing
            logger.exception("could not load blocks %d:%d; loading %d:%d again", start, end, *previous)
            start, end = previous
            self.target = previous
            await self._announce()
            self.backend = await self._load(start, end)  # failing again ends the process: better than a dead peer
        self.start, self.end = start, end
        self.handler.backend = self.backend
        self.state, self.target = PeerState.ONLINE, (0, 0)
        self.moves += 1
        # logged before it is announced: whoever sees the new span online can already read that the peer moved
        logger.info("peer moved: blocks=%d:%d peer_id=%s out of service %.2f s", start, end, self.peer_id,
                    time.monotonic() - out_of_service)
        await self._announce()

    async def _shutdown(self, p2p) -> None:
        logger.info("shutting down: withdrawing %s from the DHT", self.peer_id)
        if self.settings.health_file:
            write_health(self.settings.health_file, PeerState.OFFLINE.value, self.start, self.end)
        try:  # bounded: with the rest of the swarm gone, a DHT store may never complete
            await asyncio.wait_for(withdraw(self.dht, self.info(), self.ttl, self.owner), SHUTDOWN_STEP_TIMEOUT)
        except Exception as e:
            logger.warning("could not withdraw from the DHT (%r); the record expires in %.0f s", e, self.ttl)
        if self.local_server is not None:
            await self.local_server.stop()
        if self.backend is not None:
            self.backend.shutdown()
        if self.handler is not None and self.handler.pusher is not None:
            await self.handler.pusher.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p2p.shutdown(), SHUTDOWN_STEP_TIMEOUT)



def _stop_without_parent(parent: int, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop the peer once the process that started it is gone (killed with SIGKILL: it could not stop the peer)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    logger.warning("the process that started this peer (pid %d) is gone: stopping", parent)
    loop.call_soon_threadsafe(stop.set)
