"""Decode rows' attention in one native call per layer (kernels/cpu_attention.c), each row over its own keys.

    append_rows(key_states, rows, key_buffers, positions)         # each row's new key into its session's buffer
    decode_attention(query, rows, buffers, lengths, out, scale, window)

A batched decode step has one query row per session, each against that session's cached keys. torch's SDPA per row
costs ~25 us of dispatch for a few microseconds of arithmetic, and appending a row's new key and value to its cache
two slice assignments of ~5 us each; here one call does either for every row of a layer, reading and writing the
sessions' cache buffers in place (no copy, no mask), in float32 on the CPU. A row's result depends only on its own
query and keys (the same bits whatever else is in the call) and equals SDPA's for one unmasked query within float32
rounding of the sums (tests/unit/test_attention_kernel.py). Both return False, doing nothing, where they do not
apply (no C compiler, not float32 CPU tensors laid out as the kernel reads them, or SWARM_NATIVE_ATTENTION=0);
callers use torch then.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from kernels.cpu import FLAGS, compile_library

SOURCE = Path(__file__).with_name("cpu_attention.c")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SWARM_NATIVE_ATTENTION", "1") == "0":  # torch's SDPA per row instead (to compare)
        return None
    return build((*FLAGS, "-lm"))


def build(flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """Compile (or find in the cache) cpu_attention.c with these flags and load it; None when that fails."""
    library = compile_library(SOURCE, flags)
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.decode_attention.restype = ctypes.c_int
    library.decode_attention.argtypes = [i64, i64, i64, i64, ctypes.c_float, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                         ptr, ptr, ptr, i64]
    library.append_rows.restype = None
    library.append_rows.argtypes = [i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr]
    return library


def available() -> bool:
    return _library() is not None


def _int64s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _readable(t: torch.Tensor) -> bool:
    """A [1, heads, T, D] (or [1, T, heads, D]) float32 CPU tensor whose rows of D floats are contiguous."""
    return t.dtype == torch.float32 and t.is_cpu and t.dim() == 4 and t.shape[0] == 1 and t.stride(-1) == 1


def _buffers_fit(buffers: list[torch.Tensor], kv_heads: int, dim: int, tokens: list[int]) -> bool:
    """Every buffer a [1, kv_heads, capacity, dim] float32 CPU tensor whose tokens' rows of dim floats follow each
    other (any head stride), holding its row's tokens: the C code writes and reads them by address, trusting this
    (~0.4 us a buffer)."""
    for b, n in zip(buffers, tokens, strict=True):
        shape = b.shape
        if not (b.dtype == torch.float32 and b.is_cpu and len(shape) == 4 and shape[0] == 1 and shape[1] == kv_heads
                and shape[3] == dim and shape[2] >= n and b.stride()[2:] == (dim, 1)):
            return False
    return True


def append_rows(states: torch.Tensor, rows: list[int], buffers: list[torch.Tensor], positions: list[int]) -> bool:
    """states [1, kv_heads, T, D]: token rows[i] goes to buffers[i][0, :, positions[i]] (buffers [1, kv_heads,
    capacity, D], as SpanKVCache.reserve returns them)."""
    if (not rows or not len(rows) == len(buffers) == len(positions) or not _readable(states)
            or not 0 <= min(rows) <= max(rows) < states.shape[2] or min(positions) < 0):
        return False
    library = _library()
    _, kv_heads, _, dim = states.shape
    if library is None or not _buffers_fit(buffers, kv_heads, dim, [p + 1 for p in positions]):
        return False
    library.append_rows(len(rows), kv_heads, dim, states.data_ptr(), _int64s(rows), states.stride(2), states.stride(1),
                        _int64s([b.data_ptr() for b in buffers]), _int64s([b.stride(1) for b in buffers]),
                        _int64s(positions))
    return True


def decode_attention(query: torch.Tensor, rows: list[int], buffers: list[tuple[torch.Tensor, torch.Tensor]],
                     lengths: list[int], out: torch.Tensor, scale: float, window: int | None = None) -> bool:
    """Row i: query[0, :, rows[i]] ([1, heads, T, D]) attends to the first lengths[i] keys and values of buffers[i]
    ([1, kv_heads, capacity, D] each; the last `window` of them for a sliding layer); the result goes to
    out[0, rows[i]] ([1, T, heads, D])."""
    if (not rows or not len(rows) == len(buffers) == len(lengths) or not _readable(query) or not _readable(out)
            or min(lengths) < 1):
        return False
    _, heads, tokens, dim = query.shape
    if out.shape != (1, tokens, heads, dim) or out.stride(2) != dim or not 0 <= min(rows) <= max(rows) < tokens:
        return False
    if buffers[0][0].dim() != 4 or buffers[0][0].shape[1] < 1:
        return False
    kv_heads = buffers[0][0].shape[1]
    keys, values = [k for k, _ in buffers], [v for _, v in buffers]
    if (heads % kv_heads or not _buffers_fit(keys, kv_heads, dim, lengths)
            or not _buffers_fit(values, kv_heads, dim, lengths)):
        return False
    library = _library()
    if library is None:
        return False
    firsts = [n - window if window is not None and n > window else 0 for n in lengths]
    status = library.decode_attention(len(rows), heads, kv_heads, dim, scale, query.data_ptr(), query.stride(2),
                                      query.stride(1), _int64s(rows), _int64s([k.data_ptr() for k in keys]),
                                      _int64s([v.data_ptr() for v in values]), _int64s([k.stride(1) for k in keys]),
                                      _int64s([v.stride(1) for v in values]), _int64s(firsts),
                                      _int64s([n - f for n, f in zip(lengths, firsts, strict=True)]), out.data_ptr(),
                                      out.stride(1))
    if status == -2:
        raise MemoryError("decode attention: no memory for the scores")
    return status == 0
