"""Chat and text completion requests end to end: jobs from the request, a started generation, and its answer as
one typed body (JSON) or a stream of typed chunks (SSE).

Everything that can be refused is refused before the first byte of a stream: validation, the model, a complete
chain, and the first generation step (so that a full swarm answers 503, not a broken stream). A failure after that
becomes an SSE error event followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.responses import Response

from app.errors import APIError, swarm_error
from app.metrics import request_id as current_request_id
from app.protocol.requests import ChatCompletionRequest, CompletionRequest
from app.protocol.responses import (
    CHUNK_WITHOUT_USAGE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    DeltaToolCall,
    FinishReason,
    FunctionCall,
    TextCompletion,
    TextCompletionChunk,
    TextOffsets,
    TokenLogprob,
    ToolCallOut,
    Usage,
)
from app.rendering import DONE, EventStream, json_response, sse, with_keepalive
from app.serving import Delta, Generation, Job, ServingEngine
from app.structured import ToolCall, forced_tools, grammar_for, offered_tools, template_messages
from app.tenants import Caller

logger = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class Collected:
    """One choice gathered from all its deltas: what a non-streaming answer reports."""

    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.logprobs.extend(delta.logprobs)
        self.tool_calls.extend(delta.tool_calls)


def _call(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _function(calls: list[ToolCall]) -> FunctionCall | None:
    """The legacy API's one call (the request asked for no parallel calls: there is at most one)."""
    return FunctionCall(name=calls[0].name, arguments=calls[0].arguments) if calls else None


class _Answer:
    """The OpenAI objects answering one request share its id, creation time and model name."""

    prefix = ""

    def __init__(self, model: str):
        self.id, self.created, self.model = new_id(self.prefix), int(time.time()), model


class ChatAnswer(_Answer):
    """/v1/chat/completions: a `chat.completion` body, or `chat.completion.chunk`s opening with the role. Tool calls
    (read out of the text by the engine) go in `tool_calls`; a stream sends each one whole, in the chunk of the step
    that completed it; a choice of calls alone has null content."""

    prefix = "chatcmpl"

    def __init__(self, model: str, legacy_functions: bool = False):
        super().__init__(model)
        self.legacy = legacy_functions  # the request used `functions`: its one call is the message's `function_call`

    def body(self, choices: list[Collected], usage: Usage, logprobs: bool) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChoice(index=i, message=self._message(c), finish_reason=self._finish(c.finish_reason),
                       logprobs=ChatLogprobs(content=c.logprobs) if logprobs else None)
            for i, c in enumerate(choices)])

    def _message(self, choice: Collected) -> AssistantMessage:
        content = choice.text if choice.text or not choice.tool_calls else None
        if self.legacy:
            return AssistantMessage(content=content, function_call=_function(choice.tool_calls))
        return AssistantMessage(content=content, tool_calls=[_call(k) for k in choice.tool_calls] or None)

    def _finish(self, reason: FinishReason | None) -> FinishReason | None:
        return "function_call" if self.legacy and reason == "tool_calls" else reason

    def opening(self, n: int) -> ChatCompletionChunk | None:
        return self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                            for i in range(n)])

    def chunk(self, deltas: list[Delta]) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(
            index=d.index, delta=self._delta(d), logprobs=ChatLogprobs(content=d.logprobs) if d.logprobs else None,
            finish_reason=self._finish(d.finish_reason))
            for d in deltas])

    def _delta(self, delta: Delta) -> DeltaMessage:
        if self.legacy:
            return DeltaMessage(content=delta.text or None, function_call=_function(delta.tool_calls))
        return DeltaMessage(content=delta.text or None, tool_calls=[
            DeltaToolCall(index=k.index, id=k.id, function=FunctionCall(name=k.name, arguments=k.arguments))
            for k in delta.tool_calls] or None)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class TextAnswer(_Answer):
    """/v1/completions: a `text_completion` body, or `text_completion` chunks of the new text."""

    prefix = "cmpl"

    def body(self, choices: list[Collected], usage: Usage, logprobs: bool) -> TextCompletion:
        return TextCompletion(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                             logprobs=CompletionLogprobs.of(c.logprobs) if logprobs else None)
            for i, c in enumerate(choices)])

    def __init__(self, model: str):
        super().__init__(model)
        self._offsets: dict[int, TextOffsets] = {}  # per choice, its text so far (text_offset)

    def opening(self, n: int) -> TextCompletionChunk | None:
        return None

    def chunk(self, deltas: list[Delta]) -> TextCompletionChunk:
        return self._chunk([CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                                             logprobs=self._logprobs(d) if d.logprobs else None) for d in deltas])

    def _logprobs(self, delta: Delta) -> CompletionLogprobs:
        return CompletionLogprobs.of(delta.logprobs, self._offsets.setdefault(delta.index, TextOffsets()))

    def usage_chunk(self, usage: Usage) -> TextCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> TextCompletionChunk:
        return TextCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


Answer = ChatAnswer | TextAnswer


def _usage(jobs: list[Job]) -> Usage:
    return Usage.of(sum(len(job.prompt_ids) for job in jobs), sum(job.completion_tokens for job in jobs),
                    sum(job.cached_prompt_tokens for job in jobs),
                    (sum(job.kept_drafts for job in jobs), sum(job.rejected_drafts for job in jobs)))


def _wants_logprobs(request: ChatCompletionRequest | CompletionRequest) -> bool:
    return request.logprobs is not None and request.logprobs is not False  # chat: a bool; text: an int, 0 included


class _Starting:
    """The owner of a stream whose generation is still starting: closing it cancels the start, or closes the
    generation once it has started."""

    def __init__(self, task: asyncio.Task[Generation]):
        self.task = task

    async def aclose(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(BaseException):
            await (await self.task).aclose()


async def stream_response(engine: ServingEngine, jobs: list[Job], caller: Caller,
                          events: Callable[[Generation], AsyncIterator[str]],
                          failed: Callable[[APIError], AsyncIterator[str]]) -> Response:
    """A streamed answer. A generation that starts (a slot, a chain, the first step) within `engine.keepalive`
    seconds, or fails to, is an event stream or an HTTP error, as usual. One that takes longer (a queue, a long
    prefill) gets its 200 and event stream at once, with keep-alive comments until it starts: then a failure to
    start is the stream's error event (`failed`), as a failure later on would be."""
    request_id = current_request_id()
    starting = asyncio.ensure_future(engine.start(jobs, caller, request_id))
    try:
        done, _ = await asyncio.wait({starting}, timeout=engine.keepalive)
    except BaseException:  # the client left (unless_disconnected): the start goes too, and a generation that
        with anyio.CancelScope(shield=True):  # started meanwhile is closed to the end (its peers' sessions)
            await _Starting(starting).aclose()
        raise
    if done:
        generation = starting.result()  # ours from here: the event stream closes it
        return EventStream(with_keepalive(events(generation), engine.keepalive), owner=generation,
                           request_id=request_id)

    async def late() -> AsyncIterator[str]:
        try:
            generation = await starting
        except Exception as e:
            async for event in failed(swarm_error(e)):
                yield event
            return
        async for event in events(generation):
            yield event

    return EventStream(with_keepalive(late(), engine.keepalive), owner=_Starting(starting), request_id=request_id)


async def handle(engine: ServingEngine, request: ChatCompletionRequest | CompletionRequest, jobs: list[Job],
                 answer: Answer, caller: Caller) -> Response:
    if request.stream:
        return await stream_response(engine, jobs, caller, lambda generation: _events(generation, request, answer),
                                     _failed)
    generation = await engine.start(jobs, caller)  # ours from here: `async with` below closes it
    async with generation:
        choices = await _collect(generation, len(jobs) * request.n)
    return json_response(answer.body(choices, _usage(jobs), _wants_logprobs(request)),
                         headers={"x-request-id": generation.id})


async def _collect(generation: Generation, total: int) -> list[Collected]:
    choices = [Collected() for _ in range(total)]
    try:
        async for step in generation:
            for delta in step:
                choices[delta.index].add(delta)
    except Exception as e:
        raise swarm_error(e) from e
    return choices


async def _failed(error: APIError) -> AsyncIterator[str]:
    yield sse(error.body())
    yield DONE


async def _events(generation: Generation, request: ChatCompletionRequest | CompletionRequest,
                  answer: Answer) -> AsyncIterator[str]:
    """The SSE events of a started generation. A client that goes away cancels this (CancelledError is no
    Exception): the EventStream then closes the generation, which stops it and frees the peers' sessions."""
    exclude = None if request.include_usage else CHUNK_WITHOUT_USAGE
    error: APIError | None = None
    opening = answer.opening(len(generation.jobs) * request.n)
    if opening is not None:
        yield sse(opening, exclude)
    try:
        async for step in generation:
            deltas = [d for d in step if d.text or d.finish_reason or d.logprobs or d.tool_calls]
            if deltas:
                yield sse(answer.chunk(deltas), exclude)
    except Exception as e:
        error = swarm_error(e)
    await generation.aclose()  # settles the usage counts, and frees the slot before the client sees [DONE]
    if error is not None:
        yield sse(error.body())
    elif request.include_usage:
        yield sse(answer.usage_chunk(_usage(generation.jobs)))
    yield DONE


async def chat_jobs(engine: ServingEngine, request: ChatCompletionRequest) -> list[Job]:
    """The request's one job: its size checked, then its messages templated and tokenized, and its grammar (a
    response_format, forced tool calls) compiled, in worker threads."""
    engine.check_model(request.model)
    if not getattr(engine.backend, "chats", True):  # before anything is computed (a grammar's compile took 5 s)
        raise APIError(400, f"{request.model} has no chat template (a base model): send its prompts to "
                            "/v1/completions", "messages", "invalid_value")
    engine.check_choices(request.n)
    messages, tools = template_messages(request, engine.backend.native_tools)
    engine.check_prompt_size(sum(_message_chars(m) for m in messages) + len(json.dumps(tools or [])), "messages")
    grammar = grammar_for(request)
    if grammar is not None:
        await engine.check_grammar(grammar, "response_format" if request.response_format and not offered_tools(
            request) else "tools")
    try:
        prompt_ids = await engine.tokenize(engine.backend.encode_chat, messages, tools)
    except ValueError as e:  # the template refused these messages: its reason is for the client
        raise APIError(400, f"the chat template could not render these messages: {str(e)[:300]}", "messages",
                       "invalid_value") from e
    except Exception as e:
        logger.warning("the chat template failed: %r", e)
        raise APIError(400, "the chat template could not render these messages", "messages", "invalid_value") from e
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    names = frozenset(t.function.name for t in offered_tools(request))
    prediction = None
    if request.prediction is not None and request.n == 1:  # drafts come from it (speculative decoding)
        text = request.prediction.text()
        engine.check_prompt_size(len(text), "prediction")
        prediction = (await engine.tokenize(engine.backend.encode, text))[: engine.backend.context_length]
    job = engine.make_job(request, prompt_ids, logprobs, grammar=grammar, tool_names=names,
                          prediction=prediction, single_call=not request.parallel_tool_calls)
    job.forced_tools = frozenset(t.function.name for t in forced_tools(request))
    return [job]


def _message_chars(message: dict[str, Any]) -> int:
    """A templated message's characters: its content and the names and arguments of its tool calls."""
    calls = message.get("tool_calls") or []
    return len(str(message.get("content") or "")) + sum(
        len(str(c["function"]["name"])) + len(str(c["function"]["arguments"])) for c in calls)


async def completion_jobs(engine: ServingEngine, request: CompletionRequest) -> list[Job]:
    """A job per prompt: sizes and counts checked, then the texts tokenized in a worker thread."""
    engine.check_model(request.model)
    prompts = request.prompts()
    engine.check_choices(len(prompts) * request.n)
    for prompt in prompts:
        if isinstance(prompt, str):
            engine.check_prompt_size(len(prompt), "prompt")
    try:
        ids = await engine.tokenize(_encode_all, engine.backend.encode_prompt, prompts)
    except Exception as e:
        raise swarm_error(e) from e
    jobs = [engine.make_job(request, prompt_ids, request.logprobs, index_offset=i * request.n,
                            echo=(prompt if isinstance(prompt, str) else "") if request.echo else None)
            for i, (prompt_ids, prompt) in enumerate(zip(ids, prompts, strict=True))]
    for job, prompt in zip(jobs, prompts, strict=True):  # token ids echoed as text once they are known valid
        if request.echo and not isinstance(prompt, str):
            job.echo = await engine.tokenize(engine.backend.decode, prompt)
    return jobs


def _encode_all(encode: Callable[[str], list[int]], prompts: list[str | list[int]]) -> list[list[int]]:
    return [encode(p) if isinstance(p, str) else p for p in prompts]
