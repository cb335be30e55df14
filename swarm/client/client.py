"""The swarm client, as an async Python API: a thin facade over the router, sessions and the decode pipeline.

    client = await SwarmClient.connect(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/Qm..."])
    async for token in client.generate(prompt_ids, max_new_tokens=32):
        print(token)
    await client.close()

Who owns what: `router` (swarm.client.router) the view of the swarm, peer health and routes; `InferenceSession`
(swarm.client.session) one session's streams (swarm.client.stream) to its peers, replay, push and failover; `pipeline`
(swarm.client.pipeline) embeddings, prefill, decode groups, the LM head and sampling, and the generation loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from functools import partial

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P

from swarm.client.pipeline import DecodePipeline, StepOutput
from swarm.client.router import Router
from swarm.client.routing import Link
from swarm.client.session import FailoverPolicy, InferenceSession
from swarm.client.verification import VerificationPolicy
from swarm.dht import load_identity, start_dht, stop_dht
from swarm.local_socket import LocalFirst
from swarm.model import manifest
from swarm.model.head import EncoderHead, LocalHead, load_head
from swarm.model.source import ModelSource, resolve_model
from swarm.protocol import INFERENCE_HANDLER, SpanInfo
from swarm_kernels.sampling import Sampler, SamplingParams

__all__ = ["StepOutput", "SwarmClient"]


class SwarmClient:
    def __init__(self, dht: DHT | None, p2p: P2P | None, source: ModelSource, head: LocalHead | EncoderHead,
                 prefill_chunk: int = 1024, step_timeout: float = 30.0, failover: FailoverPolicy | None = None,
                 allowed_peers: set[str] | None = None, refresh_period: float = 3.0,
                 decode_groups: int | None = None, verification: VerificationPolicy | None = None,
                 content_id: str | None = None, push: bool = True, local_sockets: str | None = None):
        if p2p is not None and local_sockets:  # streams to peers with a socket there skip the p2p daemons
            p2p = LocalFirst(p2p, local_sockets, INFERENCE_HANDLER)
        self.dht, self.p2p = dht, p2p
        self.push = push  # server-to-server push along chains whose peers take it (swarm.protocol)
        self.source = source
        self.model_id = source.model_id
        self.head = head
        self.step_timeout = step_timeout
        self.failover = failover or FailoverPolicy()
        self.router = Router(dht, p2p, self.model_id, head.num_blocks, refresh_period, allowed_peers=allowed_peers,
                             verification=verification, content_id=content_id)
        self.router.push = push  # routes count the hops its peers measured
        self.pipeline = DecodePipeline(head, prefill_chunk, decode_groups)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], model: str | None = None, model_id: str | None = None,
                      dtype: torch.dtype = torch.float32, identity: str | None = None,
                      allowed_peers: set[str] | None = None, head_device: str = "cpu", **kwargs) -> SwarmClient:
        """Join the DHT as a client and load the head of `model` (the default model when None) onto `head_device`.

        identity: a key file (created if missing) for a client id that peers can put on their allowlist;
        allowed_peers: route only through these peer ids (a private swarm); None: any peer; local_sockets: a
        directory where peers on this host listen (their --local-socket; swarm.local_socket).
        """
        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(None, resolve_model, model, model_id)
        identity_path, key = load_identity(identity) if identity else (None, None)
        dht, head = await asyncio.gather(
            loop.run_in_executor(None, partial(start_dht, initial_peers, identity_path=identity_path,
                                               client_mode=True, signing_key=key)),
            loop.run_in_executor(None, load_head, source, dtype, head_device),
        )
        kwargs.setdefault("allowed_peers", allowed_peers)
        kwargs.setdefault("content_id", await loop.run_in_executor(None, manifest.content_id, source.path))
        p2p = await dht.replicate_p2p()
        return cls(dht, p2p, source, head, **kwargs)

    @property
    def decoder(self) -> LocalHead:
        """The head of a model that generates (TypeError for an encoder-only model's)."""
        if not isinstance(self.head, LocalHead):
            raise TypeError(f"{self.model_id} is an encoder-only model: it makes embeddings, not tokens")
        return self.head

    @property
    def peer_id(self) -> str:
        assert self.dht is not None
        return self.dht.peer_id.to_base58()

    # -- the swarm, through the router ---------------------------------------------------------------------------------

    @property
    def allowed_peers(self) -> set[str] | None:
        """Route only through these peer ids (None: any peer)."""
        return self.router.allowed_peers

    @allowed_peers.setter
    def allowed_peers(self, peers: set[str] | None) -> None:
        self.router.allowed_peers = peers

    async def spans(self, fresh: bool = False) -> list[SpanInfo]:
        """Spans of this client's model (only allowed peers, when an allowlist is set), as of the view's last
        refresh; `fresh`, or a view older than two refresh periods, reads the DHT and probes the peers now."""
        return await self.router.current(fresh)

    async def peer_info(self, peer_id: str, timeout: float = 10.0) -> SpanInfo:
        """Ask a peer directly for its current record (free KV, active sessions), bypassing the DHT."""
        return await self.router.peer_info(peer_id, timeout)

    async def chain(self, fresh: bool = False, length: int = 0, batch: int = 1) -> list[Link]:
        """The chain a new session of `batch` x `length` tokens would take now."""
        return await self.router.route(fresh=fresh, length=length, batch=batch)

    async def missing_blocks(self, fresh: bool = False) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        return await self.router.missing_blocks(fresh)

    async def wait_for_chain(self, timeout: float = 60.0, poll: float = 0.2) -> list[Link]:
        """Poll the DHT until live peers cover every block; NoChainError after `timeout` seconds."""
        return await self.router.wait_for_chain(timeout, poll)

    async def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A session on the fastest chain now, failing over through the router (see InferenceSession.routed)."""
        assert self.p2p is not None
        return await InferenceSession.routed(self.p2p, self.router, max_length, batch_size, self.step_timeout,
                                             self.failover, self.push)

    # -- computing, through the pipeline -----------------------------------------------------------------------------

    async def prefill(self, session: InferenceSession, input_ids: torch.Tensor,
                      position: int | None = None) -> torch.Tensor:
        """Tokens [B, T] through the swarm at `position` (default: the session's) → logits [B, V] of the last."""
        return await self.pipeline.prefill(session, input_ids, position)

    async def decode(self, session: InferenceSession, token_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row, token_ids [B] → logits [B, V]."""
        return await self.pipeline.decode(session, token_ids)

    async def run_in_worker(self, fn, *args):
        """Run blocking torch work on the client's head thread."""
        return await self.pipeline.stage.run(fn, *args)

    async def encode(self, inputs: Sequence[Sequence[int]], concurrency: int = 8) -> list[torch.Tensor]:
        """Last hidden states [T_i, H] of each input through an encoder-only model's blocks on the swarm.

        Each input is one short session of one step (no padding, so no attention mask crosses the wire; peers keep
        no cache for encoder spans); up to `concurrency` inputs are in flight at once."""
        if not getattr(self.head, "is_encoder", False):
            raise TypeError(f"{self.model_id} is not an encoder-only model")
        limit = asyncio.Semaphore(concurrency)

        async def one(ids: Sequence[int]) -> torch.Tensor:
            async with limit:
                hidden = await self.pipeline.stage.embed(torch.tensor([list(ids)]), 0)
                async with await self.inference_session(len(ids)) as session:
                    return (await session.step(hidden))[0]

        return list(await asyncio.gather(*(one(ids) for ids in inputs)))

    async def generate_steps(self, input_ids: torch.Tensor, max_new_tokens: int,
                             sampling: SamplingParams = SamplingParams(),
                             session: InferenceSession | None = None) -> AsyncGenerator[StepOutput, None]:
        """Sample `max_new_tokens` positions for every row of input_ids [B, T]; the caller decides when to stop."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, tokens] with at least one token")
        owned = session is None
        if session is None:
            session = await self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0])
        sampler = Sampler(input_ids.shape[0], self.decoder.vocab_size, sampling)
        steps = self.pipeline.generate(session, input_ids, sampler, max_new_tokens)
        try:
            async for step in steps:
                yield step
        finally:
            await steps.aclose()
            if owned:
                await session.close()

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                       sampling: SamplingParams = SamplingParams(),
                       stop_token_ids: Sequence[int] | None = None) -> AsyncGenerator[int, None]:
        """Yield generated token ids of one prompt; stops after a stop token (default: the model's eos)."""
        stop = set(self.decoder.eos_token_ids if stop_token_ids is None else stop_token_ids)
        steps = self.generate_steps(torch.tensor([list(prompt_ids)]), max_new_tokens, sampling)
        try:
            async for step in steps:
                token = int(step.token_ids[0])
                yield token
                if token in stop:
                    break
        finally:
            await steps.aclose()

    async def close(self) -> None:
        self.pipeline.close()
        await self.router.close()
        if self.p2p is not None:
            await self.p2p.shutdown()
        if self.dht is not None:
            await asyncio.get_running_loop().run_in_executor(None, stop_dht, self.dht)
