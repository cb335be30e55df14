"""Peer-to-peer weights (swarm.model.fetch) against fake peers: the fetcher's blame and retry logic, the provider's
bounds, and manifests that must be refused."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from types import SimpleNamespace

import pytest
from hivemind.proto import runtime_pb2

from swarm.model.fetch import MAX_CHUNK, Fetcher, TensorProvider
from swarm.model.manifest import _digest, check_identity, config_digest
from swarm.model.store import ObjectStore, process_token

IDS = ["QmXPqDD92SX9dSoujs2jGPhsCxvJ3YqKv7bkp4MkFqK7F5", "QmSj3fMYnXbdeQz7d4uDoVmfbetp1xc7Cac2nZcgbjCfVf",
       "QmP7VWGDHxudbWVrSeJ9r2XUtUJeoq387UDEaJKa2Mdwzi"]
CONFIG = json.dumps({"model_type": "llama", "num_hidden_layers": 1})


def context(peer: str = IDS[2]):
    return SimpleNamespace(remote_id=SimpleNamespace(to_base58=lambda: peer))


def make_manifest(tmp_path, sizes: list[int]) -> tuple[dict, list[bytes]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    blobs = [bytes((i * 7 + j) % 251 for j in range(n)) for i, n in enumerate(sizes)]
    path = tmp_path / "weights.bin"
    path.write_bytes(b"".join(blobs))
    tensors, locations, offset = [], {}, 0
    for i, blob in enumerate(blobs):
        digest = hashlib.sha256(blob).hexdigest()
        tensors.append({"name": f"t{i}.weight", "shape": [len(blob)], "dtype": "U8", "sha256": digest})
        locations[digest] = [str(path), offset, len(blob)]
        offset += len(blob)
    blocks = [{"sha256": _digest(tensors), "tensors": tensors}]
    head = {"sha256": _digest([]), "tensors": []}
    identity = {"format": 2, "model_type": "llama", "num_blocks": 1, "blocks": [blocks[0]["sha256"]],
                "head": head["sha256"], "config": config_digest(json.loads(CONFIG))}
    manifest = {**identity, "content_id": "sha256:" + _digest(identity), "blocks_prefix": "model.layers",
                "block_manifests": blocks, "head_manifest": head, "locations": locations}
    check_identity(manifest)
    return manifest, blobs


class FakeP2P:
    """Calls go straight to the named peer's TensorProvider (or a behaviour wrapping it)."""

    def __init__(self, peers: dict):
        self.peers = peers

    async def call_protobuf_handler(self, peer_id, handler, request, output_type):
        serve = self.peers[peer_id.to_base58()]
        return await serve(handler, request)


def provider_of(provider: TensorProvider):
    async def serve(handler, request):
        method = provider.rpc_fetch if handler.endswith("fetch") else provider.rpc_manifest
        return await method(request, context())
    return serve


def test_a_liar_that_sends_one_bad_chunk_then_refuses_is_banned_and_the_tensor_still_comes(tmp_path):
    manifest, blobs = make_manifest(tmp_path, [3 * MAX_CHUNK + 5, 1000])
    honest = TensorProvider(manifest, "m", CONFIG)
    lying = TensorProvider(manifest, "m", CONFIG, corrupt=True)
    sent = {"n": 0}

    async def liar(handler, request):  # one corrupt chunk, then it refuses everything
        sent["n"] += 1
        if sent["n"] > 1:
            raise ValueError("no")
        return await lying.rpc_fetch(request, context())

    store = ObjectStore(tmp_path / "store")
    fetcher = Fetcher(FakeP2P({IDS[0]: liar, IDS[1]: provider_of(honest)}), [IDS[0], IDS[1]], store, parallel=1)
    asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    for blob in blobs:
        assert store.get(hashlib.sha256(blob).hexdigest()) == blob
    assert fetcher.banned == {IDS[0]}


def test_busy_refusals_only_wait(tmp_path):
    """One honest provider serving two fetches at a time, four workers: the refused ones wait and get theirs."""
    manifest, blobs = make_manifest(tmp_path, [MAX_CHUNK + 1] * 6)
    provider = TensorProvider(manifest, "m", CONFIG, max_concurrent=2)

    async def slow(handler, request):  # each read takes a while, so fetches overlap and some are refused as busy
        provider.serving += 1
        try:
            await asyncio.sleep(0.02)
        finally:
            provider.serving -= 1
        return await provider.rpc_fetch(request, context())

    fetcher = Fetcher(FakeP2P({IDS[1]: slow}), [IDS[1]], ObjectStore(tmp_path / "store"), parallel=4)
    asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    assert fetcher.fetched_bytes == sum(len(b) for b in blobs) and not fetcher.banned


def test_the_provider_bounds_every_request(tmp_path):
    manifest, blobs = make_manifest(tmp_path, [2 * MAX_CHUNK])
    provider = TensorProvider(manifest, "m", CONFIG, allowed_clients={IDS[0]})
    digest = manifest["block_manifests"][0]["tensors"][0]["sha256"]

    def ask(**fields) -> runtime_pb2.ExpertUID:
        return runtime_pb2.ExpertUID(uid=json.dumps({"sha256": digest, "offset": 0, "length": 10, **fields}))

    async def call(request, peer=IDS[0]):
        return await provider.rpc_fetch(request, context(peer))

    assert asyncio.run(call(ask())).serialized_info == blobs[0][:10]
    for bad in (ask(length=MAX_CHUNK + 1), ask(offset=2 * MAX_CHUNK), ask(offset=-1), ask(length=0),
                ask(sha256="0" * 64), ask(offset="0"), runtime_pb2.ExpertUID(uid="x" * 1000),
                runtime_pb2.ExpertUID(uid="not json")):
        with pytest.raises(ValueError):
            asyncio.run(call(bad))
    with pytest.raises(PermissionError):  # a private swarm's peer: its allowed clients only
        asyncio.run(call(ask(), peer=IDS[1]))


@pytest.mark.parametrize("forgery", ["negative_shape", "huge_shape", "bad_dtype", "repeated_name", "traversal",
                                     "wrong_id", "other_config"])
def test_forged_manifests_are_refused_and_their_sender_banned(tmp_path, forgery):
    manifest, _ = make_manifest(tmp_path, [100, 200])
    forged, config = copy.deepcopy(manifest), CONFIG
    tensors = forged["block_manifests"][0]["tensors"]
    if forgery == "negative_shape":
        tensors[0]["shape"] = [-100]
    elif forgery == "huge_shape":
        tensors[0]["shape"] = [1 << 39, 1 << 39]
    elif forgery == "bad_dtype":
        tensors[0]["dtype"] = "F128"
    elif forgery == "repeated_name":
        tensors[1]["name"] = tensors[0]["name"]
    elif forgery == "traversal":
        tensors[0]["name"] = "../../x"
    elif forgery == "other_config":
        config = json.dumps({"model_type": "llama", "num_hidden_layers": 1, "rope_theta": 1.0})
    # a consistent forgery: every hash recomputed, so only the checks of its contents can catch it
    forged["block_manifests"][0]["sha256"] = _digest(tensors)
    forged["blocks"] = [forged["block_manifests"][0]["sha256"]]
    identity = {k: forged[k] for k in ("format", "model_type", "num_blocks", "blocks", "head", "config")}
    forged["content_id"] = "sha256:" + _digest(identity)
    asked = manifest["content_id"] if forgery in ("wrong_id", "other_config") else forged["content_id"]
    bad = TensorProvider(forged, "m", config)
    fetcher = Fetcher(FakeP2P({IDS[0]: provider_of(bad)}), [IDS[0]], ObjectStore(tmp_path / "store"))
    if forgery == "wrong_id":  # it answers for an id it does not have, with another model's (valid) manifest
        other, _ = make_manifest(tmp_path / "other", [300])
        bad.manifest = {**forged, "content_id": asked}
        bad.manifest_answer = json.dumps({"model_id": "m", "manifest": other, "config": config}).encode()
    with pytest.raises(FileNotFoundError):
        asyncio.run(fetcher.bundle(asked))
    assert fetcher.banned == {IDS[0]}


@pytest.mark.parametrize("busy", [False, True])
def test_the_bytes_sent_are_paced_to_the_share_rate_over_all_fetches(tmp_path, busy):
    """Two tensors of 2 MiB fetched at once from a provider paced at 10 MiB/s (while idle, or while its peer is busy
    with inference; the other rate unpaced): the first chunk goes at once, the other three each wait for the ones
    before them, so the whole takes at least 0.3 s, however many ask."""
    import time

    manifest, _ = make_manifest(tmp_path, [2 * MAX_CHUNK, 2 * MAX_CHUNK])
    rates = {"rate": 0, "busy_rate": 10 * MAX_CHUNK} if busy else {"rate": 10 * MAX_CHUNK, "busy_rate": 0}
    provider = TensorProvider(manifest, "m", CONFIG, **rates, busy=lambda: busy)
    fetcher = Fetcher(FakeP2P({IDS[1]: provider_of(provider)}), [IDS[1]], ObjectStore(tmp_path / "store"), parallel=2)
    began = time.perf_counter()
    asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    assert time.perf_counter() - began >= 0.3
    assert fetcher.fetched_bytes == provider.served_bytes == 4 * MAX_CHUNK and not fetcher.banned
    provider.busy = lambda: not busy  # the other rate: unpaced, nothing held back
    before = provider.free_at
    asyncio.run(provider.rpc_fetch(runtime_pb2.ExpertUID(uid=json.dumps({
        "sha256": manifest["block_manifests"][0]["tensors"][0]["sha256"], "offset": 0, "length": 10})), context()))
    assert provider.free_at == before


def test_a_share_rate_under_the_fetchers_patience_is_refused():
    from pydantic import ValidationError

    from swarm.server.settings import PeerSettings

    assert PeerSettings(share_rate=0).share_rate == 0 and PeerSettings(share_rate=0.5).share_rate == 0.5
    with pytest.raises(ValidationError, match=r"at least 0\.1"):
        PeerSettings(share_rate=0.01)
    with pytest.raises(ValidationError, match=r"at least 0\.1"):
        PeerSettings(share_rate_busy=0.05)


@pytest.mark.parametrize("prefix", ["good", "bad"])
def test_a_fetch_left_by_a_dead_process_is_resumed_and_a_bad_prefix_costs_nobody(tmp_path, prefix):
    """A partial file of a dead process (a peer killed mid-fetch): its good prefix is kept and only the rest fetched;
    a prefix that turns out wrong makes the tensor come again whole, and the honest peer is not banned for it."""
    import subprocess
    import sys

    manifest, blobs = make_manifest(tmp_path, [3 * MAX_CHUNK + 7])
    digest = manifest["block_manifests"][0]["tensors"][0]["sha256"]
    store = ObjectStore(tmp_path / "store")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    store.partials.mkdir(parents=True)
    left = blobs[0][:MAX_CHUNK + 3] if prefix == "good" else bytes(MAX_CHUNK + 3)
    (store.partials / f"{digest}.{child.pid}-{process_token().split('-')[1]}").write_bytes(left)
    provider = TensorProvider(manifest, "m", CONFIG)
    fetcher = Fetcher(FakeP2P({IDS[1]: provider_of(provider)}), [IDS[1]], store, parallel=1)
    asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    assert store.get(digest) == blobs[0] and not fetcher.banned
    size = len(blobs[0])
    assert provider.served_bytes == (size - len(left) if prefix == "good" else 2 * size - len(left))
    assert not list(store.partials.iterdir())  # nothing left behind: no partial, no bad copy


def test_peers_that_do_not_hold_a_tensor_are_skipped_at_once(tmp_path):
    """One peer lacks the tensor (its file went: evicted), the other does not share this model at all: the fetch
    fails at once with FileNotFoundError (the caller then reads the model source), not after TENSOR_DEADLINE."""
    import time

    manifest, _ = make_manifest(tmp_path, [1000])
    provider = TensorProvider(manifest, "m", CONFIG)
    next(iter(provider.locations.values()))[0] = str(tmp_path / "gone.bin")
    stranger = TensorProvider({**manifest, "locations": {}}, "m", CONFIG)
    fetcher = Fetcher(FakeP2P({IDS[0]: provider_of(provider), IDS[1]: provider_of(stranger)}), [IDS[0], IDS[1]],
                      ObjectStore(tmp_path / "store"))
    began = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no peer left"):
        asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    assert time.perf_counter() - began < 5 and not fetcher.banned  # lacking a tensor is no lie


def test_a_tensor_refused_as_busy_while_others_arrive_does_not_time_out(tmp_path, monkeypatch):
    """Four workers, a paced provider serving two at a time: the two waiting may be refused as busy for longer than
    the no-progress deadline while the others' chunks arrive; the fetch goes on (progress is the fetcher's)."""
    from swarm.model import fetch

    monkeypatch.setattr(fetch, "TENSOR_DEADLINE", 0.5)
    manifest, blobs = make_manifest(tmp_path, [2 * MAX_CHUNK] * 8)
    provider = TensorProvider(manifest, "m", CONFIG, rate=10 * MAX_CHUNK)  # 16 chunks at 10 a second: 1.5 s
    fetcher = Fetcher(FakeP2P({IDS[1]: provider_of(provider)}), [IDS[1]], ObjectStore(tmp_path / "store"), parallel=4)
    asyncio.run(fetcher.tensors(manifest["block_manifests"][0]["tensors"]))
    assert fetcher.fetched_bytes == sum(len(b) for b in blobs) and not fetcher.banned
