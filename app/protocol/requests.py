"""OpenAI request models (the subset this gateway honours; unknown extra fields are accepted and ignored).

Everything is bounded here, where it is parsed: numbers finite and in range, token ids and counts capped, no text
with a lone surrogate (JSON's "\\ud800" parses to a str that no tokenizer or UTF-8 encoder takes).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_LENGTH = 256  # characters: every streamed token is checked against the end of each stop string
MAX_MESSAGES = 2048
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_TOOLS = 128  # as OpenAI
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a 64-bit generator seed takes
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only: "²".isdigit() is true, int("²") fails


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in parsed JSON (keys included) holds a lone surrogate; iterative, so depth costs no
    recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # clients send name, user, metadata, ...


class _Request(_Lenient):
    """A whole request body. A field sent as null is taken as absent (its default), as OpenAI does."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("the request holds a lone UTF-16 surrogate (e.g. \\ud800): text must be valid Unicode")
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class TextPart(_Lenient):
    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type not in ("text", "input_text", "output_text"):
            raise ValueError(f"content parts of type {self.type!r} are not supported: this model reads text only")
        return self


class ToolCallFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)


class MessageToolCall(_Lenient):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Prediction(_Lenient):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat much of (an edited file, a quoted passage);
    its tokens are the first place speculative decoding drafts from."""

    type: Literal["content"]
    content: str | list[TextPart] = Field(max_length=1 << 20)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _legacy_functions(cls, data: Any) -> Any:
        """The legacy `functions` API's turns as tool turns: an assistant's `function_call`, a `function` message
        (its result, by the function's name)."""
        if not isinstance(data, dict):
            return data
        if data.get("role") == "function":
            data = {**data, "role": "tool"}
        call = data.get("function_call")
        if data.get("role") == "assistant" and isinstance(call, dict) and not data.get("tool_calls"):
            data = {**data, "tool_calls": [{"id": "call_0", "type": "function", "function": call}]}
        return data

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # function and schema names, as OpenAI


class JSONSchemaFormat(_Lenient):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} takes any JSON value
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs its json_schema")
        return self


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments (an object); None: no arguments
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class _SamplingRequest(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    # vLLM's extra sampling parameters (not OpenAI's), as self-hosted chat frontends send them; vLLM's ranges, but
    # a repetition penalty of at least 0.01 (a seen token's logit divided by 1e-39 overflows float32)
    top_k: int = Field(0, ge=-1)  # -1 or 0: no cut
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_LENGTH} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(token) or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids (decimal strings) to values in [-100, 100]")
        return value

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _stream_options(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    prediction: Prediction | None = None
    # the legacy functions API (deprecated by OpenAI, still honoured): taken as `tools` and `tool_choice`, with one
    # call an answer, which comes back as the message's `function_call` (finish_reason "function_call")
    functions: list[FunctionDefinition] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @model_validator(mode="after")
    def _legacy(self) -> ChatCompletionRequest:
        if self.functions is None:
            if self.function_call is not None:
                raise ValueError("function_call needs functions")
            return self
        if self.tools is not None or self.tool_choice is not None:
            raise ValueError("send either functions and function_call (legacy) or tools and tool_choice, not both")
        self.tools = [Tool(type="function", function=f) for f in self.functions]
        call = self.function_call
        self.tool_choice = NamedToolChoice(type="function", function=call) if isinstance(call, NamedFunction) else call
        self.parallel_tool_calls = False
        return self

    @property
    def legacy_functions(self) -> bool:
        return self.functions is not None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_param(self) -> str:
        """The field token_limit came from (what an error about it names)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list | str) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        if value == "":
            raise ValueError("prompt must not be empty")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def token_limit_param(self) -> str:
        return "max_tokens"

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: of texts, or of token-id lists."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[item for item in value if isinstance(item, int)]]  # one prompt given as token ids
        return [item for item in value if isinstance(item, str | list)]


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: of texts, or of token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[int(item) for item in value if isinstance(item, int)]]  # one input given as token ids
        return [item for item in value if isinstance(item, str | list)]
