"""The serving engine over a GenerationBackend: admission (model, complete chain, a concurrency slot from the fair
queue of `app.admission`), validated jobs, per-step text deltas of each choice (incremental detokenization and stop
strings by `app.detokenize`, finish reasons), and the `Generation` that owns an admitted request's slot and started
stream until it is closed.

The backend (the swarm in production, a fake in unit tests) yields token events; this module turns them into text
deltas. Shaping them into OpenAI bodies and SSE chunks is `app.completions`'s; nothing here knows about HTTP, peers,
torch or hivemind.

What a request may cost is bounded before it runs: its prompt's size before tokenizing, and tokenizing (chat template
included) runs in worker threads, a few at once (`tokenize`), never on the event loop; token ids inside the
vocabulary; a default cap on new tokens; temperatures and top_p too small for float32 sampling (below 1e-5, as vLLM)
sampled greedily, their limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from app.admission import Admission
from app.detokenize import ChoiceText
from app.errors import APIError, swarm_error
from app.keystore import UsageRow
from app.metrics import GatewayMetrics, log_generation
from app.metrics import request_id as current_request_id
from app.protocol.requests import ChatCompletionRequest, CompletionRequest
from app.protocol.responses import FinishReason, TokenLogprob, TopLogprob
from app.settings import GatewaySettings
from app.structured import ToolCall, ToolCallReader
from app.tenants import Access, Caller
from swarm.client.requests import GenerationRequest, Grammar, TokenEvent

logger = logging.getLogger(__name__)
T = TypeVar("T")
USAGE_COMMIT_TIMEOUT = 40.0  # the most a generation's end waits for its row (beyond the writer's lock retries)
MIN_TEMPERATURE = 1e-5  # below it (and top_p below it), sampling is greedy: the limit, without float32 overflow
CHARS_PER_TOKEN = 32  # the default prompt size cap: this many characters per token of the model's context


class GenerationBackend(Protocol):
    """What the gateway needs of a text model. `encode_chat` raises ValueError, with a message for the client, for
    messages its chat template refuses, and `check_grammar` for a grammar it cannot enforce; the tokenizer methods
    and `check_grammar` are called from worker threads."""

    model_id: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    native_tools: bool  # its chat template renders `tools` (else app.structured puts them in the messages)
    chats: bool  # it has a chat template (a base model may not: its prompts go to /v1/completions)

    async def missing_blocks(self) -> list[tuple[int, int]]: ...
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]: ...
    def check_grammar(self, grammar: Grammar) -> None: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_prompt(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_text(self, token_id: int) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...  # its own, where its text is part of a character
    def generate(self, request: GenerationRequest) -> AsyncGenerator[list[TokenEvent], None]: ...


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # completed in this step (their text is not in `text`)


@dataclass
class Job:
    """One validated prompt ready to run."""

    prompt_ids: list[int]
    request: GenerationRequest
    stops: list[str]
    index_offset: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of its prompt, the tokens a reused session did not compute again
    tool_names: frozenset[str] = frozenset()  # the tools offered: its text is read for calls of them
    single_call: bool = False  # parallel_tool_calls: false (an answer ends at its first call)
    limit_given: bool = False  # the request set its token limit (else a default one, which a key's limits may cut)
    forced_tools: frozenset[str] = frozenset()  # the tools a grammar makes its answer call, if any
    echo: str | None = None  # the prompt's text, to begin each choice's text with (/v1/completions' echo)
    route: tuple[str, ...] = ()  # the peers its session went through (as the first step found them)
    kept_drafts: int = 0  # speculative decoding: completion tokens that were drafted and kept
    rejected_drafts: int = 0  # drafted tokens computed and not kept


def _top_logprob(backend: GenerationBackend, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(token=backend.token_text(token_id), logprob=logprob, bytes=list(backend.token_bytes(token_id)))


def _token_logprob(backend: GenerationBackend, event: TokenEvent, logprob: float) -> TokenLogprob:
    return TokenLogprob(token=backend.token_text(event.token_id), logprob=logprob,
                        bytes=list(backend.token_bytes(event.token_id)),
                        top_logprobs=[_top_logprob(backend, t, lp) for t, lp in event.top_logprobs])


def _read_calls(reader: ToolCallReader, delta: Delta) -> None:
    """Move the tool calls out of a delta's text (app.structured). A choice that called a tool and ended by itself
    finishes with "tool_calls"; so does one that repeats a call, or calls a second time without parallel_tool_calls
    (it is ended there), or is cut by the token limit where nothing but markup followed its last whole call (a
    repeat begun, a next call's tag); one cut in a call returns it as far as it got, with "length"."""
    delta.text, delta.tool_calls = reader.feed(delta.text)
    if reader.ended and delta.finish_reason is None:
        delta.finish_reason = "tool_calls"
    if delta.finish_reason is None:
        return
    cut = reader.truncated() if delta.finish_reason == "length" else None
    if cut is not None:
        delta.tool_calls.append(cut)  # its arguments as far as they got, as OpenAI returns a call cut by max_tokens
    delta.text += reader.finish()
    # cut where only markup followed its last whole call (a repeat begun, the next call's tag): the answer is its calls
    whole = delta.finish_reason == "length" and not reader.wrote and not (cut is not None and cut.truncated)
    if reader.calls and (delta.finish_reason == "stop" or whole):
        delta.finish_reason = "tool_calls"


class ServingEngine:
    def __init__(self, backend: GenerationBackend, settings: GatewaySettings | None = None,
                 metrics: GatewayMetrics | None = None, access: Access | None = None):
        settings = settings or GatewaySettings()
        self.backend = backend
        self.metrics = metrics
        self.access = access  # keys' limits and usage rows (app.tenants); None: neither
        self.private = settings.gateway_private  # no session is reused, not even within one key
        self.speculative, self.speculative_below = settings.gateway_speculative, settings.gateway_speculative_below
        self.max_n = settings.gateway_max_n
        self.default_max_tokens = settings.gateway_default_max_tokens
        self.max_prompt_chars = settings.gateway_max_prompt_chars or CHARS_PER_TOKEN * backend.context_length
        self.admission = Admission(settings.gateway_max_concurrent, settings.gateway_max_queued,
                                   settings.gateway_queue_timeout)
        self._tokenizers = anyio.CapacityLimiter(settings.gateway_tokenize_threads)
        self.keepalive = settings.gateway_sse_keepalive  # seconds of silence before a stream gets a keep-alive
        self.recent_routes: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)  # for /v1/swarm

    @property
    def active(self) -> int:
        """Generations holding a slot."""
        return self.admission.active

    # ---- validation -------------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.backend.model_id:
            raise APIError(404, f"model {model!r} does not exist; this gateway serves {self.backend.model_id!r}",
                           "model", "model_not_found")

    async def check_available(self) -> None:
        missing = await self.backend.missing_blocks()
        if missing:
            spans = ", ".join(f"{s}:{e}" for s, e in missing)
            raise APIError(503, f"no live peers serve blocks {spans} of {self.backend.model_id}; retry later",
                           code="no_complete_chain", retry_after=5)

    def check_choices(self, choices: int) -> None:
        if choices > self.max_n:
            raise APIError(400, f"a request makes at most {self.max_n} choices (n, times the prompts)", "n",
                           "invalid_value")

    def check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse a prompt too long for the context by its characters alone, before it costs a tokenizer's time."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters; this gateway takes at most "
                                f"{self.max_prompt_chars} for {self.backend.model_id}", param,
                           "context_length_exceeded")

    async def tokenize(self, encode: Callable[..., T], *args: Any) -> T:
        """`encode(*args)` in a worker thread, at most `gateway_tokenize_threads` at once."""
        return await anyio.to_thread.run_sync(encode, *args, limiter=self._tokenizers)

    async def check_grammar(self, grammar: Grammar, param: str) -> None:
        """400 naming the reason when the backend cannot enforce `grammar` (compiled in a worker thread)."""
        try:
            await self.tokenize(self.backend.check_grammar, grammar)
        except ValueError as e:
            raise APIError(400, f"{param} cannot be enforced: {str(e)[:300]}", param, "invalid_value") from e

    def speculate(self, choices: int, prediction: bool = False,
                  seeded: bool = False) -> tuple[bool, Callable[[], bool] | None]:
        """Whether a request of `choices` choices decodes speculatively (drafts by prompt lookup: the same tokens,
        fewer steps through the chain when the answer repeats its input), and what is asked before each step
        whether to draft at it (None: every step). One choice only; with GATEWAY_SPECULATIVE=auto, drafts only at
        steps while fewer than GATEWAY_SPECULATIVE_BELOW other generations run (many share the peers' batched decode
        rounds better: a generation that began alone stops drafting when a burst arrives and joins their rounds, and
        drafts again once they have ended), at every step when the request sent a prediction; never in auto for
        seeded sampling, whose text would then depend on the load (drafting draws from the generator differently:
        the same distribution, another sample)."""
        if choices != 1 or self.speculative == "off" or (seeded and self.speculative == "auto"):
            return False, None
        if self.speculative == "on" or prediction:
            return True, None
        return True, self._few_others

    def _few_others(self) -> bool:
        return self.active - 1 < self.speculative_below  # active counts the asking generation itself

    def make_job(self, request: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                 logprobs: int | None, index_offset: int = 0, grammar: Grammar | None = None,
                 tool_names: frozenset[str] = frozenset(), echo: str | None = None, single_call: bool = False,
                 prediction: list[int] | None = None) -> Job:
        context, vocab = self.backend.context_length, self.backend.vocab_size
        self.check_choices(request.n)
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        if len(prompt_ids) >= context:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {context}",
                           param, "context_length_exceeded")
        if not all(0 <= t < vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param, "invalid_value")
        limit = request.token_limit
        if limit is not None and len(prompt_ids) + limit > context:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + {request.token_limit_param} ({limit}) exceeds "
                           f"the context of {context} tokens", request.token_limit_param, "context_length_exceeded")
        bias = {int(k): v for k, v in (request.logit_bias or {}).items()}  # decimal strings (validated)
        if not all(0 <= k < vocab for k in bias):
            raise APIError(400, f"logit_bias token ids must be in 0..{vocab - 1}", "logit_bias", "invalid_value")
        greedy = request.temperature < MIN_TEMPERATURE or request.top_p < MIN_TEMPERATURE or request.top_k == 1
        speculative, draft_while = self.speculate(request.n, bool(prediction), request.seed is not None and not greedy)
        generation = GenerationRequest(
            prompt_ids=prompt_ids, max_new_tokens=limit or self._default_limit(len(prompt_ids)), n=request.n,
            temperature=0.0 if greedy else request.temperature, top_p=1.0 if greedy else request.top_p,
            seed=request.seed, top_k=0 if greedy else max(request.top_k, 0), min_p=0.0 if greedy else request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            logit_bias=bias, logprobs=logprobs, stop_token_ids=self.backend.eos_token_ids, grammar=grammar,
            prompt_logprobs=logprobs if echo is not None else None,
            speculative=speculative, draft_while=draft_while,
            prediction=tuple(prediction or ()),
        )
        return Job(prompt_ids, generation, request.stop_strings, index_offset, tool_names=tool_names, echo=echo,
                   single_call=single_call, limit_given=limit is not None)

    def _default_limit(self, prompt_tokens: int) -> int:
        rest = self.backend.context_length - prompt_tokens
        return min(self.default_max_tokens, rest) if self.default_max_tokens else rest

    # ---- running ----------------------------------------------------------------------------------------------
    async def deltas(self, job: Job) -> AsyncGenerator[list[Delta], None]:
        """Per step, the text deltas of the job's choices; every choice ends with a finish_reason."""
        n, limit = job.request.n, job.request.max_new_tokens
        texts = [ChoiceText(self.backend.decode, job.stops) for _ in range(n)]
        readers = [ToolCallReader(set(job.tool_names), job.single_call, job.forced_tools)
                   for _ in range(n)] if job.tool_names else None
        prompt_entries: list[TokenLogprob] | None = None  # the echoed prompt's, built once for every choice
        counts, finished = [0] * n, [False] * n
        stream = self.backend.generate(job.request)
        try:
            async for events in stream:
                if not any(counts):  # the first step: its events say how much of the prompt was cached, and where
                    cached = max((event.cached_prompt_tokens for event in events), default=0)
                    job.cached_prompt_tokens = min(max(cached, 0), len(job.prompt_ids))
                    job.route = next((event.route for event in events if event.route), ())
                step = []
                for event in events:
                    i = event.index
                    if finished[i]:
                        continue
                    counts[i] += 1
                    job.kept_drafts += event.kept_draft
                    job.rejected_drafts += event.rejected_drafts
                    delta = Delta(i + job.index_offset, "")
                    if event.prompt_logprobs is not None and counts[i] == 1:
                        if prompt_entries is None:  # thousands of entries: off the event loop
                            prompt_entries = await self.tokenize(self._prompt_logprobs, job.prompt_ids,
                                                                 event.prompt_logprobs)
                        delta.logprobs.extend(prompt_entries)
                    if event.logprob is not None and not event.stop:  # the end token is in no text (as OpenAI)
                        delta.logprobs.append(_token_logprob(self.backend, event, event.logprob))
                    if event.stop:
                        delta.text, delta.finish_reason = texts[i].flush(), "stop"
                    else:
                        delta.text = texts[i].add(event.token_id)
                        if texts[i].stopped:
                            delta.finish_reason = "stop"
                        elif counts[i] >= limit:
                            delta.text += texts[i].flush()
                            delta.finish_reason = "length"
                    if readers is not None:
                        _read_calls(readers[i], delta)
                    if job.echo is not None and counts[i] == 1:
                        delta.text = job.echo + delta.text
                    finished[i] = delta.finish_reason is not None
                    if finished[i]:  # drafts computed after this token are in no completion: rejected
                        job.rejected_drafts += event.unused_drafts
                    step.append(delta)
                if step:
                    yield step
                if all(finished):
                    break
        finally:
            await stream.aclose()
            job.completion_tokens = sum(counts)
        leftovers = [Delta(i + job.index_offset, texts[i].flush(), "length") for i in range(n) if not finished[i]]
        for delta in leftovers if readers is not None else []:
            _read_calls(readers[delta.index - job.index_offset], delta)  # type: ignore[index]
        if leftovers:
            yield leftovers

    def _prompt_logprobs(self, prompt_ids: list[int], scores: Sequence[tuple[float | None, Sequence[tuple[int,
                                                                                                          float]]]]
                         ) -> list[TokenLogprob]:
        """The echoed prompt's tokens with their log-probabilities (the first has none); in a worker thread."""
        texts: dict[int, tuple[str, list[int]]] = {}

        def text_of(token_id: int) -> tuple[str, list[int]]:
            if token_id not in texts:
                texts[token_id] = self.backend.token_text(token_id), list(self.backend.token_bytes(token_id))
            return texts[token_id]

        out = []
        for token_id, (logprob, top) in zip(prompt_ids, scores, strict=False):
            text, data = text_of(token_id)
            out.append(TokenLogprob(token=text, logprob=logprob, bytes=data, top_logprobs=[
                TopLogprob(token=text_of(t)[0], logprob=lp, bytes=text_of(t)[1]) for t, lp in top]))
        return out

    async def start(self, jobs: list[Job], caller: Caller | None = None, request_id: str | None = None
                    ) -> Generation:
        """Admit the jobs and run their first step: the caller's key's limits (429 over one), a slot (waiting for one
        in the caller's turn; 429 when the queue is full or the wait too long), a complete chain, then the first
        step, so that whatever fails at start-up is an HTTP error. The caller owns the returned generation and must
        close it; on failure here, it is closed (its slot, stream and limits released, its usage row written)
        before the error is raised."""
        caller = caller or Caller("")
        tenant = None if self.private else caller.name  # prefix reuse stays within one caller (swarm.client.textgen)
        for job in jobs:
            job.request = dataclasses.replace(job.request, tenant=tenant)
        generation = Generation(self, jobs, caller, request_id=request_id)
        try:
            await generation.admit()
            await self.check_available()
            await generation.start()
        except BaseException as e:
            error = swarm_error(e) if isinstance(e, Exception) else None
            generation.outcome = error.code or "error" if error is not None else "cancelled"
            await generation.aclose()
            raise error or e from None
        return generation

    def release_slot(self) -> None:
        self.admission.release()

    def admit_caller(self, caller: Caller, jobs: list[Job]) -> None:
        """Hold the caller's share of its key's limits for the jobs, at most tokens (429 over a limit). Jobs that set
        no token limit have their default one cut to what the key has left (app.tenants)."""
        if self.access is None:
            return
        prompt = sum(len(job.prompt_ids) for job in jobs)
        room = self.access.room(caller, prompt)
        choices = sum(job.request.n for job in jobs)
        if room is not None and room >= choices and not any(job.limit_given for job in jobs):
            for job in jobs:
                cut = min(job.request.max_new_tokens, room // choices)
                job.request = dataclasses.replace(job.request, max_new_tokens=cut)
        new = sum(job.request.max_new_tokens * job.request.n for job in jobs)
        self.access.admit(caller, prompt + new, prompt, new)


class Generation:
    """A request's generation: once admitted (`admit`: its key's limits, then one concurrency slot) it holds the slot,
    its share of the limits and the stream of its jobs' deltas (the jobs run one after another). Iterate it for the
    steps; `aclose` (or leaving `async with`) closes the stream, which closes the backend's generation and settles
    each job's `completion_tokens`, then frees the slot and the limits: once, on every path, whoever calls it first.
    Closing it also reports it: metrics (app.metrics), one log line and its usage row, which `aclose` waits to see
    committed (so an answer whose last byte was sent is never missing from the usage table)."""

    def __init__(self, engine: ServingEngine, jobs: list[Job], caller: Caller | None = None,
                 request_id: str | None = None):
        self.jobs = jobs
        self._engine = engine
        self._stream = self._steps()
        self._first: list[Delta] | None = None
        self._closed = False
        self._slot = False  # whether it holds a slot
        self._began = False  # whether its first step was begun (its prompt sent to the swarm)
        self.id = request_id or current_request_id()  # in the answer's x-request-id, the log line, /v1/swarm
        self.caller = caller or Caller("")
        self.client = self.caller.name
        self.arrived = time.monotonic()
        self.first_token: float | None = None  # when the first step came (monotonic)
        self._last = 0.0
        self.outcome = "cancelled"  # until the steps end ("ok") or fail ("error")

    async def _steps(self) -> AsyncGenerator[list[Delta], None]:
        try:
            for job in self.jobs:
                async with contextlib.aclosing(self._engine.deltas(job)) as deltas:  # closed with us, not the GC
                    async for step in deltas:
                        self._stamp()
                        yield step
        except Exception:
            self.outcome = "error"
            raise
        self.outcome = "ok"

    def _stamp(self) -> None:
        now = time.monotonic()
        metrics = self._engine.metrics
        if self.first_token is None:
            self.first_token = now
            if metrics is not None:
                metrics.ttft.observe(now - self.arrived)
        elif metrics is not None:
            metrics.gap.observe(now - self._last)
        self._last = now

    def _report(self) -> asyncio.Future[None] | None:
        now = time.monotonic()
        # a request whose first step never began (refused, or failed before it) used nothing; one that began it
        # (cancelled during its prefill included) pays for its prompt
        prompt = sum(len(job.prompt_ids) for job in self.jobs) if self._began else 0
        completion = sum(job.completion_tokens for job in self.jobs)
        cached = sum(job.cached_prompt_tokens for job in self.jobs)
        route = self.jobs[0].route if self.jobs else ()
        if route:
            self._engine.recent_routes.append({"id": self.id, "route": list(route), "at": time.time()})
        metrics = self._engine.metrics
        if metrics is not None:
            metrics.generations.labels(self.outcome).inc()
            metrics.duration.observe(now - self.arrived)
            metrics.prompt_tokens.inc(prompt)
            metrics.completion_tokens.inc(completion)
            metrics.cached_tokens.inc(cached)
            metrics.draft_tokens.labels("kept").inc(sum(job.kept_drafts for job in self.jobs))
            metrics.draft_tokens.labels("rejected").inc(sum(job.rejected_drafts for job in self.jobs))
            if route:
                metrics.route_peers.observe(len(route))
        ttft = f"{1000 * (self.first_token - self.arrived):.0f}" if self.first_token is not None else "-"
        log_generation({"id": self.id, "client": self.client, "model": self._engine.backend.model_id,
                        "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
                        "ttft_ms": ttft, "duration_ms": f"{1000 * (now - self.arrived):.0f}",
                        "route": ",".join(peer[-8:] for peer in route) or "-", "outcome": self.outcome})
        access = self._engine.access
        if access is None:
            return None
        # a generation that failed on the swarm's side before any answer is not billed (as OpenAI bills no 5xx)
        billed = self.outcome in ("ok", "cancelled") or completion > 0
        cost = access.cost(self.caller, prompt, completion) if billed else 0.0
        return access.finish(self.caller, UsageRow(
            time.time(), self.caller.key_id, self._engine.backend.model_id, self.caller.endpoint, prompt, completion,
            cached, cost, round(1000 * (now - self.arrived)), self.outcome, self.id))

    async def admit(self) -> None:
        """Take the caller's share of its key's limits, then a slot (waiting in the caller's turn)."""
        self._engine.admit_caller(self.caller, self.jobs)
        await self._engine.admission.acquire(self.client)
        self._slot = True

    async def start(self) -> None:
        self._began = True
        self._first = await anext(self._stream)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> list[Delta]:
        if self._first is not None:
            step, self._first = self._first, None
            return step
        return await anext(self._stream)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.aclose()
        finally:
            if self._slot:
                self._engine.release_slot()
            committed = self._report()
            if committed is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(committed), USAGE_COMMIT_TIMEOUT)
                except TimeoutError:
                    logger.error("request %s: its usage row was not committed within %g s", self.id,
                                 USAGE_COMMIT_TIMEOUT)
                except Exception:  # logged by the writer; the answer goes on
                    pass

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()
