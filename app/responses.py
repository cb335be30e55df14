"""Chat and text completion endpoints' logic: run jobs, shape OpenAI bodies and SSE chunks, map failures.

Everything that can be refused is refused before the first byte of a stream: validation, the model, a complete
chain, and the first generation step (so that a full swarm answers 503, not a broken stream). A failure after that
becomes an SSE error event followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import APIError
from app.protocol import ChatCompletionRequest, CompletionRequest
from app.serving import Delta, Job, ServingEngine, new_id, now, swarm_error


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(len(job.prompt_ids) for job in jobs)
    completion = sum(job.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _primed(engine: ServingEngine, jobs: list[Job]) -> tuple[AsyncGenerator[list[Delta], None], list[Delta]]:
    """Start the jobs (one after another) and take the first step, so that start-up failures become HTTP errors."""

    async def chained() -> AsyncGenerator[list[Delta], None]:
        for job in jobs:
            async for step in engine.deltas(job):
                yield step

    stream = chained()
    try:
        first = await anext(stream)
    except BaseException as e:
        await stream.aclose()
        raise swarm_error(e) if isinstance(e, Exception) else e from None
    return stream, first


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def handle(engine: ServingEngine, request: ChatCompletionRequest | CompletionRequest, jobs: list[Job],
                 chat: bool):
    engine.acquire_slot()
    released = False
    try:
        await engine.check_available()
        stream, first = await _primed(engine, jobs)
        if request.stream:
            released = True  # the streaming body releases the slot when it ends
            return StreamingResponse(_stream_body(engine, request, jobs, stream, first, chat),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(request, jobs, stream, first, chat))
    finally:
        if not released:
            engine.release_slot()


async def _collect(request, jobs: list[Job], stream, first: list[Delta], chat: bool) -> dict[str, Any]:
    total = len(jobs) * request.n
    texts, reasons = [""] * total, [None] * total  # type: list[str], list[str | None]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(total)]
    try:
        step: list[Delta] | None = first
        while step is not None:
            for delta in step:
                texts[delta.index] += delta.text
                reasons[delta.index] = delta.finish_reason or reasons[delta.index]
                logprobs[delta.index].extend(delta.logprobs)
            step = await anext(stream, None)  # type: ignore[arg-type]
    except Exception as e:
        raise swarm_error(e) from e
    finally:
        await stream.aclose()
    wants_logprobs = request.logprobs is not None and request.logprobs is not False
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": logprobs[i]} if wants_logprobs else None,
                    "finish_reason": reasons[i]} for i in range(total)]
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": request.model,
                "choices": choices, "usage": _usage(jobs), "system_fingerprint": None}
    choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                "logprobs": _completion_logprobs(logprobs[i]) if wants_logprobs else None} for i in range(total)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": request.model,
            "choices": choices, "usage": _usage(jobs), "system_fingerprint": None}


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": []}


async def _stream_body(engine: ServingEngine, request, jobs: list[Job], stream, first: list[Delta],
                       chat: bool) -> AsyncIterator[str]:
    chunk_id, created = new_id("chatcmpl" if chat else "cmpl"), now()
    usage_field = {"usage": None} if request.include_usage else {}

    def chunk(choices: list[dict[str, Any]]) -> str:
        obj = "chat.completion.chunk" if chat else "text_completion"
        return _sse({"id": chunk_id, "object": obj, "created": created, "model": request.model,
                     "system_fingerprint": None, "choices": choices, **usage_field})

    def choice(delta: Delta) -> dict[str, Any]:
        logprobs = None
        if delta.logprobs:
            logprobs = {"content": delta.logprobs} if chat else _completion_logprobs(delta.logprobs)
        if chat:
            body = {"content": delta.text} if delta.text else {}
            return {"index": delta.index, "delta": body, "logprobs": logprobs, "finish_reason": delta.finish_reason}
        return {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(jobs) * request.n)])
        step: list[Delta] | None = first
        while step is not None:
            choices = [choice(d) for d in step if d.text or d.finish_reason or d.logprobs]
            if choices:
                yield chunk(choices)
            step = await anext(stream, None)  # type: ignore[arg-type]
        if request.include_usage:
            yield _sse({"id": chunk_id, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": request.model, "system_fingerprint": None, "choices": [],
                        "usage": _usage(jobs)})
    except asyncio.CancelledError:  # the client went away: stop generating, free the peers' sessions
        raise
    except Exception as e:
        yield _sse(swarm_error(e).body())
    finally:
        await stream.aclose()
        engine.release_slot()
    yield _sse("[DONE]")


def chat_jobs(engine: ServingEngine, request: ChatCompletionRequest) -> list[Job]:
    engine.check_model(request.model)
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                for m in request.messages]
    try:
        prompt_ids = engine.backend.encode_chat(messages)
    except Exception as e:
        raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from e
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return [engine.make_job(request, prompt_ids, logprobs)]


def completion_jobs(engine: ServingEngine, request: CompletionRequest) -> list[Job]:
    engine.check_model(request.model)
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts = [engine.backend.encode(prompt)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [engine.backend.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[arg-type]
    if any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    return [engine.make_job(request, ids, request.logprobs, index_offset=i * request.n)
            for i, ids in enumerate(prompts)]
