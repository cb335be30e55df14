"""Weights shared peer to peer: a peer serves the tensors of its model by hash; a peer started with only a model's
content id (`--model sha256:<hex>`) gets the manifest and config, then its span's tensors, from the peers that have
them, verifies each against the manifest and serves from what it fetched.

Serving (`TensorProvider`, registered on the peer's P2P):
    swarm.v1.manifest   uid = the content id → the model's name, its manifest (without local paths) and config.json
    swarm.v1.fetch      uid = {"sha256", "offset", "length"} → at most MAX_CHUNK bytes of that tensor
Every request is bounded and checked (a known digest, a range inside the tensor, a chunk of at most MAX_CHUNK); at
most `max_concurrent` fetches are served at once (others are refused at once: the fetcher asks another peer), reads
run off the event loop, and the bytes sent, all fetches together, are paced to at most `rate` bytes per second (the
peer's `--share-rate`), or `busy_rate` while the peer is computing for its sessions (`--share-rate-busy`), so that
sending weights takes a bounded share of the peer's cores from its inference (benchmarks/fetch.py measures it).

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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarm.model.manifest import CONFIG_BOOKKEEPING, MANIFEST_FILE, check_identity, config_digest, tensor_bytes
from swarm.model.store import CorruptObject, ObjectStore, digest_of, valid_digest
from swarm.protocol import CONTENT_ID, FETCH_HANDLER, MANIFEST_HANDLER
from swarm_kernels.filecache import cache_root, make_dirs, write_atomically

logger = logging.getLogger(__name__)

MAX_CHUNK = 1 << 20
MAX_REQUEST = 256  # bytes of a fetch request's uid
MAX_MANIFEST = 4 << 20  # bytes of a manifest answer (hivemind's unary messages stop at 4 MiB)
FETCH_TIMEOUT = 30.0  # seconds for one chunk
TENSOR_DEADLINE = 300.0  # seconds a tensor may go without a chunk arriving before its fetch fails
NOT_HELD = "this peer does not hold that tensor"
ADOPTED = "?"  # the sender of bytes resumed from a dead process's partial file: unknown


class TensorProvider:
    def __init__(self, manifest: dict[str, Any], model_id: str, config_text: str, max_concurrent: int = 2,
                 corrupt: bool = False, allowed_clients: set[str] | None = None, rate: float = 0.0,
                 busy_rate: float = 0.0, busy: Callable[[], bool] | None = None):
        self.manifest = manifest
        self.model_id = model_id
        self.config_text = config_text
        self.allowed_clients = allowed_clients or set()  # a private swarm's peer serves its weights to those only
        public = {k: v for k, v in manifest.items() if k != "locations"}
        self.manifest_answer = json.dumps({"model_id": model_id, "manifest": public, "config": config_text}).encode()
        if len(self.manifest_answer) > MAX_MANIFEST:
            logger.warning("this model's manifest (%d bytes) is over what a fetcher takes: not shared",
                           len(self.manifest_answer))
        self.max_concurrent = max_concurrent
        self.serving = 0
        self.served_bytes = 0
        self.corrupt = corrupt  # fault injection for tests: flip a byte of every chunk served
        self.rate = rate  # bytes per second over all fetches (0: unpaced)
        self.busy_rate = busy_rate  # the same while busy() says the peer is computing for its sessions
        self.busy = busy or (lambda: False)
        self.free_at = 0.0  # loop time at which the bytes sent so far have used up the rate

    @property
    def locations(self) -> dict[str, list[Any]]:
        return self.manifest.get("locations", {})

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(MANIFEST_HANDLER, self.rpc_manifest, runtime_pb2.ExpertUID)
        await p2p.add_protobuf_handler(FETCH_HANDLER, self.rpc_fetch, runtime_pb2.ExpertUID)

    def _check_caller(self, context: P2PContext) -> None:
        if self.allowed_clients and context.remote_id.to_base58() not in self.allowed_clients:
            raise PermissionError("this peer shares its weights with its allowed clients only")

    async def rpc_manifest(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_caller(context)
        if request.uid != self.manifest["content_id"]:
            raise ValueError("this peer does not serve that content id")
        return runtime_pb2.ExpertInfo(serialized_info=self.manifest_answer)

    async def rpc_fetch(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self._check_caller(context)
        if len(request.uid) > MAX_REQUEST:
            raise ValueError("fetch request too long")
        try:
            ask = json.loads(request.uid)
            digest, offset, length = str(ask["sha256"]), ask["offset"], ask["length"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("a fetch request is {sha256, offset, length}") from None
        where = self.locations.get(digest)
        if where is None:
            raise ValueError(NOT_HELD)
        file, start, size = where
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset < size
                and 0 < length <= MAX_CHUNK and offset + length <= size):
            raise ValueError("fetch range outside the tensor or over the chunk limit")
        if self.serving >= self.max_concurrent:
            raise ValueError("busy: too many fetches at once; ask another peer")
        self.serving += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                data = await loop.run_in_executor(None, _read, file, start + offset, length)
            except FileNotFoundError:  # evicted from the store, or its shard removed, since it was listed
                raise ValueError(NOT_HELD) from None
            except OSError:
                raise ValueError("could not read that tensor now; ask again") from None
            if len(data) != length:
                raise ValueError(NOT_HELD)
            await self._pace(loop, len(data))
        finally:
            self.serving -= 1
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.served_bytes += len(data)
        return runtime_pb2.ExpertInfo(serialized_info=data)

    async def _pace(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        """Hold a chunk back until the chunks sent before it have had their time at `rate`: a fetch of a large
        tensor from an idle peer still goes at `rate` on average, however many fetchers ask at once."""
        rate = self.busy_rate if self.busy() else self.rate
        if rate <= 0:
            return
        now = loop.time()
        begin = max(now, self.free_at)
        self.free_at = begin + size / rate
        if begin > now:
            await asyncio.sleep(begin - now)


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
        self.progress_at = 0.0  # loop time a chunk last arrived, of any tensor (or the fetch began)

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
        """Fetch every tensor of `entries` (manifest tensor entries) the store lacks, verified, into the store; if
        one cannot be fetched, the others take no new tensor, the ones under way finish (no call to a peer is
        cancelled midway), and the first error is raised."""
        wanted = {e["sha256"]: tensor_bytes(e) for e in entries if not self.store.has(e["sha256"])}
        queue: asyncio.Queue[str] = asyncio.Queue()
        for digest in wanted:
            queue.put_nowait(digest)
        errors: list[BaseException] = []
        self.progress_at = asyncio.get_running_loop().time()

        async def worker(index: int) -> None:
            while not queue.empty() and not errors:
                digest = queue.get_nowait()
                try:
                    await self._one(digest, wanted[digest], index)
                except Exception as e:
                    errors.append(e)

        await asyncio.gather(*(worker(i) for i in range(min(self.parallel, max(1, len(wanted))))))
        if errors:
            raise errors[0]

    async def _one(self, digest: str, size: int, index: int) -> None:
        """One tensor, into a partial file of the store (one chunk in memory at a time; a dead process's partial
        file is resumed at its end). Chunks may come from several peers (a peer that fails mid-tensor is resumed
        from at the last good offset); if the whole does not hash right, it is fetched again whole from one peer at
        a time, those that sent parts of the bad copy first, and a peer whose own copy is wrong is banned. A `busy`
        refusal only waits; a tensor that makes no progress for a while, or runs out of peers, raises."""
        if size == 0:
            self.store.put(digest, b"")  # CorruptObject unless the digest is that of nothing
            return
        loop = asyncio.get_running_loop()
        part = self.store.partial(digest)
        have = part.stat().st_size
        if have > size:
            have = 0
        # who sent the bytes of the current copy: (offset, length, peer) per chunk; an adopted prefix's are unknown
        origins: list[tuple[int, int, str]] = [(0, have, ADOPTED)] if have else []
        bad_copy: Path | None = None  # a mixed copy that did not hash right, kept to find who sent what
        bad_origins: list[tuple[int, int, str]] = []
        suspects: list[str] = []
        whole_from_one = False
        turn = index
        file = open(part, "r+b")  # noqa: SIM115 -- closed before the file is moved into the store, and on the way out
        try:
            file.truncate(have)
            file.seek(have)
            lacking: set[str] = set()  # peers that answered they do not hold this tensor
            while True:
                usable = [p for p in self.usable() if p not in lacking]
                if not usable:
                    raise FileNotFoundError(f"no peer left to fetch tensor {digest} from")
                if loop.time() > self.progress_at + TENSOR_DEADLINE:  # refused as busy while others go on: waits
                    raise TimeoutError(f"no tensor made progress for {TENSOR_DEADLINE:.0f} s (at {digest})")
                suspects = [p for p in suspects if p in usable]
                peer = suspects.pop(0) if suspects else usable[turn % len(usable)]
                turn += 1
                if whole_from_one:
                    have, origins = 0, []
                    file.truncate(0)
                    file.seek(0)
                failure: Exception | None = None
                while have < size:
                    length = min(MAX_CHUNK, size - have)
                    try:
                        chunk = await self._chunk(peer, digest, have, length)
                    except Exception as e:  # busy, gone or malformed: resume from another peer
                        failure = e
                        break
                    file.seek(have)
                    file.write(chunk)  # a local error (a full disk) is raised: never blamed on a peer
                    origins.append((have, length, peer))
                    have += length
                    self.by_provider[peer] = self.by_provider.get(peer, 0) + len(chunk)
                    self.progress_at = loop.time()
                if failure is not None:
                    if NOT_HELD in str(failure):
                        lacking.add(peer)
                        continue
                    if "busy" not in str(failure):
                        logger.info("fetching %s from %s stopped at %d of %d bytes: %s", digest[:12], peer, have,
                                    size, failure)
                    await asyncio.sleep(0.05 + 0.2 * random.random())
                    continue
                file.truncate(have)
                file.close()
                try:
                    stored = await loop.run_in_executor(None, self.store.put_file, digest, part)
                except CorruptObject:
                    senders = {sender for _, _, sender in origins}
                    if senders == {peer}:
                        self._ban(peer)
                    else:  # which of them lied is not known yet: each sends the whole tensor alone next
                        suspects = sorted(senders - {ADOPTED})
                        if bad_copy is not None:
                            bad_copy.unlink(missing_ok=True)
                        bad_copy, bad_origins = part.with_name("bad-" + part.name), origins
                        part.rename(bad_copy)
                    whole_from_one = True
                    part = self.store.partial(digest)
                    file = open(part, "r+b")  # noqa: SIM115
                    continue
                self.fetched_bytes += size
                if bad_copy is not None:  # the good bytes are known now: whoever sent a chunk that differs lied
                    for sender in await loop.run_in_executor(None, _differing, bad_copy, stored, bad_origins):
                        self._ban(sender)
                return
        finally:
            file.close()
            if bad_copy is not None:
                bad_copy.unlink(missing_ok=True)

    async def _chunk(self, peer: str, digest: str, offset: int, length: int) -> bytes:
        ask = json.dumps({"sha256": digest, "offset": offset, "length": length})
        answer = await asyncio.wait_for(self.p2p.call_protobuf_handler(
            PeerID.from_base58(peer), FETCH_HANDLER, runtime_pb2.ExpertUID(uid=ask), runtime_pb2.ExpertInfo),
            FETCH_TIMEOUT)
        chunk = answer.serialized_info
        if len(chunk) != length:
            raise ValueError(f"asked {length} bytes, got {len(chunk)}")
        return chunk

    def _ban(self, peer: str) -> None:
        if peer not in self.banned:
            logger.warning("peer %s sent tensor bytes that do not match their hash: banned for fetches", peer)
            self.banned.add(peer)


def _differing(bad: Path, good: Path, origins: list[tuple[int, int, str]]) -> set[str]:
    """The senders of the chunks of `bad` whose bytes are not those of `good` (an adopted prefix's sender is
    unknown: never named)."""
    senders = set()
    with open(bad, "rb") as b, open(good, "rb") as g:
        for offset, length, sender in origins:
            b.seek(offset)
            g.seek(offset)
            if sender != ADOPTED and b.read(length) != g.read(length):
                senders.add(sender)
    return senders


def write_bundle(content_id: str, model_id: str, manifest: dict[str, Any], config: str) -> Path:
    """The local directory of a model fetched by its id: config.json and the manifest; blocks come with write_blocks."""
    from transformers import AutoConfig

    from swarm.model.anatomy import find_anatomy, skeleton

    out = remote_dir(content_id)
    make_dirs(out)
    # only what the content id covers: the keys it leaves out (how the checkpoint was saved) are dropped
    covered = {k: v for k, v in json.loads(config).items() if k not in CONFIG_BOOKKEEPING}
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(covered, indent=1)))
    loaded = AutoConfig.from_pretrained(out)
    anatomy = find_anatomy(skeleton(loaded), loaded)
    if anatomy.num_blocks != manifest["num_blocks"]:
        raise ValueError(f"the manifest lists {manifest['num_blocks']} blocks, its config {anatomy.num_blocks}")
    # where the blocks' tensors go is worked out here from the config, not taken from the peer that sent it
    public = {k: v for k, v in manifest.items() if k != "locations"}
    local = {**public, "model_id": model_id, "blocks_prefix": anatomy.blocks}
    write_atomically(out / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(local)))
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
        if shard.is_file() and _shard_ok(shard, manifest, block):
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


def _shard_ok(shard: Path, manifest: dict[str, Any], block: int) -> bool:
    """Whether a shard written before holds exactly its block's tensors (it is rewritten otherwise)."""
    from swarm.model.manifest import _hash_range, read_header

    try:
        start, header = read_header(shard)
        prefix = manifest["blocks_prefix"]
        for entry in manifest["block_manifests"][block]["tensors"]:
            begin, end = header[f"{prefix}.{block}.{entry['name']}"]["data_offsets"]
            if _hash_range(shard, start + begin, end - begin) != entry["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def locate(path: Path, manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """Where each tensor of the blocks present in a fetched directory lies (file, offset, length)."""
    from swarm.model.manifest import read_header

    locations: dict[str, list[Any]] = {}
    prefix = manifest["blocks_prefix"]
    for shard in sorted(path.glob("block-*.safetensors")):
        block = int(shard.stem.split("-")[1])
        try:
            start, header = read_header(shard)
        except OSError:  # removed meanwhile by another peer of the machine that no longer serves it
            continue
        for entry in manifest["block_manifests"][block]["tensors"]:
            begin, end = header[f"{prefix}.{block}.{entry['name']}"]["data_offsets"]
            locations[entry["sha256"]] = [str(shard.resolve()), start + begin, end - begin]
    return locations


def block_entries(manifest: dict[str, Any], start: int, end: int) -> list[dict[str, Any]]:
    return [e for block in manifest["block_manifests"][start:end] for e in block["tensors"]]


__all__ = ["Fetcher", "TensorProvider", "block_entries", "digest_of", "locate", "remote_dir", "valid_digest",
           "write_blocks", "write_bundle"]
