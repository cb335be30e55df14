"""How a peer stores and computes its span: device, compute dtype and weight quantization, chosen from the hardware.

`auto` resolves as follows (and the result is announced in the peer's DHT record, so a chain may mix precisions):

    device   cuda when torch sees a GPU, else cpu
    dtype    cuda: bfloat16 where the GPU supports it, else float16;  cpu: float32 (bf16 attention and norms are
             slower than fp32 on CPUs without AMX, and on small models bf16 alone flips next tokens)
    quant    cuda: nf4 (bitsandbytes) when installed, else none;  cpu: int8 (the native kernel, cpu_affine.c:
             affine groups of 32, float32 activations), except for checkpoints that were 4-bit already (GGUF Q4_0 /
             Q4_1, like the default model): int4 in groups of 32 re-expresses those blocks in 4 bits. Next-token
             agreement with fp32 on the default model (tests/e2e/test_quantized_smollm.py): native int8 and int4
             100%; torch's kernels (bf16 activations; the fallback without a C compiler) int8 93.6%, int4 99.0%;
             nf4 56%.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from swarm_kernels.quant import HAVE_BITSANDBYTES, METHODS, kernel_for

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTS = ("auto", "none", *METHODS)


@dataclass(frozen=True)
class Precision:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # of activations, norms, attention and unquantized weights
    quant: str  # "none", "int8" or "nf4"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def kernel(self) -> str | None:
        return None if self.quant == "none" else kernel_for(self.quant, torch.device(self.device))

    def describe(self) -> str:
        quant = "unquantized" if self.quant == "none" else f"{self.quant} weights ({self.kernel} kernel)"
        return f"{self.device}, {self.dtype_name}, {quant}"


def choose_precision(device: str = "auto", dtype: str = "auto", quant: str = "auto",
                     native_quant: str | None = None) -> Precision:
    for value, allowed, what in ((device, DEVICES, "device"), (dtype, DTYPES, "dtype"), (quant, QUANTS, "quant")):
        if value not in allowed:
            raise ValueError(f"--{what} {value!r}: expected one of {', '.join(allowed)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if dtype == "auto" and device == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif dtype == "auto":
        dtype = "float32"
    if quant == "auto":
        if device == "cuda":
            quant = "nf4" if HAVE_BITSANDBYTES else "none"
            if not HAVE_BITSANDBYTES:
                logger.warning("bitsandbytes is not installed: serving unquantized %s weights on CUDA", dtype)
        elif native_quant in ("q4_0", "q4_1"):
            quant = "int4"
        else:
            quant = "int8"
    if device == "cuda" and quant == "nf4" and native_quant and native_quant.startswith("q4"):
        logger.warning("nf4 re-quantizes a %s checkpoint and loses accuracy; --quant int4 or none keeps it",
                       native_quant)
    return Precision(device, getattr(torch, dtype), quant)
