"""Quantized linear layers behind one dispatch: the fastest available kernel that computes what `reference.py` says.

Kernels, per (method, device):

    int8  cpu   "native"        cpu_affine.c (built at first use with the system's C compiler): a different
                                int8 format, affine in groups of 32 along in_features (uint8 codes, float32 scale and
                                minimum per group: reference.quantize_int8_affine), float32 activations, float32
                                accumulation (AVX-512 or AVX2 + FMA where the CPU has them, portable C elsewhere). Needs
                                in_features % 32 == 0. The CPU default: it keeps the model's predictions
                                (tests/e2e/test_quantized_smollm.py), which torch's bf16 kernels do not; int8 is faster
                                than torch's int8 kernel, int4 a little slower than torch's int4 (benchmarks/kernels.py,
                                benchmarks/quant.py)
    int4  cpu   "native"        the same kernel with 4-bit codes (reference.quantize_int4's groups, repacked): float32
                                activations, so a Q4_1 checkpoint runs exactly as in float32
    int8  cpu   "torch"         torch's `_weight_int8pack_mm`: int8 weights, bf16 activations (fp32 activations are
                                10-30x slower in this kernel), output cast back to the caller's dtype. Only for
                                in_features % 16 == 0: torch 2.13 segfaults on other widths (other layers: reference)
    int4  cpu   "torch"         torch's `_weight_int4pack_mm_for_cpu` (groups of 32, bf16 scales and zero points, bf16
                                activations); needs out_features % 16 == 0, else reference
    int8  cuda  "bitsandbytes"  LLM.int8 (`bnb.matmul`, outlier threshold 6): activations are quantized too
    nf4   cuda  "bitsandbytes"  `bnb.matmul_4bit`; packed bytes identical to reference.quantize_nf4
    nf4   cuda  "triton"        triton_nf4.py for decode rows (<= TRITON_MAX_ROWS rows per call), dequantize
                                + torch matmul for prefill chunks; needs in_features % 256 == 0
    any   any   "reference"     dequantize, then a float32 matmul (correct everywhere, slow)

Each row of the table is one class (a subclass of `QuantLinear` that packs the weight in its `__init__` and computes
in its `forward`), registered under its (kernel, method); `kernel_for` chooses a kernel once, and
`QuantLinear(linear, method, kernel=None)` builds the registered class of that choice. The choice follows from what
is installed and builds (the native kernel is compiled once per machine and cached);
`SWARM_KERNELS=reference|native|torch|bitsandbytes|triton` overrides it (e.g. to run torch's bf16 kernels, bitsandbytes'
CPU backend, or the reference everywhere). benchmarks/kernels.py measures the CPU candidates (including torch's
deprecated `quantize_dynamic`); tests/e2e/test_quantized_smollm.py measures what each does to the default model;
swarm_kernels/tolerance.py says how far each may lie from the reference and why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import ClassVar

import torch
from torch import nn

from swarm_kernels import cpu, cpu_a8, reference, triton_nf4

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4", "nf4")
KERNELS = ("reference", "native", "torch", "bitsandbytes", "triton")

HAVE_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
HAVE_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAVE_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
OVERRIDE = os.environ.get("SWARM_KERNELS", "").strip() or None
if OVERRIDE is not None and OVERRIDE not in KERNELS:
    raise ImportError(f"SWARM_KERNELS={OVERRIDE!r}: expected one of {', '.join(KERNELS)}")

BNB_INT8_THRESHOLD = 6.0
TRITON_MAX_ROWS = 4  # more rows per call (a prefill chunk) are a matmul, not a decode GEMV
INT8PACK_ALIGN = 16  # _weight_int8pack_mm reads in_features in vectors of 16 and crashes on a remainder
INT4PACK_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu refuses other out_features
PACK_ROWS = 4096  # rows of a weight quantized at once by the native kernel's int8 packing

# The automatic choice, in order (each where it fits and on the devices it names): bitsandbytes on CUDA; then native
# before torch: torch's kernels round activations to bf16 (and its int8 keeps one scale per row), which flips next
# tokens of the default model (93.6% / 99.0% agreement with fp32 against 100%); through a swarm native int8 decodes
# faster than torch's and native int4 within ~6% of torch's (benchmarks/results/quant.json). Anything else: reference.
AUTOMATIC = (("bitsandbytes", "cuda"), ("native", "cpu"), ("torch", "cpu"))


def _bnb():
    import bitsandbytes

    return bitsandbytes


class QuantLinear(nn.Module):
    """A drop-in for nn.Linear with a weight-only quantized weight; output dtype = input dtype.

    `QuantLinear(linear, method, kernel=None)` returns an instance of the class registered for (kernel, method), the
    kernel chosen by `kernel_for` when not given; a subclass quantizes and packs the weight in `__init__` (`pack`) and
    computes in `forward`."""

    kernel: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    qweight: torch.Tensor  # buffers, as each kernel packs them: codes, scales (or absmax), minima, nf4 code points
    scale: torch.Tensor
    minimum: torch.Tensor
    code: torch.Tensor

    def __new__(cls, linear: nn.Linear | None = None, method: str | None = None, kernel: str | None = None):
        if cls is QuantLinear:  # the public constructor: choose the class once
            if linear is None or method is None:
                raise TypeError("QuantLinear(linear, method, kernel=None)")
            weight = linear.weight
            chosen = kernel or kernel_for(method, weight.device, linear.in_features, linear.out_features)
            cls = kernel_class(chosen, method)
        return super().__new__(cls)

    def __init__(self, linear: nn.Linear, method: str, kernel: str | None = None):
        super().__init__()
        if kernel not in (None, self.kernel) or method not in self.methods:
            raise ValueError(f"{type(self).__name__} is the {self.kernel} kernel for {', '.join(self.methods)}; "
                             f"got {method} with kernel {kernel}")
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method = method
        if not self.fits(method, weight.device, self.in_features, self.out_features):
            raise ValueError(f"{self.requirement()} (got {method}, {self.out_features}x{self.in_features} on "
                             f"{weight.device})")
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.pack(weight)

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        """Whether this kernel computes `method` for a weight of this shape on this device (here and now)."""
        return method in cls.methods

    @classmethod
    def requirement(cls) -> str:
        """What `fits` asks for, in words: the message when a layer is forced onto a kernel it does not fit."""
        return f"the {cls.kernel} kernel computes {', '.join(cls.methods)}"

    def pack(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out_features, in_features] into this kernel's buffers."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, method={self.method}, kernel={self.kernel}"

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.buffers())

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


REGISTRY: dict[tuple[str, str], type[QuantLinear]] = {}


def register(cls: type[QuantLinear]) -> type[QuantLinear]:
    for method in cls.methods:
        REGISTRY[cls.kernel, method] = cls
    return cls


def kernel_class(kernel: str, method: str) -> type[QuantLinear]:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {', '.join(METHODS)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if (kernel, method) not in REGISTRY:
        raise ValueError(f"the {kernel} kernel has no {method}")
    return REGISTRY[kernel, method]


def fits(kernel: str, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether `kernel` can compute `method` for a weight of this shape on this device."""
    cls = REGISTRY.get((kernel, method))
    return cls is not None and cls.fits(method, device, in_features, out_features)


def kernel_for(method: str, device: torch.device, in_features: int = 64, out_features: int = 64) -> str:
    """The kernel a QuantLinear of `method` on `device` with this shape uses."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {', '.join(METHODS)}")
    if OVERRIDE is not None:
        if OVERRIDE == "bitsandbytes" and not HAVE_BITSANDBYTES:
            raise RuntimeError("SWARM_KERNELS=bitsandbytes but bitsandbytes is not installed")
        return OVERRIDE if fits(OVERRIDE, method, device, in_features, out_features) else "reference"
    for kernel, device_type in AUTOMATIC:
        if device.type == device_type and fits(kernel, method, device, in_features, out_features):
            return kernel
    return "reference"


@register
class ReferenceLinear(QuantLinear):
    """Dequantize, then a float32 matmul (reference.py): correct everywhere, slow."""

    kernel, methods = "reference", METHODS

    def pack(self, weight: torch.Tensor) -> None:
        if self.method == "int8":
            q, scale = reference.quantize_int8(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        elif self.method == "int4":
            packed, scale, minimum = reference.quantize_int4(weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("minimum", minimum)
        else:
            packed, absmax = reference.quantize_nf4(weight)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "int8":
            y = reference.int8_linear(x, self.qweight, self.scale, self.bias)
        elif self.method == "int4":
            y = reference.int4_linear(x, self.qweight, self.scale, self.minimum, self.weight_shape, self.bias)
        else:
            y = reference.nf4_linear(x, self.qweight, self.scale, self.weight_shape, self.bias)
        return y.to(x.dtype)


@register
class NativeLinear(QuantLinear):
    """swarm_kernels/cpu_affine.c: affine int8 or int4 codes in groups of 32, float32 activations and sums (int8
    activations where cpu.set_activations("int8"): swarm_kernels/cpu_a8.c)."""

    kernel, methods = "native", ("int8", "int4")
    follows_activations = True  # int8 activations when cpu.set_activations("int8") (a block's; an LM head's: never)

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        return device.type == "cpu" and method in cls.methods and cpu.fits(in_features) and cpu.available()

    @classmethod
    def requirement(cls) -> str:
        return (f"the native kernel needs a CPU weight with in_features % {cpu.GROUP} == 0, a C compiler and int8 or "
                f"int4")

    def pack(self, weight: torch.Tensor) -> None:
        if self.method == "int8":  # rows at a time: the float temporaries stay small (an LM head's are ~4x its codes)
            parts = [reference.quantize_int8_affine(weight[i : i + PACK_ROWS])
                     for i in range(0, len(weight), PACK_ROWS)]
            q, scale, minimum = (torch.cat(column) for column in zip(*parts, strict=True))
        else:
            packed, scale, minimum = reference.quantize_int4(weight)
            q = cpu.repack_int4(packed, self.out_features, self.in_features)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("minimum", minimum.contiguous())
        if self.bias is not None:
            self.bias.data = self.bias.data.float()

    @property
    def bits(self) -> int:
        """Bits per code: 8 (int8) or 4 (int4)."""
        return 8 if self.method == "int8" else 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.follows_activations and cpu.activations() == "int8":
            return self.int8_activations()(x).to(x.dtype)
        return cpu.affine_linear(x, self.qweight, self.bits, self.scale, self.minimum, self.bias).to(x.dtype)

    def int8_activations(self) -> cpu_a8.Weight:
        """This weight repacked for int8 activations (swarm_kernels/cpu_a8.py), made at its first call."""
        weight = self.__dict__.get("_a8")
        if weight is None:
            weight = self.__dict__["_a8"] = cpu_a8.Weight.from_kernel_layout(self.qweight, self.scale, self.minimum,
                                                                             self.bias, self.bits)
        return weight

    def share_int8_activations(self, weight: cpu_a8.Weight | None) -> None:
        """Use `weight` (its rows of a joined layer's repacked weight: swarm.model.lean) for int8 activations;
        None (rows not on a 16-row block boundary) leaves it to int8_activations to repack its own."""
        if weight is not None:
            self.__dict__["_a8"] = weight


def prepare_int8_activations(module: nn.Module) -> None:
    """Where cpu.activations() is int8: repack every native layer of module that follows it now (a span at load), so
    that its memory is counted (int8_activation_bytes) before its first call; layers sharing a joined weight
    (swarm.model.lean) keep theirs."""
    if cpu.activations() == "int8":
        for layer in module.modules():
            if type(layer) is NativeLinear and layer.follows_activations:
                layer.int8_activations()


def int8_activation_bytes(module: nn.Module) -> int:
    """Bytes of the weights repacked for int8 activations held by module's native layers (each storage once:
    layers of a joined call share theirs)."""
    storages = {}
    for layer in module.modules():
        weight = layer.__dict__.get("_a8") if type(layer) is NativeLinear else None
        if weight is not None:
            for tensor in (weight.codes, weight.scale, weight.minimum):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _TorchCpuLinear(QuantLinear):
    """torch's packed CPU kernels: bf16 activations, output cast back to the caller's dtype, bias added after."""

    kernel = "torch"

    @classmethod
    def requirement(cls) -> str:
        return (f"torch has no such kernel for this weight (int8: in_features % {INT8PACK_ALIGN} == 0; int4: "
                f"out_features % {INT4PACK_ALIGN} == 0 and in_features % {reference.INT4_GROUPSIZE} == 0; on the "
                f"CPU)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = self.matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register
class TorchInt8Linear(_TorchCpuLinear):
    """torch's `_weight_int8pack_mm`: reference.quantize_int8's codes, the row scales in bf16."""

    methods = ("int8",)

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        return device.type == "cpu" and method == "int8" and HAVE_INT8PACK and in_features % INT8PACK_ALIGN == 0

    def pack(self, weight: torch.Tensor) -> None:
        q, scale = reference.quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel wants it in the activations' dtype

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)


@register
class TorchInt4Linear(_TorchCpuLinear):
    """torch's `_weight_int4pack_mm_for_cpu`: reference.quantize_int4's groups as W = (q - 8) * scale + zero."""

    methods = ("int4",)

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        return (device.type == "cpu" and method == "int4" and HAVE_INT4PACK and out_features % INT4PACK_ALIGN == 0
                and in_features % reference.INT4_GROUPSIZE == 0)

    def pack(self, weight: torch.Tensor) -> None:
        packed, scale, minimum = reference.quantize_int4(weight)
        # torch's layout: W = (q - 8) * scale + zero, with [K/g, N, 2] bf16 scales and zero points
        q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(self.out_features, self.in_features)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
        zero = minimum + 8 * scale
        self.register_buffer("scale", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, reference.INT4_GROUPSIZE, self.scale)


class _BitsandbytesLinear(QuantLinear):
    kernel = "bitsandbytes"

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        return method in cls.methods and HAVE_BITSANDBYTES

    @classmethod
    def requirement(cls) -> str:
        return "the bitsandbytes kernels need bitsandbytes installed (int8 and nf4)"


@register
class BitsandbytesInt8Linear(_BitsandbytesLinear):
    """LLM.int8 (`bnb.matmul`, outlier threshold 6): reference.quantize_int8's codes; activations quantized too."""

    methods = ("int8",)

    def pack(self, weight: torch.Tensor) -> None:
        q, scale = reference.quantize_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale * reference.INT8_MAX)  # bitsandbytes keeps the row absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.qweight, self.scale
        state.threshold, state.has_fp16_weights, state.is_training = BNB_INT8_THRESHOLD, False, False
        with _quiet_bnb():
            return bnb.matmul(x, self.qweight, state=state, bias=self.bias).to(x.dtype)


@register
class BitsandbytesNf4Linear(_BitsandbytesLinear):
    """`bnb.matmul_4bit` on bitsandbytes' own nf4 quantization (the same bytes as reference.quantize_nf4)."""

    methods = ("nf4",)

    def pack(self, weight: torch.Tensor) -> None:
        packed, self._bnb_state = _bnb().functional.quantize_4bit(weight, blocksize=reference.NF4_BLOCKSIZE,
                                                                  quant_type="nf4")
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", self._bnb_state.absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _bnb().matmul_4bit(x.to(self._bnb_state.dtype), self.qweight.t(), quant_state=self._bnb_state,
                                 bias=self.bias)
        return out.to(x.dtype)


@register
class TritonNf4Linear(QuantLinear):
    """swarm_kernels/triton_nf4.py for decode rows, dequantize + torch matmul for prefill chunks (CUDA)."""

    kernel, methods = "triton", ("nf4",)

    @classmethod
    def fits(cls, method: str, device: torch.device, in_features: int, out_features: int) -> bool:
        return method == "nf4" and device.type == "cuda" and triton_nf4.fits(in_features)

    @classmethod
    def requirement(cls) -> str:
        return f"the triton nf4 kernel needs triton, a CUDA weight and in_features % {triton_nf4.BLOCK_K} == 0"

    def pack(self, weight: torch.Tensor) -> None:
        packed, absmax = reference.quantize_nf4(weight)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", absmax)
        self.register_buffer("code", reference.NF4_CODE.to(weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= TRITON_MAX_ROWS:
            y = triton_nf4.nf4_gemv(flat, self.qweight, self.scale, self.code, self.out_features)
        else:
            weight = reference.dequantize_nf4(self.qweight, self.scale, self.weight_shape)
            y = nn.functional.linear(flat, weight.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


@contextlib.contextmanager
def _quiet_bnb():
    # bitsandbytes warns on every fp32 call that it casts the activations to fp16 for int8 quantization
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def quantize_linears(module: nn.Module, method: str, kernel: str | None = None) -> int:
    """Replace every nn.Linear inside `module` by a QuantLinear, in place; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantLinear(child, method, kernel))
            count += 1
        else:
            count += quantize_linears(child, method, kernel)
    return count


EXACT_SAMPLE_ROWS = 64  # rows checked before a whole weight is quantized (a float weight fails on its first rows)


def exact_native_int8(linear: nn.Linear) -> NativeLinear | None:
    """The native int8 kernel for a float32 CPU linear whose weight it holds exactly (every group of 32 on an affine
    grid of at most 256 levels: weights dequantized from a checkpoint's own 8-bit or smaller blocks, like the default
    model's Q8_0 embedding table), so that it computes the float32 layer's products in another order only; None for
    any other weight (float weights lie on no such grid), or where the kernel is unavailable."""
    weight = linear.weight.detach()
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or OVERRIDE not in (None, "native")
            or not NativeLinear.fits("int8", weight.device, linear.in_features, linear.out_features)):
        return None
    if not _holds_exactly(weight[:EXACT_SAMPLE_ROWS], *reference.quantize_int8_affine(weight[:EXACT_SAMPLE_ROWS])):
        return None
    native = NativeLinear(linear, "int8")
    return native if _holds_exactly(weight, native.qweight, native.scale, native.minimum) else None


def _holds_exactly(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> bool:
    """Whether `exact_values` of the codes is every weight's own value."""
    for start in range(0, len(weight), PACK_ROWS):  # float64 temporaries of a few MB at a time
        part = slice(start, start + PACK_ROWS)
        if not torch.equal(exact_values(codes[part], scale[part], minimum[part]), weight[part]):
            return False
    return True


def exact_values(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Int8 affine codes [..., K] (scale and minimum [..., K/32]) → code * scale + minimum rounded once to float32,
    as the kernel's fused multiply-add computes it (in float64, where the product and sum of these values are
    exact)."""
    groups = codes.double().reshape(*codes.shape[:-1], -1, cpu.GROUP)
    return (groups * scale.double()[..., None] + minimum.double()[..., None]).float().reshape(codes.shape)
