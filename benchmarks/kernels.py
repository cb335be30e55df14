"""Quantized-linear kernels on this machine: time per call and error against the fp32 linear, per weight shape.

    python -m benchmarks.kernels [--runs 7] [--threads 1] [--device cpu|cuda] [--out DIR]

Candidates (each only where it runs): fp32 / bf16 unquantized, fp32 with oneDNN's prepacked weight (kernels/packed.py:
what unquantized float32 CPU spans and the client's LM head run); int8 (affine, groups of 32) and int4 with the native
kernel (kernels/cpu_affine.c, float32 activations); int8 with torch's `_weight_int8pack_mm`; int4 with
torch's `_weight_int4pack_mm_for_cpu`; nf4 with kernels/triton_nf4.py (CUDA); int8 with torch's deprecated
`quantize_dynamic` (activations quantized too); bitsandbytes LLM.int8 and nf4 (its CPU backend here, CUDA on a GPU);
the dequantize-then-matmul reference.
Shapes: SmolLM2's four block linear shapes and its LM head, two of an 8B Llama. Tokens per call: 1 (a decode step),
8 and 16 (decode steps of that many sessions batched). Each call uses
the next of enough copies of the layer to hold 256 MiB of fp32 weights, so weights stream from memory as they do in
a real forward pass (one small layer called in a loop would sit in the CPU cache and hide the memory bandwidth that
quantization saves). Every figure is the median of `runs` timings of a pass over the copies; `vs_fp32` is the ratio.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import emit, machine, median, versions
from kernels import packed, triton_nf4
from kernels.quant import HAVE_BITSANDBYTES, QuantLinear, fits, kernel_for

SHAPES = {  # name: (out_features, in_features)
    "smollm2.q_proj": (576, 576), "smollm2.k_proj": (192, 576), "smollm2.up_proj": (1536, 576),
    "smollm2.down_proj": (576, 1536), "smollm2.lm_head": (49152, 576), "llama8b.q_proj": (4096, 4096),
    "llama8b.up_proj": (14336, 4096),
}


STREAM_BYTES = 256 << 20


def time_calls(modules: list, x: torch.Tensor, runs: int, device: str) -> float:
    """Median over runs of the mean seconds per call, each call on the next module."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one_pass():
        for module in modules:
            module(x)

    one_pass()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        one_pass()
        sync()
        samples.append((time.perf_counter() - start) / len(modules))
    return median(samples)


def candidates(linear: nn.Linear, device: str) -> dict[str, nn.Module | Callable]:
    out: dict[str, nn.Module | Callable] = {"fp32": nn.Linear(linear.in_features, linear.out_features, bias=False,
                                                              device=device).requires_grad_(False)}
    out["fp32"].weight.copy_(linear.weight)
    if device == "cpu" and packed.available():
        out["fp32.onednn"] = packed.PackedLinear(out["fp32"])
    half = torch.bfloat16
    out["bf16"] = nn.Linear(linear.in_features, linear.out_features, device=device, dtype=half).requires_grad_(False)
    out["bf16"].weight.copy_(linear.weight)
    n, k = linear.out_features, linear.in_features
    dev = torch.device(device)
    for method in ("int8", "int4", "nf4"):
        kernel = kernel_for(method, dev, k, n)
        if kernel != "reference":
            out[f"{method}.{kernel}"] = QuantLinear(linear, method, kernel)
        if kernel != "native" and fits("native", method, dev, k, n):
            out[f"{method}.native"] = QuantLinear(linear, method, "native")
        if kernel != "torch" and fits("torch", method, dev, k, n):
            out[f"{method}.torch"] = QuantLinear(linear, method, "torch")
        if HAVE_BITSANDBYTES and method != "int4" and kernel != "bitsandbytes":
            out[f"{method}.bitsandbytes"] = QuantLinear(linear, method, "bitsandbytes")
    if device == "cuda" and triton_nf4.fits(k):
        out["nf4.triton"] = QuantLinear(linear, "nf4", "triton")
    out["int8.reference"] = QuantLinear(linear, "int8", "reference")
    if device == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            out["int8.quantize_dynamic"] = quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    return out


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sets = [candidates(linear, args.device) for _ in range(copies)]
        for tokens in (1, 8, 16):
            x = torch.randn(tokens, k, generator=g).to(args.device)
            want = linear(x)
            row = {}
            fp32_time = None
            for label in sets[0]:
                modules = [c[label] for c in sets]
                inp = x.to(torch.bfloat16) if label == "bf16" else x
                with torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = modules[0](inp).float()
                    seconds = time_calls(modules, inp, args.runs, args.device)
                fp32_time = seconds if label == "fp32" else fp32_time
                row[label] = {"us": round(seconds * 1e6, 2),
                              "vs_fp32": round(seconds / fp32_time, 3) if fp32_time else None,
                              "rel_error": round(((got - want).abs().max() / want.abs().max()).item(), 5)}
            results[f"{name}[{n}x{k}] tokens={tokens}"] = row
    return {"benchmark": "kernels", "machine": machine(), "versions": versions(),
            "settings": {"runs": args.runs, "torch_threads": args.threads, "device": args.device,
                         "stream_bytes": STREAM_BYTES},
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--big", action="store_true", help="on CPU also the 8B shapes (slow)")
    parser.add_argument("--out", default=None, help="also write DIR/kernels[-cuda].json")
    args = parser.parse_args()
    emit("kernels" if args.device == "cpu" else "kernels-cuda", run(args), args.out)


if __name__ == "__main__":
    main()
