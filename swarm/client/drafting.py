"""Drafts for speculative decoding from a small local model that shares the served model's tokenizer.

Prompt lookup (swarm.client.speculation) drafts only what the text repeats. Free text needs a model that guesses it:
a drafter, run by the client itself (the gateway: `GATEWAY_DRAFT_MODEL`), e.g. Llama 3.2 1B beside a swarm serving
Llama 3.1 70B. Each draft is then verified in one pass through the chain, as prompt lookup's are, so the output is
the same (greedy: token-identical; sampled: distributed as plain sampling, the draft being one token each position
as prompt lookup's are).

    drafts = DraftModel.load("path/or/hub-id", tokenizer, vocab_size)   # refused unless the vocabularies agree
    drafter = ModelDrafter(drafts, prompt_ids)                          # per one-choice generation
    draft = await drafter.propose(limit)   # then drafter.result(len(draft), kept); drafter.extend(chosen tokens)

A `ModelDrafter` drafts by prompt lookup first (free: no forward), by the model where that finds nothing. Its model
keeps a KV cache of the text so far, cropped back to what the chain kept; the prompt is read into it off the event
loop while the chain reads it (plain steps until then). All its forwards run on the model's one thread, never on the
event loop; a generation that finds the thread busy with another's draft or prompt takes a plain step rather than
wait. How many tokens to draft is chosen per step by the expected tokens per
second, (1 − α^(k+1)) / (1 − α) tokens in (step + k × draft) seconds, from the acceptance α and the times it
measured; a draft also stops at a token the model itself gives less than `min_probability`. Where drafting does not
pay (a fast chain, a poor drafter) it drafts one token now and then to notice when it would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from swarm.client.speculation import PromptLookup

logger = logging.getLogger(__name__)
T = TypeVar("T")


class IncompatibleDrafter(ValueError):
    """The draft model cannot draft for this model (another vocabulary, no tokenizer to compare)."""


class DraftModel:
    """A model on the client's CPU: every block of it as a peer runs them (swarm.model.span, the peers' kernels and
    default precision) and its own embedding and head, shared by every generation's ModelDrafter; forwards on one
    thread."""

    def __init__(self, span: Any, head: Any, vocab_size: int, name: str = "drafter", max_length: int = 1 << 30):
        self.span, self.head = span, head
        self.vocab_size = vocab_size  # the served model's: a draft never proposes a token it cannot have
        self.name = name
        self.max_length = max_length
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-draft")
        self.busy = 0  # jobs queued or running on the thread


    @classmethod
    def load(cls, ref: str, tokenizer: Any, vocab_size: int) -> DraftModel:
        """Blocking: the model at `ref` (anything swarm.model.source resolves: a directory, a GGUF file, a hub id,
        the packaged models) at a peer's default CPU precision; IncompatibleDrafter unless its tokenizer's
        vocabulary is `tokenizer`'s."""
        from transformers import AutoTokenizer

        from swarm.model.anatomy import load_config
        from swarm.model.head import LocalHead, load_head
        from swarm.model.precision import choose_precision
        from swarm.model.source import resolve_model
        from swarm.model.span import load_span

        source = resolve_model(ref)
        try:
            own = AutoTokenizer.from_pretrained(source.path)
        except (OSError, ValueError) as e:
            raise IncompatibleDrafter(f"draft model {ref!r} has no tokenizer to compare with the served model's: {e}"
                                      ) from e
        check_vocabularies(own, tokenizer, ref)
        config = load_config(source.path)
        head = load_head(source)
        if not isinstance(head, LocalHead):
            raise IncompatibleDrafter(f"draft model {ref!r} is not a generating model")
        precision = choose_precision("cpu", "float32", "auto", source.native_quant)
        span = load_span(source, 0, config.num_hidden_layers, precision=precision)
        logger.info("draft model %s loaded (%d blocks, %s)", source.model_id, config.num_hidden_layers,
                    precision.describe())
        return cls(span, head, vocab_size, source.model_id,
                   int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 30)

    def new_cache(self) -> Any:
        return self.span.new_cache(self.max_length)

    @torch.inference_mode()
    def forward(self, tokens: list[int], cache: Any, position: int) -> torch.Tensor:
        """`tokens` at `position` of `cache` (what it held after that is forgotten) → the logits after the last [V]."""
        hidden = self.span(self.head.embed(torch.tensor([tokens]), position), cache, position)
        return self.head.logits(hidden[:, -1:])[0, -1, : self.vocab_size]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.busy -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def check_vocabularies(drafter: Any, served: Any, ref: str = "the draft model") -> None:
    """IncompatibleDrafter unless the two tokenizers map the same strings to the same ids (special tokens included):
    a draft is a list of ids the served model reads as its own."""
    mine, theirs = drafter.get_vocab(), served.get_vocab()
    if mine != theirs:
        differing = len(set(mine.items()) ^ set(theirs.items()))
        raise IncompatibleDrafter(f"{ref} does not share the served model's tokenizer ({len(mine)} vs {len(theirs)} "
                                  f"tokens, {differing} entries differ)")


class ModelDrafter:
    """Drafts for one row (the interface of PromptLookup, `propose` awaited): prompt lookup, else the draft model."""

    MAX_DRAFT = 8
    FIRST_DRAFT = 4  # until the times of a draft and a step have been measured
    PROBE_EVERY = 16  # where drafting does not pay: steps between one-token drafts that keep α and the times current
    DECAY = 0.9  # weight of the past in α's counts, per draft

    def __init__(self, model: DraftModel, context: Sequence[int], prediction: Sequence[int] = (),
                 min_probability: float = 0.2):
        self._lookup = PromptLookup(context, prediction)
        self._model = model
        self.min_probability = min_probability
        self._tokens = list(context)  # the text so far (prompt and chosen tokens)
        self._fed: list[int] = []  # the tokens in the model's cache, in order (drafter thread only)
        self._cache: Any = None
        self._warm: asyncio.Future | None = None  # the prompt read into the cache
        self._hits, self._misses = 2.0, 1.0  # drafted tokens kept, drafts cut short: α ≈ hits / (hits + misses)
        self._draft_seconds: float | None = None  # a drafted token, measured
        self._step_seconds: float | None = None  # a verifying step, measured
        self._proposed_at = 0.0
        self._source = ""
        self._skipped = 0
        self.model_drafted = self.model_kept = 0

    @property
    def drafted(self) -> int:
        return self._lookup.drafted + self.model_drafted

    @property
    def kept(self) -> int:
        return self._lookup.kept + self.model_kept

    @property
    def acceptance(self) -> float:
        return self._hits / (self._hits + self._misses)

    def extend(self, tokens: Iterable[int]) -> None:
        tokens = list(tokens)
        self._tokens.extend(tokens)
        self._lookup.extend(tokens)

    async def propose(self, limit: int) -> list[int]:
        found = self._lookup.draft(limit)
        if found:
            self._source = "lookup"
            return found
        self._source = ""
        if limit <= 0 or len(self._tokens) + limit > self._model.max_length or self._model.busy:
            return []  # (busy: another generation's draft or prompt; a plain step rather than a wait)
        if self._warm is None:  # the prompt, read while the chain reads it; plain steps meanwhile
            self._warm = asyncio.ensure_future(self._model.run(self._feed, list(self._tokens[:-1])))
            self._warm.add_done_callback(lambda done: done.cancelled() or done.exception())  # read below
            return []
        if not self._warm.done():
            return []
        if self._warm.exception() is not None:
            if self._skipped == 0:
                logger.warning("draft model failed on a prompt: %r", self._warm.exception())
            self._skipped = 1
            return []
        length = self._length(limit)
        if length == 0:
            return []
        began = time.perf_counter()
        draft = await self._model.run(self._draft, list(self._tokens), length)
        if draft:
            self._draft_seconds = _average(self._draft_seconds, (time.perf_counter() - began) / len(draft))
            self._source = "model"
            self._proposed_at = time.perf_counter()
        return draft

    def draft(self, limit: int) -> list[int]:
        """Prompt lookup's draft only (no forward: for callers that cannot wait)."""
        return self._lookup.draft(limit)

    def result(self, drafted: int, kept: int) -> None:
        if self._source == "lookup":
            self._lookup.result(drafted, kept)
            return
        self._step_seconds = _average(self._step_seconds, time.perf_counter() - self._proposed_at)
        self.model_drafted += drafted
        self.model_kept += kept
        self._hits = self.DECAY * self._hits + kept
        self._misses = self.DECAY * self._misses + (kept < drafted)

    def _length(self, limit: int) -> int:
        """The draft length with the most expected tokens per second (0: a plain step is better)."""
        limit = min(limit, self.MAX_DRAFT)
        if self._draft_seconds is None or self._step_seconds is None:
            return min(limit, self.FIRST_DRAFT)
        alpha = min(self.acceptance, 0.99)
        best, best_rate = 0, 1.0 / self._step_seconds
        for k in range(1, limit + 1):
            rate = (1 - alpha ** (k + 1)) / (1 - alpha) / (self._step_seconds + k * self._draft_seconds)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self._skipped += 1
            if self._skipped >= self.PROBE_EVERY:
                self._skipped, best = 0, 1
        return best

    # on the draft model's thread
    def _feed(self, tokens: list[int]) -> torch.Tensor | None:
        """Bring the cache to `tokens` (what it shares with them kept, the rest read) → the logits after the last of
        them [V] (None when there was nothing to read)."""
        common = len(self._fed)
        if common > len(tokens) or tokens[:common] != self._fed:
            common = next((i for i, (a, b) in enumerate(zip(self._fed, tokens, strict=False)) if a != b),
                          min(len(self._fed), len(tokens)))
            del self._fed[common:]
        new = tokens[common:]
        if not new:
            return None
        if self._cache is None:
            self._cache = self._model.new_cache()
        logits = self._model.forward(new, self._cache, common)
        self._fed.extend(new)
        return logits

    def _draft(self, tokens: list[int], length: int) -> list[int]:
        """Up to `length` greedy tokens after `tokens`, each at least min_probability to the model."""
        self._feed(tokens[:-1])  # the cache then lacks the last token, read below so that its logits come out
        logits = self._feed(tokens)
        draft: list[int] = []
        while logits is not None and len(draft) < length:
            probability, token = torch.softmax(logits.float(), -1).max(-1)
            if float(probability) < self.min_probability:
                break
            draft.append(int(token))
            if len(draft) < length:
                logits = self._feed(tokens + draft)
        return draft


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new
