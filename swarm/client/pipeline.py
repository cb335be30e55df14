"""The client's decode pipeline: tokens → embeddings → the chain of peers → LM head → sampler, and the one loop
that generates with it.

    pipeline = DecodePipeline(head)
    async for step in pipeline.generate(session, input_ids, Sampler(rows, vocab), max_new_tokens=32):
        step.token_ids                                       # [B] chosen at this position

Its stages, explicit rather than switched on input shape:
- `prefill(session, input_ids, position)`: the prompt's tokens, in chunks of `prefill_chunk`, embedded and sent
  through the session's chain; the LM head runs on the last position only → logits [B, V].
- `decode(session, token_ids)`: one new token per row. One-row sessions advance in lockstep groups per chain
  (`swarm.client.decoding`: many sessions' steps in one forward per peer, one LM-head call per round); a session of
  several rows (n choices) is one batch already and steps alone → logits [B, V].
- the head stage (`HeadStage`): every torch computation of the client (embeddings, the LM head, sampling) on one
  worker thread, never on the event loop. LM-head calls of concurrent sessions are merged into one call (the head's
  weight, 113 MB for SmolLM2 in float32, is then read once per round of tokens instead of once per session).
- sampling: a `swarm_kernels.sampling.Sampler` holds one request's state (penalty counts, generator, logprobs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from swarm.client.decoding import DecodeGroups
from swarm.client.session import InferenceSession
from swarm.client.speculation import Drafter
from swarm_kernels.sampling import Choice, Sampler, top_logprobs

T = TypeVar("T")


@dataclass(frozen=True)
class StepOutput:
    """One generated position: the chosen token of every row, the logits it was chosen from, and (when the sampler
    was asked for them) log-probabilities."""

    token_ids: torch.Tensor  # [B] int64
    logits: torch.Tensor  # [B, V] float32
    logprobs: torch.Tensor | None = None  # [B]: of the chosen tokens
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]
    prompt_scores: PromptScores | None = None  # on the first step, when asked: the prompt's own log-probabilities
    kept_draft: bool = False  # speculative decoding: the token was a draft's, kept
    rejected_drafts: int = 0  # on the last position of a speculative step: its draft tokens not kept
    # on a kept draft's position: the step's drafts after it, computed, that a completion ending here leaves out
    unused_drafts: int = 0


@dataclass(frozen=True)
class PromptScores:
    """Log-probabilities of a prompt's tokens 1..T-1 (each given the tokens before it; row 0's prompt) and the k
    most likely tokens at each of those positions."""

    logprobs: torch.Tensor  # [T - 1]
    top_ids: torch.Tensor  # [T - 1, k]
    top_logprobs: torch.Tensor  # [T - 1, k]


SCORE_SLICE = 64  # positions whose logits [slice, V] are held at once while scoring a prompt


class HeadStage:
    """The client's torch thread: embeddings, the LM head (merged across concurrent callers) and sampling."""

    def __init__(self, head: Any):
        self.head = head
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-head")
        self._queue: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking torch work on the head's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def embed(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        return await self.run(self.head.embed, input_ids, position)

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """head.logits(hidden [k, 1, H]) → [k, 1, V], computed together with other callers' pending requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((hidden, future))
        if self._wake is None or self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._batch_loop(), name="swarm-head-batcher")
        self._wake.set()
        return await future

    async def _batch_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                items = [item for item in self._queue if not item[1].done()]
                self._queue.clear()
                if items:
                    await self._compute(items)

    async def _compute(self, items: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        rows = [hidden.shape[0] for hidden, _ in items]
        try:
            logits = await self.run(self.head.logits, torch.cat([hidden for hidden, _ in items]))
        except Exception as e:
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), part in zip(items, logits.split(rows), strict=True):
            if not future.done():
                future.set_result(part)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False)


class DecodePipeline:
    """prefill / decode / generate over sessions of one model (see the module's doc).

    prefill_chunk: prompt tokens per step sent to the peers; decode_groups: lockstep groups per chain at most
    (None: one per peer of the chain; 0: no groups, every session steps alone)."""

    def __init__(self, head: Any, prefill_chunk: int = 1024, decode_groups: int | None = None):
        self.stage = HeadStage(head)
        self.prefill_chunk = prefill_chunk
        self.groups = DecodeGroups(head, self.stage.run, max_groups=decode_groups) if decode_groups != 0 else None

    async def prefill(self, session: InferenceSession, input_ids: torch.Tensor, position: int | None = None,
                      scores: list[tuple[torch.Tensor, ...]] | None = None, top: int = 0) -> torch.Tensor:
        """Tokens [B, T] at `position` (default: the session's; an earlier one rewinds the peers' caches to it)
        through the chain → logits [B, V] of the last token. With `scores` (a list), each chunk's row-0
        log-probabilities of the tokens that follow its positions (and the `top` most likely) are appended to it."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, tokens] with at least one token")
        at = session.position if position is None else position
        hidden = input_ids  # replaced by the last chunk's output
        for start in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk = input_ids[:, start : start + self.prefill_chunk]
            hidden = await session.step(await self.stage.embed(chunk, at + start), at + start)
            following = input_ids[0, start + 1 : start + 1 + chunk.shape[1]]  # the token after each position
            if scores is not None and len(following):
                scores.append(await self.stage.run(self._score, hidden[0, : len(following)], following, top))
        return (await self.stage.logits(hidden[:, -1:]))[:, -1]

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
        """On the head's thread: hidden [t, H] → (logprob of each target [t], top ids [t, k], top logprobs [t, k]),
        the logits of SCORE_SLICE positions at a time."""
        parts = []
        for start in range(0, len(targets), SCORE_SLICE):
            logits = self.stage.head.logits(hidden[None, start : start + SCORE_SLICE])[0]
            parts.append(top_logprobs(logits, targets[start : start + SCORE_SLICE], top))
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    async def decode(self, session: InferenceSession, token_ids: torch.Tensor) -> torch.Tensor:
        """The next token of every row, token_ids [B], at the session's position → logits [B, V]."""
        return (await self.decode_and_sample(session, token_ids, None))[0]

    async def decode_and_sample(self, session: InferenceSession, token_ids: torch.Tensor,
                                sampler: Sampler | None) -> tuple[torch.Tensor, Choice | None]:
        """decode(), then `sampler` on the logits in the same job of the head's thread (for a one-row session,
        in its group's round: one LM-head call and one hop to the thread for the whole group)."""
        input_ids = token_ids.reshape(-1, 1)
        if self.groups is not None and input_ids.shape[0] == 1:
            return await self.groups.step(session, input_ids, sampler)
        hidden = await session.step(await self.stage.embed(input_ids, session.position))
        logits = (await self.stage.logits(hidden))[:, -1]
        return logits, (await self.stage.run(sampler, logits) if sampler is not None else None)

    async def generate(self, session: InferenceSession, input_ids: torch.Tensor, sampler: Sampler,
                       max_new_tokens: int, position: int | None = None,
                       prompt_scores: int | None = None, drafter: Drafter | None = None,
                       drafting: Callable[[], bool] | None = None) -> AsyncGenerator[StepOutput, None]:
        """Sample up to `max_new_tokens` positions for every row of input_ids [B, T] fed at `position`; the caller
        decides when to stop. Every token yielded but the last has been fed to the session. `prompt_scores` = k:
        the first step also carries the input's own log-probabilities (PromptScores, k alternatives each).
        `drafter` (one row): speculative decoding (`speculate`), at each step `drafting()` allows (None: every step);
        a step without a draft is a plain decode step (in its group's round)."""
        scores: list[tuple[torch.Tensor, ...]] | None = [] if prompt_scores is not None else None
        if drafter is not None and max_new_tokens > 2 and (drafting is None or drafting()):
            drafter.prepare()  # (a draft needs a position after the first token and before the last)
        logits = await self.prefill(session, input_ids, position, scores, prompt_scores or 0)
        prompt = None
        if scores is not None:
            columns = [torch.cat(c) for c in zip(*scores, strict=True)] if scores else [
                torch.zeros(0), torch.zeros(0, prompt_scores or 0, dtype=torch.long),
                torch.zeros(0, prompt_scores or 0)]
            prompt = PromptScores(*columns)
        choice: Choice = await self.stage.run(sampler, logits)
        yield StepOutput(choice.token_ids, logits, choice.logprobs, choice.top_ids, choice.top_logprobs, prompt)
        produced = 1
        if drafter is not None:
            drafter.extend([int(choice.token_ids[0])])
        fed = session.position  # where the session must stand once the caller has the last token yielded
        try:
            while produced < max_new_tokens:
                drafts = drafting is None or drafting()
                draft = await drafter.propose(max_new_tokens - produced - 1) if drafter is not None and drafts else []
                if draft:
                    at = session.position
                    steps = await self.speculate(session, choice.token_ids, draft, sampler,
                                                 drafter.probabilities() if drafter is not None else None)
                    session.rewind(at + len(steps))  # the input token and the drafts kept
                    assert drafter is not None
                    drafter.result(len(draft), len(steps) - 1)
                else:
                    logits, sampled = await self.decode_and_sample(session, choice.token_ids, sampler)
                    assert sampled is not None
                    steps = [(logits, sampled)]
                for i, (logits, choice) in enumerate(steps):
                    fed += 1
                    produced += 1
                    if drafter is not None:
                        drafter.extend([int(choice.token_ids[0])])
                    last = i == len(steps) - 1
                    yield StepOutput(choice.token_ids, logits, choice.logprobs, choice.top_ids, choice.top_logprobs,
                                     kept_draft=not last, rejected_drafts=len(draft) - i if last and draft else 0,
                                     unused_drafts=0 if last else len(draft) - i - 1)
                    if produced == max_new_tokens:
                        break
        finally:
            if session.position > fed:  # drafts the peers computed that were not kept, or not read
                session.rewind(fed)

    async def speculate(self, session: InferenceSession, token_ids: torch.Tensor, draft: list[int],
                        sampler: Sampler, draft_probs: torch.Tensor | None = None
                        ) -> list[tuple[torch.Tensor, Choice]]:
        """One row's next token token_ids [1] and a draft of the tokens after it, through the chain in one step;
        the sampler then chooses position by position, given each draft token as its guess, until a choice differs
        from the draft → (logits, choice) of each position chosen: the draft's kept tokens, then one more. The
        session stands after all of them; `generate` rewinds it to what was kept. `draft_probs` [k, V]: the
        distributions the draft's tokens were sampled from (a sampling drafter's), else None."""
        input_ids = torch.tensor([[int(token_ids[0]), *draft]])
        hidden = await session.step(await self.stage.embed(input_ids, session.position))
        return await self.stage.run(self._verify, hidden, draft, sampler, draft_probs)

    def _verify(self, hidden: torch.Tensor, draft: list[int], sampler: Sampler,
                draft_probs: torch.Tensor | None = None) -> list[tuple[torch.Tensor, Choice]]:
        """On the head's thread: hidden [1, k+1, H] → the accepted positions (see `speculate`)."""
        all_logits = self.stage.head.logits(hidden)[0]  # [k+1, V]
        out = []
        for i in range(len(draft) + 1):
            logits = all_logits[i : i + 1]
            guess = torch.tensor([draft[i]]) if i < len(draft) else None
            q = draft_probs[i : i + 1] if draft_probs is not None and guess is not None else None
            choice = sampler(logits, guess, q)
            out.append((logits, choice))
            if guess is None or int(choice.token_ids[0]) != draft[i]:
                break
        return out

    def close(self) -> None:
        if self.groups is not None:
            self.groups.close()
        self.stage.close()
