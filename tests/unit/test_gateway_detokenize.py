"""Incremental detokenization (`app.detokenize.ChoiceText`) against its reference, the whole text decoded again after
every token: over many random token sequences of the real SmolLM2 tokenizer and of the byte tokenizer the gateway
tests use (multi-byte characters, emoji, runs of spaces, invalid bytes, special tokens), what it emits concatenates
to `decode(all ids)` exactly, never takes back what it emitted, and stops where the reference stops.

Run: .venv/bin/python -m pytest tests/unit/test_gateway_detokenize.py
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from transformers import AutoTokenizer

from app.detokenize import ChoiceText
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.unit.test_gateway import FakeBackend

Decode = Callable[[Sequence[int]], str]
PIECES = ["a", "the", " ", "  ", "   ", "\n", "\t", ".", ",", "!", "?", "é", "ß", "ü", "—", "€", "中文",
          "日本語", "한국어", "Ω", "🤖", "🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\u0301",
          "Hello", " world", "STOP", "<|im_end|>", "ab", "c"]


class ReferenceText:
    """The reference: decodes the whole text again after every token (the gateway's former ChoiceText)."""

    def __init__(self, decode: Decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text, min(hits))
        safe = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        return self._emit(text, safe - hold)

    def flush(self) -> str:
        return self._emit(self.decode(self.ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.emitted:
            return ""
        out, self.emitted = text[self.emitted: end], end
        return out


def run(text: ChoiceText | ReferenceText, ids: list[int]) -> tuple[list[str], int | None]:
    """Feed `ids` until the text stops; the emitted pieces (the flush last) and the index of the stopping token."""
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(text.add(token))
        if text.stopped:
            return pieces, i
    return [*pieces, text.flush()], None


def check(decode: Decode, ids: list[int], stops: list[str]) -> None:
    pieces, stopped_at = run(ChoiceText(decode, stops), ids)
    ref_pieces, ref_stopped_at = run(ReferenceText(decode, stops), ids)
    out, full = "".join(pieces), decode(ids)
    assert (out, stopped_at) == ("".join(ref_pieces), ref_stopped_at), (ids, stops)
    if not stops:
        assert out == full, ids
    assert not any(s in out for s in stops)
    emitted = ""
    for piece in pieces:  # nothing emitted is ever revised: no half character, no text a later token changes
        emitted += piece
        assert full.startswith(emitted), (ids, stops)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))


def stops_for(rng: random.Random, full: str) -> list[str]:
    """Up to 4 stop strings: pieces of the text (so that they occur, often across tokens) and absent ones."""
    stops = []
    for _ in range(rng.randint(1, 4)):
        if full and rng.random() < 0.7:
            start = rng.randrange(len(full))
            stops.append(full[start: start + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(["STOP", "xyz", "🤖!", " \n", "é"]))
    return [s for s in stops if s and "\ufffd" not in s]


@pytest.fixture(scope="module")
def smollm_decode() -> tuple[Decode, object]:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path)

    def decode(ids: Sequence[int]) -> str:  # as SwarmTextService.decode
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return decode, tokenizer


def smollm_sequences(tokenizer, rng: random.Random, count: int) -> list[list[int]]:
    vocab = len(tokenizer)
    byte_tokens = [t for t in range(vocab) if len(tokenizer.convert_ids_to_tokens(t)) == 1][:256]
    sequences = []
    for k in range(count):
        kind = k % 3
        if kind == 0:  # encoded text, with special tokens and stray byte tokens mixed in
            ids = list(tokenizer.encode(random_text(rng), add_special_tokens=False))
            for _ in range(rng.randint(0, 3)):
                ids.insert(rng.randint(0, len(ids)), rng.choice([*tokenizer.all_special_ids, *byte_tokens]))
        elif kind == 1:  # single-byte tokens: partial and invalid UTF-8 sequences
            ids = [rng.choice(byte_tokens) for _ in range(rng.randint(1, 30))]
        else:  # anything in the vocabulary
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        sequences.append(ids)
    return sequences


def test_smollm_output_is_exactly_the_decoded_text(smollm_decode):
    decode, tokenizer = smollm_decode
    rng = random.Random(0)
    for ids in smollm_sequences(tokenizer, rng, 600):
        check(decode, ids, [])


def test_smollm_stop_strings_match_the_reference(smollm_decode):
    decode, tokenizer = smollm_decode
    rng = random.Random(1)
    for ids in smollm_sequences(tokenizer, rng, 600):
        check(decode, ids, stops_for(rng, decode(ids)))


def test_byte_tokenizer_output_and_stops_match_the_reference():
    decode = FakeBackend().decode  # one byte per token; 0 is a special token that decodes to nothing
    rng = random.Random(2)
    for k in range(1500):
        if k % 2:
            ids = list(random_text(rng).encode("utf-8"))
        else:  # any bytes: lead bytes without continuations, lone continuations, overlong forms, the special 0
            ids = [rng.choice([0, 0x41, 0x20, 0x80, 0xBF, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xA4, 0x96,
                               0xE0, 0xED, 0xF4, 0xFF]) for _ in range(rng.randint(1, 30))]
        check(decode, ids, [])
        check(decode, ids, stops_for(rng, decode(ids)))


def test_each_token_decodes_a_short_window_not_the_whole_text(smollm_decode):
    decode, tokenizer = smollm_decode
    ids = list(tokenizer.encode("Once upon a time, a robot 🤖 named Zoë painted — every day — " * 60,
                                add_special_tokens=False))
    windows: list[int] = []

    def counting(window: Sequence[int]) -> str:
        windows.append(len(window))
        return decode(window)

    text = ChoiceText(counting, ["never there"])
    assert "".join(text.add(t) for t in ids) + text.flush() == decode(ids)
    assert len(ids) > 1000 and max(windows) <= 8 and len(windows) <= 2 * len(ids) + 1
