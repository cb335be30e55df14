"""GGUF → safetensors, streamed tensor by tensor into per-block shards: the same tensors transformers loads, a
bounded reader, and (marker `models`) a model twice the memory the conversion is allowed converts under that cap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swarm.model.gguf_convert import HEAD_SHARD, convert_gguf, read_index
from tests.gguf_synth import write_llama_gguf
from tests.memcap import MemoryCap


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0", "F16"])
def test_streamed_conversion_gives_transformers_own_tensors(tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    gguf = write_llama_gguf(tmp_path / "model.gguf", layers=3, qtype=qtype, seed=1)
    out = tmp_path / "converted"
    summary = convert_gguf(gguf, out, tokenizer=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected, got = reference.state_dict(), converted.state_dict()
    assert set(expected) == set(got)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert summary["shards"] == 4 and summary["tensors"] == len(expected)
    # one shard per block, holding exactly that block's tensors; the head's shard holds the rest
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in weight_map.items():
        if ".layers." in name:
            assert shard == f"block-{int(name.split('.layers.')[1].split('.')[0]):05d}.safetensors"
        else:
            assert shard == HEAD_SHARD
    with safe_open(str(out / "block-00001.safetensors"), framework="pt") as f:
        assert all(".layers.1." in key for key in f.keys())  # noqa: SIM118 - safe_open is not iterable


def test_converted_model_generates_like_transformers_on_the_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = write_llama_gguf(tmp_path / "model.gguf", layers=2, qtype="Q4_0", seed=2)
    convert_gguf(gguf, tmp_path / "out", tokenizer=False)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(whole(ids).logits, converted(ids).logits)


@pytest.mark.parametrize("damage", ["magic", "truncated", "tensor_count", "dims", "string_length"])
def test_the_index_reader_refuses_malformed_files(tmp_path, damage):
    good = write_llama_gguf(tmp_path / "good.gguf", layers=1).read_bytes()
    bad = bytearray(good)
    if damage == "magic":
        bad[:4] = b"GGUX"
    elif damage == "truncated":
        bad = bad[:300]
    elif damage == "tensor_count":
        bad[8:16] = (1 << 40).to_bytes(8, "little")
    elif damage == "string_length":
        bad[24:32] = (1 << 50).to_bytes(8, "little")  # the first metadata key's length
    else:  # the first tensor's n_dims: find its name, then the u32 after it
        at = bytes(bad).index(b"token_embd.weight") + len(b"token_embd.weight")
        bad[at : at + 4] = (1000).to_bytes(4, "little")
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError):
        read_index(path)


def test_a_tensor_past_the_end_of_the_file_is_refused_before_anything_is_written(tmp_path):
    gguf = write_llama_gguf(tmp_path / "model.gguf", layers=1)
    data = gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 4096])  # the index is whole, the last tensor is not
    with pytest.raises(ValueError, match="runs past the end of the file"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out", tokenizer=False)
    assert not (tmp_path / "out").exists()


def _header(kv: bytes, kv_count: int, tensor_count: int = 0) -> bytes:
    counts = tensor_count.to_bytes(8, "little") + kv_count.to_bytes(8, "little")
    return b"GGUF" + (3).to_bytes(4, "little") + counts + kv


def _key(name: str) -> bytes:
    return len(name).to_bytes(8, "little") + name.encode()


@pytest.mark.parametrize("case", ["many_keys", "nested_arrays", "huge_dims", "long_key", "big_endian"])
def test_hostile_indexes_are_refused_without_their_cost(tmp_path, case):
    if case == "many_keys":
        data = _header(b"", 1 << 40)
    elif case == "nested_arrays":  # an array of arrays of arrays ...
        nested = b"".join((9).to_bytes(4, "little") + (1).to_bytes(8, "little") for _ in range(5000))
        data = _header(_key("k") + (9).to_bytes(4, "little") + nested, 1)
    elif case == "huge_dims":  # 2^32 x 2^32 F32 elements: a byte count that would wrap in int64
        info = _key("t") + (2).to_bytes(4, "little") + (1 << 32).to_bytes(8, "little") * 2 + (0).to_bytes(4, "little")
        data = _header(info + (0).to_bytes(8, "little"), 0, tensor_count=1) + bytes(64)
    elif case == "long_key":
        data = _header((1 << 20).to_bytes(8, "little") + b"k" * (1 << 20) + (4).to_bytes(4, "little") + bytes(4), 1)
    else:
        data = b"GGUF" + (3).to_bytes(4, "big") + bytes(16)
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_index(path)


def test_moe_experts_fused_from_two_gguf_tensors_keep_both_halves():
    """Qwen-MoE's processor builds gate_up_proj from ffn_gate_exps then ffn_up_exps of the same block."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import Qwen2MoeTensorProcessor

    from swarm.model.gguf_convert import process_shard

    fused = "model.layers.0.mlp.experts.gate_up_proj"
    names = {"blk.0.ffn_gate_exps": fused, "blk.0.ffn_up_exps": fused}
    items = [("blk.0.ffn_gate_exps.weight", np.full((2, 3, 4), 1.0, np.float32)),
             ("blk.0.ffn_up_exps.weight", np.full((2, 3, 4), 2.0, np.float32))]
    tensors = process_shard(iter(items), Qwen2MoeTensorProcessor(config={}), names, torch.float32)
    halves = tensors[fused].unique().tolist()
    assert sorted(halves) == [1.0, 2.0], halves


CAP_MIB = 700
_CONVERT = """
import json, sys
from pathlib import Path
from swarm.model.gguf_convert import convert_gguf
summary = convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), tokenizer=False)
print(json.dumps(summary))
"""


@pytest.mark.models
@pytest.mark.skipif(MemoryCap.why_not() is not None, reason=f"no memory cap: {MemoryCap.why_not()}")
def test_a_model_twice_the_memory_cap_converts_under_it(tmp_path):
    """A 1.5 GB (float32) synthetic Llama, converted by a process tree capped at 700 MiB of memory: the kernel kills
    it if the converter ever holds more (no swap). The converter's own peak RSS is compared with the largest tensor."""
    gguf = write_llama_gguf(tmp_path / "big.gguf", layers=18, hidden=1024, ffn=4096, vocab=32000, heads=8,
                            kv_heads=8, qtype="Q8_0", seed=3)
    cap = MemoryCap.create("gguf", CAP_MIB << 20)
    if cap is None:
        pytest.skip("could not make a memory cgroup here (root with a writable memory controller is needed)")
    try:
        done = cap.run([sys.executable, "-c", _CONVERT, str(gguf), str(tmp_path / "out")], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[2])
        oom = cap.oom_kills()
    finally:
        cap.remove()
    assert done.returncode == 0 and oom == 0, (done.returncode, oom, done.stderr[-2000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["bytes"] > 2 * (CAP_MIB << 20)  # the model really is twice the cap
    largest_mib = summary["largest_tensor_bytes"] / (1 << 20)
    working_mib = summary["peak_rss_mib"] - summary["rss_at_start_mib"]  # above the imports' own footprint
    print(f"converted {summary['bytes'] / 2**30:.2f} GiB under {CAP_MIB} MiB; converter peak RSS "
          f"{summary['peak_rss_mib']:.0f} MiB ({working_mib:.0f} above its start), metadata child "
          f"{summary['metadata_child_peak_rss_mib']:.0f} MiB, largest tensor {largest_mib:.0f} MiB")
    # the head's shard holds the embedding and the output matrix (2 of the largest tensors) until it is written
    assert working_mib <= 3 * largest_mib


def test_a_gguf_file_is_a_model_reference(tmp_path, monkeypatch):
    """`--model path/to/model.gguf`: converted once into the cache, its id the file's stem, its dominant block type
    told to the precision choice (Q4_1 → int4 on the CPU)."""
    from swarm.model.precision import choose_precision
    from swarm.model.source import resolve_model

    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_llama_gguf(tmp_path / "tiny-q4.gguf", layers=2, qtype="Q4_1")
    source = resolve_model(str(gguf))
    assert source.model_id == "tiny-q4" and source.native_quant == "q4_1"
    assert (source.path / "block-00001.safetensors").is_file() and (source.path / "swarm-cache.json").is_file()
    assert resolve_model(str(gguf)).path == source.path  # cached
    assert choose_precision("cpu", native_quant=source.native_quant).quant == "int4"
