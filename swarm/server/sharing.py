"""A peer's side of sharing weights (swarm.model.fetch): it serves its model's tensors to peers that fetch them, and
when it was started with only a content id (`--model sha256:<hex>`), it fetches each span it is about to load
(its first, and the target of every move, before it drains: a prefetch) into the content-addressed store, keeps
its span pinned there and evicts what no running peer uses beyond `--cache-budget`. The span's blocks are written out
as safetensors shards to load from; once loaded, the shards of blocks no running peer of the machine serves are
removed, so what a remote peer keeps on disk is the store (within its budget) and its own span's shards. It sends
peers what it has of both, at most `--share-rate` MiB/s (`--share-rate-busy` while it computes for sessions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hivemind.dht import DHT
from hivemind.p2p import P2P

from swarm.dht import announce_provider, get_providers, start_dht, stop_dht
from swarm.model.fetch import Fetcher, TensorProvider, block_entries, locate, write_blocks, write_bundle
from swarm.model.manifest import MANIFEST_FILE, load_manifest, tensor_bytes
from swarm.model.source import ModelSource, resolve_model
from swarm.model.store import CorruptObject, ObjectStore
from swarm.protocol import CONTENT_ID
from swarm.server.settings import PeerSettings

logger = logging.getLogger(__name__)

PROVIDER_WAIT = 60.0  # seconds to wait for a first provider of a content id
SOURCE_WAIT = 10.0  # the same when a model source can be read instead


def is_content_id(model: str) -> bool:
    return CONTENT_ID.fullmatch(model) is not None


class SourceMismatch(ValueError):
    """A model source (`--model-source`) whose content id is not the model's."""


def fetch_model(settings: PeerSettings) -> PeerSettings:
    """For `--model sha256:<hex>`: the model's manifest and config from the swarm (checked against the id), or from
    `--model-source` when no peer gives them, in a local directory that then holds the blocks this peer fetches; the
    settings pointed at it."""
    content_id, source = settings.model, settings.model_source
    dht = start_dht(settings.initial_peers, client_mode=True)
    try:
        model_id, manifest, config = asyncio.run(_bundle(dht, content_id, SOURCE_WAIT if source else PROVIDER_WAIT))
        origin = "the swarm"
    except FileNotFoundError as e:
        if not source:
            raise
        logger.warning("%s: the manifest and config from the model source %s", e, source)
        model_id, manifest, config = bundle_from_source(source, content_id)
        origin = source
    finally:
        stop_dht(dht)
    path = write_bundle(content_id, model_id, manifest, config)
    logger.info("model %s (%s): manifest and config from %s, in %s", content_id, model_id, origin, path)
    return settings.model_copy(update={"model": str(path), "model_id": settings.model_id or model_id})


def resolve_source(ref: str, content_id: str) -> tuple[ModelSource, dict[str, Any]]:
    """The model source `ref` and its manifest; SourceMismatch unless its content id is `content_id`."""
    source = resolve_model(ref)
    manifest = load_manifest(source.path)
    if manifest["content_id"] != content_id:
        raise SourceMismatch(f"the model source {ref} has content id {manifest['content_id']}, not {content_id}: "
                             f"refused (it holds other weights)")
    return source, manifest


def bundle_from_source(ref: str, content_id: str) -> tuple[str, dict[str, Any], str]:
    source, manifest = resolve_source(ref, content_id)
    public = {k: v for k, v in manifest.items() if k != "locations"}
    return source.model_id, public, (source.path / "config.json").read_text()


async def _bundle(dht: DHT, content_id: str, wait: float) -> tuple[str, dict[str, Any], str]:
    p2p = await dht.replicate_p2p()
    deadline = time.monotonic() + wait
    while not (found := await get_providers(dht, content_id)):
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no peer of the swarm provides {content_id}")
        await asyncio.sleep(1.0)
    _, manifest, config = await Fetcher(p2p, [peer for peer, _ in found]).bundle(content_id)
    # the name is not covered by the content id: the one most of its providers announce
    names = Counter(name for _, name in found)
    return names.most_common(1)[0][0], manifest, config


class WeightSharing:
    def __init__(self, path: Path, manifest: dict[str, Any], model_id: str, cache_budget_gib: float = 0.0,
                 corrupt: bool = False, allowed_clients: set[str] | None = None, share: bool = True,
                 rate: float = 0.0, busy_rate: float = 0.0, busy: Callable[[], bool] | None = None,
                 model_source: str = ""):
        self.path, self.manifest, self.model_id = Path(path), manifest, model_id
        self.model_source = model_source  # where tensors no peer gives are read (its content id checked first)
        self.content_id: str = manifest["content_id"]
        self.remote = (self.path / MANIFEST_FILE).is_file()  # fetched by its id: blocks come from the swarm
        self.store = ObjectStore()
        self.cache_budget = int(cache_budget_gib * 2**30)
        public = {k: v for k, v in manifest.items() if k != "locations"}
        locations = locate(self.path, manifest) if self.remote else dict(manifest.get("locations", {}))
        self.share = share
        self.provider = TensorProvider({**public, "locations": locations}, model_id,
                                       (self.path / "config.json").read_text(), corrupt=corrupt,
                                       allowed_clients=allowed_clients, rate=rate, busy_rate=busy_rate,
                                       busy=busy)
        if corrupt:
            logger.warning("fault injection: this peer serves corrupted tensor bytes")
        self.p2p: P2P | None = None
        self.dht: DHT | None = None
        self.last_fetch: dict[str, Any] = {}

    async def start(self, p2p: P2P, dht: DHT) -> None:
        self.p2p, self.dht = p2p, dht
        if self.share:
            await self.provider.register(p2p)

    def refresh(self) -> None:
        """At each announcement, DHT or not: this peer's pins stay fresh for processes of other pid namespaces."""
        if self.remote:
            self.store.refresh()

    async def announce(self, peer_id: str, ttl: float, owner: bytes) -> None:
        if self.share and self.dht is not None and self.provider.locations:
            await announce_provider(self.dht, self.content_id, peer_id, self.model_id, ttl, owner)

    async def prepare(self, start: int, end: int, peer_id: str, keep: tuple[int, int] | None = None) -> None:
        """Before blocks [start, end) load: fetch what this directory lacks of them (verified, from the peers that
        provide them) and write their shards; keep them pinned in the store (with `keep`, the span still served
        during a prefetch), evict beyond the budget."""
        if not self.remote:
            return
        assert self.p2p is not None and self.dht is not None
        entries = block_entries(self.manifest, start, end)
        kept = block_entries(self.manifest, *keep) if keep else []
        # before fetching: another peer's eviction, or its removal of shards, leaves them alone
        self.store.pin(e["sha256"] for e in entries + kept)
        missing = [b for b in range(start, end) if not (self.path / f"block-{b:05d}.safetensors").is_file()]
        loop = asyncio.get_running_loop()
        if missing:
            began = time.monotonic()
            providers = [p for p, _ in await get_providers(self.dht, self.content_id) if p != peer_id]
            fetcher = Fetcher(self.p2p, providers, self.store)
            for attempt in range(2):
                wanted = block_entries(self.manifest, min(missing), max(missing) + 1)
                try:
                    await fetcher.tensors(wanted)
                except (FileNotFoundError, TimeoutError) as e:  # no peer (left) to give some of them
                    if not self.model_source:
                        raise
                    logger.warning("from the swarm: %s; the rest from the model source %s", e, self.model_source)
                    await loop.run_in_executor(None, self._from_source, wanted)
                try:
                    await loop.run_in_executor(None, write_blocks, self.path, self.manifest, start, end, self.store)
                    break
                except CorruptObject:  # a stored object went bad since: it was dropped, fetch it again
                    if attempt:
                        raise
            self.last_fetch = {"blocks": [start, end], "bytes": fetcher.fetched_bytes, "seconds":
                               round(time.monotonic() - began, 3), "by_provider": dict(fetcher.by_provider),
                               "banned": sorted(fetcher.banned)}
            logger.info("fetched blocks %d:%d: %d bytes from %d peer(s) in %.1f s %s; banned for bad bytes: %s",
                        start, end, fetcher.fetched_bytes, len(fetcher.by_provider), self.last_fetch["seconds"],
                        fetcher.by_provider, sorted(fetcher.banned) or "none")
        if self.cache_budget:
            removed = await loop.run_in_executor(None, self.store.evict, self.cache_budget)
            logger.info("store: %d bytes, budget %d; evicted %d tensors no running peer uses",
                        await loop.run_in_executor(None, self.store.size), self.cache_budget, len(removed))
        await loop.run_in_executor(None, self._relocate)

    def _from_source(self, entries: list[dict[str, Any]]) -> None:
        """Tensors of `entries` the store lacks, read from the model source (checked: its content id, then each
        tensor's hash as it is stored)."""
        _, manifest = resolve_source(self.model_source, self.content_id)
        for entry in entries:
            digest = entry["sha256"]
            if not self.store.has(digest):
                file, offset, length = manifest["locations"][digest]
                with open(file, "rb") as f:
                    f.seek(offset)
                    self.store.put(digest, f.read(length))

    def repin(self, start: int, end: int) -> None:
        """A prefetched move did not happen: the span served is the one pinned again."""
        if self.remote:
            self.store.pin(e["sha256"] for e in block_entries(self.manifest, start, end))

    async def loaded(self, start: int, end: int) -> None:
        """Blocks [start, end) are in memory: the shards of other blocks, which no running peer of this machine
        uses, are removed (what is left of them is in the store, under its budget, and is served from there)."""
        if not self.remote:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._drop_shards, start, end)
        await loop.run_in_executor(None, self._relocate)

    def _drop_shards(self, start: int, end: int) -> None:
        for shard in self.path.glob("block-*.safetensors"):
            block = int(shard.stem.split("-")[1])
            if start <= block < end:
                continue
            used = self.store.in_use()  # read again for each: a peer of the machine may have pinned it just now
            if not all(e["sha256"] in used for e in self.manifest["block_manifests"][block]["tensors"]):
                shard.unlink(missing_ok=True)
                logger.info("removed the shard of block %d (no longer served here)", block)

    def _relocate(self) -> None:
        """What this peer can send: the tensors of the shards present, and those still in the store."""
        locations: dict[str, list[Any]] = {}
        for block in self.manifest["block_manifests"]:
            for entry in block["tensors"]:
                if self.store.has(entry["sha256"]):
                    locations[entry["sha256"]] = [str(self.store.path(entry["sha256"])), 0, tensor_bytes(entry)]
        locations.update(locate(self.path, self.manifest))
        self.provider.manifest["locations"] = locations
