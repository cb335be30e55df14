"""Quantized-linear kernels on this machine: time per call and error against the fp32 linear, per weight shape.

    python -m benchmarks.kernels [--runs 7] [--threads 1] [--device cpu|cuda] [--tokens 1,8,16,40,128]
                                 [--only fp32.onednn,int8.native,int4.native] [--clock thread|wall]
                                 [--kernel-threads 2] [--out DIR]

Candidates (each only where it runs): fp32 / bf16 unquantized, fp32 with oneDNN's prepacked weight (packed.py:
what unquantized float32 CPU spans and the client's LM head run); int8 (affine, groups of 32) and int4 with the native
kernel (swarm_kernels/cpu_affine.c, float32 activations); int8 and int4 with int8 activations (`int8.a8`,
`int4.a8`: swarm_kernels/cpu_a8.c, a peer's --activations int8); int8 with torch's `_weight_int8pack_mm`; int4 with
torch's `_weight_int4pack_mm_for_cpu`; nf4 with swarm_kernels/triton_nf4.py (CUDA); int8 with torch's deprecated
`quantize_dynamic` (activations quantized too); bitsandbytes LLM.int8 and nf4 (its CPU backend here, CUDA on a GPU);
the dequantize-then-matmul reference.
Shapes: SmolLM2's four block linear shapes and its LM head, two of an 8B Llama. Tokens per call: 1 (a decode step),
8 and 16 (decode steps of that many sessions batched), 40 and 128 (prefill chunks). Each call uses
the next of enough copies of the layer to hold 256 MiB of fp32 weights, so weights stream from memory as they do in
a real forward pass (one small layer called in a loop would sit in the CPU cache and hide the memory bandwidth that
quantization saves). The candidates take turns, one pass over their copies each per round; every figure is the
median over `runs` rounds; `vs_fp32` and `vs_onednn` are ratios to the fp32 nn.Linear and the oneDNN packed one.
The clock is the calling thread's CPU time with one torch thread (every candidate then computes on that thread, and
on a shared machine other processes' turns on the core stay out of the figures), wall time otherwise.
Where the native kernel takes the CPU's tile unit for calls of five rows or more (AMX: cpu_amx.h), `int8.native_noamx`
and `int4.native_noamx` are the same kernel kept on its AVX-512 path (cpu.set_amx(False) around each call; the
`native` candidates then switch it on around each call, so that both pay the switches). `--kernel-threads N` adds
`int8.native_xN` and `int4.native_xN`: the native kernel with each call split over N threads
(swarm_kernels.cpu.set_threads, as a peer on an N-core CPU runs it; each call here also pays two set_threads
calls, a few microseconds, which a peer does not); the clock is then wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import emit, machine, median, versions
from swarm_kernels import cpu, cpu_a8, packed, triton_nf4
from swarm_kernels.quant import QuantLinear, fits, kernel_for

SHAPES = {  # name: (out_features, in_features)
    "smollm2.q_proj": (576, 576), "smollm2.k_proj": (192, 576), "smollm2.up_proj": (1536, 576),
    "smollm2.down_proj": (576, 1536), "smollm2.lm_head": (49152, 576), "llama8b.q_proj": (4096, 4096),
    "llama8b.up_proj": (14336, 4096),
}


STREAM_BYTES = 256 << 20


def time_calls(passes: dict[str, tuple[list, torch.Tensor]], runs: int, device: str, clock: str) -> dict[str, float]:
    """label → median over runs of the mean seconds per call, each call on the next of its modules; the labels take
    turns, one pass each per round."""
    now = time.thread_time if clock == "thread" else time.perf_counter

    def one_pass(modules: list, x: torch.Tensor) -> float:
        start = now()
        for module in modules:
            module(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return (now() - start) / len(modules)

    samples: dict[str, list[float]] = {label: [] for label in passes}
    for round_ in range(runs + 1):  # the first round warms up
        for label, (modules, x) in passes.items():
            seconds = one_pass(modules, x)
            if round_:
                samples[label].append(seconds)
    return {label: median(values) for label, values in samples.items()}


def _copy(linear: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=False, device=linear.weight.device, dtype=dtype)
    out.requires_grad_(False).weight.copy_(linear.weight)
    return out


def _quantize_dynamic(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


class _Split(nn.Module):
    """A native-kernel layer whose calls are split over `threads` threads."""

    def __init__(self, layer: nn.Module, threads: int):
        super().__init__()
        self.layer, self.threads = layer, threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = cpu.threads()
        cpu.set_threads(self.threads)
        try:
            return self.layer(x)
        finally:
            cpu.set_threads(before)


class _Amx(nn.Module):
    """A native-kernel layer with the tile unit's path (cpu_amx.h) switched on or off for its calls; both candidates
    where the build has it are wrapped alike, so that both pay the two switches a call (~3 us)."""

    def __init__(self, layer: nn.Module, on: bool):
        super().__init__()
        self.layer, self.on = layer, on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu.set_amx(self.on)
        try:
            return self.layer(x)
        finally:
            cpu.set_amx(True)


class _Int8Activations(nn.Module):
    """A native int8 or int4 layer with int8 activations (swarm_kernels/cpu_a8.c; a peer's --activations int8)."""

    def __init__(self, linear: nn.Linear, method: str):
        super().__init__()
        layer = QuantLinear(linear, method, "native")
        self.weight = layer.int8_activations()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x)


def candidates(linear: nn.Linear, device: str, kernel_threads: int = 1) -> dict[str, Callable[[], nn.Module]]:
    """label → a function that builds that candidate of `linear` (each only where it runs)."""
    out: dict[str, Callable[[], nn.Module]] = {"fp32": functools.partial(_copy, linear, torch.float32)}
    if device == "cpu" and packed.available():
        out["fp32.onednn"] = lambda: packed.PackedLinear(_copy(linear, torch.float32))
    out["bf16"] = functools.partial(_copy, linear, torch.bfloat16)
    n, k = linear.out_features, linear.in_features
    dev = torch.device(device)
    for method in ("int8", "int4", "nf4"):
        chosen = kernel_for(method, dev, k, n)
        for kernel in ("native", "torch", "bitsandbytes"):
            if kernel == chosen or fits(kernel, method, dev, k, n):
                out[f"{method}.{kernel}"] = functools.partial(QuantLinear, linear, method, kernel)
                if kernel == "native" and device == "cpu" and cpu.amx():
                    for label, on in ((f"{method}.native", True), (f"{method}.native_noamx", False)):
                        out[label] = functools.partial(
                            lambda m, on: _Amx(QuantLinear(linear, m, "native"), on), method, on)
                if kernel == "native" and kernel_threads > 1:
                    out[f"{method}.native_x{kernel_threads}"] = functools.partial(
                        lambda m: _Split(QuantLinear(linear, m, "native"), kernel_threads), method)
    if device == "cpu" and cpu_a8.available() and cpu.fits(k):
        out["int8.a8"] = functools.partial(_Int8Activations, linear, "int8")
        out["int4.a8"] = functools.partial(_Int8Activations, linear, "int4")
    if device == "cuda" and triton_nf4.fits(k):
        out["nf4.triton"] = functools.partial(QuantLinear, linear, "nf4", "triton")
    out["int8.reference"] = functools.partial(QuantLinear, linear, "int8", "reference")
    if device == "cpu":
        out["int8.quantize_dynamic"] = functools.partial(_quantize_dynamic, linear)
    return out


def measure(sets: list[dict], linear: nn.Linear, x: torch.Tensor, args) -> dict[str, dict]:
    """One (shape, tokens) cell: time per call, ratios to fp32 and oneDNN, and the error against fp32, per label."""
    want = linear(x)
    passes = {label: ([c[label] for c in sets], x.to(torch.bfloat16) if label == "bf16" else x) for label in sets[0]}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {label: modules[0](inp).float() for label, (modules, inp) in passes.items()}
        seconds = time_calls(passes, args.runs, args.device, args.clock)
    row = {}
    for label, value in seconds.items():
        row[label] = {"us": round(value * 1e6, 2), "rel_error": round(
            ((got[label] - want).abs().max() / want.abs().max()).item(), 5)}
        for base in ("fp32", "fp32.onednn"):
            if base in seconds:
                row[label]["vs_fp32" if base == "fp32" else "vs_onednn"] = round(value / seconds[base], 3)
    return row


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = {}
    for name, (n, k) in SHAPES.items():
        if name.startswith("llama8b") and args.device == "cpu" and not args.big:
            continue
        linear = nn.Linear(k, n, bias=False).requires_grad_(False)
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        linear = linear.to(args.device)
        copies = max(1, STREAM_BYTES // (n * k * 4))
        builders = {label: build for label, build in candidates(linear, args.device, args.kernel_threads).items()
                    if not args.only or label in args.only}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sets = [{label: build() for label, build in builders.items()} for _ in range(copies)]
        for tokens in args.tokens:
            x = torch.randn(tokens, k, generator=g).to(args.device)
            results[f"{name}[{n}x{k}] tokens={tokens}"] = measure(sets, linear, x, args)
    return {"benchmark": "kernels", "machine": machine(), "isa": isa(), "versions": versions(),
            "settings": {"runs": args.runs, "torch_threads": args.threads, "kernel_threads": args.kernel_threads,
                         "device": args.device,
                         "stream_bytes": STREAM_BYTES, "clock": args.clock, "tokens": args.tokens},
            "results": results}


def isa() -> dict:
    """The CPU's vector instruction sets and the native kernel's path on it (its order of the sums says which)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        flags = {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for word in line.split(":", 1)[1].split()}
    path = None
    if cpu.available():
        path = {8: "avx2+fma"}.get(cpu.sum_lanes(), "avx512" if "avx512f" in flags else "portable")
    if path == "avx512" and cpu.amx():
        path = "avx512+amx"  # calls of five rows or more on the tile unit (cpu_amx.h)
    return {"avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "fma": "fma" in flags,
            "amx_bf16": "amx_bf16" in flags, "native_kernel": path}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernel-threads", type=int, default=1,
                        help="also the native kernel with each call split over this many threads (wall clock)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--big", action="store_true", help="on CPU also the 8B shapes (slow)")
    parser.add_argument("--tokens", default="1,8,16,40,128", help="tokens (rows) per call, comma-separated")
    parser.add_argument("--only", default="", help="only these candidates, comma-separated (e.g. fp32.onednn,"
                                                   "int4.native); default all")
    parser.add_argument("--clock", choices=["thread", "wall"], default=None,
                        help="thread CPU time or wall time (default: thread with one thread of each, else wall)")
    parser.add_argument("--out", default=None, help="also write DIR/kernels[-cuda].json")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.only = {label for label in args.only.split(",") if label}
    single = args.threads == 1 and args.kernel_threads == 1 and args.device == "cpu"
    args.clock = args.clock or ("thread" if single else "wall")
    emit("kernels" if args.device == "cpu" else "kernels-cuda", run(args), args.out)


if __name__ == "__main__":
    main()
