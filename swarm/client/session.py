"""Inference sessions: one persistent stream per peer of a chain, hidden states passed along it step by step.

    session = await InferenceSession.routed(p2p, router, max_length=512)   # or .open(p2p, chain, ...) by hand
    hidden = await session.step(embeddings)         # [B, T, H] at the next position → [B, T, H] after all blocks
    await session.close()                            # the peers free the session's KV cache
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P

from swarm.client.health import Outcome
from swarm.client.router import Router
from swarm.client.routing import Link
from swarm.client.stream import PeerStream, Probe, PushMismatch, open_streams
from swarm.client.verification import distance, judge, tolerance
from swarm.protocol import MAX_PUSH_HOPS, ErrorCode, Hop, NoChainError, PeerError, SpanInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverPolicy:
    """How a session survives peers that fail mid-stream."""

    max_failovers: int = 8  # replacements per session before giving up
    min_step_timeout: float = 5.0  # a decode step never times out sooner than this...
    latency_factor: float = 10.0  # ...nor sooner than this many times the link's usual decode step
    # but a peer silent for max(min_probe_after, probe_factor x its usual decode step) is probed, and one that does not
    # answer within max(1.5 s, 4 x its RTT) either is replaced then (a host cut off, not a slow step); 0: never probed
    min_probe_after: float = 1.0
    probe_factor: float = 4.0
    replay_chunk: int = 1024  # tokens per replay step
    # a step of a prompt's tokens may take the step timeout per this many of them (a long context's chunk costs a
    # slow or busy peer tens of seconds), and a peer silent for one step timeout is probed meanwhile
    prefill_tokens_per_timeout: int = 128
    open_attempts: int = 3  # chains tried to open a session on, when peers refuse or fail the opening


def outcome_of(error: PeerError) -> Outcome:
    """What a peer's error says about the peer, for the router."""
    if error.code == ErrorCode.MOVED:
        return Outcome.MOVED
    if error.code == ErrorCode.CAPACITY:
        return Outcome.REFUSED
    return Outcome.FAILED


class InferenceSession:
    """A session over a whole chain: `step` runs new tokens' hidden states through every block.

    It keeps, for every link, the inputs it sent for the positions cached so far. When a peer fails (connection
    lost, error, timeout, a malformed or non-finite answer) and the session has a `router`, the failure is reported
    to it, a replacement chain for just that link's blocks is routed and opened, the kept inputs are replayed to
    rebuild its KV cache, and the step goes on: the caller sees no error, and greedy output is unchanged.
    Without a router (a chain chosen by hand) a failure is raised.
    """

    def __init__(self, p2p: P2P, streams: list[PeerStream], max_length: int, batch_size: int, step_timeout: float,
                 router: Router | None = None, policy: FailoverPolicy | None = None, push: bool = True):
        self.p2p = p2p
        # server-to-server push along the chain where its peers were opened for it (swarm.protocol); turned off
        # for the session when a pushed input differed from what the previous peer answered
        self.push = push
        self.streams = streams
        self.router = router
        if router is not None:
            router.opened(self._peer_ids(streams))
        self.max_length = max_length
        self.batch_size = batch_size
        self.step_timeout = step_timeout
        self.policy = policy or FailoverPolicy()
        self.position = 0  # tokens every peer has cached
        self.failovers = 0
        self.pushed = 0  # link steps computed from a push (the previous peer's output sent to it directly)
        self.rebuilds = 0  # links rebuilt after an answer to another input than sent (see _rebuild)
        self.closed = False
        self._inputs: list[torch.Tensor | None] = [None] * len(streams)  # per link: [B, >= position, H]
        self._latency: list[float | None] = [None] * len(streams)  # per link: smoothed decode step seconds
        self._background_check: asyncio.Task | None = None  # a check of a trusted peer's step, beside the decoding
        self._found: PeerError | None = None  # a peer that check found wrong, not replaced yet

    @classmethod
    async def open(cls, p2p: P2P, chain: list[Link], max_length: int, batch_size: int = 1, timeout: float = 30.0,
                   router: Router | None = None, policy: FailoverPolicy | None = None,
                   push: bool = True) -> InferenceSession:
        """A session over this chain (with a router: replaced link by link when peers fail); `push`: hidden
        states go from peer to peer where the peers take pushes (swarm.protocol)."""
        streams = await open_streams(p2p, chain, max_length, batch_size, timeout, push)
        return cls(p2p, streams, max_length, batch_size, timeout, router, policy, push)

    @classmethod
    async def routed(cls, p2p: P2P, router: Router, max_length: int, batch_size: int = 1, timeout: float = 30.0,
                     policy: FailoverPolicy | None = None, push: bool = True) -> InferenceSession:
        """A session on the fastest chain now. A peer that refuses or fails the opening (the router's view is a few
        seconds old: the peer may have filled up, started moving or died) is reported, and another chain is tried;
        when nobody else serves its blocks, its own answer is raised."""
        policy = policy or FailoverPolicy()
        for attempt in range(policy.open_attempts):
            chain = await router.route(length=max_length, batch=batch_size)
            peers = [link.peer.peer_id for link in chain]
            router.opened(peers)  # before the await: sessions opened concurrently see each other
            try:
                return await cls.open(p2p, chain, max_length, batch_size, timeout, router, policy, push)
            except PeerError as e:
                if not e.peer_id or attempt + 1 == policy.open_attempts:
                    raise
                router.report(e.peer_id, outcome_of(e))
                try:
                    await router.route(length=max_length, batch=batch_size, fresh=e.code == ErrorCode.MOVED)
                except NoChainError:
                    raise e from None  # no one else serves those blocks: the peer's own answer says most
                logger.info("peer %s refused a new session (%s); trying another chain", e.peer_id, e)
            finally:
                router.closed(peers)  # the session counts its own links
        raise AssertionError("unreachable")

    @classmethod
    async def fork(cls, parent: InferenceSession, tokens: int, max_length: int) -> InferenceSession | None:
        """A new session over `parent`'s chain that starts where `parent` was after its first `tokens` tokens: each
        peer copies that much of parent's cache (swarm.protocol: fork) and this client the inputs it keeps for
        replay, so its first step is at position `tokens`. None where that cannot be (a stream without a handle, a
        peer that does not fork, inputs not kept, a peer a check found wrong and not replaced yet, a banned peer);
        PeerError where a peer refuses. A check of the parent still running hands its verdict to the fork too (a
        peer found wrong is replaced in both, at their next steps). Taken before any await: the parent may be closed
        meanwhile."""
        router, policy, push = parent.router, parent.policy, parent.push
        check = parent._background_check
        if parent.closed or not 1 <= tokens <= parent.position or parent.repair_due is not None \
                or any(stream.closed or stream.handle is None for stream in parent.streams) \
                or any(kept is None or kept.shape[1] < tokens for kept in parent._inputs) \
                or (router is not None and router.banned() & set(cls._peer_ids(parent.streams))):
            return None
        inputs = [kept[:, :tokens].clone() for kept in parent._inputs if kept is not None]
        forks = [(stream.handle or 0, tokens, stream.session_id) for stream in parent.streams]  # (each has one)
        streams = await open_streams(parent.p2p, [stream.link for stream in parent.streams], max_length,
                                     parent.batch_size, parent.step_timeout, push, forks)
        if any(stream.forked != tokens for stream in streams):
            for stream in streams:
                await stream.close()
            return None
        session = cls(parent.p2p, streams, max_length, parent.batch_size, parent.step_timeout, router, policy, push)
        session.position = tokens
        session._inputs = list(inputs)
        if check is not None and not check.done():
            check.add_done_callback(lambda _: session._inherit(parent))
        session._inherit(parent)  # (a verdict that came during the await)
        return session

    def _inherit(self, parent: InferenceSession) -> None:
        """A fork takes its parent's verdict on a peer (see fork)."""
        if parent._found is not None and self._found is None and not self.closed:
            self._found = parent._found

    @staticmethod
    def _peer_ids(streams: list[PeerStream]) -> list[str]:
        return [stream.link.peer.peer_id for stream in streams]

    @property
    def chain_key(self) -> tuple[str, ...]:
        """Which peers serve which blocks of this session now: sessions with equal keys decode together."""
        return tuple(f"{s.link.peer.peer_id}:{s.link.start}:{s.link.end}" for s in self.streams)

    @property
    def pushing(self) -> bool:
        """Whether its steps go from peer to peer (swarm.protocol: push): every link's peer takes pushes."""
        return self.push and len(self.streams) > 1 and all(stream.push_key for stream in self.streams)

    async def step(self, hidden: torch.Tensor, position: int | None = None,
                   group: tuple[str, int] | None = None) -> torch.Tensor:
        """hidden: [B, T, H] of tokens at `position` (default: right after the cached ones) → last block's output.
        `group`: (id, size) of the group of decode steps of other sessions sent with this one (swarm.protocol)."""
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{position + hidden.shape[1]} tokens exceed the session's max_length {self.max_length}")
        if self._found is not None:
            await self._repair(position)
        # server-to-server push where every link's peer takes it (swarm.protocol): the first link gets the step
        # with the links after it, each peer pushes its output on to the next, and every answer still comes back
        # here, where it is kept for replay. Each link also gets its input from here once the previous link has
        # answered (whichever copy arrives first is computed): a push lost or slow costs nothing more than relaying.
        pushing = self.pushing
        numbered: dict[PeerStream, Hop] = {}
        i, sent = 0, None
        try:
            while i < len(self.streams):
                stream = self.streams[i]
                started = time.monotonic()
                try:
                    if sent is not stream:
                        await self._send(i, hidden, position, group, numbered if pushing and self.push else None)
                        sent = stream
                    out, metadata = await stream.result(hidden, self.link_timeout(i, hidden.shape[1]),
                                                        self.link_probe(i, hidden.shape[1]), position)
                    if metadata.get("pushed") is True:
                        self.pushed += 1
                    await self.check_due(i, hidden, position, out)
                except PushMismatch:
                    await self._rebuild(i, position)
                    continue
                except PeerError as e:
                    await self._fail_over(i, position, e)
                    continue  # the same step, now through the replacement
                seconds = time.monotonic() - started
                if metadata.get("pushed") is True and self.router is not None:
                    # its input came from the previous peer about when that peer's answer came here: since then,
                    # the peer computed and answered; half its round trip stands for the leg its input took
                    seconds += (self.router.health.rtt(stream.link.peer.peer_id) or 0.0) / 2
                self.remember(i, hidden, position, seconds)
                hidden, i = out, i + 1
        except asyncio.CancelledError:  # the step's answers would be read as the next step's
            for stream in self.streams if pushing else self.streams[i : i + 1]:  # pushed: any link may owe one
                await stream.close()
            raise
        self.position = position + hidden.shape[1]
        return hidden

    async def _send(self, i: int, hidden: torch.Tensor, position: int, group: tuple[str, int] | None,
                    numbered: dict[PeerStream, Hop] | None) -> None:
        """Send link i its step; with `numbered` (pushing: each stream's number for this step, drawn once), named
        with the links after it that take pushes (a replacement may not; at most MAX_PUSH_HOPS)."""
        stream = self.streams[i]
        hops: list[Hop] = []
        for later in self.streams[i : i + 1 + MAX_PUSH_HOPS] if numbered is not None else ():
            if not later.push_key or numbered is None:
                break
            if later not in numbered:
                numbered[later] = later.number()
                later.expect(hidden)  # a pushed answer may arrive before its input is sent from here
            hops.append(numbered[later])
        if hops:
            await stream.send(hidden, position, group, hops[0].step, hops[1:])
        else:
            await stream.send(hidden, position, group)

    async def _rebuild(self, i: int, position: int) -> None:
        """Link i answered a step other than the one sent to it: a push that differed from what the previous
        link answered here, or an answer to a push nobody asked for (a broken or lying peer on either side: nobody
        is blamed). Its stream is replaced by a new one to the same peer, without push, rebuilt from the inputs
        kept here; the session pushes no more."""
        old = self.streams[i]
        logger.warning("peer %s answered a step other than the one sent to it (a pushed input differed); its link "
                       "is rebuilt, and this session pushes no more", old.link.peer.peer_id)
        self.push = False
        self.rebuilds += 1
        await old.close()
        new = (await open_streams(self.p2p, [old.link], self.max_length, self.batch_size, self.step_timeout))[0]
        self.streams[i] = new
        kept = self._inputs[i]
        if position and kept is not None:
            await self._replay(new, kept[:, :position])

    def rewind(self, position: int) -> None:
        """Forget the tokens from `position` on (drafts not kept): the next step goes there, and the peers rewind
        their caches to it."""
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        self.position = position

    def link_timeout(self, i: int, new_tokens: int) -> float:
        latency = self._latency[i]
        if new_tokens > 1:  # a prompt's chunk: its compute grows with its tokens (see link_probe)
            return self.chunk_timeout(new_tokens)
        if latency is None:
            return self.step_timeout
        return max(self.policy.min_step_timeout, self.policy.latency_factor * latency)

    def chunk_timeout(self, tokens: int) -> float:
        """How long a step of `tokens` of a prompt (or a replay) may take: the step timeout per
        FailoverPolicy.prefill_tokens_per_timeout of them."""
        return self.step_timeout * max(1.0, tokens / self.policy.prefill_tokens_per_timeout)

    def link_probe(self, i: int, new_tokens: int) -> Probe | None:
        """When a step of link i that has no answer yet makes the router ask its peer whether it lives: a decode step
        after a few of its usual ones, a prompt's chunk (whose timeout grows with its tokens) after a step timeout."""
        latency, router = self._latency[i], self.router
        if router is None or not self.policy.min_probe_after or (new_tokens == 1 and latency is None):
            return None
        peer_id = self.streams[i].link.peer.peer_id
        after = self.step_timeout if new_tokens > 1 else max(self.policy.min_probe_after,
                                                              self.policy.probe_factor * (latency or 0.0))
        return after, lambda: router.alive(peer_id)

    def remember(self, i: int, hidden: torch.Tensor, position: int, seconds: float, observed: bool = True) -> None:
        """Keep link i's input of this step for replay; `observed`: `seconds` is the link's round trip (a pushed
        link's answer may come before its input was sent: not a measure of the peer)."""
        kept = self._inputs[i]  # its first `position` tokens are the inputs kept so far; it has room for more
        end = position + hidden.shape[1]
        if kept is None or kept.shape[1] < end or kept.shape[0] != hidden.shape[0] or kept.dtype != hidden.dtype:
            # grown by doubling: a token's step copies O(1) amortized, not the whole history (O(n^2) per session)
            capacity = min(self.max_length, max(end, 64, 2 * (kept.shape[1] if kept is not None else 0)))
            grown = hidden.new_empty(hidden.shape[0], capacity, hidden.shape[2])
            if kept is not None and position:
                grown[:, :position] = kept[:, :position]
            kept = self._inputs[i] = grown
        kept[:, position:end] = hidden
        if hidden.shape[1] == 1:
            old = self._latency[i]
            self._latency[i] = seconds if old is None else 0.8 * old + 0.2 * seconds
            if self.router is not None and hidden.shape[0] == 1:
                link = self.streams[i].link
                self.router.observed(link.peer.peer_id, link.end - link.start, seconds)

    async def _fail_over(self, i: int, position: int, error: PeerError) -> torch.Tensor | None:
        """Replace link i (which just failed) by a fresh chain over its blocks, rebuilt by replay; returns the new
        chain's outputs for the first `position` tokens (None at position 0)."""
        failed = self.streams[i]
        await failed.close()
        kept = self._inputs[i]
        while True:
            if self.router is None:
                raise error
            self.router.report(error.peer_id or failed.link.peer.peer_id, outcome_of(error))
            if self.failovers >= self.policy.max_failovers:
                raise error
            self.failovers += 1
            logger.warning("peer %s failed (%s); replacing blocks %d:%d", error.peer_id, error, failed.link.start,
                           failed.link.end)
            chain = await self.router.route(failed.link.start, failed.link.end, length=self.max_length,
                                            batch=self.batch_size, fresh=True, replacing=True,
                                            push=self.push)  # NoChainError: none
            streams: list[PeerStream] = []
            try:
                streams = await open_streams(self.p2p, chain, self.max_length, self.batch_size, self.step_timeout,
                                             self.push)
                inputs: list[torch.Tensor | None] = []
                history = kept[:, :position] if position and kept is not None else None
                for stream in streams:  # replay: each new link's inputs are the previous new link's outputs
                    inputs.append(history)
                    if history is not None:
                        history = await self._replay(stream, history)
            except PeerError as e:
                for stream in streams:
                    await stream.close()
                error = e
                continue
            self.router.closed(self._peer_ids([failed]))
            self.router.opened(self._peer_ids(streams))
            self.streams[i : i + 1] = streams
            self._inputs[i : i + 1] = inputs
            self._latency[i : i + 1] = [None] * len(streams)
            return history

    def _history(self, i: int, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Link i's inputs up to and with this step (a copy: the kept inputs change as the session goes on)."""
        kept = self._inputs[i]
        return torch.cat([kept[:, :position], hidden], dim=1) if position and kept is not None else hidden.clone()

    @property
    def repair_due(self) -> PeerError | None:
        """A peer a background check found wrong, to be replaced at the next step (see _repair)."""
        return self._found

    async def check_due(self, i: int, hidden: torch.Tensor, position: int, out: torch.Tensor) -> None:
        """Check link i's step if the router says one is due (see check)."""
        if self.verify_due(i):
            await self.check(i, hidden, position, out)

    def verify_due(self, i: int) -> bool:
        """Whether link i's step just answered is to be checked (the router's draw: once per step)."""
        return self.router is not None and self.router.verify_due(self.streams[i].link.peer.peer_id)

    async def check(self, i: int, hidden: torch.Tensor, position: int, out: torch.Tensor) -> None:
        """Check link i's step (`hidden` in at `position`, `out` back) on another replica of its blocks, if one
        serves them: for a peer in its warm-up, before the output goes on (raises PeerError when it is wrong);
        for a peer with a clean record, beside the decoding, one check at a time per session (a peer found wrong is
        banned at once and replaced at this session's next step, see _repair). The link's inputs are copied only
        once a verifier is found."""
        assert self.router is not None
        link = self.streams[i].link
        background = self.router.check_in_background(link.peer.peer_id)
        if background and self._background_check is not None and not self._background_check.done():
            return
        chain = await self._verifier_chain(link, position + hidden.shape[1], [link.peer.peer_id])
        if chain is None:
            return  # nobody else serves these blocks: nothing to compare with
        history = self._history(i, hidden, position)
        if background:
            self._background_check = asyncio.create_task(
                self._verify_later(link, chain, history, hidden.shape[1], out.clone()))
        else:
            await self._verify(link, chain, history, hidden.shape[1], out)

    async def _verify_later(self, link: Link, chain: list[Link], history: torch.Tensor, tokens: int,
                            out: torch.Tensor) -> None:
        try:
            await self._verify(link, chain, history, tokens, out)
        except PeerError as e:
            if self.router is not None:
                self.router.report(link.peer.peer_id, Outcome.FAILED)  # banned now: no new route takes it
            self._found = e
        except Exception:
            logger.exception("a background check of peer %s failed", link.peer.peer_id)

    async def _repair(self, position: int) -> None:
        """Replace the peer a background check found wrong: its link by replay, then the links after it, which
        computed their caches from its wrong outputs, again from the new outputs (each rewound to position 0)."""
        error, self._found = self._found, None
        assert error is not None
        i = next((k for k, s in enumerate(self.streams) if s.link.peer.peer_id == error.peer_id), None)
        if i is None:
            return  # replaced meanwhile (it failed otherwise)
        end = self.streams[i].link.end
        outputs = await self._fail_over(i, position, error)
        j = self._link_at(end)
        while j < len(self.streams) and outputs is not None:
            kept = self._inputs[j]
            assert kept is not None
            kept[:, :position] = outputs
            end = self.streams[j].link.end
            try:
                outputs = await self._replay(self.streams[j], outputs)
            except PeerError as e:
                outputs = await self._fail_over(j, position, e)
            j = self._link_at(end)

    def _link_at(self, block: int) -> int:
        """The index of the link that starts at `block` (the number of links past the chain's end)."""
        return next((k for k, stream in enumerate(self.streams) if stream.link.start >= block), len(self.streams))

    async def _verify(self, link: Link, chain: list[Link], history: torch.Tensor, tokens: int,
                      out: torch.Tensor) -> None:
        """Re-run a step of `link` on `chain`, another replica of its blocks (from the link's inputs `history`, the
        step's `tokens` last), and compare with its output `out` (see swarm.client.verification); raises PeerError
        when the link's peer is found wrong."""
        peer = link.peer
        verifier = await self._recompute(chain, history, tokens)
        if verifier is None or self.router is None:
            return  # the verifiers failed, or the session was closed meanwhile: nothing to compare with
        theirs, infos = verifier
        if distance(out, theirs) <= tolerance(peer, infos):
            self.router.check_passed(peer.peer_id)
            return
        third_chain = await self._verifier_chain(link, history.shape[1],
                                                 [peer.peer_id, *(info.peer_id for info in infos)])
        third = await self._recompute(third_chain, history, tokens) if third_chain is not None else None
        if self.router is None:
            return
        third_out, third_infos = third if third is not None else (None, [])
        peer_wrong, verifier_wrong = judge(out, theirs, third_out, tolerance(peer, third_infos),
                                           max((tolerance(v, third_infos) for v in infos), default=0.0))
        for info in infos if verifier_wrong else []:
            logger.warning("peer %s answered differently from two other replicas: banned", info.peer_id)
            self.router.report(info.peer_id, Outcome.FAILED)
        if peer_wrong:
            raise PeerError(f"peer {peer.peer_id} answered blocks {link.start}:{link.end} differently from another "
                            "replica", ErrorCode.INTERNAL, peer.peer_id)

    async def _verifier_chain(self, link: Link, length: int, without: list[str]) -> list[Link] | None:
        """A fresh chain over the link's blocks for `length` tokens avoiding `without`; None when there is none (or
        the session was closed)."""
        if self.router is None:
            return None
        return await self.router.verifier_route(link.start, link.end, length=length, batch=self.batch_size,
                                                without=without, push=self.push)

    async def _recompute(self, chain: list[Link], history: torch.Tensor, tokens: int
                         ) -> tuple[torch.Tensor, list[SpanInfo]] | None:
        """The outputs of the last `tokens` of `history` computed by `chain` (opened for this), and that chain's
        peers; None when it fails (its failure is reported, not the checked link's) or the session was closed."""
        steps = history.shape[1]
        streams: list[PeerStream] = []
        try:
            streams = await open_streams(self.p2p, chain, steps, self.batch_size, self.step_timeout)
            result = history
            for stream in streams:
                result = await self._replay(stream, result)
        except PeerError as e:
            if e.peer_id and self.router is not None:
                self.router.report(e.peer_id, outcome_of(e))
            return None
        finally:
            for stream in streams:
                await stream.close()
        return result[:, -tokens:], [link.peer for link in chain]

    async def _replay(self, stream: PeerStream, history: torch.Tensor) -> torch.Tensor:
        outputs = []
        router, peer_id = self.router, stream.link.peer.peer_id
        probe = (self.step_timeout, lambda: router.alive(peer_id)) \
            if router is not None and self.policy.min_probe_after else None  # (see link_probe)
        for start in range(0, history.shape[1], self.policy.replay_chunk):
            chunk = history[:, start : start + self.policy.replay_chunk]
            # (PushMismatch: see _rebuild)
            outputs.append(await stream.step(chunk, start, self.chunk_timeout(chunk.shape[1]), probe=probe))
        return torch.cat(outputs, dim=1)

    async def close(self) -> None:
        self.closed = True
        if self._background_check is not None:
            self._background_check.cancel()
        for stream in self.streams:  # each close runs to completion without yielding, even in a cancelled task
            await stream.close()
        if self.router is not None:
            self.router.closed(self._peer_ids(self.streams))
            self.router = None

    async def __aenter__(self) -> InferenceSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
