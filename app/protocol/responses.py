"""OpenAI response bodies, stream chunks and errors as typed models: built once, serialized once (`app.rendering`).

Null versus absent follows OpenAI's wire format: `system_fingerprint`, a choice's `logprobs` and `finish_reason` are
always present (null when there is nothing); a chat delta carries only the fields it sets; a chunk's `usage` is sent
only when the client asked for it (`stream_options.include_usage`) and is null until the last chunk, so the stream
writer leaves it out (`CHUNK_WITHOUT_USAGE`) otherwise.
"""

from __future__ import annotations

import codecs
import time
from typing import Any, Literal

from pydantic import BaseModel, Field, SerializeAsAny, SerializerFunctionWrapHandler, model_serializer

SERVING_SINCE = int(time.time())  # a model card's `created`: when this gateway process began

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]  # the last: legacy `functions` only
CHUNK_WITHOUT_USAGE = {"usage"}  # `exclude` for chunks of a stream that did not ask for usage


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV a reused session held: not computed again


class CompletionTokensDetails(BaseModel):
    """Speculative decoding's drafts, in OpenAI's Predicted Outputs fields: completion tokens that were drafted and
    kept, and drafted tokens computed but not kept."""

    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
           drafts: tuple[int, int] = (0, 0)) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                   completion_tokens_details=CompletionTokensDetails(accepted_prediction_tokens=drafts[0],
                                                                     rejected_prediction_tokens=drafts[1]))


# ---- log-probabilities -----------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    """A chosen token's log-probability and the most likely alternatives at its position (chat's shape). A prompt's
    first token, echoed by /v1/completions, has none (null)."""

    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class TextOffsets:
    """Where each token begins in a choice's text, in characters, from the tokens' bytes: a token that holds part
    of a character (byte-level vocabularies split an emoji over several) begins where that character does."""

    def __init__(self) -> None:
        self.chars = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, data: list[int]) -> int:
        """The offset of a token of these bytes (the text before it), and count them in."""
        offset = self.chars
        self.chars += len(self.decoder.decode(bytes(data)))
        return offset


class CompletionLogprobs(BaseModel):
    """The legacy /v1/completions shape: parallel lists, the alternatives as {token: logprob}."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token's text begins in the choice's text (its tokens' texts, summed)

    @classmethod
    def of(cls, entries: list[TokenLogprob], offsets: TextOffsets | None = None) -> CompletionLogprobs:
        """`offsets`: the choice's text so far (a stream's chunks carry on from the ones before)."""
        offsets = offsets or TextOffsets()
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[cls._top(e) if e.logprob is not None else None for e in entries],
                   text_offset=[offsets.add(e.bytes) for e in entries])

    @staticmethod
    def _top(entry: TokenLogprob) -> dict[str, float]:
        """The alternatives and, always, the token itself (OpenAI: "up to logprobs+1 elements")."""
        top = {t.token: t.logprob for t in entry.top_logprobs}
        if entry.logprob is not None:
            top.setdefault(entry.token, entry.logprob)
        return top


# ---- chat completions ------------------------------------------------------------------------------------------
class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCallOut):
    """A tool call in a stream: sent whole, in one chunk (the SDKs accumulate by `index`)."""

    index: int


class AssistantMessage(BaseModel):
    """content is null when the answer is tool calls only; `tool_calls` is absent when there are none, and
    `function_call` (the legacy `functions` API's one call) unless the request used that API."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCall | None = None

    @model_serializer(mode="wrap")
    def _calls_if_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for key in ("tool_calls", "function_call"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class DeltaMessage(BaseModel):
    """What a chunk adds to a chat choice; unset fields are absent, not null (an empty delta is `{}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- text completions (legacy /v1/completions) -----------------------------------------------------------------
class CompletionChoice(BaseModel):
    """A choice of a text completion body, and of its stream chunks (which carry the new text only)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models ----------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: SERVING_SINCE)  # (when this gateway began serving it)
    owned_by: str = "swarm"
    context_length: int


class EmbeddingModelCard(ModelCard):
    type: Literal["embedding"] = "embedding"
    dimensions: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SerializeAsAny[ModelCard]]  # an EmbeddingModelCard keeps its own fields


# ---- embeddings ------------------------------------------------------------------------------------------------
class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- errors ----------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error body: `{"error": {"message", "type", "param", "code"}}`, also sent as an SSE event."""

    error: ErrorInfo
