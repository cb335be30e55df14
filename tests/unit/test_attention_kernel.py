"""swarm_kernels/attention.py: decode rows' attention and key appends in one native call, against torch's SDPA."""

from __future__ import annotations

import functools
import platform

import pytest
import torch

from swarm_kernels import attention, cpu

pytestmark = pytest.mark.skipif(not attention.available(), reason="no C compiler: the native kernels are unavailable")
needs_x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds")


def _march(arch: str) -> tuple[str, ...]:
    return tuple(f if f != "-march=native" else f"-march={arch}" for f in (*cpu.FLAGS, "-lm"))


@functools.cache
def _build(flags: tuple[str, ...]):
    library = attention.build(flags)
    assert library is not None, f"swarm_kernels/cpu_attention.c did not build with {flags}"
    return library


@pytest.fixture(autouse=True, params=[
    pytest.param(None, id="march-native"),
    pytest.param(_march("x86-64-v3"), id="avx2", marks=needs_x86),  # the AVX2 + FMA intrinsics (AVX-512 CPUs too)
    pytest.param(_march("x86-64"), id="sse2-portable", marks=needs_x86),  # the portable loops (any head size)
])
def build(request, monkeypatch):
    """Every test runs each build of the kernel a machine can end up with (where this CPU can execute it)."""
    if request.param is not None:
        library = _build(request.param)
        monkeypatch.setattr(attention, "_library", lambda: library)


def _sessions(g: torch.Generator, lengths: list[int], kv_heads: int, dim: int, capacity: int = 160):
    """Per session a key and a value buffer [1, kv_heads, capacity, dim] of which the first `length` are its keys."""
    return [(torch.randn(1, kv_heads, capacity, dim, generator=g), torch.randn(1, kv_heads, capacity, dim, generator=g))
            for _ in lengths]


def _sdpa(query_row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(query_row, keys, values, scale=scale,
                                                            enable_gqa=query_row.shape[1] != keys.shape[1])[0, :, 0]


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80)])
@pytest.mark.parametrize("window", [None, 5])
def test_rows_over_their_own_keys_equal_torch_sdpa(heads, kv_heads, dim, window):
    g = torch.Generator().manual_seed(heads * dim)
    lengths = [1, 4, 5, 37, 150]
    buffers = _sessions(g, lengths, kv_heads, dim)
    tokens = 9  # rows sit among other tokens of the sequence, as decode rows among prefill chunks do
    query = torch.randn(1, tokens, heads, dim, generator=g).transpose(1, 2)  # [1, heads, T, D] as the layers make it
    rows = [8, 0, 3, 4, 6]
    out = torch.full((1, tokens, heads, dim), float("nan"))
    scale = dim**-0.5
    assert attention.decode_attention(query, rows, buffers, lengths, out, scale, window)
    for row, (keys, values), n in zip(rows, buffers, lengths, strict=True):
        first = max(0, n - window) if window else 0
        want = _sdpa(query[:, :, row : row + 1], keys[:, :, first:n], values[:, :, first:n], scale)
        torch.testing.assert_close(out[0, row], want, atol=2e-6, rtol=1e-5)
    assert out[0, [1, 2, 5, 7]].isnan().all()  # tokens that are not rows are not written


def test_a_rows_result_is_the_same_bits_whatever_else_is_in_the_call():
    g = torch.Generator().manual_seed(3)
    lengths = [70, 3, 129]
    buffers = _sessions(g, lengths, 3, 64)
    query = torch.randn(1, 9, 3, 64, generator=g)
    together = torch.zeros(1, 3, 9, 64)
    assert attention.decode_attention(query, [0, 1, 2], buffers, lengths, together, 0.125)
    for i in range(3):
        alone = torch.zeros(1, 1, 9, 64)
        assert attention.decode_attention(query[:, :, i : i + 1], [0], [buffers[i]], [lengths[i]], alone, 0.125)
        assert torch.equal(alone[0, 0], together[0, i])


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 1, 128), (6, 2, 80), (4, 2, 64), (12, 3, 64)])
def test_a_heads_result_is_the_same_bits_beside_its_key_heads_other_heads_as_alone(heads, kv_heads, dim):
    # heads sharing a key head are computed a few at a time (three with AVX-512, two for groups of 2, 4 or 8), each
    # with its own sums in the order of one head alone
    g = torch.Generator().manual_seed(heads + dim)
    lengths = [70, 3, 129]
    buffers = _sessions(g, lengths, kv_heads, dim)
    query = torch.randn(1, heads, len(lengths), dim, generator=g)
    together = torch.zeros(1, len(lengths), heads, dim)
    assert attention.decode_attention(query, list(range(len(lengths))), buffers, lengths, together, 0.125)
    group = heads // kv_heads
    for h in range(heads):
        key_head = [(keys[:, h // group : h // group + 1].clone(), values[:, h // group : h // group + 1].clone())
                    for keys, values in buffers]
        alone = torch.zeros(1, len(lengths), 1, dim)
        assert attention.decode_attention(query[:, h : h + 1], list(range(len(lengths))), key_head, lengths, alone,
                                          0.125)
        assert torch.equal(alone[0, :, 0], together[0, :, h])


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 1, 128), (6, 2, 80), (4, 4, 32)])
def test_16_bit_caches_attend_as_float32_caches_of_the_same_values(heads, kv_heads, dim):
    # a half converts to a float exactly: the same bits as over float32 buffers holding the rounded values
    g = torch.Generator().manual_seed(heads * dim + 1)
    lengths = [70, 3, 129, 1]
    buffers = _sessions(g, lengths, kv_heads, dim)
    halves = [(k.half(), v.half()) for k, v in buffers]
    rounded = [(k.float(), v.float()) for k, v in halves]
    query = torch.randn(1, heads, len(lengths), dim, generator=g)
    out16, out32 = (torch.zeros(1, len(lengths), heads, dim) for _ in range(2))
    rows = list(range(len(lengths)))
    if not attention.kv16(dim):  # a build without F16C (the portable loops): refused, nothing read or written
        assert not attention.decode_attention(query, rows, halves, lengths, out16, 0.125)
        assert not out16.any()
        return
    assert attention.decode_attention(query, rows, halves, lengths, out16, 0.125, 5)
    assert attention.decode_attention(query, rows, rounded, lengths, out32, 0.125, 5)
    assert torch.equal(out16, out32)
    mixed = [halves[0], rounded[1], halves[2], halves[3]]  # one call reads one kind of buffer
    assert not attention.decode_attention(query, rows, mixed, lengths, out16, 0.125)


def test_16_bit_caches_are_taken_only_for_head_sizes_the_kernel_reads():
    # the C build decides (kv16_fits): a multiple of 8 values, at most rope_append's 512
    if not attention.kv16(64):  # a build without F16C takes none
        assert not any(attention.kv16(dim) for dim in (8, 128, 512))
        return
    assert all(attention.kv16(dim) for dim in (8, 64, 80, 128, 256, 512))
    assert not any(attention.kv16(dim) for dim in (0, 4, 12, 63, 520, 1024))


def test_16_bit_caches_are_written_as_torch_rounds_to_halves():
    g = torch.Generator().manual_seed(5)
    kv_heads, dim = 3, 64
    states = torch.randn(1, kv_heads, 5, dim, generator=g) * 300  # also past a half's 11 bits
    states[0, 0, 4, :3] = torch.tensor([1e-6, 7e4, -float("inf")])  # a subnormal half, past its largest, infinite
    buffers = [torch.zeros(1, kv_heads, 16, dim, dtype=torch.float16) for _ in range(2)]
    if not attention.kv16(dim):
        assert not attention.append_rows(states, [4, 1], buffers, [0, 9])
        return
    assert attention.append_rows(states, [4, 1], buffers, [0, 9])
    assert torch.equal(buffers[0][0, :, 0], states[0, :, 4].half())
    assert torch.equal(buffers[1][0, :, 9], states[0, :, 1].half())
    assert buffers[0][0, :, 1:].count_nonzero() == 0 and buffers[1][0, :, :9].count_nonzero() == 0
    # the keys rotated (as `rope` computes them in float32) and then rounded; the values rounded
    keys = [torch.zeros(1, kv_heads, 16, dim, dtype=torch.float16) for _ in range(2)]
    values = [torch.zeros(1, kv_heads, 16, dim, dtype=torch.float16) for _ in range(2)]
    rows = attention.DecodeRows([0, 1], [3, 8])
    assert rows.check(keys, values)
    k, v = (torch.randn(1, 2, kv_heads, dim, generator=g) for _ in range(2))
    cos, sin = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g)
    assert rows.rope_append(k, v, cos, sin)
    rotated = torch.empty_like(k)
    assert attention.rope(k, cos, sin, rotated)
    for i, position in enumerate([2, 7]):
        assert torch.equal(keys[i][0, :, position], rotated[0, i].half())
        assert torch.equal(values[i][0, :, position], v[0, i].half())


def test_rows_shared_among_the_kernel_pools_threads_give_the_same_bits(monkeypatch):
    # with the peer's kernel threads (cpu.set_threads), a call's rows are claimed by the affine kernel's pool:
    # each row computed whole by one thread, so the same bits as on one
    g = torch.Generator().manual_seed(7)
    lengths = [70, 3, 129, 40, 1, 90, 17]
    buffers = _sessions(g, lengths, 3, 64)
    query = torch.randn(1, 9, len(lengths), 64, generator=g)
    monkeypatch.setattr(cpu, "_threads", 1)  # restored after the test
    one = torch.zeros(1, len(lengths), 9, 64)
    assert attention.decode_attention(query, list(range(len(lengths))), buffers, lengths, one, 0.125)
    if cpu.set_threads(2) < 2:
        pytest.skip("the kernel's pool could not start a helper thread")
    split = cpu._library().affine_split_calls()
    shared = torch.zeros(1, len(lengths), 9, 64)
    assert attention.decode_attention(query, list(range(len(lengths))), buffers, lengths, shared, 0.125)
    assert cpu._library().affine_split_calls() == split + 1  # the rows went through the pool
    assert torch.equal(one, shared)


def test_large_scores_stay_finite():
    # the softmax subtracts each head's maximum: scores of ~1e4 would overflow exp otherwise
    keys = torch.full((1, 1, 4, 8), 100.0)
    values = torch.arange(32, dtype=torch.float32).reshape(1, 1, 4, 8)
    query = torch.full((1, 1, 1, 8), 100.0)
    out = torch.zeros(1, 1, 1, 8)
    assert attention.decode_attention(query, [0], [(keys, values)], [4], out, 1.0)
    torch.testing.assert_close(out[0, 0, 0], values[0, 0].mean(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_score_gives_nan_as_sdpa_does(bad):
    g = torch.Generator().manual_seed(6)
    keys, values = torch.randn(1, 1, 12, 16, generator=g), torch.randn(1, 1, 12, 16, generator=g)
    keys[0, 0, 5, 3] = bad
    query, out = torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16)
    assert attention.decode_attention(query, [0], [(keys, values)], [12], out, 0.25)
    want = _sdpa(query, keys, values, 0.25)
    assert want.isnan().all() and out.isnan().all()


def test_append_rows_writes_each_rows_key_at_its_position_and_nothing_else():
    g = torch.Generator().manual_seed(4)
    buffers = [torch.zeros(1, 3, 16, 64), torch.zeros(1, 3, 130, 64)]
    states = torch.randn(1, 5, 3, 64, generator=g).transpose(1, 2)  # [1, kv_heads, T, D], token-major in memory
    assert attention.append_rows(states, [4, 1], buffers, [0, 129])
    assert torch.equal(buffers[0][0, :, 0], states[0, :, 4]) and torch.equal(buffers[1][0, :, 129], states[0, :, 1])
    assert buffers[0][0, :, 1:].abs().sum() == 0 and buffers[1][0, :, :129].abs().sum() == 0


def test_what_the_kernel_cannot_read_is_refused_not_read():
    g = torch.Generator().manual_seed(5)
    (keys, values), = _sessions(g, [8], 2, 16, capacity=8)
    query, out = torch.randn(1, 4, 1, 16, generator=g), torch.zeros(1, 1, 4, 16)
    assert attention.decode_attention(query, [0], [(keys, values)], [8], out, 0.25)
    refused = [
        (query.double(), [(keys, values)], [8], out),  # not float32
        (query, [(keys, values)], [9], out),  # more keys than the buffer holds
        (query, [(keys, values)], [0], out),  # no key at all
        (query, [(keys.transpose(2, 3), values)], [8], out),  # keys not laid out token by token
        (query, [(keys[:, :1], values[:, :1])], [8], out[..., :3, :]),  # 4 heads onto 1 key head, 3 heads out
        (query, [(keys, values)], [8], torch.zeros(1, 1, 4, 8)),  # out narrower than the heads
        (torch.randn(1, 3, 1, 16), [(keys, values)], [8], torch.zeros(1, 1, 3, 16)),  # 3 heads over 2 key heads
    ]
    refused += [
        (query, [(keys[:0], values[:0])], [8], out),  # an empty batch of keys
        (torch.cat([query, query]), [(keys, values)], [8], torch.cat([out, out])),  # a batch of 2 queries
        (query, [(torch.cat([keys, keys]), torch.cat([values, values]))], [8], out),  # keys of 2 batches
    ]
    for q, kv, lengths, o in refused:
        assert not attention.decode_attention(q, [0], kv, lengths, o, 0.25)
    assert not attention.decode_attention(query, [1], [(keys, values)], [8], out, 0.25)  # no token 1 in the query
    assert not attention.decode_attention(query, [0, 0], [(keys, values)], [8], out, 0.25)  # 2 rows, 1 buffer
    assert not attention.decode_attention(query, [0], [(keys, values)], [8, 8], out, 0.25)  # 2 lengths
    states = torch.randn(1, 2, 1, 16, generator=g)
    assert not attention.append_rows(states, [0], [keys], [8])  # past the buffer's capacity
    assert not attention.append_rows(states.double(), [0], [keys.double()], [0])
    assert not attention.append_rows(states, [1], [keys], [0])  # no token 1 in the states
    assert not attention.append_rows(states, [0], [keys], [-1])  # before the buffer
    assert not attention.append_rows(states, [0, 0], [keys], [0])  # 2 rows, 1 buffer
    assert not attention.append_rows(states, [0], [keys, keys], [0, 1])  # 1 row, 2 buffers
    assert not attention.append_rows(states, [0], [keys[:0]], [0])  # an empty batch


def test_rows_checked_from_their_caches_records_attend_as_rows_checked_from_their_buffers():
    from swarm.model.span import SpanKVCache

    g = torch.Generator().manual_seed(6)
    kv_heads, dim, lengths = 2, 16, [5, 9, 3]
    caches = [SpanKVCache(num_layers=2, max_length=300) for _ in lengths]
    for cache, n in zip(caches, lengths, strict=True):  # n - 1 tokens held; each row appends its n-th
        for layer in range(2):
            cache.update(torch.randn(1, kv_heads, n - 1, dim, generator=g), torch.randn(1, kv_heads, n - 1, dim,
                                                                                     generator=g), layer)
        cache.commit(n - 1)
    states = [torch.randn(1, kv_heads, len(lengths), dim, generator=g) for _ in range(2)]
    query = torch.randn(1, 4, len(lengths), dim, generator=g)
    outs = []
    for from_records in (True, False):
        rows = attention.DecodeRows(list(range(len(lengths))), lengths)
        if from_records:
            assert rows.check_caches(caches, 1, kv_heads, dim)
        else:
            buffers = [c.reserve(states[0], states[1], 1, n) for c, n in zip(caches, lengths, strict=True)]
            assert rows.check([k for k, _ in buffers], [v for _, v in buffers])
        out = torch.zeros(1, len(lengths), 4, dim)
        assert rows.append(*states) and rows.attend(query, out, 0.25)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    rows = attention.DecodeRows([0, 1, 2], lengths)
    assert not rows.check_caches(caches, 1, kv_heads + 1, dim)  # another geometry
    assert not rows.check_caches(caches, 1, kv_heads, dim * 2)
    assert not rows.check_caches(caches[:2], 1, kv_heads, dim)  # a row without its cache
    assert not rows.check_caches([caches[0], object(), caches[2]], 1, kv_heads, dim)  # not a SpanKVCache
    assert not rows.append(*states)  # nothing kept from a refused check
    assert not attention.DecodeRows([0, 1, 2], [5, 9, 129]).check_caches(caches, 1, kv_heads, dim)  # past capacity
    fresh = SpanKVCache(num_layers=2, max_length=300)
    assert fresh.native == [None, None] and not attention.DecodeRows([0], [1]).check_caches([fresh], 0, kv_heads, dim)
    old = caches[2].native[1]
    caches[2].reserve(states[0], states[1], 1, 129)  # grown: the record follows the new buffers
    assert caches[2].native[1] != old and caches[2].native[1][4] == 256
    assert attention.DecodeRows([0, 1, 2], [5, 9, 129]).check_caches(caches, 1, kv_heads, dim)
    assert attention.native_record(torch.zeros(1, 2, 8, 16).double(), torch.zeros(1, 2, 8, 16).double()) is None
    assert attention.native_record(torch.zeros(1, 2, 16, 8).transpose(2, 3), torch.zeros(1, 2, 8, 16)) is None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize(("heads", "dim"), [(9, 64), (2, 6), (4, 128)])
def test_rotary_embedding_of_rows_is_the_same_bits_as_torchs_expression(heads, dim):
    g = torch.Generator().manual_seed(7)
    tokens = 5
    joined = torch.randn(1, tokens, heads * dim + 32, generator=g) * 30  # q as a view of a wider projection output
    x = joined[..., 32:].view(1, tokens, heads, dim)
    angles = torch.randn(1, 1, tokens, dim, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    out = torch.empty(1, tokens, heads, dim)
    assert attention.rope(x, cos, sin, out)
    xt = x.transpose(1, 2)  # transformers' layout: [1, heads, T, D], cos broadcast over heads
    assert torch.equal(out.transpose(1, 2), (xt * cos) + (_rotate_half(xt) * sin))
    assert not attention.rope(x, cos.transpose(2, 3), sin, out)  # angles not token by token
    assert not attention.rope(x.double(), cos.double(), sin.double(), out.double())
    assert not attention.rope(x, cos[..., :3, :], sin[..., :3, :], out)  # angles of 3 tokens for 5
    assert not attention.rope(x, cos, sin, out[:, :4])  # out of another shape
    # keys rotated into their rows' caches (and values appended): as rotated, then appended
    kv_heads = 2
    keys = torch.randn(1, tokens, kv_heads, dim, generator=g)
    values = torch.randn(1, tokens, kv_heads, dim, generator=g)
    buffers = [(torch.zeros(1, kv_heads, 8, dim), torch.zeros(1, kv_heads, 8, dim)) for _ in range(2)]
    rows = attention.DecodeRows([3, 1], [4, 8])
    assert rows.check([k for k, _ in buffers], [v for _, v in buffers]) and rows.rope_append(keys, values, cos, sin)
    rotated = torch.empty_like(keys)
    assert attention.rope(keys, cos, sin, rotated)
    for (k, v), token, position in zip(buffers, [3, 1], [3, 7], strict=True):
        assert torch.equal(k[0, :, position], rotated[0, token]) and torch.equal(v[0, :, position], values[0, token])
        k[0, :, position] = 0
        assert not k.any()  # nothing else written
    assert not rows.rope_append(keys[..., :1, :], values, cos, sin)  # 1 key head, the buffers hold 2
    assert not rows.rope_append(keys, values, cos[..., :2, :], sin[..., :2, :])
