"""Text generation over the swarm for the gateway: tokenizer, chat template, n choices, penalties, logprobs.

Speaks plain Python types (lists of ints, strings, dataclasses) so that its caller needs neither torch nor
transformers. One request of n choices runs as one session of batch n.

Prefix reuse (multi-turn chats): a finished single-choice session is not closed but parked with the tokens whose
KV its peers hold. A later request of the same tenant (API key, else client address: a first token sooner than
usual must not tell one tenant what another sent) whose prompt starts with such tokens (turn 2 repeats turn 1's
prompt and answer) takes that session, rewinds the peers to the common prefix and computes only the new suffix, so
the history is not recomputed; the result is what a fresh session computes (the peers rewind exactly as for failover
replay). A prompt that shares only a prefix with a parked session (another conversation's system prompt) does not
take it: a new session starts from a copy of that prefix on the same peers (InferenceSession.fork), so concurrent
chats share a system prompt's KV without queueing for parked sessions, and the parked conversation stays for its own
next turn; where the peers cannot fork, the session is taken as before. Parked
sessions are kept most-recently-used first, at most `reuse_sessions` of them; the oldest is closed when another is
parked, all are closed when a new session is refused for capacity (then it is retried once), and one that fails on
reuse (a peer freed it) falls back to a fresh session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jinja2
import torch
from transformers import AutoTokenizer

from swarm.client.client import SwarmClient
from swarm.client.drafting import DraftModel, ModelDrafter
from swarm.client.grammar import Grammars
from swarm.client.pipeline import StepOutput
from swarm.client.requests import GenerationRequest, Grammar, TokenEvent
from swarm.client.session import InferenceSession
from swarm.client.speculation import Drafter, PromptLookup, common_prefix
from swarm.client.token_bytes import TokenBytes
from swarm.protocol import ErrorCode, NoChainError, PeerError
from swarm_kernels.sampling import LogitsAdjustments, Sampler, SamplingParams

logger = logging.getLogger(__name__)


class SwarmTextService:
    """The swarm, seen as a text model: what the gateway's GenerationBackend needs."""

    MIN_REUSE = 16  # common prefix (tokens) worth taking a parked session for
    REUSE_HEADROOM = 1024  # tokens a session is opened for beyond its request, so that a next turn fits in it
    PARK_SECONDS = 60.0  # a parked session older than this is closed, not reused

    # Parked sessions kept (each holds only the KV of its tokens on its peers): a burst of chats that share a system
    # prompt reuses it once as many sessions have finished. They are parked on their peers (swarm.protocol: park): a
    # peer that needs room for a new session frees parked ones first, rather than make it wait (64 chats at once
    # beside 32 parked sessions on a peer of 64 slots used to wait for the first 32 to end); and when a peer still
    # refuses a new session for capacity, the parked ones this service holds are closed.
    # 16 chats at once through `make serve` after a first 16: with 8 parked, 8 of them reused 28 of their ~45 prompt
    # tokens and the other 8 computed all (benchmarks/README.md, 2026-12-03).
    REUSE_SESSIONS = 32

    def __init__(self, client: SwarmClient, tokenizer: Any, reuse_sessions: int = REUSE_SESSIONS):
        self.client = client
        self.reuse_sessions = reuse_sessions
        self._parked: list[_Parked] = []  # most recently used first
        self.reused_tokens = 0  # prompt tokens not recomputed thanks to reuse, for tests and stats
        self.forked_sessions = 0  # sessions started from a copy of a parked one's prefix
        # SWARM_FORK_SESSIONS=0: a prompt sharing only a prefix with a parked session takes that session (as before
        # forks existed; for measurements)
        self.fork_sessions = os.environ.get("SWARM_FORK_SESSIONS", "1") != "0"
        self.failovers = 0  # peers replaced mid-session by replay, over all generations (app.metrics)
        self.pushed_steps = 0  # link steps computed from the previous peer's push, over all generations (app.metrics)
        self.tokenizer = tokenizer
        self._token_bytes = TokenBytes(tokenizer)
        self.model_id = client.model_id
        head = client.decoder
        self.context_length: int = getattr(head.config, "max_position_embeddings", 2048)
        self.vocab_size: int = head.vocab_size
        self.eos_token_ids: tuple[int, ...] = head.eos_token_ids
        # a grammar ends its text with the first end-of-text token (the one the chat template closes turns with)
        self.native_tools = "tools" in str(getattr(tokenizer, "chat_template", None) or "")
        self.chats = bool(getattr(tokenizer, "chat_template", None))  # a base model may have none
        self.grammars = Grammars(tokenizer, self.vocab_size, _grammar_end(tokenizer, self.eos_token_ids))
        # speculative decoding's drafts: by prompt lookup, and from this local model where one is loaded
        self.draft_model: DraftModel | None = None

    async def load_draft_model(self, ref: str, budget_tokens: int = 32768) -> None:
        """Draft with the model at `ref` (swarm.client.drafting; IncompatibleDrafter unless it shares this model's
        tokenizer), its generations' caches holding `budget_tokens` at most."""
        self.draft_model = await asyncio.get_running_loop().run_in_executor(
            None, DraftModel.load, ref, self.tokenizer, self.vocab_size, budget_tokens)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], model: str | None = None,
                      **client_options: Any) -> SwarmTextService:
        client = await SwarmClient.connect(initial_peers, model, **client_options)
        loop = asyncio.get_running_loop()
        tokenizer = await loop.run_in_executor(None, AutoTokenizer.from_pretrained, client.source.path)
        return cls(client, tokenizer)

    async def swarm_view(self) -> dict[str, Any]:
        """This client's view of the swarm (no new probes: its routing view), as swarm.status summarizes it, with
        each peer's RTT and observed decode step as this client measured them and whether it bans the peer (a
        banned peer, e.g. one that failed its probe, counts for neither coverage nor the chain: its blocks may be a
        hole)."""
        from swarm.status import snapshot

        spans = {s.peer_id: s for s in await self.client.spans()}
        health, banned = self.client.router.health, self.client.router.banned()

        async def known(peer_id: str) -> tuple[Any, float]:
            return spans[peer_id], health.view(peer_id).rtt or 0.0

        view = await snapshot(list(spans.values()), self.model_id, known, frozenset(banned))
        for peer in view["peers"]:
            seen = health.view(peer["peer_id"])
            peer["rtt_ms"] = None if seen.rtt is None else round(seen.rtt * 1000, 2)
            step = seen.observed_block_seconds
            peer["observed_block_ms"] = None if step is None else round(step * 1000, 3)
            peer["banned"] = peer["peer_id"] in banned
        return view

    async def missing_blocks(self) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        return await self.client.missing_blocks()

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt of a chat (with `tools`, for a template that renders them: `native_tools`); ValueError with
        the template's own reason when it refuses the messages (a template's raise_exception, e.g. roles that do
        not alternate)."""
        try:
            encoded = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                         tokenize=True)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from e
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def check_grammar(self, grammar: Grammar) -> None:
        """Raise GrammarError (a ValueError, its message for the client) if `grammar` cannot be enforced."""
        self.grammars.check(grammar)

    def encode(self, text: str) -> list[int]:
        """A fragment of text (a prediction, a stop string): no special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """A whole /v1/completions prompt, as the checkpoint's tokenizer encodes by default: with its BOS where it
        adds one (Gemma's does, SmolLM2's does not)."""
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """Its own text (a leading space included: swarm.client.token_bytes); U+FFFD for part of a character."""
        return self._token_bytes.of(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes.of(token_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        """Yield, per step, one event per unfinished choice; ends when every choice hit a stop token or the limit.
        A single-choice session that got that far is parked for the next turn, whether the caller reads on to the
        end or closes this generator at the last event; one stopped earlier (a client that hung up) is closed."""
        n, prompt = request.n, list(request.prompt_ids)
        constraint = None
        if request.grammar is not None:  # compiled (cached after the gateway's check) and its first masks begun
            constraint = await asyncio.get_running_loop().run_in_executor(
                None, self.grammars.constraint, request.grammar, n)
        scoring = request.prompt_logprobs is not None  # every prompt token is computed then: no reuse
        private = request.tenant is None  # neither reuses a session nor leaves one for reuse
        session, start = await self._session_for(prompt, request.max_new_tokens, n, request.tenant or "",
                                                  reuse=not scoring and not private)
        failovers_before, pushed_before = session.failovers, session.pushed  # a reused session's earlier turns
        sampler = Sampler(n, self.vocab_size, SamplingParams(request.temperature, request.top_p, request.top_k,
                                                             request.seed, request.min_p),
                          LogitsAdjustments(request.presence_penalty, request.frequency_penalty,
                                            tuple(request.logit_bias.items()), request.repetition_penalty),
                          request.logprobs, constraint, prompt=prompt)
        drafter = None
        if request.speculative and n == 1:
            drafter = self._drafter(prompt, request.prediction, sampler.params)
        steps = self.client.pipeline.generate(session, torch.tensor([prompt[start:]] * n), sampler,
                                              request.max_new_tokens, position=start,
                                              prompt_scores=request.prompt_logprobs, drafter=drafter,
                                              drafting=request.draft_while)
        stop_ids = set(request.stop_token_ids)
        chosen: list[int] = []  # row 0's tokens: all but the last have been fed to the session
        active = [True] * n
        complete = False  # every choice has its last event: nothing is left to compute
        try:
            async for step in steps:
                chosen.append(int(step.token_ids[0]))
                events = []
                route = tuple(stream.link.peer.peer_id for stream in session.streams) if len(chosen) == 1 else ()
                scores = None
                if step.prompt_scores is not None:  # a tuple a prompt token: off the event loop
                    scores = await asyncio.get_running_loop().run_in_executor(None, _prompt_logprobs, prompt, step)
                for i in range(n):
                    if active[i]:
                        event = _event(step, i, start if len(chosen) == 1 else 0)
                        if scores is not None:
                            event = dataclasses.replace(event, prompt_logprobs=scores)
                        if route:
                            event = dataclasses.replace(event, route=route)
                        if event.token_id in stop_ids:
                            event = dataclasses.replace(event, stop=True)
                            active[i] = False
                        events.append(event)
                complete = not any(active) or len(chosen) == request.max_new_tokens
                yield events
                if complete:
                    break
        finally:
            await steps.aclose()
            if drafter is not None:
                drafter.close()
            fed = prompt + chosen[:-1]
            self.failovers += session.failovers - failovers_before
            self.pushed_steps += session.pushed - pushed_before
            if (complete and n == 1 and not private and self.reuse_sessions > 0 and self._alive(session)
                    and session.position == len(fed)):
                await self._park(fed, session, request.tenant or "")
            else:
                await session.close()

    async def _session_for(self, prompt: list[int], max_new_tokens: int, n: int, tenant: str = "",
                           reuse: bool = True) -> tuple[InferenceSession, int]:
        """A session `tenant` parked holding the longest prefix of `prompt` (and the position to continue from),
        else a new session (position 0). Only the tenant's own: how soon a first token comes must not tell one
        tenant what another sent."""
        if n == 1 and reuse:
            for entry in [e for e in self._parked if not e.forks and not self._alive(e.session)]:
                self._parked.remove(entry)  # freed by its peers for room
                await entry.session.close()
            best, best_common = None, 0
            now = time.monotonic()
            for entry in self._parked:
                common = common_prefix(entry.tokens, prompt)
                if (entry.tenant == tenant and common > best_common
                        and entry.session.max_length >= len(prompt) + max_new_tokens
                        and now - entry.since < self.PARK_SECONDS):
                    best, best_common = entry, common
            if best is not None and best_common >= self.MIN_REUSE:
                start = min(best_common, len(prompt) - 1)  # at least one token goes in, to get logits
                needed = len(prompt) + max_new_tokens
                if best_common < len(best.tokens) and self.fork_sessions:
                    # the prompt shares only a prefix (a system prompt) with what the session holds (someone's
                    # conversation, which its next turn may continue): a new session starts from a copy of the prefix
                    # on the same peers and the parked one stays for its own next turn
                    best.forks += 1  # while it is copied, nobody takes (and rewinds) it
                    try:
                        forked = await self._fork(best.session, start, self._length(needed, n))
                    finally:
                        best.forks -= 1
                    if forked is not None:
                        self.reused_tokens += start
                        self.forked_sessions += 1
                        return forked, start
                if best in self._parked and not best.forks:  # not taken, closed nor being forked meanwhile
                    self._parked.remove(best)
                    if await self._unpark(best.session):
                        self.reused_tokens += start
                        return best.session, start
                    await best.session.close()
        needed = len(prompt) + max_new_tokens
        wanted = self._length(needed, n)
        try:
            return await self._open(wanted, n), 0
        except NoChainError:
            if wanted == needed:
                raise
            return await self._open(needed, n), 0  # no peers can hold the headroom: open without it

    def _length(self, needed: int, n: int) -> int:
        """The max_length a session for `needed` tokens is opened with: room for a next turn too (one choice)."""
        return max(needed, min(self.context_length, needed + (self.REUSE_HEADROOM if n == 1 else 0)))

    async def _fork(self, parent: InferenceSession, tokens: int, max_length: int) -> InferenceSession | None:
        """A session starting from `parent`'s first `tokens` (InferenceSession.fork); None where the peers cannot."""
        try:
            return await InferenceSession.fork(parent, tokens, max_length)
        except PeerError as e:  # e.g. full, or the parked session was freed: take or open instead
            logger.info("could not fork a parked session: %s", e)
            return None

    async def _open(self, max_length: int, n: int) -> InferenceSession:
        try:
            return await self.client.inference_session(max_length, n)
        except PeerError as e:
            if e.code != ErrorCode.CAPACITY or not self._parked:
                raise
            # the peers are full: what this service parks goes first (least recently used first), then retry once
            logger.info("peers at capacity: closing %d parked sessions", len(self._parked))
            while self._parked:
                await self._parked.pop().session.close()
            return await self.client.inference_session(max_length, n)

    async def _unpark(self, session: InferenceSession) -> bool:
        """Take a parked session back from its peers (each answers that it will not free it now), or False where a
        peer freed it meanwhile."""
        try:
            for stream in session.streams:
                await stream.unpark(session.step_timeout)
        except PeerError:
            return False
        return self._alive(session)

    @staticmethod
    def _alive(session: InferenceSession) -> bool:
        return not any(stream.ended for stream in session.streams)  # (a parked one the peers may have freed)

    async def _park(self, tokens: list[int], session: InferenceSession, tenant: str = "") -> None:
        if len(tokens) != session.position:  # not what the peers hold: never reuse it
            await session.close()
            return
        for stream in session.streams:  # its peers may free it for room: a new session comes before a cache
            try:
                await stream.park()
            except PeerError:  # gone already
                await session.close()
                return
        now = time.monotonic()
        self._parked.insert(0, _Parked(tokens, session, now, tenant))
        # beyond the count, or parked long enough that a peer may free it for idleness (300 s by default) and an
        # attempt to reuse it would look like a peer failure
        while self._parked and (len(self._parked) > self.reuse_sessions
                                or now - self._parked[-1].since > self.PARK_SECONDS):
            await self._parked.pop().session.close()

    def _drafter(self, prompt: list[int], prediction: Sequence[int],
                 params: SamplingParams = SamplingParams()) -> Drafter:
        """The draft model's drafter (sampling as `params` do) where one is loaded, but for seeded sampling: whether
        and how much a model drafts depends on measured times and the load, and drafts draw from the seeded
        generator, so its text would too (prompt lookup's drafts depend on the text only)."""
        if self.draft_model is not None and not (params.seed is not None and not params.greedy):
            return ModelDrafter(self.draft_model, prompt, prediction, params=params)
        return PromptLookup(prompt, prediction)

    async def close(self) -> None:
        for entry in self._parked:
            await entry.session.close()
        self._parked.clear()
        await self.client.close()
        if self.draft_model is not None:
            self.draft_model.close()


@dataclasses.dataclass
class _Parked:
    tokens: list[int]  # what the peers hold for the session
    session: InferenceSession
    since: float
    tenant: str  # whose request parked it: only theirs may take it
    forks: int = 0  # forks of it in flight (it is not taken meanwhile: a rewind would change what they copy)


def _event(step: StepOutput, i: int, cached: int) -> TokenEvent:
    token = int(step.token_ids[i])
    if step.logprobs is None or step.top_ids is None or step.top_logprobs is None:
        return TokenEvent(i, token, cached_prompt_tokens=cached, kept_draft=step.kept_draft,
                          rejected_drafts=step.rejected_drafts, unused_drafts=step.unused_drafts)
    return TokenEvent(i, token, float(step.logprobs[i]),
                      list(zip(step.top_ids[i].tolist(), step.top_logprobs[i].tolist(), strict=True)), False, cached,
                      kept_draft=step.kept_draft, rejected_drafts=step.rejected_drafts,
                      unused_drafts=step.unused_drafts)


def _prompt_logprobs(prompt: list[int], step: StepOutput) -> tuple[tuple[float | None, tuple[tuple[int, float],
                                                                                             ...]], ...]:
    scores = step.prompt_scores
    assert scores is not None
    rest = tuple((float(lp), tuple(zip(ids.tolist(), lps.tolist(), strict=True)))
                 for lp, ids, lps in zip(scores.logprobs, scores.top_ids, scores.top_logprobs, strict=True))
    return ((None, ()), *rest)[: len(prompt)]


def _grammar_end(tokenizer: Any, eos_token_ids: tuple[int, ...]) -> int:
    """The end-of-text token a grammar closes with: the tokenizer's own when it stops generation, else the first."""
    own = getattr(tokenizer, "eos_token_id", None)
    if own in eos_token_ids or not eos_token_ids:
        return int(own or 0)
    return eos_token_ids[0]


