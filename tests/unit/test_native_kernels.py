"""The native CPU kernel (swarm_kernels/cpu_affine.c) in every build a machine can end up with: parity with the exact
value within its derived bound (helpers and bounds: tests/unit/test_kernels.py), the same bits for a row alone or
batched (on a CPU with AMX: in any call of five rows or more, and with the tile unit's path off) and on any number of
threads, its threads shared by callers and after a fork, and its cached library
refused when others could have written it."""

from __future__ import annotations

import functools
import os
import stat
import sys
import time

import pytest
import torch
from torch import nn

from swarm_kernels import cpu
from swarm_kernels.quant import QuantLinear
from tests.unit.test_kernels import AVX512, _parity, needs_cc, needs_x86

NATIVE_SHAPES = [(1, 32), (7, 96), (33, 64), (576, 1536), (1536, 576)]  # K a multiple of 32; any N


def _march(arch: str) -> tuple[str, ...]:
    return tuple(f if f != "-march=native" else f"-march={arch}" for f in cpu.FLAGS)


# Every build of cpu_affine.c a machine can end up with: -march=native (what QuantLinear runs here), and the
# code paths of other CPUs: the AVX-512 intrinsics, the AVX2 + FMA intrinsics, and the portable loops for plain
# x86-64 (SSE2, no FMA). Each runs the same parity and row-invariance tests where this CPU can execute it.
NATIVE_BUILDS = [
    pytest.param(tuple(cpu.FLAGS), id="march-native"),
    pytest.param(_march("x86-64-v4"), id="avx512", marks=[needs_x86, pytest.mark.skipif(
        not AVX512, reason="this CPU has no AVX-512F: the AVX-512 build cannot run here (it is compiled here by "
                           "test_every_native_build_compiles and runs on CPUs that have AVX-512)")]),
    pytest.param(_march("x86-64-v3"), id="avx2", marks=needs_x86),
    pytest.param(_march("x86-64"), id="sse2-portable", marks=needs_x86),
]


@functools.cache
def native_library(flags: tuple[str, ...]):
    library = cpu.build(flags)
    assert library is not None, f"the native kernel did not build with {flags}"
    return library


@needs_cc
def test_a_cached_library_others_could_have_written_is_never_loaded(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu.build(tuple(cpu.FLAGS)) is not None  # built into the fresh cache, private, and loaded
    (library,) = (tmp_path / "cache" / "kernels").glob("cpu_affine-*.so")
    assert stat.S_IMODE(library.stat().st_mode) == 0o700
    library.chmod(0o777)  # as if another user had replaced it through a permissive mode
    assert cpu.build(tuple(cpu.FLAGS)) is None
    assert "refusing a native CPU kernel's cached library" in caplog.text and "writable by others" in caplog.text
    library.chmod(0o700)
    (tmp_path / "cache").chmod(0o777)  # a cache directory others may write: they could swap the kernels folder
    assert cpu.build(tuple(cpu.FLAGS)) is None


@needs_cc
@needs_x86
def test_every_native_build_compiles():
    for build in NATIVE_BUILDS:
        assert native_library(build.values[0]) is not None, build.id


@pytest.mark.parametrize("shape", NATIVE_SHAPES)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [(1,), (2, 3), (5,), (4, 4), (40,), (130,)])  # decode steps to prefill chunks
def test_native_cpu_kernel_matches_reference(native_build, shape, method, rows):
    _parity(method, "native", shape, torch.float32, "cpu", rows=rows)
    _parity(method, "native", shape, torch.bfloat16, "cpu", bias=False, rows=rows)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("in_features", [1600, 576])
def test_native_kernel_gives_a_row_the_same_bits_alone_or_in_a_batch(native_build, method, in_features):
    # 133 rows: more than one pass of the tiled paths (128 rows) and every register tile (6, 4, 2 and 1 rows); K = 1600
    # in uneven column tiles of the AVX2 path and past the AVX-512 path's tiles (widened in registers), K = 576 in
    # them from 16 rows; 97 outputs: a partial tile of weight rows
    layer = QuantLinear(nn.Linear(in_features, 97), method, "native")
    x = torch.randn(133, in_features, generator=torch.Generator().manual_seed(2))
    tile_unit = cpu.amx(native_build)
    try:
        cpu.set_amx(False, native_build)  # (where the build has the tile unit's path: without it, as elsewhere)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        for rows in (2, 3, 4, 5, 7, 15, 16, 17, 23, 133):
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows
        assert torch.equal(layer(x[50:61]), alone[50:61])
    finally:
        cpu.set_amx(bool(tile_unit), native_build)
    if tile_unit:  # cpu_amx.h: a row has the same bits in any call of tile_unit (5) rows or more, as alone in fewer
        batched = layer(x)
        for rows in (2, 3, 4, 5, 7, 15, 16, 17, 23):
            assert torch.equal(layer(x[:rows]), (batched if rows >= tile_unit else alone)[:rows]), rows
        assert torch.equal(layer(x[50:61]), batched[50:61])
        assert torch.equal(torch.cat([layer(x[i : i + 7]) for i in range(0, 126, 7)]), batched[:126])
        assert not torch.equal(batched, alone)  # the tile unit's path was taken
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)  # float32-accurate both (bounds: parity tests)


@pytest.fixture
def split_every_call(native_build):
    """The native build with calls split over its helper threads however small they are; one thread again after."""
    native_build.affine_set_min_work(0, cpu.SPIN_NS)
    yield native_build
    cpu.set_threads(1, native_build)
    native_build.affine_set_min_work(cpu.MIN_WORK, cpu.SPIN_NS)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("in_features", [1600, 576])
def test_native_kernel_gives_the_same_bits_on_any_number_of_threads(split_every_call, method, in_features):
    # 97 outputs: parts of whole 16-row tiles and a partial last one; 7 outputs: one tile, never split
    for out_features in (97, 7):
        layer = QuantLinear(nn.Linear(in_features, out_features), method, "native")
        x = torch.randn(133, in_features, generator=torch.Generator().manual_seed(3))
        alone = {rows: layer(x[:rows]) for rows in (2, 5, 16, 133)}  # one row is never split
        for threads in (2, 3, 4):
            assert cpu.set_threads(threads, split_every_call) == threads
            for rows, expected in alone.items():
                before = split_every_call.affine_split_calls()
                assert torch.equal(layer(x[:rows]), expected), (out_features, threads, rows)
                split = split_every_call.affine_split_calls() - before
                assert split == (1 if out_features > 16 and sys.platform == "linux" else 0), (out_features, rows)
            before = split_every_call.affine_split_calls()
            layer(x[:1])
            assert split_every_call.affine_split_calls() == before  # one row: never split
        cpu.set_threads(1, split_every_call)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_weight_checked_once_computes_what_each_checked_call_does(native_build, method):
    layer = QuantLinear(nn.Linear(576, 97), method, "native")
    weight = cpu.Weight(layer.qweight, layer.bits, layer.scale, layer.minimum, layer.bias)
    for rows in (1, 5, 16):
        x = torch.randn(2, rows, 576, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(weight(x), cpu.affine_linear(x, layer.qweight, layer.bits, layer.scale, layer.minimum,
                                                        layer.bias))
    assert torch.equal(weight(x.double()), weight(x))  # converted to float32 as affine_linear converts it
    with pytest.raises(ValueError, match="features"):
        weight(torch.randn(1, 575))
    with pytest.raises(ValueError, match="inconsistent"):
        cpu.Weight(layer.qweight[:-1], layer.bits, layer.scale, layer.minimum, layer.bias)
    with pytest.raises(ValueError, match="contiguous"):
        cpu.Weight(layer.qweight, layer.bits, layer.scale.t().contiguous().t(), layer.minimum, layer.bias)
    assert weight.tensors[0] is layer.qweight  # held: the addresses it calls with stay valid


def test_native_kernel_threads_serve_callers_on_several_threads_at_once(split_every_call):
    # the pool runs one call at a time: a call that finds it busy computes on its own thread, with the same result
    import concurrent.futures

    layer = QuantLinear(nn.Linear(576, 200), "int4", "native")
    inputs = [torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) for rows in range(1, 9)]
    expected = [layer(x) for x in inputs]
    cpu.set_threads(2, split_every_call)
    before = split_every_call.affine_split_calls()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: [layer(inputs[i % 8]) for _ in range(50)], range(8)))
    for i, outputs in enumerate(results):
        assert all(torch.equal(out, expected[i % 8]) for out in outputs), i
    assert split_every_call.affine_split_calls() > before or sys.platform != "linux"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_after_the_kernel_threads_started_computes_alone(split_every_call):
    layer = QuantLinear(nn.Linear(576, 200), "int4", "native")
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4))
    expected = layer(x)
    cpu.set_threads(2, split_every_call)
    layer(x)  # the helper runs
    pid = os.fork()
    if pid == 0:  # the child: no helper thread; a split call would wait for it forever
        ok = False
        try:
            ok = torch.equal(layer(x), expected) and split_every_call.affine_threads() == 1
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in the kernel")


@needs_cc
@needs_x86
def test_each_native_build_reports_its_order_of_the_sums():
    assert cpu.sum_lanes(native_library(_march("x86-64-v3"))) == 8  # AVX2 + FMA: one 8-lane register per sum
    assert cpu.sum_lanes(native_library(_march("x86-64"))) == 32  # the portable loops
    assert cpu.sum_lanes(native_library(_march("x86-64-v4"))) == 32  # AVX-512 (returns a constant: safe to call here)
    assert cpu.amx(native_library(_march("x86-64-v4"))) == 0  # no tile unit path in a build for x86-64-v4


needs_amx = pytest.mark.skipif(not cpu.available() or not cpu.amx(), reason=(
    "the native kernel takes no tile unit path here (swarm_kernels/cpu_amx.h needs AMX-BF16: Intel Sapphire Rapids "
    "and later, and Linux's permission); these tests run on such CPUs"))


@needs_amx
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_tile_unit_takes_calls_of_five_rows_or_more_unless_switched_off(monkeypatch, method):
    layer = QuantLinear(nn.Linear(1600, 97), method, "native")
    x = torch.randn(6, 1600, generator=torch.Generator().manual_seed(5))
    tiles, four = layer(x), layer(x[:4])
    assert cpu.amx() == 5
    try:
        monkeypatch.setenv("SWARM_AMX", "0")  # read when the library is loaded (a peer's environment)
        assert cpu.build(tuple(cpu.FLAGS)) is not None and cpu.amx() == 0
        assert torch.equal(layer(x[:4]), four)  # four rows: the AVX-512 path either way
        vector = layer(x)
        assert not torch.equal(vector, tiles)
        torch.testing.assert_close(vector, tiles, rtol=0, atol=1e-5)
    finally:
        cpu.set_amx(True)
    assert torch.equal(layer(x), tiles)


def dequantized(codes: torch.Tensor, bits: int, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] of the kernel's codes: each group's codes times its scale plus its minimum."""
    n, groups = scale.shape
    q = (codes.reshape(n, groups * cpu.GROUP) if bits == 8 else cpu.int4_codes(codes, n, groups * cpu.GROUP)).float()
    return q * scale.repeat_interleave(cpu.GROUP, dim=1) + minimum.repeat_interleave(cpu.GROUP, dim=1)


@needs_amx
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "k"), [(32, 32), (33, 64), (48, 32), (80, 96)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_tile_units_blocks_two_at_a_time_give_each_row_the_bits_of_one_at_a_time(bits, n, k, threads):
    # calls of more than 16 rows take full blocks of 16 weight rows two at a time (cpu_amx.h's amx_tile_pair), calls
    # of 16 or fewer one at a time: one group (K = 32), a pair and a partial block, an odd block left alone
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 256, (n * k * bits // 8,), generator=g, dtype=torch.uint8)
    scale, minimum, bias = torch.rand(n, k // 32, generator=g), -torch.rand(n, k // 32, generator=g), torch.randn(n)
    x = torch.randn(40, k, generator=g)
    library = cpu._library()
    library.affine_set_min_work(0, cpu.SPIN_NS)  # split however small (the pool's chunks: whole pairs where they can)
    try:
        assert cpu.set_threads(threads) == threads
        for b in (bias, None):
            many = cpu.affine_linear(x, codes, bits, scale, minimum, b)  # 40 rows: three packed tiles
            few = torch.cat([cpu.affine_linear(x[i : i + 8], codes, bits, scale, minimum, b) for i in range(0, 40, 8)])
            assert torch.equal(many, few)
            w = dequantized(codes, bits, scale, minimum).double()
            reference = x.double() @ w.T + (0 if b is None else b)
            scale_of_sums = x.double().abs() @ w.abs().T + (0 if b is None else b.abs())  # float32-accurate:
            assert ((many.double() - reference).abs() <= 1e-6 * scale_of_sums).all()  # (~1e-7 measured)
    finally:
        cpu.set_threads(1)
        library.affine_set_min_work(cpu.MIN_WORK, cpu.SPIN_NS)


@needs_amx
def test_the_tile_unit_keeps_a_float32s_every_bit_in_its_three_parts():
    # x = hi + mid + lo in bfloat16 parts holds any float32 down to ~1e-33 exactly: against a weight of small integers
    # (scale 1, minimum 0) and one nonzero input a row, each output is the exact product rounded once to float32
    codes = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    packed = (codes[:, :32].reshape(16, 2, 16)[:, 0] | (codes[:, :32].reshape(16, 2, 16)[:, 1] << 4))
    second = (codes[:, 32:].reshape(16, 2, 16)[:, 0] | (codes[:, 32:].reshape(16, 2, 16)[:, 1] << 4))
    kernel_codes = torch.cat([packed, second], dim=1).reshape(-1).contiguous()
    scale, minimum = torch.ones(16, 2), torch.zeros(16, 2)
    x = torch.zeros(8, 64)
    x[torch.arange(8), torch.arange(8) * 7] = torch.tensor([1 + 2.0**-23, -(1 - 2.0**-24), 3.0e-30 * (1 + 2.0**-22),
                                                            12345.678, -7.0e20, 2.0**-100 * 1.5, 0.1, -0.3])
    got = cpu.affine_linear(x, kernel_codes, 4, scale, minimum)  # 8 rows: the tile unit; one product per output
    assert torch.equal(got, (x.double() @ codes.double().T).float())

