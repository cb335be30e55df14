"""Drafts for speculative decoding over the swarm, by prompt lookup: no second model.

A text that quotes, edits or summarises its input repeats runs of it. `PromptLookup` finds the longest recent n-gram
(`max_ngram` down to `min_ngram` tokens; a prediction's down to `min_prediction_ngram`) that ends the text so far
and occurred before, in a prediction the client sent (OpenAI's Predicted Outputs) or in the text itself (prompt and
generated tokens), and proposes the tokens that followed it there. Three tokens at least in the text itself: shorter
matches in free text are mostly chance, and a draft not kept costs a step's extra tokens.

The decode pipeline (`swarm.client.pipeline`) sends the last token and the draft through the chain in one step and
keeps what the sampler accepts; the peers' caches rewind past the rest at the next step.

The draft length adapts: it grows while drafts are kept whole and shrinks to what was kept otherwise; a draft of
which nothing is kept pauses drafting for a while (doubling up to `max_pause` positions), so a text with nothing to
look up (free chat) pays for few wasted steps. Lookups are O(1) per token: an index from each n-gram to where it
last ended with a token after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Drafter(Protocol):
    """What the decode pipeline asks of a drafter (PromptLookup; swarm.client.drafting.ModelDrafter)."""

    async def propose(self, limit: int) -> list[int]: ...  # up to `limit` tokens to follow the text so far

    def result(self, drafted: int, kept: int) -> None: ...  # how many of the last proposal the chain kept

    def extend(self, tokens: Iterable[int]) -> None: ...  # the tokens chosen since

    def probabilities(self) -> Any: ...  # the last proposal's distributions [k, V] if sampled from them, else None

    def prepare(self) -> None: ...  # the prompt is about to go through the chain (a model drafter reads it too)

    def close(self) -> None: ...  # the generation has ended


class _Index:
    """n-grams (min_ngram..max_ngram tokens) of a growing token list → the position after their latest occurrence
    that has a following token."""

    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending at end - 1 now have a token after them
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def follow(self, suffix: Sequence[int], limit: int, exclude_end: bool = False) -> list[int]:
        """Up to `limit` tokens that followed the longest n-gram ending `suffix` (its latest occurrence)."""
        for n in range(min(self.max_ngram, len(suffix)), self.min_ngram - 1, -1):
            after = self._after.get(tuple(suffix[len(suffix) - n :]))
            if after is not None and not (exclude_end and after >= len(self.tokens)):
                return self.tokens[after : after + limit]
        return []


class PromptLookup:
    """Drafts for one row: `draft(limit)` proposes up to that many tokens to follow the text so far; `extend` adds
    the tokens chosen since; `result(drafted, kept)` adapts the next draft's length."""

    def __init__(self, context: Sequence[int], prediction: Sequence[int] = (), min_ngram: int = 3,
                 max_ngram: int = 4, first_draft: int = 2, max_draft: int = 8, max_pause: int = 16,
                 min_prediction_ngram: int = 2):
        self._own = _Index(min_ngram, max_ngram)
        self._own.extend(context)
        self._prediction = _Index(min_prediction_ngram, max_ngram) if prediction else None
        if self._prediction is not None:
            self._prediction.extend(prediction)
        self.length, self.max_draft, self.max_pause = first_draft, max_draft, max_pause
        self._pause, self._next_pause = 0, 1
        self.drafted = self.kept = 0  # totals, for usage reports

    def extend(self, tokens: Iterable[int]) -> None:
        self._own.extend(tokens)
        if self._pause:
            self._pause -= 1

    def draft(self, limit: int) -> list[int]:
        limit = min(limit, self.length)
        if limit <= 0 or self._pause:
            return []
        suffix = self._own.tokens[-self._own.max_ngram :]
        if self._prediction is not None:
            found = self._prediction.follow(suffix, limit)
            if found:
                return found
        return self._own.follow(suffix, limit)

    async def propose(self, limit: int) -> list[int]:
        return self.draft(limit)

    def probabilities(self) -> None:
        return None  # the drafts are what the text holds: deterministic

    def prepare(self) -> None:
        pass

    def close(self) -> None:
        pass

    def result(self, drafted: int, kept: int) -> None:
        self.drafted += drafted
        self.kept += kept
        if kept == drafted:
            self.length = min(self.max_draft, self.length + 2)
            self._next_pause = 1
        elif kept == 0:
            self.length = max(1, self.length // 2)
            self._pause, self._next_pause = self._next_pause, min(self.max_pause, 2 * self._next_pause)
        else:
            self.length = max(1, kept + 1)
            self._next_pause = 1
