"""/v1/responses: the request (the part this gateway honours; see app.responses_api) and the `response` object.

Input items: messages (with or without `"type": "message"`; text parts only), `function_call` items a client sends
back, `function_call_output` items (their output text, or text parts), `reasoning` items (a history replayed from
another model's run holds them: this model reads none, they are left out), and `item_reference`s to the items of this
caller's stored responses. Tools: function tools only; a built-in tool
(web search, files, ...) is a 400 naming it, never ignored; so are the fields whose meaning this gateway cannot give
(`conversation`, `prompt` templates). `background` responses are stored and polled (app.responses_api), not streamed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from app.protocol.requests import _NAME, MAX_MESSAGES, MAX_TOOLS, TextPart, _Lenient, _Request


class InputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[TextPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(_Lenient):
    """Another model's reasoning, replayed in a history (summaries, encrypted content): read by no one here."""

    type: Literal["reasoning"]


class ItemReference(_Lenient):
    """An item of a stored response (its input or its output) by id, standing for that item
    (app.responses_api: `resolve_references`)."""

    type: Literal["item_reference"]
    id: str = Field(min_length=1, max_length=256)


InputItem = Annotated[InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | ItemReference,
                      Field(discriminator="type")]


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError("text.format of type json_schema needs its name and schema")
        return self


class TextOptions(_Lenient):
    format: TextFormat = Field(default_factory=TextFormat)


class FunctionTool(_Lenient):
    type: str
    name: str | None = Field(None, pattern=_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function_only(self) -> FunctionTool:
        if self.type != "function":
            raise ValueError(f"tools of type {self.type!r} are not supported: this gateway runs function tools only")
        if self.name is None:
            raise ValueError("a function tool needs its name")
        return self


_UNSUPPORTED = {
    "conversation": "conversations are not kept by this gateway: continue with previous_response_id, or send the "
                    "whole input",
    "prompt": "prompt templates are not supported: send instructions and input",
}


def _typed(item: Any) -> Any:
    """An input item without a type (or a null one): an item reference if it holds an id alone, else a message."""
    if not isinstance(item, dict) or item.get("type") is not None:
        return item
    rest = {key: value for key, value in item.items() if key != "type"}
    return {"type": "item_reference" if set(rest) == {"id"} else "message", **rest}


class ToolChoiceFunction(_Lenient):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class ResponsesRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    text: TextOptions = Field(default_factory=TextOptions)
    tools: list[FunctionTool] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    stream: bool = False
    previous_response_id: str | None = Field(None, max_length=256)
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    truncation: Literal["disabled", "auto"] = "disabled"  # auto: as disabled (an input too long is a 400, not cut)
    include: list[str] = Field(default_factory=list, max_length=16)  # message.output_text.logprobs: honoured
    top_logprobs: int | None = Field(None, ge=0, le=20)
    background: bool = False  # answered at once (in progress), computed in the gateway, polled by GET, cancellable
    # what this gateway cannot do, refused rather than ignored (`_unsupported`)
    conversation: Any = None
    prompt: Any = None

    @field_validator("conversation", "prompt", mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value is not False:
            raise ValueError(_UNSUPPORTED[str(info.field_name)])
        return value

    @model_validator(mode="before")
    @classmethod
    def _typed_items(cls, data: Any) -> Any:
        """Messages may come without a type (the SDKs' "easy" input messages), and so may item references (an id
        and nothing else, as OpenAI's schema allows)."""
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            data = {**data, "input": [_typed(item) for item in data["input"]]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if isinstance(self.input, list) and len(self.input) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} input items")
        if self.background and not self.store:
            raise ValueError("a background response is kept to be polled: it needs store true")
        if self.background and self.stream:
            raise ValueError("background responses are not streamed here: poll GET /v1/responses/{id}")
        names = [tool.name for tool in self.tools]
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct names")
        if isinstance(self.tool_choice, ToolChoiceFunction) and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools")
        return self


# ---- the response object -----------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)  # with include message.output_text.logprobs


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | FunctionCallOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    text: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = True
    background: bool = False
    truncation: Literal["disabled", "auto"] = "disabled"
