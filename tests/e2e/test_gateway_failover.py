"""Peers failing under the gateway: invisible to API clients while a replica exists, a clean 503 when none does,
and service back without restarting the gateway once a peer returns."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import pytest

from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.e2e.conftest import poll
from tests.e2e.test_gateway import free_port
from tests.launcher import LocalSwarm

MODEL = DEFAULT_MODEL_ID
PROMPTS = [f"Write one sentence about the number {n}." for n in (3, 7, 11, 42)]
TOKENS = 16


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    resolve_model(MODEL)
    with LocalSwarm(tmp_path_factory.mktemp("failover-swarm")) as swarm:
        swarm.start_bootstrap()
        swarm.peers = {}  # peer id → (blocks, process)
        procs = [(blocks, swarm.start_peer(MODEL, blocks, "--announce-period", "1", wait=False))
                 for blocks in ("0:15", "0:15", "15:30", "15:30")]
        for blocks, proc in procs:
            swarm.peers[LocalSwarm.peer_id(proc)] = (blocks, proc)
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers)})
        swarm.url = f"http://127.0.0.1:{port}"
        yield swarm


@pytest.fixture(scope="module")
async def observer(swarm):
    client = await SwarmClient.connect(swarm.initial_peers)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def sdk(swarm):
    return openai.AsyncOpenAI(base_url=f"{swarm.url}/v1", api_key="unused", max_retries=0)


async def stream(sdk, prompt: str, started: asyncio.Event | None = None) -> str:
    chunks = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=TOKENS, stream=True)
    text = ""
    async for chunk in chunks:
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if started is not None and len(text) > 10:
            started.set()
    return text


async def complete(sdk, prompt: str) -> str:
    """A plain completion: its prompt is a few tokens, too short to reuse a session the gateway parked (all chats
    share the template's system prompt, so a chat would take a parked session and the route it had)."""
    chunks = await sdk.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=TOKENS, stream=True)
    return "".join([chunk.choices[0].text async for chunk in chunks if chunk.choices])


@pytest.fixture(scope="module")
async def baseline(sdk):
    return await asyncio.gather(*(stream(sdk, p) for p in PROMPTS))


async def busiest_peer(observer, swarm, blocks: str) -> str:
    """The live peer serving `blocks` that holds the most sessions right now."""
    best, best_sessions = None, -1
    for peer_id, (peer_blocks, proc) in swarm.peers.items():
        if peer_blocks == blocks and proc.proc.poll() is None:
            sessions = (await observer.peer_info(peer_id)).active_sessions
            if sessions > best_sessions:
                best, best_sessions = peer_id, sessions
    assert best is not None and best_sessions > 0, f"no live {blocks} peer holds a session"
    return best


async def run_with_fault(sdk, observer, swarm, blocks: str, sig: int) -> tuple[list[str], str]:
    started = asyncio.Event()
    tasks = [asyncio.create_task(stream(sdk, p, started if i == 0 else None)) for i, p in enumerate(PROMPTS)]
    await started.wait()
    victim = await busiest_peer(observer, swarm, blocks)
    swarm.peers[victim][1].signal(sig)
    return await asyncio.gather(*tasks), victim


async def test_killed_peer_under_four_streams_is_invisible(sdk, observer, swarm, baseline):
    texts, victim = await run_with_fault(sdk, observer, swarm, "0:15", signal.SIGKILL)
    assert texts == baseline
    swarm.peers.pop(victim)


async def test_hung_peer_under_four_streams_is_invisible(sdk, observer, swarm, baseline):
    replacement = swarm.start_peer(MODEL, "0:15", "--announce-period", "1")  # two replicas of 0:15 again
    swarm.peers[LocalSwarm.peer_id(replacement)] = ("0:15", replacement)
    texts, victim = await run_with_fault(sdk, observer, swarm, "15:30", signal.SIGSTOP)
    assert texts == baseline
    proc = swarm.peers.pop(victim)[1]
    proc.signal(signal.SIGKILL)
    proc.signal(signal.SIGCONT)


async def test_peer_answering_nan_under_four_streams_is_invisible(sdk, observer, swarm):
    # It serves every block in one hop and claims to be very fast, so routes of new sessions take it for all 4
    # streams; it turns bad after a few steps.
    expected = await asyncio.gather(*(complete(sdk, p) for p in PROMPTS))
    bad = swarm.start_peer(MODEL, "0:30", "--announce-period", "1", "--fault-nan-after", "12",
                           "--throughput", "100000")
    bad_id = LocalSwarm.peer_id(bad)
    swarm.peers[bad_id] = ("0:30", bad)
    await poll(lambda: _listed(observer, bad_id))
    await asyncio.sleep(observer.router.period + 0.5)  # the gateway's client has refreshed its view since
    texts = await asyncio.gather(*(complete(sdk, p) for p in PROMPTS))
    assert texts == expected
    assert "answered with NaN" in next(p for p in swarm.processes if p.name.startswith("gateway")).log()
    swarm.peers.pop(bad_id)
    bad.stop()


async def _listed(observer, peer_id):
    return peer_id in {s.peer_id for s in await observer.spans(fresh=True)}


async def test_no_replica_left_is_an_error_event_then_503_then_recovery(sdk, observer, swarm, baseline):
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0,
            "max_tokens": 200, "stream": True}
    events = []
    async with httpx.AsyncClient(timeout=120) as http, http.stream(
            "POST", f"{swarm.url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:  # mid-stream: kill every peer serving 15:30
                for peer_id, (blocks, proc) in list(swarm.peers.items()):
                    if blocks == "15:30":
                        proc.signal(signal.SIGKILL)
                        swarm.peers.pop(peer_id)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "15:30" in error["message"], error

    async def unavailable():
        response = await http_post(swarm.url)
        return response.status_code == 503 and "15:30" in response.json()["error"]["message"]

    await poll(unavailable, timeout=20)
    back = swarm.start_peer(MODEL, "15:30", "--announce-period", "1")
    swarm.peers[LocalSwarm.peer_id(back)] = ("15:30", back)

    async def served():
        return (await http_post(swarm.url)).status_code == 200

    await poll(served, timeout=30)
    assert await stream(sdk, PROMPTS[1]) == baseline[1]


async def http_post(url: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"{url}/v1/chat/completions", json=body)
