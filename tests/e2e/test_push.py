"""Server-to-server push (swarm.protocol): a chain's peers send hidden states straight to the next peer; the client
keeps every link's input for replay and checks that each peer computed from what the previous one answered.
Real peer processes of the tiny Llama: exactness with and without push, a peer that pushes lies, hostile pushes."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from swarm.client.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.session import InferenceSession
from swarm.codec import make_request, send_message
from swarm.protocol import PUSH_HANDLER
from swarm.server.handler import MAX_PEER_PUSH_STREAMS
from tests.e2e.conftest import TINY_PEER_ARGS, local_greedy
from tests.launcher import LocalSwarm

SPANS = ("0:2", "2:4", "4:6")
# the tiny swarm's arguments, but streams idle for a minute before a peer closes them (the push-stream test holds some)
ARGS = tuple("60" if previous == "--idle-timeout" else arg
             for previous, arg in zip(("", *TINY_PEER_ARGS[:-1]), TINY_PEER_ARGS, strict=True))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir):
    """The tiny Llama in three spans, and a second 0:2 peer that pushes wrong hidden states on."""
    model = str(tiny_model_dir("llama"))
    with LocalSwarm(tmp_path_factory.mktemp("push-swarm")) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(model, blocks, *ARGS, wait=False) for blocks in SPANS]
        liar = swarm.start_peer(model, "0:2", *ARGS, "--fault-push-wrong", wait=False)
        swarm.peers = {blocks: LocalSwarm.peer_id(p) for blocks, p in zip(SPANS, peers, strict=True)}
        swarm.peers["liar"] = LocalSwarm.peer_id(liar)
        yield swarm


@pytest.fixture(scope="module")
async def client(swarm, tiny_model_dir):
    client = await SwarmClient.connect(swarm.initial_peers, str(tiny_model_dir("llama")))
    await client.wait_for_chain()
    yield client
    await client.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()


IDS = torch.randint(2, 512, (9,), generator=torch.Generator().manual_seed(7)).tolist()
NEW = 16


async def chain(client: SwarmClient, swarm, first: str = "0:2") -> list[Link]:
    for _ in range(100):
        spans = {s.peer_id: s for s in await client.spans(fresh=True)}
        names = [first, *SPANS[1:]]
        if all(swarm.peers[name] in spans for name in names):
            return [Link(spans[swarm.peers[name]], *map(int, blocks.split(":")))
                    for name, blocks in zip(names, SPANS, strict=True)]
        await asyncio.sleep(0.2)
    raise AssertionError("the peers never all announced themselves")


async def generate(client: SwarmClient, session: InferenceSession, between=None) -> list[int]:
    tokens = []
    async for step in client.generate_steps(torch.tensor([IDS]), NEW, session=session):
        tokens.append(int(step.token_ids[0]))
        if between is not None and len(tokens) == 4:
            await between()
    return tokens


async def test_pushed_steps_equal_relayed_steps_and_transformers(client, swarm, reference):
    links = await chain(client, swarm)
    assert all(link.peer.push for link in links)
    expected = local_greedy(reference, IDS, NEW)
    for push in (True, False):
        session = await InferenceSession.open(client.p2p, links, max_length=len(IDS) + NEW, push=push)
        async with session:
            assert await generate(client, session) == expected, f"push={push}"
        # every step of links 2 and 3 may be pushed (2 x (1 prefill + 15 decodes)); on loopback a push races the
        # client's own copy and usually wins
        assert (session.pushed > 0) == push, (push, session.pushed)
        assert session.push == push


async def test_a_peer_that_pushes_wrong_states_costs_one_replay(client, swarm, reference):
    links = await chain(client, swarm, first="liar")
    session = await InferenceSession.open(client.p2p, links, max_length=len(IDS) + NEW)
    async with session:
        assert await generate(client, session) == local_greedy(reference, IDS, NEW)
        assert session.push is False, "the pushed input differed from the liar's answer: push is off"
        # the links after the liar computed from its push (the second from the first's output pushed on): rebuilt
        assert session.rebuilds == 2 and session.failovers == 0, "nobody is blamed: either side may be the liar"


async def test_hostile_pushes_cost_only_their_sender(client, swarm, reference):
    """A push stream sending garbage is closed; a push under a wrong key or of the wrong shape is dropped; even a
    well-formed push of other states under the session's own key (only its chain's peers know it) is caught by the
    client's digest check. The session's tokens stay exact."""
    links = await chain(client, swarm)
    session = await InferenceSession.open(client.p2p, links, max_length=len(IDS) + NEW)
    target = PeerID.from_base58(links[1].peer.peer_id)

    async def attack() -> None:
        stream = session.streams[1]
        step = stream.steps + 1
        _, reader, writer = await client.p2p.call_binary_stream_handler(target, PUSH_HANDLER)
        good = {"type": "push", "key": stream.push_key, "step": step, "position": session.position, "next": []}
        for metadata, hidden in (({**good, "key": "0" * 32}, torch.ones(1, 1, 64)),  # nobody's key: dropped
                                 (good, torch.ones(1, 3, 7)),  # the wrong shape: dropped at the step
                                 (good, torch.full((1, 2, 64), 0.5))):  # a step of 2 tokens, other states
            await send_message(writer, make_request(metadata, (hidden,)))
        await asyncio.sleep(0.5)  # the last one is computed and answered to the client, unasked
        await send_message(writer, make_request({"type": "nonsense"}, (torch.ones(1),)))
        async with asyncio.timeout(10):
            assert await reader.read() == b"", "a malformed push frame ends the push stream"
        writer.close()

    async with session:
        assert await generate(client, session, between=attack) == local_greedy(reference, IDS, NEW)
        assert session.push is False
        # the answer to the injected push (2 tokens) was read as the next step's, its digest did not match: the
        # link was rebuilt, and the peer not blamed (before the digest check, its shape would have failed it)
        assert session.rebuilds == 1 and session.failovers == 0
    # the peer still serves (a fresh session through it, with push)
    session = await InferenceSession.open(client.p2p, links, max_length=len(IDS) + NEW)
    async with session:
        assert await generate(client, session) == local_greedy(reference, IDS, NEW)


async def test_one_sender_holds_at_most_a_few_push_streams(client, swarm):
    links = await chain(client, swarm)
    target = PeerID.from_base58(links[1].peer.peer_id)
    opened = [await client.p2p.call_binary_stream_handler(target, PUSH_HANDLER)
              for _ in range(MAX_PEER_PUSH_STREAMS + 1)]
    # the peer's handlers may start in any order: whichever came last is the one too many, closed at once
    reads = [asyncio.ensure_future(reader.read()) for _, reader, _ in opened]
    async with asyncio.timeout(10):
        await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.5)
    closed = [read for read in reads if read.done()]
    assert len(closed) == 1 and closed[0].result() == b"", "one stream too many is closed, the others stay open"
    for read in reads:
        read.cancel()
    for _, _, writer in opened:
        writer.close()
