"""64 concurrent sessions of the default model against a peer whose KV budget holds 16 of them at a time.

Sessions reserve KV as they grow (128-token chunks), wait up to --admission-wait for budget, and are refused with a
`capacity` error after that. The peer never reserves past its budget (sampled from its own record during the run),
never crashes, every admitted session's greedy tokens equal transformers' for its prompt, and afterwards all the
budget is free again.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.protocol import ErrorCode, PeerError
from tests.e2e.conftest import poll
from tests.launcher import LocalSwarm

BUDGET = 16 * 128
PROMPTS = ["Name a color.", "What is 2 + 2?", "Say hello.", "Name a fruit."]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def small_budget_peer(tmp_path_factory):
    resolve_model(DEFAULT_MODEL_ID)
    with LocalSwarm(tmp_path_factory.mktemp("capacity")) as swarm:
        swarm.start_bootstrap()
        proc = swarm.start_peer(DEFAULT_MODEL_ID, "0:30", "--kv-budget-tokens", str(BUDGET), "--max-sessions", "64",
                                "--admission-wait", "20", "--announce-period", "1")
        swarm.peer = LocalSwarm.peer_id(proc)
        swarm.proc = proc
        yield swarm


async def test_sixty_four_sessions_on_a_sixteen_session_budget(small_budget_peer):
    source = resolve_model(DEFAULT_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
           for p in PROMPTS]
    expected = []
    for prompt in ids:
        x = torch.tensor([prompt])
        out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None)
        expected.append(out[0, len(prompt):].tolist())
    client = await SwarmClient.connect(small_budget_peer.initial_peers)
    try:
        await client.wait_for_chain()
        samples = []
        done = asyncio.Event()

        async def sample():
            while not done.is_set():
                samples.append(await client.peer_info(small_budget_peer.peer))
                await asyncio.sleep(0.05)

        async def one(k: int):
            tokens = [t async for t in client.generate(ids[k % 4], NEW_TOKENS, stop_token_ids=[])]
            return k, tokens

        sampler = asyncio.ensure_future(sample())
        results = await asyncio.gather(*(one(k) for k in range(64)), return_exceptions=True)
        done.set()
        await sampler
        succeeded = [r for r in results if isinstance(r, tuple)]
        failed = [r for r in results if not isinstance(r, tuple)]
        assert all(isinstance(e, PeerError) and e.code == ErrorCode.CAPACITY for e in failed), failed[:3]
        assert len(succeeded) >= 16
        for k, tokens in succeeded:
            assert tokens == expected[k % 4], k
        assert samples and all(0 <= s.free_kv_tokens <= BUDGET for s in samples)
        assert max(BUDGET - s.free_kv_tokens for s in samples) > BUDGET // 2  # the budget really was contended
        await poll(lambda: _all_free(client, small_budget_peer.peer), timeout=20)
        assert small_budget_peer.proc.proc.poll() is None  # still running
        again = [t async for t in client.generate(ids[0], NEW_TOKENS, stop_token_ids=[])]
        assert again == expected[0]
    finally:
        await client.close()


async def _all_free(client, peer_id):
    info = await client.peer_info(peer_id)
    return info.free_kv_tokens == info.kv_budget_tokens and info.active_sessions == 0
