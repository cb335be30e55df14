"""/v1/responses: a request becomes a chat completion request (one engine, one grammar and tool path: app.structured),
its answer the `response` object, or the typed event stream of the Responses API.

- `input` (text or items) after `instructions` (a system message, not carried to later turns, as OpenAI);
  `function_call` / `function_call_output` items are the tool round trip; `text.format` is `response_format`;
  function `tools` and `tool_choice` as for chat; `max_output_tokens` is `max_tokens`.
- `previous_response_id`: the conversation so far (its input and output items, without its instructions) is kept in
  memory (app.conversations) for `ttl` seconds (at most `capacity` of them, the oldest forgotten first) when `store`
  is true (the default); an unknown or expired id is a 404. So is the response object (GET /v1/responses/{id}),
  with its input items (GET …/input_items); DELETE forgets it. The prompt of the next turn then begins with the
  previous turn's tokens, so the swarm's prefix reuse (swarm.client.textgen) computes only what is new. Nothing is
  written to disk.
- `item_reference` input items name an input or output item of a response this key stored (by the ids those
  objects carry): each stands for that item (`resolve_references`; unknown, expired or another key's: a 404).
- `background`: admitted and started as any request, answered at once (in progress), then computed in a task of the
  store (app.conversations), polled by GET, cancelled by POST …/cancel, DELETE or the gateway stopping.
- Streaming: `response.created`, `response.in_progress`, per output item `response.output_item.added` … `.done`
  (a message's `response.content_part.added`, `response.output_text.delta`s, `response.output_text.done`,
  `response.content_part.done`; a function call's `response.function_call_arguments.delta` and `.done`), then
  `response.completed` (or `response.incomplete` at the token limit). Every event has its `sequence_number`. A
  failure after the stream began is an `error` event, then `response.failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from app.completions import chat_jobs, stream_response
from app.conversations import ConversationStore
from app.errors import APIError, swarm_error, validation_message
from app.protocol.requests import ChatCompletionRequest
from app.protocol.responses_api import (
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputMessage,
    InputTokensDetails,
    ItemReference,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    ToolChoiceFunction,
)
from app.rendering import json_response
from app.serving import Delta, Generation, Job, ServingEngine
from app.tenants import Caller

logger = logging.getLogger(__name__)
REFERENCED_TEXT = 4 << 20  # characters all of a request's item references may stand for (a body's default bound)
LOGPROBS = "message.output_text.logprobs"  # the `include` that asks for the output text's logprobs


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def resolve_references(request: ResponsesRequest, store: ConversationStore, owner: str) -> ResponsesRequest:
    """The request with each `item_reference` replaced by the item it names (of a response `owner` stored: another
    key's, an unknown or an expired one is a 404)."""
    if isinstance(request.input, str) or not any(isinstance(item, ItemReference) for item in request.input):
        return request
    items: list[Any] = []
    size = 0
    for item in request.input:
        if isinstance(item, ItemReference):
            found = store.item(item.id, owner)
            if found is None:
                raise APIError(404, f"item {item.id!r} is not known here (or its response has expired)", "input",
                               "not_found")
            item = _as_input(found)
            size += len(item.text() if not isinstance(item, FunctionCallItem) else item.arguments)
            if size > REFERENCED_TEXT:  # one stored item named many times: bounded as a body is
                raise APIError(400, f"the items referenced hold more than {REFERENCED_TEXT} characters", "input",
                               "invalid_value")
        items.append(item)
    return request.model_copy(update={"input": items})


def _as_input(item: dict[str, Any]) -> InputMessage | FunctionCallItem | FunctionCallOutputItem:
    """A stored item (as sent in a response or listed as an input item) as the input item it stands for."""
    if item["type"] == "message":
        text = "".join(part.get("text", "") for part in item["content"])
        return InputMessage(type="message", role=item["role"], content=text)
    if item["type"] == "function_call":
        return FunctionCallItem(type="function_call", call_id=item["call_id"], name=item["name"],
                                arguments=item["arguments"])
    return FunctionCallOutputItem(type="function_call_output", call_id=item["call_id"], output=item["output"])


def input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as the items GET /v1/responses/{id}/input_items lists (each with an id)."""
    if isinstance(request.input, str):
        return [_message_item("user", request.input)]
    items: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, InputMessage):
            items.append(_message_item(item.role, item.text()))
        elif isinstance(item, FunctionCallItem):
            items.append({"id": _id("fc"), "type": "function_call", "status": "completed", "call_id": item.call_id,
                          "name": item.name, "arguments": item.arguments})
        elif isinstance(item, FunctionCallOutputItem):
            items.append({"id": _id("fco"), "type": "function_call_output", "status": "completed",
                          "call_id": item.call_id, "output": item.text()})
    return items


def _message_item(role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": _id("msg"), "type": "message", "role": role, "status": "completed",
            "content": [{"type": kind, "text": text}]}


def _input_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input items as chat messages (consecutive function_call items: one assistant message)."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def chat_request(request: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion request this response is computed as (a 400 for what chat validation refuses)."""
    given = _input_messages(request)
    if not given:
        raise APIError(400, "input holds no message or function call output (reasoning items are left out)", "input",
                       "invalid_value")
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else []) + history \
        + given
    form = request.text.format
    response_format: dict[str, Any] = {"type": form.type}
    if form.type == "json_schema":
        response_format["json_schema"] = {"name": form.name, "schema": form.schema_, "strict": form.strict}
    choice = request.tool_choice
    logprobs = LOGPROBS in request.include
    body = {"model": request.model, "messages": messages, "max_tokens": request.max_output_tokens,
            "logprobs": logprobs, "top_logprobs": (request.top_logprobs or 0) if logprobs else None,
            "temperature": request.temperature, "top_p": request.top_p, "response_format": response_format,
            "parallel_tool_calls": request.parallel_tool_calls,
            "tools": [{"type": "function", "function": {**t.model_dump(exclude={"type"}, exclude_none=True),
                                                        "strict": t.strict is not False}}  # the Responses default
                      for t in request.tools] or None,
            "tool_choice": ({"type": "function", "function": {"name": choice.name}}
                            if isinstance(choice, ToolChoiceFunction) else choice) if request.tools else None}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise APIError(400, validation_message(e.errors())[0][:500], "input", "invalid_request") from e


class ResponseBuilder:
    """The response object of one request, built up from the generation's deltas (streamed or not)."""

    def __init__(self, request: ResponsesRequest, history: list[dict[str, Any]]):
        self.request, self.history = request, history
        self.id, self.created = _id("resp"), int(time.time())
        self.items = input_items(request)  # with their ids (the same in every snapshot kept of a background one)
        self.output: list[OutputItem] = []
        self.message: OutputMessage | None = None  # the message item being written
        self.finish: str | None = None
        self.logprobs: list[dict[str, Any]] = []  # of tokens whose text has not come yet (part of a character)

    def close_message(self, numbers: Iterator[int], status: str = "completed") -> list[str]:
        """End the message item being written (if any) with `status` ("incomplete": cut at the token limit): its
        closing events."""
        message, self.message = self.message, None
        if message is None:
            return []
        index = len(self.output) - 1
        part = message.content[0]
        message.status = "incomplete" if status == "incomplete" else "completed"
        return [_event("response.output_text.done", next(numbers), item_id=message.id, output_index=index,
                       content_index=0, text=part.text, logprobs=part.logprobs),
                _event("response.content_part.done", next(numbers), item_id=message.id, output_index=index,
                       content_index=0, part=part),
                _event("response.output_item.done", next(numbers), output_index=index, item=message)]

    def snapshot(self, status: str, usage: ResponseUsage | None = None,
                 error: ResponseError | None = None) -> ResponseObject:
        request = self.request
        choice = request.tool_choice
        return ResponseObject(
            id=self.id, created_at=self.created, status=status, model=request.model,  # type: ignore[arg-type]
            output=list(self.output), usage=usage, error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=request.instructions, max_output_tokens=request.max_output_tokens,
            temperature=request.temperature, top_p=request.top_p,
            tools=[t.model_dump(exclude_none=True) for t in request.tools],
            tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice,
            parallel_tool_calls=request.parallel_tool_calls, previous_response_id=request.previous_response_id,
            text={"format": request.text.format.model_dump(by_alias=True, exclude_none=True)},
            metadata=request.metadata, store=request.store, background=request.background,
            truncation=request.truncation)

    def conversation(self, chat: ChatCompletionRequest) -> list[dict[str, Any]]:
        """What a next turn continues from: this turn's messages without instructions, and its output."""
        messages = [*self.history, *_input_messages(self.request)]
        text = "".join(part.text for item in self.output if isinstance(item, OutputMessage) for part in item.content)
        calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                       "arguments": item.arguments}}
                 for item in self.output if isinstance(item, FunctionCallOutput)]
        messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
        return messages


def _usage(jobs: list[Job]) -> ResponseUsage:
    prompt = sum(len(job.prompt_ids) for job in jobs)
    output = sum(job.completion_tokens for job in jobs)
    return ResponseUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
                         input_tokens_details=InputTokensDetails(
                             cached_tokens=sum(job.cached_prompt_tokens for job in jobs)))


async def handle(engine: ServingEngine, store: ConversationStore, request: ResponsesRequest,
                 caller: Caller) -> Response:
    history: list[dict[str, Any]] = []
    if request.previous_response_id is not None:
        entry = store.entry(request.previous_response_id, caller.key_id)
        if entry is None:
            raise APIError(404, f"response {request.previous_response_id!r} is not known here (or has expired)",
                           "previous_response_id", "not_found")
        if entry.response.get("status") == "in_progress":  # a background response still being computed
            raise APIError(400, f"response {request.previous_response_id!r} is still in progress: poll it, or cancel "
                           "it, before continuing from it", "previous_response_id", "invalid_value")
        history = list(entry.messages)
    request = resolve_references(request, store, caller.key_id)
    chat = chat_request(request, history)
    try:
        jobs = await chat_jobs(engine, chat)
    except APIError as e:
        if e.param == "max_tokens":  # the chat request's names for this request's fields
            e.param, e.message = "max_output_tokens", e.message.replace("max_tokens", "max_output_tokens")
        elif e.param == "messages":
            e.param = "input"
        raise
    builder = ResponseBuilder(request, history)
    if request.stream:
        return await stream_response(engine, jobs, caller,
                                     lambda generation: _events(generation, builder, store, chat, caller.key_id),
                                     lambda error: _failed(builder, error, opened=False))
    if request.background and store.capacity < 1:
        raise APIError(400, "background responses are polled from the responses this gateway keeps, and it keeps "
                       "none (GATEWAY_RESPONSES_KEPT=0)", "background", "invalid_value")
    generation = await engine.start(jobs, caller)  # admitted and started: what fails here is an HTTP error
    if request.background:
        response = builder.snapshot("in_progress")
        _keep(store, builder, chat, caller.key_id, response)
        store.run(builder.id, _background(generation, builder, store, chat, caller.key_id, jobs))
        await asyncio.sleep(0)  # its task begins (and so owns the generation) before anything can cancel it
        return json_response(response, headers={"x-request-id": generation.id})
    numbers = itertools.count()  # the events are built as for a stream (the items in the same order) and dropped
    async with generation:
        try:
            finish = await _collect(generation, builder, numbers)
        except Exception as e:
            raise swarm_error(e) from e
    status = "incomplete" if finish == "length" else "completed"
    builder.close_message(numbers, status)
    response = builder.snapshot(status, _usage(jobs))
    if request.store:
        _keep(store, builder, chat, caller.key_id, response)
    return json_response(response, headers={"x-request-id": generation.id})


async def _collect(generation: Generation, builder: ResponseBuilder, numbers: Iterator[int]) -> str | None:
    """The generation's deltas into the response's items; its finish reason."""
    finish = None
    async for step in generation:
        for delta in step:
            _delta_events(delta, builder, numbers)
            finish = delta.finish_reason or finish
    return finish


async def _background(generation: Generation, builder: ResponseBuilder, store: ConversationStore,
                      chat: ChatCompletionRequest, owner: str, jobs: list[Job]) -> None:
    """A background response's generation to its end, stored as it ends: completed (or incomplete), failed (its
    error), or cancelled (POST …/cancel, DELETE, or the gateway stopping: the output so far)."""
    numbers, status, error = itertools.count(), "completed", None
    try:
        if await _collect(generation, builder, numbers) == "length":
            status = "incomplete"
    except asyncio.CancelledError:
        status = "cancelled"
    except Exception as e:  # (the swarm's failure, as a stream's: the error's code and message, no internals)
        failure = swarm_error(e)
        status, error = "failed", ResponseError(code=failure.code or "error", message=failure.message)
    finally:
        await _close(generation)
    builder.close_message(numbers, status if status == "completed" else "incomplete")
    if store.entry(builder.id, owner) is not None:  # (deleted while it ran: not kept again)
        _keep(store, builder, chat, owner, builder.snapshot(status, _usage(jobs), error))


async def _close(generation: Generation) -> None:
    """Close a generation to its end (its peers' sessions, its slot, its usage row), whatever cancels the task that
    closes it meanwhile."""
    closing = asyncio.ensure_future(generation.aclose())
    while not closing.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({closing})
    if not closing.cancelled() and closing.exception() is not None:  # (the response is still stored as it ended)
        logger.warning("background response: closing its generation %s failed: %r", generation.id,
                       closing.exception())


def _keep(store: ConversationStore, builder: ResponseBuilder, chat: ChatCompletionRequest, owner: str,
          response: ResponseObject) -> None:
    store.put(builder.id, builder.conversation(chat), owner, response.model_dump(mode="json", by_alias=True),
              builder.items)


def _event(kind: str, number: int, **fields: Any) -> str:
    body = {"type": kind, "sequence_number": number}
    for key, value in fields.items():
        body[key] = value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value
    return f"event: {kind}\ndata: {_dumps(body)}\n\n"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _events(generation: Generation, builder: ResponseBuilder, store: ConversationStore,
                  chat: ChatCompletionRequest, owner: str) -> AsyncIterator[str]:
    numbers = itertools.count()
    for event in _opening(builder, numbers):
        yield event
    finish: str | None = None
    try:
        async for step in generation:
            for delta in step:
                for event in _delta_events(delta, builder, numbers):
                    yield event
                finish = delta.finish_reason or finish
    except Exception as e:
        await generation.aclose()
        async for event in _failed(builder, swarm_error(e), numbers=numbers):
            yield event
        return
    status = "incomplete" if finish == "length" else "completed"
    for event in builder.close_message(numbers, status):
        yield event
    await generation.aclose()  # settles the usage counts and frees the slot
    response = builder.snapshot(status, _usage(generation.jobs))
    if builder.request.store:
        _keep(store, builder, chat, owner, response)
    yield _event(f"response.{status}", next(numbers), response=response)


def _opening(builder: ResponseBuilder, numbers: Iterator[int]) -> list[str]:
    return [_event("response.created", next(numbers), response=builder.snapshot("in_progress")),
            _event("response.in_progress", next(numbers), response=builder.snapshot("in_progress"))]


async def _failed(builder: ResponseBuilder, error: APIError, opened: bool = True,
                  numbers: Iterator[int] | None = None) -> AsyncIterator[str]:
    """The end of a stream that failed; `opened`: its opening events were sent (else they come first, as the SDKs
    expect a response.created before anything else)."""
    numbers = numbers if numbers is not None else itertools.count()
    for event in [] if opened else _opening(builder, numbers):
        yield event
    yield _event("error", next(numbers), code=error.code or "error", message=error.message, param=None)
    yield _event("response.failed", next(numbers), response=builder.snapshot(
        "failed", error=ResponseError(code=error.code or "error", message=error.message)))


def _delta_events(delta: Delta, builder: ResponseBuilder, numbers: Iterator[int]) -> list[str]:
    """Add a delta's text and tool calls to the response's items, in order → the stream's events for them."""
    events: list[str] = []
    builder.logprobs.extend(entry.model_dump() for entry in delta.logprobs)
    if delta.tool_calls:
        builder.logprobs.clear()  # the calls' own tokens: not the text's
    if delta.text:
        if builder.message is None:
            builder.message = OutputMessage(id=_id("msg"), status="in_progress", content=[OutputText(text="")])
            builder.output.append(builder.message)
            index = len(builder.output) - 1
            events.append(_event("response.output_item.added", next(numbers), output_index=index,
                                 item=OutputMessage(id=builder.message.id, status="in_progress")))
            events.append(_event("response.content_part.added", next(numbers), item_id=builder.message.id,
                                 output_index=index, content_index=0, part=OutputText(text="")))
        logprobs, builder.logprobs = builder.logprobs, []
        builder.message.content[0].text += delta.text
        builder.message.content[0].logprobs.extend(logprobs)
        events.append(_event("response.output_text.delta", next(numbers), item_id=builder.message.id,
                             output_index=len(builder.output) - 1, content_index=0, delta=delta.text,
                             logprobs=logprobs))
    for call in delta.tool_calls:
        events.extend(builder.close_message(numbers))
        item = FunctionCallOutput(id=_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments,
                                  status="incomplete" if call.truncated else "completed")
        builder.output.append(item)
        index = len(builder.output) - 1
        events.append(_event("response.output_item.added", next(numbers), output_index=index, item=item.model_copy(
            update={"arguments": "", "status": "in_progress"})))
        events.append(_event("response.function_call_arguments.delta", next(numbers), item_id=item.id,
                             output_index=index, delta=call.arguments))
        events.append(_event("response.function_call_arguments.done", next(numbers), item_id=item.id,
                             output_index=index, arguments=call.arguments))
        events.append(_event("response.output_item.done", next(numbers), output_index=index, item=item))
    return events
