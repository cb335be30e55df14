"""A tiny random-weight Llama served by real peer processes: exactness, isolation, memory, bad input, shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from swarm.client.routing import Link
from swarm.client.session import InferenceSession
from swarm.codec import make_request, unpack_metadata
from swarm.protocol import INFERENCE_HANDLER, PROTOCOL_VERSION, ErrorCode, PeerError
from tests.e2e.conftest import TINY_PEER_ARGS, local_greedy, poll
from tests.logits_tolerance import calibrated_atol, growing_sequence_logits


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()


def prompt(seed: int, length: int = 7) -> list[int]:
    return torch.randint(2, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_greedy_tokens_equal_transformers_generate(tiny_client, reference):
    ids = prompt(0)
    tokens = [t async for t in tiny_client.generate(ids, 24, stop_token_ids=[])]
    assert tokens == local_greedy(reference, ids, 24)
    assert len(set(tokens)) > 3, "degenerate test model: greedy output barely varies"


async def test_every_step_logits_match_local_forward(tiny_client, reference, tiny_model_dir):
    ids = torch.tensor([prompt(1)])
    # fp32 split across processes vs one local forward: the spread of this machine's kernels (tests/logits_tolerance.py)
    atol = calibrated_atol(reference, tiny_model_dir("llama"), [(ids, local_greedy(reference, prompt(1), 12))],
                           growing_sequence_logits)
    async for step in tiny_client.generate_steps(ids, 12):
        with torch.inference_mode():
            expected = reference(ids).logits[:, -1]
        torch.testing.assert_close(step.logits, expected, atol=atol, rtol=0)
        ids = torch.cat([ids, step.token_ids[:, None]], dim=1)


async def test_uneven_three_peer_chain_and_partial_spans_match(tiny_client, tiny_swarm, reference):
    spans = {s.peer_id: s for s in await tiny_client.spans()}
    peers = tiny_swarm.peers
    chains = {
        "uneven 0:1 1:4 4:6": [(peers["0:1"], 0, 1), (peers["1:4"], 1, 4), (peers["4:6"], 4, 6)],
        "partial 0:2 of 0:3, 2:4 of 1:4": [(peers["0:3"], 0, 2), (peers["1:4"], 2, 4), (peers["4:6"], 4, 6)],
    }
    ids = prompt(2)
    expected = local_greedy(reference, ids, 16)
    for name, links in chains.items():
        chain = [Link(spans[peer], start, end) for peer, start, end in links]
        session = await InferenceSession.open(tiny_client.p2p, chain, max_length=len(ids) + 16)
        async with session:
            steps = tiny_client.generate_steps(torch.tensor([ids]), 16, session=session)
            tokens = [int(step.token_ids[0]) async for step in steps]
        assert tokens == expected, name


async def test_concurrent_sessions_stay_independent(tiny_client, reference):
    prompts = [prompt(10 + i, length=3 + 2 * i) for i in range(4)]

    async def run(ids):
        return [t async for t in tiny_client.generate(ids, 16, stop_token_ids=[])]

    concurrent = await asyncio.gather(*(run(ids) for ids in prompts))
    assert concurrent == [local_greedy(reference, ids, 16) for ids in prompts]


async def test_batched_session_rows_match_their_own_runs(tiny_client, reference):
    ids = torch.tensor([prompt(20, 5), prompt(21, 5)])
    rows: list[list[int]] = [[], []]
    async for step in tiny_client.generate_steps(ids, 10):
        for row, token in zip(rows, step.token_ids.tolist(), strict=True):
            row.append(token)
    assert rows == [local_greedy(reference, ids[i].tolist(), 10) for i in range(2)]


async def free_kv_is_full(client, peer_id):
    info = await client.peer_info(peer_id)
    return info.free_kv_tokens == info.kv_budget_tokens and info.active_sessions == 0


async def test_closed_session_frees_the_peers_kv(tiny_client):
    chain = await tiny_client.chain()
    session = await InferenceSession.open(tiny_client.p2p, chain, max_length=300)
    await tiny_client.prefill(session, torch.tensor([prompt(3)]))
    for link in chain:  # a session reserves KV as it grows, in chunks of 128 tokens: 7 tokens cached → 128 held
        info = await tiny_client.peer_info(link.peer.peer_id)
        assert info.free_kv_tokens <= info.kv_budget_tokens - 128 and info.active_sessions >= 1
    await session.close()
    for link in chain:
        await poll(lambda link=link: free_kv_is_full(tiny_client, link.peer.peer_id))

    async def dht_shows_full():  # what routing sees, not only what the peer says when asked
        spans = {s.peer_id: s for s in await tiny_client.spans()}
        return all(spans[link.peer.peer_id].free_kv_tokens == spans[link.peer.peer_id].kv_budget_tokens
                   for link in chain)

    await poll(dht_shows_full)


async def test_idle_session_times_out_and_is_freed(tiny_client):
    chain = await tiny_client.chain()
    session = await InferenceSession.open(tiny_client.p2p, chain, max_length=64)
    for link in chain:  # the peers' idle timeout is 4 s
        await poll(lambda link=link: free_kv_is_full(tiny_client, link.peer.peer_id), timeout=12)
    with pytest.raises(PeerError, match="idle"):
        await tiny_client.prefill(session, torch.tensor([prompt(4)]))
    await session.close()


def open_message(**overrides):
    message = {"type": "open", "version": PROTOCOL_VERSION, "session_id": "raw", "max_length": 32, "batch_size": 1,
               "blocks": [0, 3], **overrides}
    return make_request(message)


def step_message(tensor, position=0, **overrides):
    return make_request({"type": "step", "position": position, **overrides}, (tensor,))


def garbage(buffer=b"\x00\x01", size=(1, 1, 64)):
    proto = runtime_pb2.Tensor(buffer=buffer, size=size, dtype="float32")
    return runtime_pb2.ExpertRequest(metadata=make_request({"type": "step", "position": 0}).metadata, tensors=[proto])


BAD_STREAMS = {
    "garbage metadata": ([runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1\xc1")], ErrorCode.BAD_REQUEST),
    "step before open": ([step_message(torch.zeros(1, 1, 64))], ErrorCode.BAD_REQUEST),
    "wrong version": ([open_message(version=999)], ErrorCode.VERSION),
    "blocks not served": ([open_message(blocks=[0, 6])], ErrorCode.BAD_REQUEST),
    "huge max_length": ([open_message(max_length=10**9)], ErrorCode.BAD_REQUEST),
    "over the KV budget": ([open_message(max_length=512, batch_size=8)], ErrorCode.CAPACITY),
    "wrong hidden size": ([open_message(), step_message(torch.zeros(1, 1, 32))], ErrorCode.BAD_REQUEST),
    "wrong dtype": ([open_message(), step_message(torch.zeros(1, 1, 64, dtype=torch.float64))],
                    ErrorCode.BAD_REQUEST),
    "buffer shorter than shape": ([open_message(), garbage()], ErrorCode.BAD_REQUEST),
    "huge declared shape": ([open_message(), garbage(buffer=b"", size=(4096, 4096, 4096))], ErrorCode.BAD_REQUEST),
    "position in the future": ([open_message(), step_message(torch.zeros(1, 1, 64), position=5)],
                               ErrorCode.BAD_REQUEST),
    "NaN hidden states": ([open_message(), step_message(torch.full((1, 2, 64), float("nan")))],
                          ErrorCode.BAD_REQUEST),
    "unknown message type": ([open_message(), make_request({"type": "explode"})], ErrorCode.BAD_REQUEST),
    "malformed push key": ([open_message(push_key="not-hex")], ErrorCode.BAD_REQUEST),
    "malformed push hops": ([open_message(push_key="a" * 32),
                             step_message(torch.zeros(1, 1, 64), step=1, next=[["Qm/x", "b" * 32, 1]])],
                            ErrorCode.BAD_REQUEST),
    "push step number not positive": ([open_message(push_key="c" * 32), step_message(torch.zeros(1, 1, 64), step=0)],
                                      ErrorCode.BAD_REQUEST),
}


@pytest.mark.parametrize("name", list(BAD_STREAMS))
async def test_bad_rpc_input_is_refused_and_the_peer_keeps_serving(tiny_client, tiny_swarm, reference, name):
    messages, code = BAD_STREAMS[name]
    peer_id = tiny_swarm.peers["0:3"]

    async def requests():
        for message in messages:
            yield message
        await asyncio.sleep(60)  # keep our side open: the error must come from the peer, not our end of stream

    responses = await tiny_client.p2p.iterate_protobuf_handler(
        PeerID.from_base58(peer_id), INFERENCE_HANDLER, requests(), runtime_pb2.ExpertResponse)
    replies = []
    async with asyncio.timeout(20):
        async for response in responses:
            replies.append(unpack_metadata(response.metadata))
            if replies[-1]["type"] == "error":
                break
    await responses.aclose()
    assert replies[-1]["type"] == "error" and replies[-1]["code"] == code, replies
    assert replies[-1]["message"]
    await poll(lambda: free_kv_is_full(tiny_client, peer_id))
    ids = prompt(5)
    assert [t async for t in tiny_client.generate(ids, 6, stop_token_ids=[])] == local_greedy(reference, ids, 6)


async def test_sigterm_withdraws_the_peer_from_the_dht(tiny_client, tiny_swarm, tiny_model_dir, tmp_path):
    health = tmp_path / "peer-health.json"
    proc = tiny_swarm.start_peer(str(tiny_model_dir("llama")), "2:5", *TINY_PEER_ARGS, "--health-file", str(health))
    peer_id = tiny_swarm.peer_id(proc)

    def probe() -> subprocess.CompletedProcess:  # what a container HEALTHCHECK runs
        return subprocess.run([sys.executable, "-m", "swarm.server.health", str(health)], capture_output=True,
                              text=True, timeout=60)

    async def listed():
        return peer_id in {s.peer_id for s in await tiny_client.spans(fresh=True)}

    await poll(listed)
    ready = probe()
    assert ready.returncode == 0 and ready.stdout.startswith("online blocks=2:5"), ready
    proc.signal(signal.SIGTERM)
    assert await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 20) == 0
    # Withdrawn at once: well before its last record (TTL 3 s) would have expired by itself.
    assert not await listed()
    gone = probe()
    assert gone.returncode == 1 and gone.stdout.startswith("offline"), gone


async def test_a_frame_declaring_a_huge_size_is_refused_before_it_is_read(tiny_client, tiny_swarm):
    from swarm.codec import receive_message

    peer_id = tiny_swarm.peers["0:3"]
    _, reader, writer = await tiny_client.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id),
                                                                         INFERENCE_HANDLER)
    writer.write(b"\x00" + (1 << 40).to_bytes(8, "big") + b"only a few bytes follow")  # claims 1 TiB
    await writer.drain()
    async with asyncio.timeout(10):
        reply = unpack_metadata((await receive_message(reader, runtime_pb2.ExpertResponse, 1 << 20)).metadata)
    writer.close()
    assert reply["type"] == "error" and reply["code"] == ErrorCode.BAD_REQUEST
    assert "exceeds the limit" in reply["message"]
    await poll(lambda: free_kv_is_full(tiny_client, peer_id))


def fuzz_streams(seed: int, count: int) -> list[list[bytes]]:
    """Seeded malformed streams: raw garbage, random metadata, lying tensor headers, out-of-order steps."""
    import random

    import msgpack

    rng = random.Random(seed)
    frame = lambda payload: b"\x00" + len(payload).to_bytes(8, "big") + payload  # noqa: E731
    junk = lambda: rng.choice([None, True, -1, 2**63, 1.5, "x" * rng.randint(0, 50), [1, 2], {"a": 1}])  # noqa: E731

    def metadata() -> dict:
        keys = ["type", "version", "session_id", "max_length", "batch_size", "blocks", "position", "zzz"]
        data = {k: junk() for k in rng.sample(keys, rng.randint(0, len(keys)))}
        if rng.random() < 0.5:
            data["type"] = rng.choice(["open", "step", "close", ""])
        return data

    def tensor() -> runtime_pb2.Tensor:
        size = [rng.choice([0, 1, 2, 64, 4096, 2**31]) for _ in range(rng.randint(0, 4))]
        return runtime_pb2.Tensor(buffer=rng.randbytes(rng.randint(0, 600)), size=size,
                                  dtype=rng.choice(["float32", "bfloat16", "int8", "complex64", "", "float64"]))

    streams = []
    for _ in range(count):
        kind, messages = rng.randrange(4), []
        if kind == 0:  # bytes that are not frames at all
            messages.append(rng.randbytes(rng.randint(1, 300)))
        elif kind == 1:  # frames of random metadata and tensors
            for _ in range(rng.randint(1, 4)):
                request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(metadata()),
                                                    tensors=[tensor() for _ in range(rng.randint(0, 2))])
                messages.append(frame(request.SerializeToString()))
        elif kind == 2:  # a valid open, then steps at random positions and shapes
            messages.append(frame(open_message().SerializeToString()))
            for _ in range(rng.randint(1, 4)):
                shape = (1, rng.randint(1, 3), rng.choice([64, 64, 63]))
                step = step_message(torch.randn(shape), position=rng.randint(-2, 6))
                messages.append(frame(step.SerializeToString()))
        else:  # a frame header that lies about its length, then garbage
            messages.append(b"\x00" + rng.randint(0, 2**64 - 1).to_bytes(8, "big") + rng.randbytes(20))
        streams.append(messages)
    return streams


async def test_fuzzed_streams_get_errors_and_leave_the_peer_serving_with_bounded_memory(tiny_client, tiny_swarm,
                                                                                       reference):
    import psutil

    from swarm.codec import EndOfStream, receive_message

    peer_id = tiny_swarm.peers["0:3"]
    pid = next(p.pid for p in tiny_swarm.processes if f"peer_id={peer_id}" in p.log())
    rss_before = psutil.Process(pid).memory_info().rss
    outcomes = {"error": 0, "ended": 0, "answered": 0}
    for messages in fuzz_streams(seed=1234, count=80):
        _, reader, writer = await tiny_client.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id),
                                                                             INFERENCE_HANDLER)
        for data in messages:
            writer.write(data)
        try:
            await writer.drain()
            async with asyncio.timeout(10):
                while True:
                    reply = unpack_metadata((await receive_message(reader, runtime_pb2.ExpertResponse,
                                                                   1 << 20)).metadata)
                    if reply["type"] == "error":
                        outcomes["error"] += 1
                        break
                    outcomes["answered"] += 1
        except (EndOfStream, ConnectionError):
            outcomes["ended"] += 1
        finally:
            writer.close()
    print("fuzz outcomes", outcomes)
    assert outcomes["error"] >= 60, outcomes  # nearly every malformed stream is told why
    await poll(lambda: free_kv_is_full(tiny_client, peer_id))
    assert psutil.Process(pid).memory_info().rss - rss_before < 64 * 2**20
    ids = prompt(6)
    assert [t async for t in tiny_client.generate(ids, 6, stop_token_ids=[])] == local_greedy(reference, ids, 6)
