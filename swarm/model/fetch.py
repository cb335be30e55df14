"""Weights shared peer to peer: a peer serves the tensors of its model by hash; a peer started with only a model's
content id (`--model sha256:<hex>`) gets the manifest and config, then its span's tensors, from the peers that have
them, verifies each against the manifest and serves from what it fetched.

Serving (`TensorProvider`, registered on the peer's P2P):
    swarm.v1.manifest   uid = the content id → the model's name, its manifest (without local paths) and config.json
    swarm.v1.fetch      uid = {"sha256", "offset", "length"} → at most MAX_CHUNK bytes of that tensor
Every request is bounded and checked (a known digest, a range inside the tensor, a chunk of at most MAX_CHUNK); at
most `max_concurrent` fetches are served at once (others are refused at once: the fetcher asks another peer), and
reads run off the event loop, so serving weights never stalls the peer's inference for longer than a file read.

Fetching (`fetch_bundle`, `fetch_blocks`): providers are found in the DHT under the content id
(swarm.dht.get_providers); the manifest is checked against the id (swarm.model.manifest.check_identity) before
anything in it is used; tensors are fetched in chunks, several tensors at once from different providers, each from
one provider (so a bad hash names the peer that sent it: it is banned for fetches, and the tensor is fetched
elsewhere), resuming at the last good offset from another provider when one fails mid-tensor. What was fetched lands
in the content-addressed store (swarm.model.store), and the span's blocks are written as safetensors shards into
the model's local directory, which then loads like any other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from kernels.filecache import cache_root, make_dirs, write_atomically
from swarm.model.manifest import MANIFEST_FILE, check_identity, config_digest
from swarm.model.store import CorruptObject, ObjectStore, digest_of, valid_digest
from swarm.protocol import CONTENT_ID, FETCH_HANDLER, MANIFEST_HANDLER

logger = logging.getLogger(__name__)

MAX_CHUNK = 1 << 20
MAX_REQUEST = 256  # bytes of a fetch request's uid
MAX_MANIFEST = 64 << 20  # bytes of a manifest answer a fetcher accepts
FETCH_TIMEOUT = 30.0  # seconds for one chunk


class TensorProvider:
    def __init__(self, manifest: dict[str, Any], model_id: str, config_text: str, max_concurrent: int = 2,
                 corrupt: bool = False):
        self.manifest = manifest
        self.model_id = model_id
        self.config_text = config_text
        self.max_concurrent = max_concurrent
        self.serving = 0
        self.served_bytes = 0
        self.corrupt = corrupt  # fault injection for tests: flip a byte of every chunk served

    @property
    def locations(self) -> dict[str, list[Any]]:
        return self.manifest.get("locations", {})

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(MANIFEST_HANDLER, self.rpc_manifest, runtime_pb2.ExpertUID)
        await p2p.add_protobuf_handler(FETCH_HANDLER, self.rpc_fetch, runtime_pb2.ExpertUID)

    async def rpc_manifest(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        if request.uid != self.manifest["content_id"]:
            raise ValueError("this peer does not serve that content id")
        public = {k: v for k, v in self.manifest.items() if k != "locations"}
        answer = {"model_id": self.model_id, "manifest": public, "config": self.config_text}
        return runtime_pb2.ExpertInfo(serialized_info=json.dumps(answer).encode())

    async def rpc_fetch(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        if len(request.uid) > MAX_REQUEST:
            raise ValueError("fetch request too long")
        try:
            ask = json.loads(request.uid)
            digest, offset, length = str(ask["sha256"]), ask["offset"], ask["length"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("a fetch request is {sha256, offset, length}") from None
        where = self.locations.get(digest)
        if where is None:
            raise ValueError("this peer does not hold that tensor")
        file, start, size = where
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset < size
                and 0 < length <= MAX_CHUNK and offset + length <= size):
            raise ValueError("fetch range outside the tensor or over the chunk limit")
        if self.serving >= self.max_concurrent:
            raise ValueError("busy: too many fetches at once; ask another peer")
        self.serving += 1
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, _read, file, start + offset, length)
        finally:
            self.serving -= 1
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.served_bytes += len(data)
        return runtime_pb2.ExpertInfo(serialized_info=data)


def _read(file: str, offset: int, length: int) -> bytes:
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- fetching --------------------------------------------------------------------------------------------------------


def remote_dir(content_id: str) -> Path:
    return cache_root() / "remote" / content_id.removeprefix("sha256:")


class Fetcher:
    """Fetches a model's pieces from the peers that provide it; bans those that send bytes of the wrong hash."""

    def __init__(self, p2p: P2P, providers: list[str], store: ObjectStore | None = None, parallel: int = 4):
        self.p2p = p2p
        self.providers = list(providers)
        self.banned: set[str] = set()
        self.store = store or ObjectStore()
        self.parallel = parallel
        self.fetched_bytes = 0
        self.by_provider: dict[str, int] = {}

    def usable(self) -> list[str]:
        return [p for p in self.providers if p not in self.banned]

    async def bundle(self, content_id: str) -> tuple[str, dict[str, Any], str]:
        """(model name, manifest, config.json text) of `content_id`, checked against it."""
        if not CONTENT_ID.fullmatch(content_id):
            raise ValueError(f"not a content id: {content_id!r}")
        for peer in self.usable():
            try:
                answer = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), MANIFEST_HANDLER, runtime_pb2.ExpertUID(uid=content_id),
                    runtime_pb2.ExpertInfo), FETCH_TIMEOUT)
                if len(answer.serialized_info) > MAX_MANIFEST:
                    raise ValueError("manifest too large")
                data = json.loads(answer.serialized_info)
                manifest, config, model_id = data["manifest"], data["config"], data["model_id"]
                check_identity(manifest)
                if manifest["content_id"] != content_id:
                    raise ValueError("a manifest of another model")
                if config_digest(json.loads(config)) != manifest["config"]:
                    raise ValueError("a config that is not the manifest's")
                if not (isinstance(model_id, str) and 0 < len(model_id) <= 256 and model_id.isprintable()):
                    raise ValueError("a malformed model name")
                return model_id, manifest, config
            except Exception as e:  # any bad answer costs only its sender
                logger.warning("peer %s gave no usable manifest of %s: %s", peer, content_id, e)
                self.banned.add(peer)
        raise FileNotFoundError(f"no peer gave a valid manifest of {content_id}")

    async def tensors(self, entries: list[dict[str, Any]]) -> None:
        """Fetch every tensor of `entries` (manifest tensor entries) the store lacks, verified, into the store."""
        wanted = {e["sha256"]: _nbytes(e) for e in entries if not self.store.has(e["sha256"])}
        queue: asyncio.Queue[str] = asyncio.Queue()
        for digest in wanted:
            queue.put_nowait(digest)

        async def worker(index: int) -> None:
            while not queue.empty():
                digest = queue.get_nowait()
                await self._one(digest, wanted[digest], index)

        await asyncio.gather(*(worker(i) for i in range(min(self.parallel, max(1, len(wanted))))))

    async def _one(self, digest: str, size: int, index: int) -> None:
        data = bytearray()
        contributors: set[str] = set()
        attempts = 0
        while True:
            usable = self.usable()
            if not usable:
                raise FileNotFoundError(f"no peer left to fetch tensor {digest} from")
            peer = usable[(index + attempts) % len(usable)]
            attempts += 1
            try:
                while len(data) < size:
                    length = min(MAX_CHUNK, size - len(data))
                    ask = json.dumps({"sha256": digest, "offset": len(data), "length": length})
                    answer = await asyncio.wait_for(self.p2p.call_protobuf_handler(
                        PeerID.from_base58(peer), FETCH_HANDLER, runtime_pb2.ExpertUID(uid=ask),
                        runtime_pb2.ExpertInfo), FETCH_TIMEOUT)
                    chunk = answer.serialized_info
                    if len(chunk) != length:
                        raise ValueError(f"asked {length} bytes, got {len(chunk)}")
                    data += chunk
                    contributors.add(peer)
                    self.by_provider[peer] = self.by_provider.get(peer, 0) + len(chunk)
            except Exception as e:  # busy, gone or malformed: resume from another peer
                logger.info("fetching %s from %s stopped at %d of %d bytes: %s", digest[:12], peer, len(data), size, e)
                if attempts > 8 * max(1, len(self.providers)):
                    raise
                await asyncio.sleep(0.05 * random.random())
                continue
            try:
                self.store.put(digest, bytes(data))
                self.fetched_bytes += size
                return
            except CorruptObject:
                if len(contributors) == 1:
                    logger.warning("peer %s sent tensor bytes that do not match their hash: banned for fetches", peer)
                    self.banned |= contributors
                data, contributors = bytearray(), set()  # again, whole, from one peer


_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(entry: dict[str, Any]) -> int:
    n = _ITEM[entry["dtype"]]
    for d in entry["shape"]:
        n *= int(d)
    return n


def write_bundle(content_id: str, model_id: str, manifest: dict[str, Any], config: str) -> Path:
    """The local directory of a model fetched by its id: config.json and the manifest; blocks come with write_blocks."""
    out = remote_dir(content_id)
    make_dirs(out)
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(config))
    public = {k: v for k, v in manifest.items() if k != "locations"}
    write_atomically(out / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps({**public, "model_id": model_id})))
    return out


def write_blocks(path: Path, manifest: dict[str, Any], start: int, end: int, store: ObjectStore) -> None:
    """Shards `block-NNNNN.safetensors` of blocks [start, end) from the store (each tensor verified as read), and an
    index of every shard present; the manifest's locations then point at them, so this peer serves them too."""
    import torch

    from swarm.model.gguf_convert import _save_shard

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    prefix = manifest["blocks_prefix"]
    for block in range(start, end):
        shard = path / f"block-{block:05d}.safetensors"
        if shard.is_file():
            continue
        tensors = {}
        for entry in manifest["block_manifests"][block]["tensors"]:
            raw = bytearray(store.get(entry["sha256"]))
            tensor = torch.frombuffer(raw, dtype=dtypes[entry["dtype"]]) if raw else torch.empty(0)
            tensors[f"{prefix}.{block}.{entry['name']}"] = tensor.reshape(entry["shape"])
        write_atomically(shard, partial(_save_shard, tensors=tensors))
    weight_map = {}
    for shard in sorted(path.glob("block-*.safetensors")):
        block = int(shard.stem.split("-")[1])
        for entry in manifest["block_manifests"][block]["tensors"]:
            weight_map[f"{prefix}.{block}.{entry['name']}"] = shard.name
    write_atomically(path / "model.safetensors.index.json",
                     lambda tmp: tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map})))


def locate(path: Path, manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """Where each tensor of the blocks present in a fetched directory lies (file, offset, length)."""
    from swarm.model.manifest import read_header

    locations: dict[str, list[Any]] = {}
    prefix = manifest["blocks_prefix"]
    for shard in sorted(path.glob("block-*.safetensors")):
        block = int(shard.stem.split("-")[1])
        start, header = read_header(shard)
        for entry in manifest["block_manifests"][block]["tensors"]:
            begin, end = header[f"{prefix}.{block}.{entry['name']}"]["data_offsets"]
            locations[entry["sha256"]] = [str(shard.resolve()), start + begin, end - begin]
    return locations


def block_entries(manifest: dict[str, Any], start: int, end: int) -> list[dict[str, Any]]:
    return [e for block in manifest["block_manifests"][start:end] for e in block["tensors"]]


__all__ = ["Fetcher", "TensorProvider", "block_entries", "digest_of", "locate", "remote_dir", "valid_digest",
           "write_blocks", "write_bundle"]
