"""Decode rows' attention in one native call per layer (swarm_kernels/cpu_attention.c), each row over its own keys.

    rows = DecodeRows(rows, lengths)             # once per forward: token rows[i] attends to lengths[i] keys
    rows.check(key_buffers, value_buffers)      # per layer: the rows' cache buffers, validated once
    rows.append(key_states, value_states)       # each row's new key and value into its session's buffers
    rows.attend(query, out, scale, window)      # each row's attention over its own keys

    rope(x, cos, sin, out)                      # rotary embedding of token-major heads, as transformers computes it
    rows.rope_append(keys, values, cos, sin)    # the rows' keys rotated into their buffers, values appended

A batched decode step has one query row per session, each against that session's cached keys. torch's SDPA per row
costs ~25 us of dispatch for a few microseconds of arithmetic, and appending a row's new key and value to its cache
two slice assignments of ~5 us each; here one call does either for every row of a layer, reading and writing the
sessions' cache buffers in place (no copy, no mask), in float32 on the CPU. A row's result depends only on its own
query and keys (the same bits whatever else is in the call) and equals SDPA's for one unmasked query within float32
rounding of the sums (tests/unit/test_attention_kernel.py). Each returns False, doing nothing, where it does not
apply (no C compiler, not float32 CPU tensors laid out as the kernel reads them, or SWARM_NATIVE_ATTENTION=0);
callers use torch then. What every layer of a forward shares is laid out once, and a layer's buffers are checked
once for both calls: per-row Python work measured ~1 ms of a 16-row forward of SmolLM2's 30 blocks done per layer
and per call (`append_rows` and `decode_attention` below do one call from scratch).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from swarm_kernels import cpu
from swarm_kernels.cpu import FLAGS, compile_library

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
                                         ptr, ptr, ptr, i64, ctypes.c_int, ctypes.c_int]
    library.attention_kv16.restype, library.attention_kv16.argtypes = ctypes.c_int, [i64]
    library.attention_set_pool.restype, library.attention_set_pool.argtypes = None, [ptr]
    pool = cpu._library()  # rows shared among the threads of the affine kernel's pool (swarm_kernels.cpu.set_threads)
    if pool is not None:
        library.attention_set_pool(ctypes.cast(pool.affine_pool_run, ctypes.c_void_p).value)
    library.append_rows.restype = None
    library.append_rows.argtypes = [i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    library.rope_rows.restype = None
    library.rope_rows.argtypes = [i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64]
    library.rope_append.restype = None
    library.rope_append.argtypes = [i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    return library


def available() -> bool:
    return _library() is not None


def kv16(dim: int) -> bool:
    """Whether caches of 16-bit floats (torch.float16) with this head size are read and written here (F16C: every
    AVX2 CPU; dim a positive multiple of 8, at most 512)."""
    library = _library()
    return library is not None and bool(library.attention_kv16(int(dim)))  # cpu_attention.c's kv16_fits


def _int64s(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _readable(t: torch.Tensor) -> bool:
    """A [1, heads, T, D] (or [1, T, heads, D]) float32 CPU tensor whose rows of D floats are contiguous."""
    return t.dtype == torch.float32 and t.is_cpu and t.dim() == 4 and t.shape[0] == 1 and t.stride(-1) == 1


def _angles(cos: torch.Tensor, sin: torch.Tensor, tokens: int, dim: int) -> bool:
    """cos and sin: T x D contiguous float32 CPU values (e.g. [1, 1, T, D], as a rotary module gives them)."""
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.numel() == tokens * dim
               and t.shape[-1] == dim for t in (cos, sin))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> bool:
    """x [1, T, heads, D] → out (same shape): x * cos + rotate_half(x) * sin, per token t with cos[t], sin[t] (T x D
    values), the same bits as torch computing that expression. False (nothing written) where the kernel does not
    apply (then compute it with torch)."""
    library = _library()
    if library is None or not (_readable(x) and _readable(out)) or out.shape != x.shape:
        return False
    _, tokens, heads, dim = x.shape
    if dim % 2 or not _angles(cos, sin, tokens, dim):
        return False
    library.rope_rows(tokens, heads, dim, x.data_ptr(), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
                      out.data_ptr(), out.stride(1), out.stride(2))
    return True


def _buffers_fit(buffers: list[torch.Tensor], kv_heads: int, dim: int, tokens: list[int]) -> bool:
    """Every buffer a [1, kv_heads, capacity, dim] CPU tensor of one dtype, float32 (or float16 where `kv16`), whose
    tokens' rows of dim values follow each other (any head stride), holding its row's tokens: the C code writes and
    reads them by address, trusting this (~0.4 us a buffer)."""
    dtype = buffers[0].dtype if buffers else torch.float32
    if dtype != torch.float32 and not (dtype == torch.float16 and kv16(dim)):
        return False
    for b, n in zip(buffers, tokens, strict=True):
        shape = b.shape
        if not (b.dtype == dtype and b.is_cpu and len(shape) == 4 and shape[0] == 1 and shape[1] == kv_heads
                and shape[3] == dim and shape[2] >= n and b.stride()[2:] == (dim, 1)):
            return False
    return True


def native_record(keys: torch.Tensor, values: torch.Tensor) -> tuple[int, ...] | None:
    """What `DecodeRows.check_caches` needs of one layer's key and value buffers of a session, taken when they are
    allocated (SpanKVCache.reserve): (key address, value address, their head strides, capacity, kv_heads, dim, 16-bit),
    or None where they are not [1, kv_heads, capacity, dim] CPU tensors of one geometry and dtype that `_buffers_fit`
    takes (`check` of the tensors then decides)."""
    if keys.dim() != 4 or keys.shape != values.shape or keys.dtype != values.dtype:
        return None
    _, kv_heads, capacity, dim = keys.shape
    if not (kv_heads >= 1 and _buffers_fit([keys], kv_heads, dim, [capacity])
            and _buffers_fit([values], kv_heads, dim, [capacity])):
        return None
    return (keys.data_ptr(), values.data_ptr(), keys.stride(1), values.stride(1), capacity, kv_heads, dim,
            int(keys.dtype == torch.float16))


class DecodeRows:
    """The decode rows of one forward, for the native calls of every layer: row i is token rows[i] of the layer's
    sequence and attends to the first lengths[i] keys of its own session's buffers (its new key the last of them).
    What is the same in every layer (the rows, lengths, a sliding window's first keys) is laid out once; per layer,
    `check` validates the rows' key and value buffers and takes their addresses once, then `append` (the rows' new
    keys and values, written at lengths[i] - 1) and `attend` (their attention) use them."""

    def __init__(self, rows: list[int], lengths: list[int]):
        self.count = len(rows)
        self.valid = bool(rows) and len(lengths) == self.count and min(rows) >= 0 and min(lengths) >= 1
        self.lengths = lengths
        self._last_row = max(rows, default=-1)
        self.in_order = rows == list(range(self.count))  # row i is token i of the step (the fused calls' layout)
        self._rows = _int64s(rows)
        self._positions = _int64s([n - 1 for n in lengths])
        self._spans: dict[int | None, tuple[ctypes.Array, ctypes.Array]] = {}
        self._checked: tuple | None = None  # the buffers `check` validated last, their geometry and addresses

    def check(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
        """Row i's buffers keys[i], values[i] ([1, kv_heads, capacity, D] float32 CPU, as SpanKVCache.reserve returns
        them): the same geometry for every row, each holding the row's lengths[i] tokens. False (nothing kept) when
        they are not what the C code reads."""
        self._checked = None
        if not self.valid or len(keys) != self.count or len(values) != self.count or keys[0].dim() != 4:
            return False
        _, kv_heads, _, dim = keys[0].shape
        if kv_heads < 1 or values[0].dtype != keys[0].dtype or not (
                _buffers_fit(keys, kv_heads, dim, self.lengths) and _buffers_fit(values, kv_heads, dim, self.lengths)):
            return False
        self._checked = (keys, values, kv_heads, dim, _int64s([k.data_ptr() for k in keys]),
                         _int64s([v.data_ptr() for v in values]), _int64s([k.stride(1) for k in keys]),
                         _int64s([v.stride(1) for v in values]), int(keys[0].dtype == torch.float16))
        return True

    def check_caches(self, caches: list, layer: int, kv_heads: int, dim: int) -> bool:
        """As `check`, from the records each row's cache (a SpanKVCache, caches[i]) took of the layer's buffers when
        it allocated them, without looking at a tensor (a 16-row forward of 30 layers: ~0.1 ms instead of ~2.5).
        False (nothing kept) where a cache has no such record, or one of another geometry or too short for its row:
        then reserve the buffers and `check` them."""
        self._checked = None
        if not self.valid or len(caches) != self.count:
            return False
        try:
            records = [cache.native[layer] for cache in caches]
        except (AttributeError, IndexError):  # not SpanKVCaches of this span
            return False
        for record, n in zip(records, self.lengths, strict=True):
            if (record is None or record[4] < n or record[5] != kv_heads or record[6] != dim
                    or record[7] != records[0][7]):
                return False
        columns = list(zip(*records, strict=True))
        self._checked = (None, None, kv_heads, dim, _int64s(columns[0]), _int64s(columns[1]), _int64s(columns[2]),
                         _int64s(columns[3]), records[0][7])
        return True

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """key_states, value_states [1, kv_heads, T, D]: token rows[i] goes to position lengths[i] - 1 of row i's
        checked buffers."""
        return self._write([(key_states, True), (value_states, False)])

    def rope_append(self, key_states: torch.Tensor, value_states: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> bool:
        """As `append`, the keys rotated on the way (`rope`): key_states, value_states [1, T, kv_heads, D] (token
        major, as the projections give them), cos and sin T x D."""
        library = _library()
        if self._checked is None or library is None:
            return False
        _, _, kv_heads, dim, key_addresses, _, key_strides, _, kv16 = self._checked
        for states in (key_states, value_states):
            if not (_readable(states) and states.shape[2] == kv_heads and states.shape[3] == dim
                    and self._last_row < states.shape[1]):
                return False
        if dim % 2 or not _angles(cos, sin, key_states.shape[1], dim):
            return False
        if not self._write([(value_states.transpose(1, 2), False)]):
            return False
        library.rope_append(self.count, kv_heads, dim, key_states.data_ptr(), self._rows, key_states.stride(1),
                            key_states.stride(2), cos.data_ptr(), sin.data_ptr(), key_addresses, key_strides,
                            self._positions, kv16)
        return True

    def _write(self, writes: list[tuple[torch.Tensor, bool]]) -> bool:
        """Each (states, into the key buffers or the value ones) appended, once all of them are checked."""
        library = _library()
        if self._checked is None or library is None:
            return False
        _, _, kv_heads, dim, key_addresses, value_addresses, key_strides, value_strides, kv16 = self._checked
        for states, _ in writes:
            if not (_readable(states) and states.shape[1] == kv_heads and states.shape[3] == dim
                    and self._last_row < states.shape[2]):
                return False
        for states, keys in writes:
            addresses, strides = (key_addresses, key_strides) if keys else (value_addresses, value_strides)
            library.append_rows(self.count, kv_heads, dim, states.data_ptr(), self._rows, states.stride(2),
                                states.stride(1), addresses, strides, self._positions, kv16)
        return True

    def window(self, window: int | None) -> tuple[ctypes.Array, ctypes.Array]:
        """(first key, number of keys) each row attends to: all of them, or a sliding layer's last `window`."""
        if window not in self._spans:
            firsts = [n - window if window is not None and n > window else 0 for n in self.lengths]
            self._spans[window] = (_int64s(firsts), _int64s([n - f for n, f in zip(self.lengths, firsts, strict=True)]))
        return self._spans[window]

    def attend(self, query: torch.Tensor, out: torch.Tensor, scale: float, window: int | None = None) -> bool:
        """Row i: query[0, :, rows[i]] ([1, heads, T, D]) over the first lengths[i] keys and values of its checked
        buffers (the last `window` of them for a sliding layer) → out[0, rows[i]] ([1, T, heads, D])."""
        library = _library()
        if self._checked is None or library is None or not _readable(query) or not _readable(out):
            return False
        _, _, kv_heads, dim, key_addresses, value_addresses, key_strides, value_strides, kv16 = self._checked
        _, heads, tokens, query_dim = query.shape
        if (query_dim != dim or heads % kv_heads or out.shape != (1, tokens, heads, dim) or out.stride(2) != dim
                or self._last_row >= tokens):
            return False
        firsts_array, counts = self.window(window)
        status = library.decode_attention(self.count, heads, kv_heads, dim, scale, query.data_ptr(), query.stride(2),
                                          query.stride(1), self._rows, key_addresses, value_addresses, key_strides,
                                          value_strides, firsts_array, counts, out.data_ptr(), out.stride(1),
                                          cpu.threads(), kv16)
        if status == -2:
            raise MemoryError("decode attention: no memory for the scores")
        return status == 0


def append_rows(states: torch.Tensor, rows: list[int], buffers: list[torch.Tensor], positions: list[int]) -> bool:
    """states [1, kv_heads, T, D]: token rows[i] goes to buffers[i][0, :, positions[i]] (buffers [1, kv_heads,
    capacity, D], as SpanKVCache.reserve returns them). One tensor's rows: DecodeRows appends keys and values."""
    if not rows or len(positions) != len(rows) or min(positions) < 0:
        return False
    batch = DecodeRows(rows, [p + 1 for p in positions])
    return batch.check(buffers, buffers) and batch._write([(states, True)])


def decode_attention(query: torch.Tensor, rows: list[int], buffers: list[tuple[torch.Tensor, torch.Tensor]],
                     lengths: list[int], out: torch.Tensor, scale: float, window: int | None = None) -> bool:
    """Row i: query[0, :, rows[i]] ([1, heads, T, D]) attends to the first lengths[i] keys and values of buffers[i]
    ([1, kv_heads, capacity, D] each; the last `window` of them for a sliding layer); the result goes to
    out[0, rows[i]] ([1, T, heads, D])."""
    batch = DecodeRows(rows, lengths)
    return (batch.check([k for k, _ in buffers], [v for _, v in buffers])
            and batch.attend(query, out, scale, window))
