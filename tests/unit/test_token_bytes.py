"""Token bytes (OpenAI logprobs' `bytes`): a token holding part of a character gives its own bytes, so that the
bytes of consecutive tokens join into the text, for byte-level BPE (SmolLM2's real tokenizer) and SentencePiece-style
byte fallback (a small tokenizer built here)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from swarm.client.token_bytes import TokenBytes
from swarm.model.source import resolve_model

TEXTS = ["ok 🤖 — ünïcode", "日本語のテキスト", "  two spaces\tand a tab\n", "plain ascii"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_join_into_the_text(text):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model().path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    of = TokenBytes(tokenizer).of
    assert b"".join(of(i) for i in ids).decode("utf-8") == text
    if any(ord(c) > 127 for c in text):  # some token is part of a character: its text alone would not do
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("strips", [False, True])
def test_sentencepiece_tokens_give_their_byte_and_their_space(strips):
    """Byte fallback (`<0xF0>`), and word pieces with their space, also where the decoder strips a text's first
    space (Llama 2's, Mistral's: `decode([id])` alone loses it)."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁ok": 257, "o": 258, "▁world": 259}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if strips else steps)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    of = TokenBytes(tokenizer).of
    ids = [257, *(1 + b for b in "🤖".encode()), 258, 259]  # " ok", the emoji as four byte tokens, "o", " world"
    assert tokenizer.decode(ids) == ("ok🤖o world" if strips else " ok🤖o world")
    assert [of(i) for i in ids[1:5]] == [bytes([b]) for b in "🤖".encode()]
    assert b"".join(of(i) for i in ids) == " ok🤖o world".encode()


def test_a_special_token_has_no_bytes_as_texts_leave_it_out():
    # an echoed prompt begins with its BOS (Gemma's `<bos>`): its text offset counted "<bos>" into a text without it
    tokenizer = AutoTokenizer.from_pretrained(resolve_model().path)
    of = TokenBytes(tokenizer).of
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] in tokenizer.all_special_ids and ids[-1] in tokenizer.all_special_ids
    assert of(ids[0]) == of(ids[-1]) == b""
    assert b"".join(of(i) for i in ids).decode() == tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
