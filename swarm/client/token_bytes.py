"""The bytes of one token, as OpenAI's logprobs give them (`bytes`), for any Hugging Face tokenizer.

A token's text alone loses them where a token holds part of a character: byte-level BPE (GPT-2's, SmolLM2's, Llama
3's) splits an emoji over several tokens, each of which decodes to U+FFFD, whose UTF-8 bytes are not the token's. A
client joins the `bytes` of consecutive tokens to rebuild such text. Byte-level vocabularies write each byte as one
printable character (GPT-2's `bytes_to_unicode`), SentencePiece ones with byte fallback as `<0xE2>`; any other
token's bytes are those of its decoded text, with the space a SentencePiece word piece (`▁world`) stands for even
where the tokenizer's decoder drops it from a text's start (Llama 2's, Mistral's): a token's own bytes, as
tiktoken's tokens hold their leading space. A special token (a BOS, a chat template's markers) has none: texts
leave it out (`skip_special_tokens`), so an echoed prompt's text offsets do not count it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _printable_bytes() -> dict[str, int]:
    """GPT-2's map from the character a byte-level vocabulary writes for a byte to that byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(kept)
    shifted = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and '"ByteLevel"' in str(decoder.__getstate__())


class TokenBytes:
    """`of(token_id)`: the token's bytes (cached; the vocabulary is bounded)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.printable = _printable_bytes() if _byte_level(tokenizer) else None
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.of = lru_cache(maxsize=1 << 16)(self._of)

    def _of(self, token_id: int) -> bytes:
        if token_id in self.special:
            return b""
        text = self.tokenizer.decode([token_id])
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if "\ufffd" not in text:
            if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
                text = " " + text
            return text.encode("utf-8")
        if isinstance(piece, str):
            if (byte := _BYTE_TOKEN.fullmatch(piece)) is not None:
                return bytes([int(byte[1], 16)])
            if self.printable is not None and all(c in self.printable for c in piece):
                return bytes(self.printable[c] for c in piece)
        return text.encode("utf-8")
