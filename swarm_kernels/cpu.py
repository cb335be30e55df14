"""The native CPU kernel (swarm_kernels/cpu_affine.c): affine int8 / int4 weights in groups of 32, float32 activations.

Compiled with the system's C compiler at first use into ~/.cache/swarm/kernels ($SWARM_CACHE_DIR/kernels; keyed by
the source, the flags and the CPU's model name, since -march=native code only runs where it was built; peers starting
together compile once: swarm_kernels.filecache) and loaded with ctypes; no torch
headers, no build step at install time. Where no compiler works, `available()` is False and quant.py falls back to
torch's kernels or the reference.

    y = affine_linear(x, codes, bits, scale, minimum, bias)    # x [..., K] float32 → [..., N] float32

Every call runs in the kernel, prefill chunks included. Per call against oneDNN's prepacked float32 linear (what
float32 spans run; benchmarks/results/kernels.json: SmolLM2's block shapes, one thread) on a 2-core Zen 3 EPYC with
AVX2: int4 takes 0.37-0.52x the time at 1 row (a decode step), 0.64-0.84x at 16 rows, 0.79-0.86x at 40 and
0.89-1.02x at 128 (a prefill chunk); int8 0.55-0.69x, 0.70-0.88x, 0.83-0.91x and 0.97-1.04x. On AVX-512 (Zen 4,
2026-12-04, benchmarks/results/kernels_avx512_tiles.json) int4 takes 0.26-0.50x oneDNN's time at 1 row, 0.85-1.05x
at 16 and 0.97-1.35x at 128 (int8 0.32-0.42x, 0.93-1.20x, 0.97-1.43x; the upper ends: the MLP's down projection):
from 16 rows it multiplies widened tiles in register blocks as the AVX2 path does.
Dequantizing to float32 for torch's matmul measured 1.3-1.7x (its float32 temporaries cost more than the matmul saves).
One thread by default, whatever torch's thread count. `set_threads(n)` shares each call of two rows or more among n
threads (the kernel's own pool of C threads, which claim chunks of the output rows and poll between calls before
they sleep; a Python pool's hand-off measured slower than a ~0.1 ms call): the same bits, and on a 2-core AVX2 EPYC
with SmolLM2's shapes, weights streaming from memory (benchmarks/results/kernels_threads.json), 2 threads took
1/1.25-1/1.55 of the time of one at 16 rows (1/1.8 for its LM head), 1/1.2-1/1.9 at 40 and 128; a 16-row decode
of its 30 int4 blocks spent 79 → 45 ms in the kernel (142 → 99 ms in all, one noisy run; the rest, attention and
norms, stays on one thread). A peer on the native kernel uses every CPU it may run on (`--num-threads`).
On a CPU with AMX-BF16 calls of five rows or more take the tile unit (cpu_amx.h; `amx()`, `set_amx()`, SWARM_AMX=0).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from swarm_kernels.filecache import cache_root, check_private, compute_once

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_affine.c")
GROUP = 32
# a call of fewer than MIN_WORK multiply-adds (rows x outputs x inputs) runs on the caller's thread alone: splitting
# it costs more than it saves (one row of 576x576, 0.33 M, measured 0.96x; of 1536x576, 0.88 M, 1.2x); an idle helper
# thread polls SPIN_NS for the next call before it sleeps (cpu_affine.c says why and what it costs others)
MIN_WORK = 1 << 19
SPIN_NS = 2_000_000
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-std=c11"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build(tuple(FLAGS))


def build(flags: tuple[str, ...], source: Path = SOURCE) -> ctypes.CDLL | None:
    """Compile (or find in the cache) cpu_affine.c (or another revision's copy, `source`) with these flags and load
    it; None when that fails."""
    library = compile_library(source, flags)
    if library is None:
        return None
    fn = library.affine_linear
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, ptr]
    fn = library.affine_linear_parallel
    fn.restype = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    library.affine_set_threads.restype, library.affine_set_threads.argtypes = ctypes.c_int, [ctypes.c_int]
    library.affine_threads.restype, library.affine_threads.argtypes = ctypes.c_int, []
    library.affine_split_calls.restype, library.affine_split_calls.argtypes = i64, []
    library.affine_set_min_work.restype, library.affine_set_min_work.argtypes = None, [i64, i64]
    library.affine_scratch_floats.restype, library.affine_scratch_floats.argtypes = i64, [i64]
    library.affine_set_min_work(MIN_WORK, SPIN_NS)
    library.affine_sum_lanes.restype, library.affine_sum_lanes.argtypes = ctypes.c_int, []
    library.affine_pool_run.restype = None
    library.affine_pool_run.argtypes = [ptr, ptr, i64, ctypes.c_int]
    if hasattr(library, "affine_set_amx"):  # a baseline revision's copy (benchmarks) may predate it
        library.affine_amx.restype, library.affine_amx.argtypes = ctypes.c_int, []
        library.affine_set_amx.restype, library.affine_set_amx.argtypes = ctypes.c_int, [ctypes.c_int]
        library.affine_set_amx(int(os.environ.get("SWARM_AMX", "1").strip() != "0"))
    return library


def _local_includes(source_path: Path, source: bytes) -> bytes:
    """The text of the files a source (`source`: its text) includes from its own directory (`#include "name"`:
    cpu_affine.c's cpu_amx.h), so that the cache key changes with them."""
    names = re.findall(rb'^\s*#\s*include\s+"([^"]+)"', source, flags=re.MULTILINE)
    return b"".join((source_path.parent / name.decode()).read_bytes() for name in names
                    if (source_path.parent / name.decode()).is_file())


def compile_library(source_path: Path, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """Compile (or find in the cache) a C source of this package with these flags and load it; None when that
    fails (logged)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the native CPU kernels are unavailable")
        return None
    source = source_path.read_bytes()
    source += _local_includes(source_path, source)
    key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_name()]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source_path.stem}-{key}.so"

    def compile_into(out: Path) -> None:
        subprocess.run([compiler, *flags, str(source_path), "-o", str(out)], check=True, capture_output=True,
                       timeout=120)
        out.chmod(0o700)  # whatever the umask: check_private below refuses a library others may write

    try:
        compute_once(target, compile_into)
        check_private(target, up_to=cache_root())  # code another user could have written is never loaded
        library = ctypes.CDLL(str(target))
    except PermissionError as e:
        logger.warning("refusing a native CPU kernel's cached library: %s; remove it (or set SWARM_CACHE_DIR to a "
                       "directory of your own) to have it built again", e)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.warning("building %s failed (%s): %r %s", source_path.name, compiler, e, detail.decode()[-2000:])
        return None
    return library


def available() -> bool:
    return _library() is not None


_threads = 1  # threads a call may be split over (set_threads)
ACTIVATIONS = ("float32", "int8")
_activations = "float32"  # set_activations


def activations() -> str:
    """What the blocks' int8 and int4 weights multiply: float32 activations (this kernel, the default) or int8 ones
    (swarm_kernels/cpu_a8.c: a peer's --activations int8)."""
    return _activations


def set_activations(mode: str) -> str:
    """From now on the blocks' native int8 and int4 calls (Weight, quant.NativeLinear; not an LM head) quantize their
    activations to int8 ("int8", where the kernel builds; else float32 with a warning) or keep them float32
    ("float32"). Returns the mode in effect."""
    global _activations
    mode = mode.strip().lower() or "float32"
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {mode!r}")
    if mode == "int8":
        from swarm_kernels import cpu_a8  # here: it imports this module

        if not cpu_a8.available():
            logger.warning("int8 activations need the native kernel cpu_a8.c, which did not build: float32 instead")
            mode = "float32"
    _activations = mode
    return mode


def set_threads(threads: int, library: ctypes.CDLL | None = None) -> int:
    """Split each big enough call's output rows over up to `threads` threads from now on (the kernel's own pool of
    helper threads; 1: every call on the caller's thread, the default). Returns the threads calls will use (fewer
    where threads could not be started, or off Linux). The result is the same bits whatever the count."""
    global _threads
    library = library or _library()
    if library is None:
        raise RuntimeError("the native CPU kernel is unavailable (no working C compiler)")
    _threads = min(threads, int(library.affine_set_threads(threads))) if threads > 1 else 1  # the pool never shrinks
    return _threads


def threads() -> int:
    return _threads


@functools.cache
def _scratch_floats(library: ctypes.CDLL, k: int) -> int:
    return int(library.affine_scratch_floats(k))


def amx(library: ctypes.CDLL | None = None) -> int:
    """The fewest input rows of a call that runs on the CPU's tile unit (AMX: cpu_amx.h; float32-accurate, not the
    same bits as on the AVX-512 path), or 0 where none does: it needs a build for such a CPU, Linux's permission,
    and the path switched on (set_amx; SWARM_AMX=0 switches it off when the library is loaded)."""
    library = library or _library()
    return int(library.affine_amx()) if library is not None and hasattr(library, "affine_amx") else 0


def set_amx(on: bool, library: ctypes.CDLL | None = None) -> bool:
    """Switch the tile unit's path on or off (where it is built); whether it is on. Loading the library again
    (`build`) sets it from SWARM_AMX once more: one library loaded twice is one handle."""
    library = library or _library()
    if library is None or not hasattr(library, "affine_set_amx"):
        return False
    return bool(library.affine_set_amx(int(on)))


def sum_lanes(library: ctypes.CDLL | None = None) -> int:
    """How many partial sums the build splits a row's K products into (in increasing k each, then added pairwise):
    32 on AVX-512 and in the portable loops, 8 on AVX2. tolerance.py derives the kernel's bound from it."""
    library = library or _library()
    if library is None:
        raise RuntimeError("the native CPU kernel is unavailable (no working C compiler)")
    return int(library.affine_sum_lanes())


def fits(in_features: int) -> bool:
    return in_features % GROUP == 0


def repack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """reference.py's int4 bytes (row-major codes, two per byte, the first in the high nibble) → the kernel's layout
    (per group of 32: byte j = code j in the low nibble | code j + 16 in the high nibble)."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(out_features, in_features // GROUP, GROUP)
    return (codes[..., : GROUP // 2] | (codes[..., GROUP // 2 :] << 4)).reshape(-1).contiguous()


def _check_weight(codes: torch.Tensor, bits: int, scale: torch.Tensor, minimum: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[int, int]:
    """(N, K) of a weight, once its tensors are what the C code reads: it trusts them (a wrong size or a GPU pointer
    would be read out of bounds, not raise)."""
    n, groups = scale.shape
    k = groups * GROUP
    tensors = (codes, scale, minimum) if bias is None else (codes, scale, minimum, bias)
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        raise ValueError("the native kernel takes contiguous CPU tensors")
    if (codes.dtype != torch.uint8 or codes.numel() != n * k * bits // 8 or minimum.shape != scale.shape
            or scale.dtype != torch.float32 or minimum.dtype != torch.float32
            or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != n))):
        raise ValueError(f"the native kernel got inconsistent tensors for a {n}x{k} weight with {bits}-bit codes")
    return n, k


def _call(library: ctypes.CDLL, x: torch.Tensor, n: int, k: int, codes: int, bits: int, scale: int, minimum: int,
          bias: int | None) -> torch.Tensor:
    """x [..., K] → [..., N] with a checked weight's addresses (the checks on x cost ~1 us: a decode step makes ~200
    calls of ~15-150 us)."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight {k}")
    flat = x.reshape(-1, k)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.to(torch.float32).contiguous()
    if not flat.is_cpu:
        raise ValueError("the native kernel takes contiguous CPU tensors")
    rows = flat.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    scratch = torch.empty(_scratch_floats(library, k), dtype=torch.float32)  # dequantized weight tiles
    status = library.affine_linear_parallel(flat.data_ptr(), rows, k, codes, bits, scale, minimum, bias, y.data_ptr(),
                                            n, scratch.data_ptr(), _threads)
    if status != 0:
        raise ValueError(f"the native kernel refused a {n}x{k} weight with {bits}-bit codes")
    return y.reshape(*x.shape[:-1], n)


def affine_linear(x: torch.Tensor, codes: torch.Tensor, bits: int, scale: torch.Tensor, minimum: torch.Tensor,
                  bias: torch.Tensor | None = None, library: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., K] → float32 [..., N]; codes uint8 [N, K] (bits 8) or [N * K / 2] in repack_int4's layout (bits 4);
    scale and minimum float32 [N, K / 32]; bias float32 [N] or None."""
    library = library or _library()
    if library is None:
        raise RuntimeError("the native CPU kernel is unavailable (no working C compiler)")
    n, k = _check_weight(codes, bits, scale, minimum, bias)
    return _call(library, x, n, k, codes.data_ptr(), bits, scale.data_ptr(), minimum.data_ptr(),
                 None if bias is None else bias.data_ptr())


class Weight:
    """A weight called many times (the lean decode path's projections): its tensors checked once, as affine_linear
    checks them on every call, and held (so the addresses stay theirs); a call checks only its input, ~6 us less than
    affine_linear's (a lean decode step of SmolLM2's 30 blocks makes 120 calls). `weight(x)` = affine_linear(x, ...)."""

    def __init__(self, codes: torch.Tensor, bits: int, scale: torch.Tensor, minimum: torch.Tensor,
                 bias: torch.Tensor | None = None):
        self.n, self.k = _check_weight(codes, bits, scale, minimum, bias)
        self.bits = bits
        self.tensors = (codes, scale, minimum, bias)
        self._a8: Any = None  # int8_activations(): a cpu_a8.Weight
        self.follows_activations = True  # computes with int8 activations when set_activations("int8")
        self._addresses = (codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
                           None if bias is None else bias.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _activations == "int8" and self.follows_activations:
            return self.int8_activations()(x)
        library = _library()
        if library is None:
            raise RuntimeError("the native CPU kernel is unavailable (no working C compiler)")
        codes, scale, minimum, bias = self._addresses
        return _call(library, x, self.n, self.k, codes, self.bits, scale, minimum, bias)

    def int8_activations(self) -> Any:  # a cpu_a8.Weight (cpu_a8 imports this module)
        """This weight repacked for int8 activations (swarm_kernels/cpu_a8.py), made at its first call."""
        if self._a8 is None:
            from swarm_kernels import cpu_a8

            codes, scale, minimum, bias = self.tensors
            self._a8 = cpu_a8.Weight.from_kernel_layout(codes, scale, minimum, bias, self.bits)
        return self._a8

    def share_int8_activations(self, weight: Any) -> None:
        """Use `weight` (the same weight repacked by its layer: swarm.model.lean) for int8 activations."""
        self._a8 = weight


def int4_codes(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """4-bit codes in the kernel's layout (repack_int4's) → uint8 [N, K], one code a byte."""
    packed = codes.reshape(n, k // GROUP, GROUP // 2)
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] of 4-bit codes in the kernel's layout."""
    n, groups = scale.shape
    q = int4_codes(codes, n, groups * GROUP).float().reshape(n, groups, GROUP)
    return (q * scale[..., None] + minimum[..., None]).reshape(n, groups * GROUP)
