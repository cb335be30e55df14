"""Write a synthetic Llama GGUF of any size, reproducibly and without holding it: for the converter's tests.

Tensor infos are declared first, then each tensor is made (seeded by its name), quantized and written, one at a
time, so a GGUF bigger than the memory a test allows can be made under that same limit. No tokenizer is written (the
converter is then run with tokenizer=False).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def llama_tensors(layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int):
    """(GGUF name, numpy shape) of a Llama in GGUF order: rows first, as gguf's writer takes them."""
    head_dim = hidden // heads
    yield "token_embd.weight", (vocab, hidden)
    for i in range(layers):
        yield f"blk.{i}.attn_norm.weight", (hidden,)
        yield f"blk.{i}.attn_q.weight", (hidden, hidden)
        yield f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden)
        yield f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden)
        yield f"blk.{i}.attn_output.weight", (hidden, hidden)
        yield f"blk.{i}.ffn_norm.weight", (hidden,)
        yield f"blk.{i}.ffn_gate.weight", (ffn, hidden)
        yield f"blk.{i}.ffn_up.weight", (ffn, hidden)
        yield f"blk.{i}.ffn_down.weight", (hidden, ffn)
    yield "output_norm.weight", (hidden,)
    yield "output.weight", (vocab, hidden)


def _values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if len(shape) == 1:  # norms near 1
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(shape[-1]))).astype(np.float32)


def write_llama_gguf(path: Path, *, layers: int = 2, hidden: int = 64, ffn: int = 128, vocab: int = 256,
                     heads: int = 4, kv_heads: int = 2, qtype: str = "Q8_0", seed: int = 0) -> Path:
    """Matrices in `qtype` (Q8_0, Q4_0, Q4_1, Q5_0, F16 or F32), norms in F32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    quant = GGMLQuantizationType[qtype]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("synthetic llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    specs = list(llama_tensors(layers, hidden, ffn, vocab, heads, kv_heads))

    def kind(shape):
        return GGMLQuantizationType.F32 if len(shape) == 1 else quant

    for name, shape in specs:
        block, type_size = GGML_QUANT_SIZES[kind(shape)]
        nbytes = int(np.prod(shape[:-1])) * (shape[-1] // block) * type_size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in specs:
        data = quantize(_values(name, shape, seed), kind(shape))
        writer.write_tensor_data(data)
        del data
    writer.close()
    return path
