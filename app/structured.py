"""Structured outputs and tool calls: the grammar a chat request's answer must match, the prompt that shows the
model its tools, and the tool calls read back out of what it wrote.

**The tool-call format.** A model whose chat template has a tool format gets the tools through it (`tools=` of
transformers' apply_chat_template). Any other (SmolLM2's template has none) gets them in a system message, as JSON,
with this instruction, the format of Hermes/Qwen templates:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

An answer is read in that format either way: each `<tool_call>` block whose JSON names one of the request's tools
with an object of arguments is a tool call; anything else stays text. Earlier turns go back into the prompt the same
way (an assistant's `tool_calls` as such blocks, a `tool` message as a user turn in `<tool_response>` tags, when the
template has no tool format).

**What is enforced.** `tool_choice: "required"` or a named function: the answer is one tool call (or several, with
`parallel_tool_calls`) by grammar, its arguments valid against the function's parameters. `auto`: the model chooses;
with a `response_format` as well, the answer is by grammar either tool calls or that JSON. `none`: no tools in the
prompt. `response_format` `json_object`: one JSON object, nothing around it; `json_schema`: JSON valid against the
schema (a schema feature the grammar engine cannot enforce is refused, whatever `strict` says: see
swarm.client.grammar). `strict: true` (a function's, or the format's; a Responses function tool's by default) closes
the schema's objects that do not say whether they take other keys (`closed`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from app.errors import APIError
from app.protocol.requests import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from swarm.client.requests import JSON_STYLE, Grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8  # calls one forced answer may hold
TOOLS_PROMPT = (
    "You may call functions to answer. The functions, with their parameters as JSON Schema:\n{tools}\n\n"
    "To call a function, write only this, once per call:\n"
    f"{CALL_OPEN}\n{{{{\"name\": \"<function name>\", \"arguments\": {{{{<the arguments as a JSON object>}}}}}}}}\n"
    f"{CALL_CLOSE}\n"
    "Otherwise, answer in plain text."
)


@dataclass(frozen=True)
class ToolCall:
    index: int  # its place among its choice's calls
    id: str
    name: str
    arguments: str  # JSON text of an object (the start of one, when `truncated`)
    truncated: bool = False  # cut by the token limit before its end


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _parameters(tool: Tool) -> dict[str, Any]:
    """Its arguments' schema; a function without `parameters` takes none (OpenAI: "an empty parameter list"), one
    with an empty schema any object; `strict`: its objects closed (`closed`)."""
    parameters = tool.function.parameters
    if parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return (closed(parameters) if tool.function.strict else parameters) or {"type": "object"}


# the keywords whose values are schemas, maps of them or lists of them
_SUBSCHEMA = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_SUBSCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a schema for OpenAI's strict mode: every object schema that lists `properties` and says nothing of
    others takes no others (`additionalProperties: false`, which OpenAI requires strict schemas to say and xgrammar's
    strict mode assumes). A schema from a Pydantic model's `model_json_schema()` leaves it out, and a small model
    then adds keys of its own until the token limit cuts its JSON. Walked without recursion (a deep schema is
    bounded by the body's size, not by the stack)."""
    root: dict[str, Any] = {"schema": schema}
    stack: list[tuple[Any, Any]] = [(root, "schema")]
    while stack:
        parent, key = stack.pop()
        value = parent[key]
        if isinstance(value, list):
            value = parent[key] = list(value)
            stack.extend((value, i) for i in range(len(value)))
            continue
        if not isinstance(value, dict):
            continue
        value = parent[key] = dict(value)
        if isinstance(value.get("properties"), dict) and "additionalProperties" not in value:
            value["additionalProperties"] = False
        for word, sub in value.items():
            if word in _SUBSCHEMA or (word in _SUBSCHEMA_LISTS and isinstance(sub, list)):
                stack.append((value, word))
            elif word in _SUBSCHEMA_MAPS and isinstance(sub, dict):
                value[word] = dict(sub)
                stack.extend((value[word], name) for name in sub)
    return root["schema"]


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": _parameters(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


def offered_tools(request: ChatCompletionRequest) -> list[Tool]:
    """The tools the model is shown: none with tool_choice "none", else all of them."""
    return [] if request.tool_choice == "none" else list(request.tools or [])


def forced_tools(request: ChatCompletionRequest) -> list[Tool]:
    """The tools the answer must call one of (tool_choice "required" or a named function), else none."""
    tools = offered_tools(request)
    choice = request.tool_choice
    if choice == "required":
        return tools
    return [t for t in tools if t.function.name == choice.function.name] if isinstance(choice, NamedToolChoice) else []


def grammar_for(request: ChatCompletionRequest) -> Grammar | None:
    """What the answer must match (None: free text)."""
    tools, forced = offered_tools(request), forced_tools(request)
    answer = _format_schema(request)
    if forced:
        return Grammar("lark", _calls_lark(forced, request.parallel_tool_calls))
    if tools and answer is not None:  # auto, and a format: either tool calls or the formatted answer
        return Grammar("lark", _calls_lark(tools, request.parallel_tool_calls, alternative=answer))
    return None if answer is None else Grammar("json_schema", _json(answer))


def _format_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    form = request.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return {"type": "object"}
    assert form.json_schema is not None  # validated
    return closed(form.json_schema.schema_) if form.json_schema.strict else form.json_schema.schema_


def _calls_lark(tools: list[Tool], parallel: bool, alternative: dict[str, Any] | None = None) -> str:
    schema = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
    calls = f'call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
    start = f"{calls} | answer" if alternative is not None else calls
    rules = [f"start: {start}",
             f'call: "{CALL_OPEN}\\n" call_json "\\n{CALL_CLOSE}"',
             f"call_json: %json {_json(_styled(schema))}"]
    if alternative is not None:
        rules.append(f"answer: %json {_json(_styled(alternative))}")
    return "\n".join(rules)


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    own = schema.get("x-guidance", {})
    if not isinstance(own, dict):
        raise APIError(400, "x-guidance, where given, must be an object of llguidance's JSON options",
                       "response_format", "invalid_value")
    return {**schema, "x-guidance": {**JSON_STYLE, **own}}


# ---- the prompt ----------------------------------------------------------------------------------------------
def template_messages(request: ChatCompletionRequest, native_tools: bool) -> tuple[list[dict[str, Any]],
                                                                                 list[dict[str, Any]] | None]:
    """The messages for the chat template, and the tools to pass it (None: the template is not given tools; then
    they are in the messages, in this module's format)."""
    tools = offered_tools(request)
    if native_tools:
        return [_native(m) for m in request.messages], ([t.model_dump(exclude_none=True) for t in tools] or None)
    messages = [_generic(m) for m in request.messages]
    if tools:
        listing = "\n".join(_json({"name": t.function.name, "description": t.function.description or "",
                                   "parameters": _parameters(t)}) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return _merged(messages), None


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _calls_text(message: ChatMessage) -> str:
    return "\n".join(f"{CALL_OPEN}\n{_json({'name': c.function.name, 'arguments': _arguments(c.function.arguments)})}"
                     f"\n{CALL_CLOSE}" for c in message.tool_calls or [])


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text  # sent back as the client had it


def _generic(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.text()}\n</tool_response>"}
    content = "\n".join(part for part in (message.text(), _calls_text(message)) if part)
    return {"role": _role(message), "content": content}


def _native(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _role(message), "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        out["name"] = message.name
    return out


def _merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role as one (templates that insist on alternating roles take them so)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"] and message["role"] != "system":
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{message['content']}"}
        else:
            out.append(dict(message))
    return out


# ---- reading the answer --------------------------------------------------------------------------------------
class ToolCallReader:
    """Splits one choice's text, as it streams, into content and tool calls (see the module). `feed` returns the
    content that can be released and the calls completed; text that may be the start of a call is held back.

    A call identical to one before it (same name, same arguments) is not returned again, and sets `ended`: the
    answer should end there (a small model asked for calls repeats one word for word rather than stopping). With
    `single` (parallel_tool_calls: false), the first call sets it too (auto mode has no grammar to stop a second).
    `forced`: the tools a grammar makes the answer call (tool_choice "required" or a named function), if any."""

    def __init__(self, names: set[str], single: bool = False, forced: frozenset[str] = frozenset()):
        self.names, self.single, self.forced = names, single, forced
        self.pending = ""  # text not released yet
        self.in_call = False
        self.gap = ""  # the whitespace before the call being read: dropped if it is a call, else text again
        self.calls = 0
        self.wrote = False  # content other than whitespace since the last call
        self.seen: set[tuple[str, str]] = set()
        self.ended = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.pending += text
        content, calls = "", list[ToolCall]()
        while True:
            if self.in_call:
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    return content, calls
                body, self.pending = self.pending[:end], self.pending[end + len(CALL_CLOSE):]
                self.in_call = False
                call, gap, self.gap = self._parse(body), self.gap, ""
                if call is None:
                    content += self._text(f"{gap}{CALL_OPEN}{body}{CALL_CLOSE}")  # not a call of ours: it stays text
                elif isinstance(call, str):  # "repeated"
                    self.ended = True
                    return content, calls
                else:
                    calls.append(call)
                    self.wrote = False
                    if self.single:
                        self.ended = True
                        return content, calls
                continue
            start = self.pending.find(CALL_OPEN)
            if start >= 0:
                before = self.pending[:start]
                content += self._text(before.rstrip())  # the space before a call is not content (if it is a call)
                self.gap = before[len(before.rstrip()):]
                self.pending, self.in_call = self.pending[start + len(CALL_OPEN):], True
                continue
            # held back: what may begin a call, and the whitespace before it (between calls, or after the last,
            # it is not content)
            released = self.pending[: len(self.pending) - _partial(self.pending, CALL_OPEN)].rstrip()
            content, self.pending = content + self._text(released), self.pending[len(released):]
            return content, calls

    def _text(self, content: str) -> str:
        self.wrote = self.wrote or bool(content.strip())
        return content

    def truncated(self) -> ToolCall | None:
        """The call the answer was cut in by the token limit, as far as it got (call it before `finish`): OpenAI
        returns such a call with its arguments cut short, and finish_reason "length". It is one when the cut text
        names one of the tools, or, with calls forced, begins the name of exactly one of the forced tools; a cut
        before any name (in the opening tag included) is the forced tool's call when only one is forced and no call
        came before. A call whose JSON is whole and only its closing tag cut is returned whole; a cut repeat of an
        earlier call ends the answer as a repeat does. Otherwise None, and `finish` decides what the text is."""
        if self.ended:
            return None
        first_forced = len(self.forced) == 1 and not self.calls
        if not self.in_call:  # cut in the opening tag, or before it
            opening = self.pending.strip()
            if first_forced and CALL_OPEN.startswith(opening):
                return self._cut(next(iter(self.forced)), "")
            return None
        body = self.pending[: len(self.pending) - _partial(self.pending, CALL_CLOSE)]
        body = body.split(CALL_OPEN, 1)[0]  # an unclosed call followed by another (auto mode): the first one
        whole = self._parse(body)
        if whole is not None:
            self.pending, self.in_call, self.gap = "", False, ""
            if isinstance(whole, str):  # a repeat
                self.ended = True
                return None
            return whole
        match = _CUT_CALL.match(body)
        if match is not None:
            head: dict[str, str | None] = match.groupdict()
        elif first_forced and _CUT_BEFORE_NAME.match(body):
            head = {"name": "", "closed": None, "arguments": None}
        else:
            return None
        try:
            name = json.loads(f'"{head["name"]}"')
        except (ValueError, RecursionError):
            return None
        if not head["closed"]:
            starting = [n for n in self.forced if n.startswith(name)]
            if len(starting) != 1:
                return None
            name = starting[0]
        if name not in self.names:
            return None
        arguments = (head["arguments"] or "").lstrip()
        try:  # whole arguments, the call's own end cut: keep only them
            arguments = arguments[: json.JSONDecoder().raw_decode(arguments)[1]]
        except (ValueError, RecursionError):
            pass
        if any(seen == name and earlier.startswith(arguments) for seen, earlier in self.seen):
            self.ended = True  # the start of a repeat
            return None
        return self._cut(name, arguments)

    def _cut(self, name: str, arguments: str) -> ToolCall:
        self.calls += 1
        self.pending, self.in_call, self.gap = "", False, ""
        return ToolCall(self.calls - 1, f"call_{secrets.token_hex(12)}", name, arguments, truncated=True)

    def finish(self) -> str:
        """The text left once the choice has ended. After calls, what is left of an unclosed call (cut by the
        token limit), of an opening tag and whitespace are dropped, and after the call that ended the answer
        everything; before any call, an unclosed call is text (unless calls were forced)."""
        rest = (self.gap + CALL_OPEN if self.in_call else "") + self.pending
        markup = self.in_call or CALL_OPEN.startswith(rest.strip())
        if self.ended or ((self.calls or self.forced) and markup):
            rest = ""
        self.pending, self.in_call, self.gap = "", False, ""
        return self._text(rest)

    def _parse(self, body: str) -> ToolCall | str | None:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        key = (value["name"], _json(arguments))
        if key in self.seen:
            return "repeated"
        self.seen.add(key)
        self.calls += 1
        return ToolCall(self.calls - 1, f"call_{secrets.token_hex(12)}", *key)


# the start of a call cut short: its name (whole when `closed`), then, if it got there, the start of its arguments
_CUT_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)(?P<closed>")?'
                       r'(?:\s*,\s*"(?:arguments|parameters)"\s*:(?P<arguments>.*))?', re.DOTALL)
_CUT_BEFORE_NAME = re.compile(r'\s*(?:\{\s*(?:"(?:n(?:a(?:m(?:e"?)?)?)?)?)?)?\Z')


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (shorter than it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
