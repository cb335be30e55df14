"""Plain request/event types of text generation, free of torch, for callers such as the gateway."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# JSON is generated in one style, as Python's json.dumps writes it: a small model given free whitespace can fill its
# whole budget with it. A JSON Schema (or a Lark grammar's `%json {...}`) carries it as llguidance's "x-guidance".
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class Grammar:
    """What generated text must match (swarm.client.grammar enforces it): `kind` "json_schema" (`source` a JSON
    Schema, as JSON text) or "lark" (llguidance's Lark dialect, where `%json {...}` embeds a schema)."""

    kind: Literal["json_schema", "lark"]
    source: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: none
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    stop_token_ids: tuple[int, ...] = ()
    grammar: Grammar | None = None  # the text must match it; it ends with the grammar (end-of-text is the only choice)
    prompt_logprobs: int | None = None  # k: the prompt's own log-probabilities too (k alternatives), on the first step
    speculative: bool = False  # one choice: speculative decoding with drafts by prompt lookup (same output)
    # speculative: asked before each step whether to draft now (None: always); a step without a draft joins the plain
    # decode rounds (the gateway stops drafting while many generations share the peers' batched rounds)
    draft_while: Callable[[], bool] | None = None
    prediction: tuple[int, ...] = ()  # tokens the answer is expected to repeat much of (drafts come from them first)
    # who asks (an API key's id, a client address): sessions parked for reuse are per tenant; None: no reuse at all
    tenant: str | None = ""


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which of the n choices
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    stop: bool = False  # a stop token: the choice is finished
    cached_prompt_tokens: int = 0  # on the first step's events: prompt tokens whose KV was reused (not recomputed)
    # on the first step's events, when asked: per prompt token, its log-probability given the tokens before it (None
    # for the first) and the k most likely tokens there
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...]], ...] | None = None
    route: tuple[str, ...] = ()  # on the first step's events: the peer ids of the session's chain
    kept_draft: bool = False  # speculative decoding: the token was drafted, and kept
    rejected_drafts: int = 0  # draft tokens computed but not kept, in the step that gave this token
    unused_drafts: int = 0  # on a kept draft: its step's drafts after it (kept or not) left out if the choice ends here
