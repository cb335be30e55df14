"""Untrusted participants: DHT records cannot be overwritten or forged; identities persist; allowlists hold."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from hivemind.utils import get_dht_time

from swarm.client import SwarmClient
from swarm.dht import get_spans, load_identity, owner_marker, record_subkey, start_dht
from swarm.protocol import PeerError, spans_key
from tests.e2e.conftest import poll
from tests.launcher import LocalSwarm


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir):
    with LocalSwarm(tmp_path_factory.mktemp("trust")) as swarm:
        swarm.start_bootstrap()
        swarm.identity = str(swarm.workdir / "honest.key")
        proc = swarm.start_peer(str(tiny_model_dir("llama")), "0:6", "--identity", swarm.identity,
                                "--announce-period", "1")
        swarm.honest, swarm.honest_proc = LocalSwarm.peer_id(proc), proc
        yield swarm


async def test_records_cannot_be_overwritten_or_forged(swarm, tmp_path, tiny_model_dir):
    loop = asyncio.get_running_loop()
    _, attacker_key = load_identity(str(tmp_path / "attacker.key"))
    attacker = await loop.run_in_executor(None, lambda: start_dht(swarm.initial_peers, signing_key=attacker_key))
    try:
        model = "tiny-llama"
        spans = await get_spans(attacker, model)
        assert [(s.peer_id, s.start, s.end) for s in spans] == [(swarm.honest, 0, 6)]
        forged = dataclasses.replace(spans[0], start=0, end=1, free_kv_tokens=10**9)
        key, expiration = spans_key(model), get_dht_time() + 3600
        # The attacker does not hold the honest peer's key; it tries three ways:
        honest_subkey = next(iter((await attacker.get(key, latest=True, return_future=True)).value))
        overwrite = await attacker.store(key, subkey=honest_subkey, value=forged.to_dict(),
                                         expiration_time=expiration, return_future=True)
        in_its_name = await attacker.store(key, subkey=record_subkey(swarm.honest, owner_marker(attacker_key)),
                                           value=forged.to_dict(), expiration_time=expiration, return_future=True)
        unsigned = await attacker.store(key, subkey=swarm.honest, value=forged.to_dict(),
                                        expiration_time=expiration, return_future=True)
        unsigned_bytes = await attacker.store(key, subkey=swarm.honest.encode(), value=forged.to_dict(),
                                              expiration_time=expiration + 1, return_future=True)
        assert overwrite is False  # the DHT refuses a change to a record signed by someone else
        assert unsigned is False  # str subkeys are refused everywhere (they can crash hivemind's storage)
        assert in_its_name and unsigned_bytes  # stored (valid as records), but readers must not believe them:
        await asyncio.sleep(1.5)  # across an announcement of the honest peer
        client = await SwarmClient.connect(swarm.initial_peers, str(tiny_model_dir("llama")))
        try:
            seen = await client.spans()
            assert [(s.peer_id, s.start, s.end, s.free_kv_tokens < 10**9) for s in seen] == [
                (swarm.honest, 0, 6, True)]
        finally:
            await client.close()
    finally:
        await loop.run_in_executor(None, attacker.shutdown)


async def test_identity_file_keeps_the_peer_id_across_restarts(swarm, tiny_model_dir):
    swarm.honest_proc.stop()
    proc = swarm.start_peer(str(tiny_model_dir("llama")), "0:6", "--identity", swarm.identity,
                            "--announce-period", "1")
    assert LocalSwarm.peer_id(proc) == swarm.honest
    swarm.honest_proc = proc


async def test_allowlists_on_both_sides(swarm, tmp_path, tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    client_key = str(tmp_path / "client.key")
    client = await SwarmClient.connect(swarm.initial_peers, model, identity=client_key)
    stranger = await SwarmClient.connect(swarm.initial_peers, model)
    guarded = swarm.start_peer(model, "0:6", "--allowed-clients", client.peer_id, "--announce-period", "1")
    guarded_id = LocalSwarm.peer_id(guarded)
    try:
        # Client side: routing only through allowed peers.
        client.allowed_peers = {guarded_id}
        await poll(lambda: _has(client, guarded_id))
        assert [link.peer.peer_id for link in await client.chain()] == [guarded_id]
        tokens = [t async for t in client.generate([5, 6, 7], 4, stop_token_ids=[])]
        assert len(tokens) == 4
        # Peer side: a client not on the allowlist is refused with a clear error.
        stranger.allowed_peers = {guarded_id}
        with pytest.raises(PeerError, match="not allowed"):
            session = await stranger.inference_session(16)
            await stranger.prefill(session, torch.tensor([[5, 6]]))
    finally:
        guarded.stop()
        await client.close()
        await stranger.close()


async def _has(client, peer_id):
    return peer_id in {s.peer_id for s in await client.spans()}
