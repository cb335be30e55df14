"""The text of one choice as its tokens come: incremental detokenization and stop strings (`ChoiceText`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class ChoiceText:
    """Detokenizes one choice incrementally: never emits half a UTF-8 character or a prefix of a stop string,
    and cuts the text at the first stop string (which never appears in the output). What it emits, concatenated,
    is `decode(all ids)` (cut at the stop string).

    Each token costs the decode of a short window, not of the whole text (the prefix-offset technique of vLLM and
    TGI): the text a new token adds is decode(window) minus decode(the window's context tokens), where the context
    is the tokens of the text taken last (a token's text may depend on the one before it, e.g. a leading space).
    Text is taken only once it does not end in U+FFFD (an incomplete multi-byte character); the window then moves
    on. It grows only over tokens that complete no character (bytes of one character, skipped special tokens)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.window: list[int] = []  # the context tokens, then those whose text is not taken yet
        self.read = 0  # window[:read] are the context tokens
        self.context_text = ""  # decode(window[:read])
        self.pending = ""  # text taken but not emitted: it could begin a stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.window.append(token_id)
        new = self._new_text()
        if not new or new.endswith("\ufffd"):  # a character in the making: a stop string already complete still stops
            text = self.pending + new
            cut = _first_stop(text, self.stops)
            return self._stop(text, cut) if cut is not None else ""
        self._take(new)
        return self._release(hold=True)

    def flush(self) -> str:
        """The rest of the text, once no token follows."""
        if self.stopped:
            return ""
        if len(self.window) > self.read:
            self._take(self._new_text())
        return self._release(hold=False)

    def _new_text(self) -> str:
        return self.decode(self.window)[len(self.context_text):]

    def _take(self, new: str) -> None:
        self.pending += new
        self.window = self.window[self.read:]  # the tokens just read are the next context
        self.read = len(self.window)
        self.context_text = self.decode(self.window)

    def _release(self, hold: bool) -> str:
        """Emit the pending text up to a stop string, or up to what could begin one (`hold`)."""
        cut = _first_stop(self.pending, self.stops)
        if cut is not None:
            return self._stop(self.pending, cut)
        end = len(self.pending) - (_partial_stop(self.pending, self.stops) if hold else 0)
        out, self.pending = self.pending[:end], self.pending[end:]
        return out

    def _stop(self, text: str, cut: int) -> str:
        self.stopped, self.pending = True, ""
        return text[:cut]


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in `text` begins (None: there is none)."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)


def _partial_stop(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (shorter than it): held back."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
