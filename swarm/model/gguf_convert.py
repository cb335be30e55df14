"""GGUF → a Hugging Face directory of per-block safetensors shards, one tensor at a time.

The whole model is never in memory: the `gguf` reader maps the file, and each shard (the embedding and final norm;
then one transformer block) is dequantized tensor by tensor, written and dropped before the next is read. After each
tensor the file's mapping is advised away, so the pages read so far leave the process too. The peak is about the
largest shard in float32 plus what numpy's dequantization of its largest tensor holds at once (measured in
benchmarks/README.md, "Converting a GGUF"). Names, config and per-family fixes (llama's rotary permutation, gemma's
norm offset) are transformers' own GGUF tables, so the tensors are those `from_pretrained(gguf_file=...)` loads.

Output: config.json, generation_config.json, the tokenizer, `head.safetensors`, `block-00000.safetensors`, ...
and model.safetensors.index.json, so both `transformers.from_pretrained` and a peer that reads only its span work.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

HEAD_SHARD = "head.safetensors"
NAMES_FILE = "gguf-names.json"
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def shard_of(gguf_name: str) -> str:
    """The shard a GGUF tensor is written to: one per transformer block (`blk.N.*`), the rest (embedding, final
    norm, output) in the head's."""
    match = _BLOCK.match(gguf_name)
    return f"block-{int(match.group(1)):05d}.safetensors" if match else HEAD_SHARD


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order (rows first)
    offset: int  # absolute, in bytes


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_TENSORS, MAX_DIMS, MAX_STRING, MAX_KEYS, MAX_NESTING = 1 << 20, 8, 1 << 30, 1 << 16, 4
METADATA_TIMEOUT = 600.0  # seconds for the metadata child (a hung one must not hold the cache's lock forever)


def read_index(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    """The GGUF's scalar and string metadata and its tensors' names, types, shapes and offsets, without the
    per-element field objects gguf's reader builds (with a 262k-token vocabulary those alone hold ~0.5 GB).
    Arrays are skipped (their length recorded). A file that is not a well-formed GGUF raises ValueError."""
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_index(mapped)
    except struct.error as e:
        raise ValueError(f"{path} is truncated: {e}") from None
    finally:
        mapped.close()


def _parse_index(buf: mmap.mmap) -> tuple[dict[str, object], list[TensorInfo]]:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string(keep: int = 4096) -> str:
        """The next string; one longer than `keep` bytes is skipped (a chat template, say), not copied."""
        nonlocal pos
        length = take("<Q")
        if length > MAX_STRING or pos + length > len(buf):
            raise ValueError("GGUF string runs past the end of the file")
        pos += length
        if length > keep:
            return f"<string of {length} bytes>"
        return bytes(buf[pos - length : pos]).decode("utf-8", errors="replace")

    def skip(kind: int, depth: int = 0) -> object:
        nonlocal pos
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind == 9:
            if depth >= MAX_NESTING:
                raise ValueError("GGUF arrays nested too deep")
            item, count = take("<I"), take("<Q")
            if item in _SCALARS:
                pos += struct.calcsize(_SCALARS[item]) * count
            else:
                for _ in range(count):
                    skip(item, depth + 1)
                    if pos > len(buf):
                        raise ValueError("GGUF array runs past the end of the file")
            if pos > len(buf):
                raise ValueError("GGUF array runs past the end of the file")
            return f"<array of {count}>"
        raise ValueError(f"unknown GGUF value type {kind}")

    if take("<I") != 0x46554747:  # b"GGUF"
        raise ValueError("not a GGUF file (bad magic)")
    version = take("<I")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise ValueError("a big-endian GGUF: not supported (convert it on a big-endian machine)")
        raise ValueError(f"GGUF version {version} is not supported")
    tensor_count, kv_count = take("<Q"), take("<Q")
    if tensor_count > MAX_TENSORS:
        raise ValueError(f"GGUF declares {tensor_count} tensors")
    if kv_count > MAX_KEYS:
        raise ValueError(f"GGUF declares {kv_count} metadata keys")
    meta: dict[str, object] = {}
    for _ in range(kv_count):
        key = string(keep=1024)
        if key.startswith("<string of "):
            raise ValueError("a GGUF metadata key over 1024 bytes")
        meta[key] = skip(take("<I"))
    infos = []
    for _ in range(tensor_count):
        name = string(keep=1024)
        if name.startswith("<string of "):
            raise ValueError("a GGUF tensor name over 1024 bytes")
        n_dims = take("<I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"GGUF tensor {name!r} has {n_dims} dimensions")
        dims = [take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, take("<I"), take("<Q")))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"GGUF alignment {alignment!r} is not a power of two")
    data_start = -(-pos // alignment) * alignment
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = []
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"GGUF tensor {name!r} has an unknown type {qtype}") from None
        info = TensorInfo(name, qtype, tuple(reversed(dims)), data_start + offset)
        row = info.shape[-1] if info.shape else 1
        if row % block:
            raise ValueError(f"GGUF tensor {name!r}: a row of {row} is not a whole number of {block}-blocks")
        if info.offset + math.prod(info.shape) // block * type_size > len(buf):
            raise ValueError(f"GGUF tensor {name!r} runs past the end of the file")
        tensors.append(info)
    return meta, tensors


def dominant_quant(path: Path) -> str | None:
    """The quantization of a GGUF's block matrices for a peer's `--quant auto` (swarm.model.precision): "q4_0" or
    "q4_1" only when every one of them is that 4-bit type (int4 holds those exactly, and nothing with more bits);
    otherwise the most common type ("q5_0", "q8_0", ...; None: float weights)."""
    _, infos = read_index(path)
    from gguf import GGMLQuantizationType

    sizes: dict[str, int] = {}
    for info in infos:
        if len(info.shape) >= 2 and info.name.startswith("blk."):
            kind = GGMLQuantizationType(info.qtype).name.lower()
            sizes[kind] = sizes.get(kind, 0) + math.prod(info.shape)
    dominant = max(sizes, key=sizes.__getitem__) if sizes else None
    if dominant in ("q4_0", "q4_1") and len(sizes) > 1:
        dominant = max((k for k in sizes if k not in ("q4_0", "q4_1")), key=sizes.__getitem__)
    return None if dominant in (None, "f32", "f16", "bf16") else dominant


def _metadata(gguf_path: str, out: str, tokenizer: bool) -> None:
    """Run in a child process (`python -m swarm.model.gguf_convert metadata ...`; its memory, which gguf's field
    objects and the tokenizer's conversion make large, goes back to the system when it exits): transformers' config
    for the file, saved with the generation config and the tokenizer, and NAMES_FILE: the architecture, the config
    and the map of GGUF tensor name → HF name (from a model built on the `meta` device, so no weights)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(gguf_path)
    config_dict = dict(load_gguf_checkpoint(gguf_path, return_tensors=False)["config"])
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    meta, _ = read_index(path)
    if tokenizer and "tokenizer.ggml.model" in meta:  # a GGUF without one (a test's) is converted without one
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    architecture = str(meta["general.architecture"])
    names = get_gguf_hf_weights_map(model, _processor(architecture, config_dict))
    peak = _peak_rss_mib()
    (Path(out) / NAMES_FILE).write_text(json.dumps({"architecture": architecture, "config": config_dict,
                                                    "names": names, "peak_rss_mib": peak}))


def _processor(architecture: str, config_dict: dict):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)


def convert_gguf(gguf_path: Path, out: Path, *, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                 on_shard: Callable[[str], None] | None = None) -> dict:
    """Write the HF directory for `gguf_path` into `out`. Returns a summary: shards, tensors, bytes written, the
    largest tensor's bytes in `dtype` and the metadata child's peak RSS."""
    _, infos = read_index(gguf_path)  # a malformed file is refused here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "swarm.model.gguf_convert", "metadata", str(gguf_path), str(out)]
    done = subprocess.run(argv + ([] if tokenizer else ["--no-tokenizer"]), capture_output=True, text=True,
                          timeout=METADATA_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"reading {gguf_path.name}'s metadata failed: {done.stderr.strip()[-2000:]}")
    child = json.loads((out / NAMES_FILE).read_text())
    (out / NAMES_FILE).unlink()
    names: dict[str, str] = child["names"]
    processor = _processor(child["architecture"], child["config"])
    data = np.memmap(gguf_path, mode="r")
    groups: dict[str, list[TensorInfo]] = {}
    for info in infos:  # group first (names only), so each shard is read and written once
        groups.setdefault(shard_of(info.name), []).append(info)
    weight_map: dict[str, str] = {}
    total = largest = 0
    start_mib = _rss_mib()
    for shard in sorted(groups, key=lambda s: (s != HEAD_SHARD, s)):
        def read(infos: list[TensorInfo], mapped: np.memmap):
            nonlocal largest
            for info in infos:
                weights = _dequantize(mapped, info)
                largest = max(largest, weights.size * torch.empty((), dtype=dtype).element_size())
                yield info.name, weights
                del weights
                _release(mapped)

        tensors = process_shard(read(groups[shard], data), processor, names, dtype)
        if tensors:
            _save_shard(out / shard, tensors)
            for hf_name, value in tensors.items():
                weight_map[hf_name] = shard
                total += value.numel() * value.element_size()
        del tensors
        if on_shard is not None:
            on_shard(shard)
    del data
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    if dtype != torch.float32:
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"shards": len(groups), "tensors": len(weight_map), "bytes": total, "largest_tensor_bytes": largest,
            "metadata_child_peak_rss_mib": round(child["peak_rss_mib"], 1), "rss_at_start_mib": round(start_mib, 1),
            "peak_rss_mib": round(_peak_rss_mib(), 1)}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                       torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written straight from the tensors' memory (safetensors' own save_file first copies every
    tensor into a bytes object, which would double the shard's footprint)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors.values():
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE / (1 << 20)


def _peak_rss_mib() -> float:
    """This process's peak RSS since it started its program: VmHWM (ru_maxrss would carry over the RSS of the
    process it was forked from, e.g. a big test runner's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_shard(items, processor, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One shard's tensors under their HF names, from (GGUF name, float32 array) pairs read one at a time, through
    transformers' per-family processor. One `parsed_parameters` per shard: MoE processors fill a fused tensor from
    several GGUF tensors of a block (gate and up experts into gate_up_proj) and find its first half there."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict = {"tensors": {}}
    for name, weights in items:
        result = processor.process(weights=weights, name=name, tensor_key_mapping=names, parsed_parameters=extra)
        del weights
        if result.name in names:
            tensors[names[result.name]] = _cast(torch.from_numpy(np.ascontiguousarray(result.weights)), dtype)
        elif result.name is not None and not extra["tensors"]:
            logger.debug("GGUF tensor %s has no counterpart in the model; skipped", name)
        del result
    for hf_name, value in extra["tensors"].items():  # what processors built in place (MoE experts)
        tensors[hf_name] = _cast(value, dtype)
    return tensors


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype).contiguous() if value.is_floating_point() else value.contiguous()


CHUNK_BYTES = 32 << 20  # dequantize this many output bytes at a time, into the tensor's one float32 buffer


def _dequantize(data: np.memmap, info: TensorInfo) -> np.ndarray:
    """One tensor as float32 (numpy order), dequantized in row chunks so that numpy's temporaries stay small."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(info.qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = info.shape or (1,)
    if shape[-1] % block:
        raise ValueError(f"GGUF tensor {info.name}: row of {shape[-1]} is not a multiple of {qtype.name}'s {block}")
    row_bytes = shape[-1] // block * type_size
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if info.offset + rows * row_bytes > data.size:
        raise ValueError(f"GGUF tensor {info.name} runs past the end of the file")
    raw = data[info.offset : info.offset + rows * row_bytes].reshape(rows, row_bytes)
    out = np.empty((rows, shape[-1]), dtype=np.float32)
    step = max(1, CHUNK_BYTES // (shape[-1] * 4))
    for start in range(0, rows, step):
        out[start : start + step] = dequantize(raw[start : start + step], qtype).reshape(-1, shape[-1])
    return out.reshape(info.shape)


def _release(data: np.memmap) -> None:
    """Drop the pages of the mapped GGUF this process has read: they are clean file pages, reread if ever needed."""
    mapped = getattr(data, "_mmap", None)
    if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "metadata":
        _metadata(sys.argv[2], sys.argv[3], tokenizer="--no-tokenizer" not in sys.argv)
    else:
        sys.exit("usage: python -m swarm.model.gguf_convert metadata GGUF OUT [--no-tokenizer]")
