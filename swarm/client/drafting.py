"""Drafts for speculative decoding from a small local model that shares the served model's tokenizer.

Prompt lookup (swarm.client.speculation) drafts only what the text repeats. Free text needs a model that guesses it:
a drafter, run by the client itself (the gateway: `GATEWAY_DRAFT_MODEL`), e.g. Llama 3.2 1B beside a swarm serving
Llama 3.1 70B. Each draft is then verified in one pass through the chain, as prompt lookup's are, so the output is
the same (greedy: token-identical, the drafts being the drafter's argmax; sampled: distributed as plain sampling, the
drafts being sampled from the drafter's own distribution q, which the verification is given:
swarm_kernels.sampling.sample_with_draft).

    drafts = DraftModel.load("path/or/hub-id", tokenizer, vocab_size)   # refused unless the vocabularies agree
    drafter = ModelDrafter(drafts, prompt_ids)                          # per one-choice generation
    draft = await drafter.propose(limit)   # then drafter.result(len(draft), kept); drafter.extend(chosen tokens)

A `ModelDrafter` drafts by prompt lookup first (free: no forward), by the model where that finds nothing. Its model
keeps a KV cache of the text so far, cropped back to what the chain kept; the prompt is read into it (in chunks)
while the chain reads it (`prepare`), or from the first step that may draft on, plain steps meanwhile. All its
forwards run on the model's one thread, never on the event loop; a generation that finds the thread busy with
another's draft or prompt takes a plain step rather than wait. The generations' caches share a budget of tokens
(`GATEWAY_DRAFT_KV_TOKENS`): one that finds it spent drafts by prompt lookup only, as does one whose draft model
failed. How many tokens to draft is chosen per step by the expected tokens per second, (1 − α^(k+1)) / (1 − α)
tokens in a verifying step's time plus k drafts', against one token in a plain step's time, from the acceptance α
and the times it measured; a draft also stops where the top of the model's distribution (after the request's
temperature and cuts) is below `min_probability`. Where drafting does not pay (a fast chain, a poor or slow
drafter) it drafts one token now and then to notice when it would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from swarm.client.speculation import PromptLookup, common_prefix
from swarm_kernels.sampling import SamplingParams, probabilities

logger = logging.getLogger(__name__)
T = TypeVar("T")


class IncompatibleDrafter(ValueError):
    """The draft model cannot draft for this model (another vocabulary, no tokenizer to compare)."""


class DraftModel:
    """A model on the client's CPU: every block of it as a peer runs them (swarm.model.span, the peers' kernels and
    default precision) and its own embedding and head, shared by every generation's ModelDrafter; forwards on one
    thread."""

    def __init__(self, span: Any, head: Any, vocab_size: int, name: str = "drafter", max_length: int = 1 << 30,
                 budget_tokens: int = 32768):
        self.span, self.head = span, head
        self.vocab_size = vocab_size  # the served model's: a draft never proposes a token it cannot have
        self.name = name
        self.max_length = max_length
        self.budget_tokens = budget_tokens
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-draft")
        self._lock = threading.Lock()
        self.busy = 0  # jobs queued or running on the thread
        self.held = 0  # tokens of budget_tokens the generations' caches hold
        self.closed = False
        # SWARM_DRAFT_SAMPLED=0: sampled generations get greedy drafts, verified as deterministic ones (for
        # measurements: they are kept p(d) of the time instead of 1 - TV(p, q))
        self.sample_drafts = os.environ.get("SWARM_DRAFT_SAMPLED", "1") != "0"

    @classmethod
    def load(cls, ref: str, tokenizer: Any, vocab_size: int, budget_tokens: int = 32768) -> DraftModel:
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
                   int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 30, budget_tokens)

    def new_cache(self) -> Any:
        return self.span.new_cache(self.max_length)

    @torch.inference_mode()
    def forward(self, tokens: list[int], cache: Any, position: int) -> torch.Tensor:
        """`tokens` at `position` of `cache` (what it held after that is forgotten) → the logits after the last [V]."""
        hidden = self.span(self.head.embed(torch.tensor([tokens]), position), cache, position)
        logits = self.head.logits(hidden[:, -1:])[0, -1, : self.vocab_size]
        if len(logits) < self.vocab_size:  # a head of fewer rows than the served model's (its tokenizer's vocabulary
            # fits both): the rows it lacks are tokens it never proposes
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - len(logits)), value=float("-inf"))
        return logits

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """`fn(*args)` on the model's thread; `busy` counts it from now until the thread is done with it (a caller
        that stops awaiting does not end the job)."""
        job = self._executor.submit(fn, *args)
        with self._lock:
            self.busy += 1
        job.add_done_callback(self._done)
        return job

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.wrap_future(self.submit(fn, *args))

    def _done(self, _job: Any) -> None:
        with self._lock:
            self.busy -= 1

    def reserve(self, tokens: int) -> bool:
        """Take `tokens` of the KV budget shared by every generation's cache (False, taking nothing, past it)."""
        with self._lock:
            if self.held + tokens > self.budget_tokens:
                return False
            self.held += tokens
            return True

    def release(self, tokens: int) -> None:
        with self._lock:
            self.held -= tokens

    def close(self) -> None:
        self.closed = True  # a prompt being read stops at its next chunk
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
    """Drafts for one row (the interface of PromptLookup, `propose` awaited): prompt lookup, else the draft model.
    `close()` when the generation ends: it frees the cache and its share of the budget."""

    MAX_DRAFT = 8
    FIRST_DRAFT = 4  # until the times of a draft and a step have been measured
    PROBE_EVERY = 16  # where drafting does not pay: steps between one-token drafts that keep α and the times current
    DECAY = 0.9  # weight of the past in α's counts, per draft
    PROMPT_CHUNK = 256  # prompt tokens per forward while the cache reads a prompt (a closed drafter stops between)
    BUDGET_CHUNK = 128  # tokens of the model's budget taken at a time

    def __init__(self, model: DraftModel, context: Sequence[int], prediction: Sequence[int] = (),
                 min_probability: float = 0.2, params: SamplingParams | None = None):
        self._lookup = PromptLookup(context, prediction)
        self._model = model
        self.min_probability = min_probability
        # sampled generations: drafts are sampled from the model's distribution under the request's parameters, and
        # verified against it (swarm_kernels.sampling.sample_with_draft); greedy ones draft the argmax
        self._params = params if params is not None and not params.greedy and model.sample_drafts else None
        self._generator = torch.Generator() if self._params is not None else None
        if self._generator is not None:
            self._generator.seed()
        self._probs: torch.Tensor | None = None  # the last model draft's q rows [k, V] (sampled drafts)
        self._tokens = list(context)  # the text so far (prompt and chosen tokens)
        self._fed: list[int] = []  # the tokens in the model's cache, in order (drafter thread only)
        self._cache: Any = None
        self._warm: asyncio.Future | None = None  # the prompt read into the cache
        self._reserved = 0  # tokens of the model's budget this drafter holds
        self._off = False  # the model drafts no more for this generation (a failure, no budget, closed)
        self._hits, self._misses = 2.0, 1.0  # drafted tokens kept, drafts cut short: α ≈ hits / (hits + misses)
        self._draft_seconds: float | None = None  # a forward of one drafted token, measured
        self._step_seconds: float | None = None  # a verifying step, measured
        self._plain_seconds: float | None = None  # a plain step (no draft), measured
        self._plain_since: float | None = None  # when the last empty proposal ended (its plain step then ran)
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
        if self._plain_since is not None:  # the token of the plain step after an empty proposal
            self._plain_seconds = _average(self._plain_seconds, time.perf_counter() - self._plain_since)
            self._plain_since = None
        tokens = list(tokens)
        self._tokens.extend(tokens)
        self._lookup.extend(tokens)

    async def propose(self, limit: int) -> list[int]:
        draft = await self._propose(limit)
        self._plain_since = None if draft else time.perf_counter()
        return draft

    async def _propose(self, limit: int) -> list[int]:
        found = self._lookup.draft(limit)
        self._probs = None
        if found:
            self._source = "lookup"
            return found
        self._source = ""
        # the cache ends a draft of k holding len(tokens) + k - 1 tokens
        limit = min(limit, self.MAX_DRAFT, self._model.max_length - len(self._tokens) + 1)
        if limit <= 0 or self._off or self._model.busy:
            return []  # (busy: another generation's draft or prompt; a plain step rather than a wait)
        if self._warm is None:
            self.prepare()  # the prompt, read now; plain steps meanwhile
            return []
        if not self._warm.done():
            return []
        if self._warm.cancelled() or self._warm.exception() is not None:
            self._fail("reading a prompt", None if self._warm.cancelled() else self._warm.exception())
            return []
        length = self._length(limit)
        if length == 0 or not self._hold(len(self._tokens) + length - 1):
            return []
        began = time.perf_counter()
        try:
            draft, forwards, probs = await self._model.run(self._draft, list(self._tokens), length)
        except Exception as e:
            self._fail("drafting", e)
            return []
        self._draft_seconds = _average(self._draft_seconds, (time.perf_counter() - began) / max(1, forwards))
        if not draft:  # the model doubted its first token: a step of no draft, charged as one cut short
            self._misses = self.DECAY * self._misses + 1
            return []
        self._source = "model"
        self._probs = probs
        self._proposed_at = time.perf_counter()
        return draft

    def probabilities(self) -> torch.Tensor | None:
        """The distributions [k, V] the last proposal's tokens were sampled from (None: chosen deterministically)."""
        return self._probs

    def prepare(self) -> None:
        """Start reading the text so far into the cache (the prompt, while the chain reads it), unless that has
        begun, the model is busy or its budget is spent."""
        if self._warm is None and not self._off and not self._model.busy and self._hold(len(self._tokens)):
            self._warm = self._model.run(self._read_prompt, list(self._tokens[:-1]))

    def _hold(self, tokens: int) -> bool:
        """Hold budget for a cache of `tokens` (in chunks, as the peers' caches grow); past the model's budget, this
        generation drafts by prompt lookup only."""
        if tokens > self._reserved:
            more = -(-(tokens - self._reserved) // self.BUDGET_CHUNK) * self.BUDGET_CHUNK
            if not self._model.reserve(more):
                self._off = True
                return False
            self._reserved += more
        return True

    def _fail(self, doing: str, error: BaseException | None) -> None:
        if error is not None:
            logger.warning("draft model failed %s (this generation drafts by prompt lookup only): %r", doing, error)
        self._off = True

    def close(self) -> None:
        self._off = True
        if self._warm is not None and not self._warm.done():
            self._warm.cancel()
        if self._reserved:
            self._model.release(self._reserved)
            self._reserved = 0
        if self._cache is not None or self._warm is not None:
            try:
                self._model.submit(self._drop)  # after whatever of this drafter's is still on the thread
            except RuntimeError:  # the model is closed: its thread runs nothing more
                self._drop()

    def draft(self, limit: int) -> list[int]:
        """Prompt lookup's draft only (no forward: for callers that cannot wait)."""
        self._probs, self._source = None, "lookup"
        return self._lookup.draft(limit)

    def result(self, drafted: int, kept: int) -> None:
        if self._source == "lookup":
            self._lookup.result(drafted, kept)
            return
        assert self._source == "model", "result() follows a proposal"
        self._step_seconds = _average(self._step_seconds, time.perf_counter() - self._proposed_at)
        self.model_drafted += drafted
        self.model_kept += kept
        self._hits = self.DECAY * self._hits + kept
        self._misses = self.DECAY * self._misses + (kept < drafted)

    def _length(self, limit: int) -> int:
        """The draft length with the most expected tokens per second (0: a plain step is better)."""
        if self._draft_seconds is None or self._step_seconds is None:
            return min(limit, self.FIRST_DRAFT)
        alpha, step = min(self.acceptance, 0.99), max(self._step_seconds, 1e-6)
        best, best_rate = 0, 1.0 / max(self._plain_seconds or step, 1e-6)  # a plain step's rate, as measured
        for k in range(1, limit + 1):
            rate = (1 - alpha ** (k + 1)) / (1 - alpha) / (step + k * self._draft_seconds)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self._skipped += 1
            if self._skipped >= self.PROBE_EVERY:
                self._skipped, best = 0, 1
        return best

    # on the draft model's thread
    def _read_prompt(self, tokens: list[int]) -> None:
        for end in range(self.PROMPT_CHUNK, len(tokens) + self.PROMPT_CHUNK, self.PROMPT_CHUNK):
            if self._off or self._model.closed:
                return
            self._feed(tokens[: min(end, len(tokens))])

    def _drop(self) -> None:
        self._cache, self._fed = None, []

    def _feed(self, tokens: list[int], last: bool = False) -> torch.Tensor | None:
        """Bring the cache to `tokens` (what it shares with them kept, the rest read; with `last`, at least their
        last token read, so that its logits come out) → the logits after the last of them [V] (None when nothing
        was read)."""
        common = len(self._fed)
        if common > len(tokens) or tokens[:common] != self._fed:
            common = common_prefix(self._fed, tokens)
        if last:
            common = min(common, len(tokens) - 1)
        del self._fed[common:]
        new = tokens[common:]
        if not new:
            return None
        if self._cache is None:
            self._cache = self._model.new_cache()
        logits = self._model.forward(new, self._cache, common)
        self._fed.extend(new)
        return logits

    def _draft(self, tokens: list[int], length: int) -> tuple[list[int], int, torch.Tensor | None]:
        """Up to `length` tokens after `tokens` (greedy, or sampled under the request's parameters), each from a
        distribution whose top token has at least min_probability, the forwards that took, and (sampled) those
        distributions [k, V]."""
        logits = self._feed(tokens, last=True)
        draft: list[int] = []
        rows: list[torch.Tensor] = []
        forwards = 1
        while logits is not None and len(draft) < length:
            if self._params is None:
                probability, token = torch.softmax(logits.float(), -1).max(-1)
            else:
                q = probabilities(logits[None], self._params)[0]
                probability = q.max()
                token = torch.multinomial(q, 1, generator=self._generator)[0]
            if float(probability) < self.min_probability:
                break
            draft.append(int(token))
            if self._params is not None:
                rows.append(q)
            if len(draft) < length:
                logits = self._model.forward([draft[-1]], self._cache, len(self._fed))
                self._fed.append(draft[-1])
                forwards += 1
        return draft, forwards, torch.stack(rows) if rows else None


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new
