"""The swarm client: discovery, the local head, sessions and token generation, as an async Python API.

    client = await SwarmClient.connect(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/Qm..."])
    async for token in client.generate(prompt_ids, max_new_tokens=32):
        print(token)
    await client.close()

Torch work of the head (embeddings, final norm, LM head, sampling) runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P

from kernels.sampling import SamplingParams, sample
from swarm.client.decoding import DecodeGroups
from swarm.client.monitor import SwarmMonitor, probe
from swarm.client.routing import Link, find_chain
from swarm.client.session import FailoverPolicy, InferenceSession
from swarm.dht import load_identity, start_dht
from swarm.model.head import LocalHead, load_head
from swarm.model.source import ModelSource, resolve_model
from swarm.protocol import ErrorCode, NoChainError, PeerError, SpanInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """One generated position: the chosen token of every row and the logits it was chosen from."""

    token_ids: torch.Tensor  # [B] int64
    logits: torch.Tensor  # [B, V] float32


class SwarmClient:
    def __init__(self, dht: DHT, p2p: P2P, source: ModelSource, head: LocalHead, prefill_chunk: int = 1024,
                 step_timeout: float = 30.0, failover: FailoverPolicy | None = None,
                 allowed_peers: set[str] | None = None, refresh_period: float = 3.0,
                 decode_groups: int | None = None):
        self.dht, self.p2p = dht, p2p
        self.source = source
        self.model_id = source.model_id
        self.head = head
        self.prefill_chunk = prefill_chunk
        self.step_timeout = step_timeout
        self.failover = failover or FailoverPolicy()
        self._allowed_peers = allowed_peers
        self._bans: dict[str, tuple[float, float]] = {}  # peer id → (banned until, last ban length)
        # Spans, RTTs and loads, refreshed in the background: a route search never waits on the network.
        self.monitor = SwarmMonitor(dht, p2p, self.model_id, refresh_period, allowed_peers=allowed_peers,
                                    on_failure=self.ban)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-head")
        # LM-head requests of concurrent sessions are computed together: the head's weight (113 MB for SmolLM2 in
        # fp32) is then read once per round of tokens instead of once per session
        self._logit_queue: list[tuple[torch.Tensor, asyncio.Future]] = []
        # Decode steps of one-row sessions run in lockstep groups per chain, pipelined through its peers
        # (decode_groups: how many groups per chain at most; None: one per peer of the chain, 0: no groups)
        self.decoding = (DecodeGroups(head, self.run_in_worker, max_groups=decode_groups, logits=self.logits)
                         if decode_groups != 0 else None)
        self._logit_wake: asyncio.Event | None = None
        self._logit_task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], model: str | None = None, model_id: str | None = None,
                      dtype: torch.dtype = torch.float32, identity: str | None = None,
                      allowed_peers: set[str] | None = None, **kwargs) -> SwarmClient:
        """Join the DHT as a client and load the head of `model` (the default model when None).

        identity: a key file (created if missing) for a client id that peers can put on their allowlist;
        allowed_peers: route only through these peer ids (a private swarm); None: any peer.
        """
        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(None, resolve_model, model, model_id)
        identity_path, key = load_identity(identity) if identity else (None, None)
        dht, head = await asyncio.gather(
            loop.run_in_executor(None, partial(start_dht, initial_peers, identity_path=identity_path,
                                               client_mode=True, signing_key=key)),
            loop.run_in_executor(None, load_head, source, dtype),
        )
        kwargs.setdefault("allowed_peers", allowed_peers)
        p2p = await dht.replicate_p2p()
        return cls(dht, p2p, source, head, **kwargs)

    async def peer_info(self, peer_id: str, timeout: float = 10.0) -> SpanInfo:
        """Ask a peer directly for its current record (free KV, active sessions), bypassing the DHT."""
        return (await probe(self.p2p, peer_id, timeout))[0]

    @property
    def allowed_peers(self) -> set[str] | None:
        """Route only through these peer ids (None: any peer)."""
        return self._allowed_peers

    @allowed_peers.setter
    def allowed_peers(self, peers: set[str] | None) -> None:
        self._allowed_peers = self.monitor.allowed_peers = peers
        self.monitor.updated = None  # the next route reads the swarm again, through the new filter

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    async def spans(self, fresh: bool = False) -> list[SpanInfo]:
        """Spans of this client's model (only allowed peers, when an allowlist is set), as of the background view's
        last refresh; `fresh`, or a view older than two refresh periods, reads the DHT and probes the peers now."""
        self.monitor.start()
        return await self.monitor.refresh() if fresh or self.monitor.stale else self.monitor.spans

    BAN_SECONDS = 15.0
    MAX_BAN_SECONDS = 600.0

    def ban(self, peer_id: str) -> None:
        """Stop routing to a peer for a while; each new ban of the same peer lasts twice as long."""
        _, last = self._bans.get(peer_id, (0.0, self.BAN_SECONDS / 2))
        length = min(2 * last, self.MAX_BAN_SECONDS)
        self._bans[peer_id] = (time.monotonic() + length, length)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    async def chain(self, start: int = 0, end: int | None = None, banned: set[str] | None = None,
                    fresh: bool = False, length: int = 0, batch: int = 1) -> list[Link]:
        """The fastest chain over blocks [start, end) among routable peers not banned by the caller that can hold a
        session of `batch` x `length` tokens. Peers this client banned are avoided unless no chain exists without
        them (a suspect peer beats no answer)."""
        spans, views = await self.spans(fresh), self.monitor.views()
        banned = banned or set()
        try:
            return find_chain(spans, self.model_id, self.head.num_blocks, self.banned() | banned, start, end, views,
                              length, batch)
        except NoChainError:
            if not self.banned() - banned:
                raise
            return find_chain(spans, self.model_id, self.head.num_blocks, banned, start, end, views, length, batch)

    async def _reroute(self, start: int, end: int, avoid: set[str], faulty: set[str], length: int = 0,
                       batch: int = 1) -> list[Link]:
        for peer in faulty:
            if peer and peer not in self.banned():
                self.ban(peer)
        return await self.chain(start, end, avoid, fresh=True, length=length, batch=batch)

    async def missing_blocks(self, fresh: bool = False) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        try:
            await self.chain(fresh=fresh)
            return []
        except NoChainError as e:
            return e.missing

    async def wait_for_chain(self, timeout: float = 60.0, poll: float = 0.2) -> list[Link]:
        """Poll the DHT until live peers cover every block; NoChainError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.chain(fresh=True)
            except NoChainError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(poll)

    OPEN_ATTEMPTS = 3

    async def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """Open a session on the fastest chain now. A peer that refuses or fails the opening (this client's view of
        the swarm is a few seconds old: it may have filled up, started moving or died) is left out of another try."""
        avoid: set[str] = set()
        reroute = partial(self._reroute, length=max_length, batch=batch_size)
        for attempt in range(self.OPEN_ATTEMPTS):
            chain = await self.chain(banned=avoid, length=max_length, batch=batch_size)
            self.monitor.opened(link.peer.peer_id for link in chain)  # before the await: concurrent opens see it
            try:
                return await InferenceSession.open(self.p2p, chain, max_length, batch_size, self.step_timeout,
                                                   reroute, self.failover, self.monitor)
            except PeerError as e:
                if not e.peer_id or attempt + 1 == self.OPEN_ATTEMPTS:
                    raise
                if e.code not in (ErrorCode.MOVED, ErrorCode.CAPACITY):
                    self.ban(e.peer_id)
                avoid.add(e.peer_id)
                try:
                    await self.chain(banned=avoid, length=max_length, batch=batch_size)
                except NoChainError:
                    raise e from None  # no one else serves those blocks: the peer's own answer says most
                logger.info("peer %s refused a new session (%s); trying another chain", e.peer_id, e)
            finally:
                self.monitor.closed(link.peer.peer_id for link in chain)  # the session counts its own links
        raise AssertionError("unreachable")

    async def run_in_worker(self, fn, *args):
        """Run blocking torch work of the head on the client's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, inputs: Sequence[Sequence[int]], concurrency: int = 8) -> list[torch.Tensor]:
        """Last hidden states [T_i, H] of each input through an encoder-only model's blocks on the swarm.

        Each input is one short session of one step (no padding, so no attention mask crosses the wire; peers keep
        no cache for encoder spans); up to `concurrency` inputs are in flight at once."""
        if not getattr(self.head, "is_encoder", False):
            raise TypeError(f"{self.model_id} is not an encoder-only model")
        limit = asyncio.Semaphore(concurrency)

        async def one(ids: Sequence[int]) -> torch.Tensor:
            async with limit:
                hidden = await self.run_in_worker(self.head.embed, torch.tensor([list(ids)]))
                async with await self.inference_session(len(ids)) as session:
                    return (await session.step(hidden))[0]

        return list(await asyncio.gather(*(one(ids) for ids in inputs)))

    async def forward(self, session: InferenceSession, input_ids: torch.Tensor,
                      position: int | None = None) -> torch.Tensor:
        """Run tokens [B, T] through the swarm at `position` (default: the session's; an earlier one rewinds the
        peers' caches to it) in chunks → logits [B, 1, V] of the last token."""
        if (self.decoding is not None and input_ids.shape == (1, 1) and session.position > 0
                and position in (None, session.position)):
            return await self.decoding.step(session, input_ids)
        hidden = None
        for start in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk = input_ids[:, start : start + self.prefill_chunk]
            at = session.position if position is None or start else position
            embeddings = await self.run_in_worker(self.head.embed, chunk, at)
            hidden = await session.step(embeddings, at)
        assert hidden is not None, "input_ids must hold at least one token"
        return await self.logits(hidden[:, -1:])

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """head.logits(hidden [B, 1, H]) → [B, 1, V], computed together with other sessions' pending requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._logit_queue.append((hidden, future))
        if self._logit_wake is None or self._logit_task is None or self._logit_task.done():
            self._logit_wake = asyncio.Event()
            self._logit_task = loop.create_task(self._logits_loop(), name="swarm-head-batcher")
        self._logit_wake.set()
        return await future

    async def _logits_loop(self) -> None:
        assert self._logit_wake is not None
        while True:
            await self._logit_wake.wait()
            self._logit_wake.clear()
            while self._logit_queue:
                items = [item for item in self._logit_queue if not item[1].done()]
                self._logit_queue.clear()
                if not items:
                    continue
                rows = [h.shape[0] for h, _ in items]
                try:
                    logits = await self.run_in_worker(self.head.logits, torch.cat([h for h, _ in items]))
                except Exception as e:
                    for _, future in items:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), part in zip(items, logits.split(rows), strict=True):
                    if not future.done():
                        future.set_result(part)

    async def generate_steps(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        session: InferenceSession | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Sample `max_new_tokens` positions for every row of input_ids [B, T]; the caller decides when to stop."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, tokens] with at least one token")
        owned = session is None
        if session is None:
            session = await self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0])
        generator = sampling.generator()
        try:
            tokens = input_ids
            for _ in range(max_new_tokens):
                logits = (await self.forward(session, tokens))[:, -1]
                next_ids = await self.run_in_worker(sample, logits, sampling, generator)
                yield StepOutput(next_ids, logits)
                tokens = next_ids[:, None]
        finally:
            if owned:
                await session.close()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] | None = None,
    ) -> AsyncIterator[int]:
        """Yield generated token ids of one prompt; stops after a stop token (default: the model's eos)."""
        stop = set(self._eos_ids() if stop_token_ids is None else stop_token_ids)
        steps = self.generate_steps(torch.tensor([list(prompt_ids)]), max_new_tokens, sampling)
        try:
            async for step in steps:
                token = int(step.token_ids[0])
                yield token
                if token in stop:
                    break
        finally:
            await steps.aclose()

    def _eos_ids(self) -> list[int]:
        eos = self.head.config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    async def close(self) -> None:
        if self.decoding is not None:
            self.decoding.close()
        await self.monitor.close()
        if self._logit_task is not None:
            self._logit_task.cancel()
        self._executor.shutdown(wait=False)
        await self.p2p.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.dht.shutdown)
