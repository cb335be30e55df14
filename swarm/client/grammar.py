"""Grammar-constrained sampling: a token mask per row, from llguidance, applied where the client samples.

    grammars = Grammars(hf_tokenizer, vocab_size=V, eos_token_id=2)
    grammars.check(Grammar("json_schema", '{"type": "object"}'))       # GrammarError names what is refused
    constraint = grammars.constraint(grammar, rows=n)                    # one matcher per choice
    logits = constraint.apply(logits)       # [n, V]: tokens the grammar does not allow next → -inf
    constraint.advance(chosen)              # [n]: each row's matcher takes its token; the next masks start

The peers never see a grammar: it changes only which token the client picks from the logits it already has. A
row's next mask depends only on the tokens that row has taken, so it is computed (in a worker thread) while the
peers compute the next forward, and `apply` usually finds it ready. Once a grammar is complete, its mask allows only
the end-of-text token, so a constrained answer ends where its grammar does.

JSON is generated in one style (swarm.client.requests.JSON_STYLE: as Python's json.dumps writes it). A JSON Schema
feature llguidance does not enforce (an unknown `format`, a `$ref` to nothing, ...) is a GrammarError naming it,
never silently ignored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
from typing import Any

import numpy as np
import torch

from swarm.client.requests import JSON_STYLE, Grammar

MAX_GRAMMAR_CHARS = 200_000  # a schema or grammar this long is refused before compiling
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="swarm-grammar")


class GrammarError(ValueError):
    """A grammar or schema that cannot be enforced; the message says why (for the client)."""


class Grammars:
    """Compiles and checks grammars for one tokenizer, and makes the constraints of requests. Thread-safe: the
    gateway checks grammars in worker threads while sessions sample."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_id: int):
        self.hf_tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()  # most recent last

    @property
    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (built once, on first use: ~0.6 s for a 49k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_token_id)
            return self._tokenizer

    def check(self, grammar: Grammar) -> None:
        """Raise GrammarError when `grammar` cannot be enforced exactly."""
        self._compiled(grammar)

    def constraint(self, grammar: Grammar, rows: int) -> Constraint:
        return Constraint([self.matcher(grammar) for _ in range(rows)], self.vocab_size, self.eos_token_id)

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh llguidance matcher of `grammar` (the state of one row)."""
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer, self._compiled(grammar), log_level=0)

    def _compiled(self, grammar: Grammar) -> str:
        key = (grammar.kind, grammar.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        text = _compile(self.tokenizer, grammar.kind, grammar.source)
        with self._lock:
            self._cache[key] = text
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        return text


def _compile(tokenizer: Any, kind: str, source: str) -> str:
    from llguidance import LLMatcher

    if len(source) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(source)} characters; at most {MAX_GRAMMAR_CHARS} are taken")
    try:
        if kind == "json_schema":
            schema = json.loads(source)
            if isinstance(schema, dict):
                schema = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
            text = LLMatcher.grammar_from_json_schema(schema)
        elif kind == "lark":
            text = LLMatcher.grammar_from_lark(source)
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}")
        failed, messages = LLMatcher.validate_grammar_with_warnings(text, tokenizer)
    except GrammarError:
        raise
    except Exception as e:  # a schema llguidance cannot read: its reason, which names the feature
        raise GrammarError(_short(str(e))) from e
    if failed or messages:  # a warning is a feature it would not enforce: refused too
        raise GrammarError(_short("; ".join(messages) or "the grammar is invalid"))
    return text


def _short(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "the grammar is invalid"


class Constraint:
    """The grammar's matchers of one request's rows (see the module). A matcher is used by one thread at a time:
    the worker computing the next masks, or `advance` once they are done."""

    def __init__(self, matchers: list[Any], vocab_size: int, eos_token_id: int):
        self.matchers = matchers
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self._next: concurrent.futures.Future[torch.Tensor] = _POOL.submit(self._masks)

    def _masks(self) -> torch.Tensor:
        """[rows, V] bool: the tokens each row may take next."""
        allowed = np.zeros((len(self.matchers), self.vocab_size), dtype=bool)
        for row, matcher in enumerate(self.matchers):
            if matcher.is_error():  # cannot happen through `apply`; if it does, the row can only end
                allowed[row, self.eos_token_id] = True
                continue
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            width = min(len(bits), self.vocab_size)
            allowed[row, :width] = bits[:width]
            if not allowed[row].any():
                allowed[row, self.eos_token_id] = True
        return torch.from_numpy(allowed)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, V] → a float copy with every token the grammar does not allow next at -inf."""
        allowed = self._next.result()
        return logits.float().masked_fill(~allowed[:, : logits.shape[-1]], float("-inf"))

    def advance(self, chosen: torch.Tensor) -> None:
        """Each row takes its chosen token (from `apply`'s logits); the next masks start computing."""
        self._next.result()  # (already done after `apply`) the matchers are not in use by the worker
        for matcher, token in zip(self.matchers, chosen.tolist(), strict=True):
            if not matcher.is_stopped():
                matcher.consume_token(int(token))
        self._next = _POOL.submit(self._masks)
