"""A model's manifest and content id: which weights a peer serves, by hash, so that peers and clients of one model
name know they run the same weights.

The manifest lists, per block, each tensor's name within the block (`self_attn.q_proj.weight`), shape, dtype and
the SHA-256 of its bytes as stored in the safetensors file, and a block hash over those entries; then the same for
the parts outside the blocks (embeddings, final norm, LM head when it is not tied). Hashing each tensor (not a
block's serialization) is what a content-addressed store needs: identical tensors, in another block position or
another model, are one object. A block's hash names it without its position, so a fine-tune that changed some blocks
shares the others' hashes.

The content id, `sha256:<64 hex>`, hashes the family, the block count, the block hashes in order, the head's hash
and the config's (without its bookkeeping: transformers' version, dtype, the path it was loaded from), so a peer
fetching a model by its id can check the config it is given as well as every tensor. Computed once per model
directory (keyed by its files' names, sizes and mtimes) and cached under `cache_root()/manifests`.

`locations` (outside the identity) says where each tensor's bytes lie in this directory's files, so that a peer can
serve them to peers that fetch the model (swarm.model.fetch). A directory made by fetching carries its manifest
(MANIFEST_FILE), checked against its id, and only the blocks fetched so far.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from swarm.model.store import valid_digest
from swarm_kernels.filecache import cache_root, compute_once

FORMAT = 2  # in the identity and the cache's file names: a manifest of another format is computed again
MANIFEST_FILE = "swarm-manifest.json"
# config.json keys that say how a checkpoint was saved, not what the model computes
CONFIG_BOOKKEEPING = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures",
                      "quantization_config", "_commit_hash")
MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one we wrote or will read
_CHUNK = 16 << 20


def content_id(path: Path) -> str:
    """The content id of the model at `path` (computed once, then read from the cache)."""
    return str(load_manifest(path)["content_id"])


def load_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():  # fetched by its id: the manifest came with it, checked when it came
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        check_identity(manifest)
        return manifest
    key = hashlib.sha256(str(path.resolve()).encode())
    for file in [*sorted(path.glob("*.safetensors")), path / "config.json"]:
        if file.exists():
            stat = file.stat()
            key.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "manifests" / f"{path.resolve().name}-{key.hexdigest()[:16]}-f{FORMAT}.json"
    def build(out: Path) -> None:
        out.write_text(json.dumps(build_manifest(path), indent=1))

    compute_once(target, build)
    return json.loads(target.read_text())


def build_manifest(path: Path) -> dict[str, Any]:
    """Hash every tensor the model's blocks and head are made of (see the module docstring)."""
    from swarm.model.anatomy import checkpoint_for, find_anatomy, load_config, skeleton

    config = load_config(path)
    model = skeleton(config)
    anatomy = find_anatomy(model, config)
    block_paths = [f"{anatomy.blocks}.{i}" for i in range(anatomy.num_blocks)]
    # an encoder's "head" is its embeddings module alone (no final norm, no LM head: their paths are "")
    head_paths = [p for p in (anatomy.embeddings, anatomy.final_norm, anatomy.position_embeddings) if p]
    if not anatomy.tied_embeddings and anatomy.lm_head:
        head_paths.append(anatomy.lm_head)
    checkpoint = checkpoint_for(path, model, anatomy, block_paths + head_paths)
    headers: dict[Path, tuple[int, dict[str, Any]]] = {}
    locations: dict[str, list[Any]] = {}  # digest → [file, offset, length], relative to the checkpoint's directory

    def entries(module_paths: list[str], strip: str) -> list[dict[str, Any]]:
        out = []
        for module_path in module_paths:
            for key in model.get_submodule(module_path).state_dict():
                full = f"{module_path}.{key}"
                stored = checkpoint.resolve(full, anatomy.base_prefix)
                if stored is None:
                    raise FileNotFoundError(f"tensor {full} is missing from {checkpoint.path}")
                file = checkpoint.files[stored]
                if file not in headers:
                    headers[file] = read_header(file)
                start, header = headers[file]
                meta = header[stored]
                begin, end = meta["data_offsets"]
                digest = _hash_range(file, start + begin, end - begin)
                out.append({"name": full.removeprefix(strip), "shape": list(meta["shape"]), "dtype": meta["dtype"],
                            "sha256": digest})
                locations[digest] = [str(file.resolve()), start + begin, end - begin]
        return sorted(out, key=lambda e: e["name"])

    blocks = []
    for block_path in block_paths:
        tensors = entries([block_path], block_path + ".")
        blocks.append({"sha256": _digest(tensors), "tensors": tensors})
    head_tensors = entries(head_paths, "")
    head = {"sha256": _digest(head_tensors), "tensors": head_tensors}
    identity = {"format": FORMAT, "model_type": config.model_type, "num_blocks": anatomy.num_blocks,
                "blocks": [b["sha256"] for b in blocks], "head": head["sha256"],
                "config": config_digest(json.loads((path / "config.json").read_text()))}
    return {**identity, "content_id": "sha256:" + _digest(identity), "blocks_prefix": anatomy.blocks,
            "block_manifests": blocks, "head_manifest": head, "locations": locations}


def config_digest(config: dict[str, Any]) -> str:
    return _digest({k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING})


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_BLOCKS_IN_MANIFEST = 4096
MAX_TENSORS_PER_PART = 4096
MAX_TENSOR_BYTES = 1 << 36


def _check_tensors(tensors: Any) -> None:
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS_PER_PART:
        raise ValueError("a part's tensors must be a bounded list")
    names = set()
    for t in tensors:
        if not isinstance(t, dict):
            raise ValueError("a tensor entry must be an object")
        name, shape, dtype, digest = t.get("name"), t.get("shape"), t.get("dtype"), t.get("sha256")
        if not (isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable() and ".." not in name
                and "/" not in name and name not in names):
            raise ValueError(f"a tensor name is malformed or repeated: {str(name)[:80]!r}")
        names.add(name)
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name}: unknown dtype {str(dtype)[:16]!r}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise ValueError(f"tensor {name}: malformed shape")
        size = DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        if size > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor {name}: {size} bytes")
        if not (isinstance(digest, str) and valid_digest(digest)):
            raise ValueError(f"tensor {name}: malformed sha256")


def check_identity(manifest: dict[str, Any]) -> None:
    """ValueError unless the manifest is well formed (bounded counts, known dtypes, sane shapes, hex digests, unique
    names), its content id is the hash of its identity and its blocks' and head's hashes are those of their tensor
    lists (a manifest from another peer is checked before anything in it is trusted)."""
    try:
        blocks, head = manifest["block_manifests"], manifest["head_manifest"]
        if not (isinstance(blocks, list) and 0 < len(blocks) <= MAX_BLOCKS_IN_MANIFEST):
            raise ValueError("a manifest's blocks must be a bounded, non-empty list")
        for part in [*blocks, head]:
            _check_tensors(part["tensors"])
        if [_digest(b["tensors"]) for b in blocks] != manifest["blocks"] or _digest(head["tensors"]) != manifest[
                "head"]:
            raise ValueError("a block's or the head's hash is not that of its tensors")
        identity = {k: manifest[k] for k in ("format", "model_type", "num_blocks", "blocks", "head", "config")}
        if "sha256:" + _digest(identity) != manifest["content_id"] or len(blocks) != manifest["num_blocks"]:
            raise ValueError("the manifest's content id is not the hash of its contents")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed manifest: {e!r}") from None


def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, the header) of a safetensors file, bounded."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER:
            raise ValueError(f"{file}: a safetensors header of {length} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{file}: a safetensors header must be an object")
    return 8 + length, header


def shared_tensors(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int]:
    """(bytes of `b`'s distinct tensors that `a` holds too, bytes of `b`'s distinct tensors): what a store that
    already holds `a` saves on `b`."""
    def sizes(manifest: dict[str, Any]) -> dict[str, int]:
        out = {}
        for part in [*manifest["block_manifests"], manifest["head_manifest"]]:
            for t in part["tensors"]:
                out[t["sha256"]] = tensor_bytes(t)
        return out

    have, want = sizes(a), sizes(b)
    return sum(n for h, n in want.items() if h in have), sum(want.values())


def tensor_bytes(entry: dict[str, Any]) -> int:
    """Bytes of a manifest tensor entry's data."""
    n = DTYPE_BYTES[entry["dtype"]]
    for d in entry["shape"]:
        n *= d
    return n


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hash_range(file: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                raise ValueError(f"{file} ends inside a tensor")
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    import sys

    from swarm.model.source import resolve_model

    print(content_id(resolve_model(sys.argv[1] if len(sys.argv) > 1 else None).path))
