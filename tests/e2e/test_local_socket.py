"""Peers that also listen on a Unix socket (--local-socket): a client on their host reaches them there, with the same
tokens as through P2P, the handler's bounds and errors, and push to a next peer unchanged."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from swarm.codec import make_request, receive_message, send_message, unpack_metadata
from swarm.local_socket import LocalPeers
from swarm.protocol import PROTOCOL_VERSION, ErrorCode, PeerError
from tests.e2e.conftest import TINY_PEER_ARGS, local_greedy
from tests.launcher import LocalSwarm, ProcessFailed


@pytest.fixture(scope="module")
def sockets():
    directory = Path(tempfile.mkdtemp(prefix="swarm-test-"))  # mode 700, short enough for socket addresses
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def local_swarm(tmp_path_factory, tiny_model_dir, sockets):
    """The tiny Llama as 0:3 (also on a Unix socket) + 3:6 (P2P only)."""
    model = str(tiny_model_dir("llama"))
    with LocalSwarm(tmp_path_factory.mktemp("local-socket")) as swarm:
        swarm.start_bootstrap()
        first = swarm.start_peer(model, "0:3", *TINY_PEER_ARGS, "--local-socket", str(sockets), wait=False)
        second = swarm.start_peer(model, "3:6", *TINY_PEER_ARGS, wait=False)
        swarm.local_peer, swarm.remote_peer = LocalSwarm.peer_id(first), LocalSwarm.peer_id(second)
        yield swarm


def prompt(seed: int) -> list[int]:
    return torch.randint(2, 512, (9,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_the_socket_carries_the_sessions_with_the_same_tokens(local_swarm, sockets, tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    assert (sockets / f"{local_swarm.local_peer}.sock").exists()
    assert not (sockets / f"{local_swarm.remote_peer}.sock").exists()
    for push in (True, False):  # the local peer pushes to the next one over P2P; or the client relays
        client = await SwarmClient.connect(local_swarm.initial_peers, model, local_sockets=str(sockets), push=push)
        try:
            await client.wait_for_chain()
            ids = prompt(int(push))
            tokens = [t async for t in client.generate(ids, 12, stop_token_ids=[])]
            assert tokens == local_greedy(reference, ids, 12)
            assert client.p2p.connections == 1  # the 0:3 link's stream; the 3:6 one went through P2P
        finally:
            await client.close()


async def test_a_bad_frame_on_the_socket_costs_only_its_sender(local_swarm, sockets, tiny_model_dir):
    reader, writer = await LocalPeers(sockets).connect(local_swarm.local_peer, timeout=5)
    await send_message(writer, make_request({"type": "open", "version": PROTOCOL_VERSION, "max_length": -5}))
    answer = await asyncio.wait_for(receive_message(reader, runtime_pb2.ExpertResponse, 1 << 16), 10)
    metadata = unpack_metadata(answer.metadata)
    assert metadata["type"] == "error" and metadata["code"] == ErrorCode.BAD_REQUEST.value
    writer.close()
    reader, writer = await LocalPeers(sockets).connect(local_swarm.local_peer, timeout=5)
    writer.write(b"\xff" * 64)  # not a frame at all
    await writer.drain()
    writer.write_eof()
    answered = asyncio.StreamReader()  # all the peer sent before it hung up: one error frame
    answered.feed_data(await asyncio.wait_for(reader.read(), 15))
    answered.feed_eof()
    metadata = unpack_metadata((await receive_message(answered, runtime_pb2.ExpertResponse, 1 << 16)).metadata)
    assert metadata["type"] == "error" and metadata["code"] == ErrorCode.BAD_REQUEST.value
    writer.close()
    client = await SwarmClient.connect(local_swarm.initial_peers, str(tiny_model_dir("llama")),
                                       local_sockets=str(sockets))
    try:
        await client.wait_for_chain()
        assert len([t async for t in client.generate(prompt(3), 4, stop_token_ids=[])]) == 4
        assert client.p2p.connections == 1
    finally:
        await client.close()


def test_a_peer_refuses_a_socket_directory_others_can_enter(tmp_path, tiny_model_dir):
    shared = Path(tempfile.mkdtemp(prefix="swarm-test-"))
    try:
        shared.chmod(0o755)
        with LocalSwarm(tmp_path) as swarm:
            swarm.start_bootstrap()
            peer = swarm.start_peer(str(tiny_model_dir("llama")), "0:6", "--local-socket", str(shared), wait=False)
            with pytest.raises(ProcessFailed):
                peer.wait_for(r"peer ready", timeout=60)
            assert "open to others" in peer.log() and list(shared.iterdir()) == []
    finally:
        shutil.rmtree(shared)


def test_allowed_clients_bind_p2p_streams_not_the_users_own_socket(tmp_path, tiny_model_dir, sockets):
    """--allowed-clients names peer ids; the socket serves this user's processes whatever it lists."""
    model = str(tiny_model_dir("llama"))
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        peer = swarm.start_peer(model, "0:6", *TINY_PEER_ARGS, "--local-socket", str(sockets), "--allowed-clients",
                                "QmNobodyNobodyNobodyNobodyNobodyNobodyNobody1")
        peer_id = LocalSwarm.peer_id(peer)

        async def generate(local: bool) -> list[int]:
            client = await SwarmClient.connect(swarm.initial_peers, model,
                                               local_sockets=str(sockets) if local else None)
            try:
                await client.wait_for_chain()
                return [t async for t in client.generate(prompt(5), 3, stop_token_ids=[])]
            finally:
                await client.close()

        assert len(asyncio.run(generate(local=True))) == 3
        with pytest.raises(PeerError, match="not allowed"):
            asyncio.run(generate(local=False))
        assert (sockets / f"{peer_id}.sock").exists()
        peer.stop()  # SIGTERM: the peer removes its own socket (the directory stays: it is not the peer's)
        assert not (sockets / f"{peer_id}.sock").exists() and sockets.is_dir()
