"""The real default model, SmolLM2-135M-Instruct, served by real peers: token-exact with local transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.session import InferenceSession
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.launcher import LocalSwarm
from tests.logits_tolerance import calibrated_atol

NEW_TOKENS = 32
PROMPT = "Write a short story about a robot who learns to paint."
CONCURRENT_PROMPTS = ["Name three colors.", "What is 2 + 2?", "Write a haiku about peers."]
TWO, THREE = ("0:15", "15:30"), ("0:7", "7:20", "20:30")


@pytest.fixture(scope="module")
def source():
    return resolve_model(DEFAULT_MODEL_ID)  # converts the GGUF once, before any peer needs it


@pytest.fixture(scope="module")
def smol_swarm(tmp_path_factory, source):
    with LocalSwarm(tmp_path_factory.mktemp("smol-swarm")) as swarm:
        swarm.start_bootstrap()
        procs = {blocks: swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--kv-budget-tokens", "20000", wait=False)
                 for blocks in TWO + THREE}
        swarm.peers = {blocks: LocalSwarm.peer_id(proc) for blocks, proc in procs.items()}
        yield swarm


@pytest.fixture(scope="module")
async def smol_client(smol_swarm):
    client = await SwarmClient.connect(smol_swarm.initial_peers)
    await client.wait_for_chain()
    yield client
    await client.close()


@pytest.fixture(scope="module")
def reference(source):
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(source):
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    messages = [{"role": "user", "content": PROMPT}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def local_tokens(reference, prompt_ids):
    # An explicit mask: without one, generate treats the prompt's <|im_end|> (also the pad token) as padding.
    out = reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None)
    return out[0, prompt_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def concurrent_runs(source, reference):
    """(prompt ids, transformers' 16 greedy tokens for that prompt alone) of each of CONCURRENT_PROMPTS."""
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_tensors="pt")["input_ids"] for p in CONCURRENT_PROMPTS]
    return [(i, reference.generate(i, attention_mask=torch.ones_like(i), max_new_tokens=16, do_sample=False,
                                   eos_token_id=None)[0, i.shape[1]:].tolist()) for i in ids]


@pytest.fixture(scope="module")
def logits_atol(source, reference, prompt_ids, local_tokens, concurrent_runs):
    """How far the swarm's logits may be from local_step_logits: twice the float32 spread this machine's kernels
    give on these very runs in one process (tests/logits_tolerance.py; about 2.3e-4 on an AVX2 EPYC)."""
    return calibrated_atol(reference, source.path, [(prompt_ids, local_tokens), *concurrent_runs], local_step_logits)


def test_conversion_keeps_rope_theta_and_chat_template(source):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.path)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    assert "quantization_config" not in cfg.to_dict()
    template = AutoTokenizer.from_pretrained(source.path).chat_template
    assert template and "<|im_start|>" in template


async def collect(steps):
    tokens, logits = [], []
    async for step in steps:
        tokens.append(int(step.token_ids[0]))
        logits.append(step.logits[0])
    return tokens, torch.stack(logits)


def local_step_logits(reference, prompt_ids, tokens):
    ids = torch.cat([prompt_ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        logits = reference(ids).logits[0]
    return logits[prompt_ids.shape[1] - 1 : -1]  # the logits each generated token was chosen from


async def test_two_peers_greedy_and_logits_equal_local(smol_client, smol_swarm, source, reference, prompt_ids,
                                                       local_tokens, logits_atol):
    # the two peers' chain (which of the two chains is faster depends on what 5 peers started at once measured)
    smol_client.allowed_peers = {smol_swarm.peers[blocks] for blocks in TWO}
    try:
        chain = await smol_client.chain()
        assert [(link.start, link.end) for link in chain] == [(0, 15), (15, 30)]
        tokens, logits = await collect(smol_client.generate_steps(prompt_ids, NEW_TOKENS))
    finally:
        smol_client.allowed_peers = None
    assert tokens == local_tokens
    text = AutoTokenizer.from_pretrained(source.path).decode(tokens)
    assert text.startswith('As the AI, AI-powered robot, "Pixel," began its journey'), text
    torch.testing.assert_close(logits, local_step_logits(reference, prompt_ids, tokens), atol=logits_atol, rtol=0)


async def test_three_peers_uneven_split_equal_local(smol_client, smol_swarm, reference, prompt_ids, local_tokens,
                                                     logits_atol):
    spans = {s.peer_id: s for s in await smol_client.spans()}
    chain = []
    for blocks in THREE:
        start, end = map(int, blocks.split(":"))
        chain.append(Link(spans[smol_swarm.peers[blocks]], start, end))
    session = await InferenceSession.open(smol_client.p2p, chain, max_length=prompt_ids.shape[1] + NEW_TOKENS)
    async with session:
        tokens, logits = await collect(smol_client.generate_steps(prompt_ids, NEW_TOKENS, session=session))
    assert tokens == local_tokens
    torch.testing.assert_close(logits, local_step_logits(reference, prompt_ids, tokens), atol=logits_atol, rtol=0)


async def test_concurrent_sessions_are_batched_and_each_equals_local(smol_client, smol_swarm, reference,
                                                                     concurrent_runs, logits_atol):
    """Six sessions at once through the 2-peer chain: the client sends their decode steps in lockstep groups, the peers
    run each group in one forward, and every session's greedy tokens equal transformers' generate() of its prompt
    alone (logits within logits_atol)."""
    ids, expected = [i for i, _ in concurrent_runs], [tokens for _, tokens in concurrent_runs]
    first = smol_swarm.peers["0:15"]
    before = await smol_client.peer_info(first)
    groups = smol_client.pipeline.groups
    rounds, grouped, framed = groups.rounds, groups.rows, groups.framed
    smol_client.allowed_peers = {smol_swarm.peers[blocks] for blocks in TWO}  # not spread over the 3-peer chain
    try:
        runs = await asyncio.gather(*(collect(smol_client.generate_steps(ids[k % 3], 16)) for k in range(6)))
    finally:
        smol_client.allowed_peers = None
    for k, (tokens, logits) in enumerate(runs):
        assert tokens == expected[k % 3], f"session {k}"
        torch.testing.assert_close(logits, local_step_logits(reference, ids[k % 3], tokens), atol=logits_atol, rtol=0)
    after = await smol_client.peer_info(first)
    forwards, rows = after.decode_forwards - before.decode_forwards, after.decode_rows - before.decode_rows
    assert rows >= 6 * 15 and rows / forwards > 2, (rows, forwards)  # 6 sessions × 15 decode steps, shared forwards
    # the client sent them in lockstep groups (two on a 2-peer chain: three sessions per round), each session's step
    # in frames of its own: sessions that push from peer to peer take no group frames (swarm.client.grouped)
    rounds, grouped, framed = groups.rounds - rounds, groups.rows - grouped, groups.framed - framed
    assert grouped == 6 * 15 and grouped / rounds > 2 and framed == 0, (grouped, rounds, framed)


async def test_sessions_that_relay_send_their_rounds_in_group_frames_and_each_equals_local(smol_swarm, reference,
                                                                                           concurrent_runs,
                                                                                           logits_atol):
    """Six sessions at once through the 2-peer chain without push: each round goes to each peer in one group frame
    and comes back in one (swarm.protocol: group_step), and every session's greedy tokens still equal
    transformers' generate() of its prompt alone."""
    ids, expected = [i for i, _ in concurrent_runs], [tokens for _, tokens in concurrent_runs]
    client = await SwarmClient.connect(smol_swarm.initial_peers, push=False,
                                       allowed_peers={smol_swarm.peers[blocks] for blocks in TWO})
    try:
        await client.wait_for_chain()
        first = smol_swarm.peers["0:15"]
        before = await client.peer_info(first)
        runs = await asyncio.gather(*(collect(client.generate_steps(ids[k % 3], 16)) for k in range(6)))
        after = await client.peer_info(first)
        groups = client.pipeline.groups
    finally:
        await client.close()
    for k, (tokens, logits) in enumerate(runs):
        assert tokens == expected[k % 3], f"session {k}"
        torch.testing.assert_close(logits, local_step_logits(reference, ids[k % 3], tokens), atol=logits_atol, rtol=0)
    forwards, rows = after.decode_forwards - before.decode_forwards, after.decode_rows - before.decode_rows
    assert rows >= 6 * 15 and rows / forwards > 2, (rows, forwards)
    # every step of a round of several went in group frames (a round of one is one frame anyway)
    assert groups.rows == 6 * 15 and groups.rows / groups.rounds > 2, (groups.rows, groups.rounds)
    assert groups.framed == groups.rows - groups.solo and groups.solo < 10, (groups.framed, groups.solo)


async def greedy(service, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The service's greedy tokens after `prompt_ids` (no stop token)."""
    from swarm.client.requests import GenerationRequest

    request = GenerationRequest(prompt_ids, new_tokens, temperature=0.0, stop_token_ids=())
    return [events[0].token_id async for events in service.generate(request)]


async def test_turn_two_reuses_the_peers_kv_of_turn_one_and_equals_a_fresh_computation(smol_swarm, source,
                                                                                         reference):
    from swarm.client.textgen import SwarmTextService

    service = await SwarmTextService.connect(smol_swarm.initial_peers)
    try:
        await service.client.wait_for_chain()

        def run(prompt_ids, new_tokens):
            return greedy(service, prompt_ids, new_tokens)

        turn1 = [{"role": "user", "content": PROMPT}]
        prompt1 = service.encode_chat(turn1)
        answer = service.decode(await run(prompt1, 24))
        prompt2 = service.encode_chat([*turn1, {"role": "assistant", "content": answer},
                                       {"role": "user", "content": "Give the story a title."}])
        reused_before = service.reused_tokens
        tokens = await run(prompt2, 12)
        assert service.reused_tokens - reused_before >= len(prompt1)  # turn 1's prompt (and answer) not recomputed
        x = torch.tensor([prompt2])
        expected = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None)[0, len(prompt2):].tolist()
        assert tokens == expected
        service.reuse_sessions = 0  # and without reuse, the same
        assert await run(prompt2, 12) == expected
    finally:
        await service.close()


async def test_a_chat_sharing_only_a_system_prompt_forks_it_and_the_parked_conversation_keeps_its_turn(
        smol_swarm, source, reference):
    """Two conversations behind one tenant with one system prompt: the second starts from a copy of the first's
    prefix on the peers (a fork: swarm.protocol), the first's turn 2 still continues its own whole history, and every
    answer is transformers' own."""
    from swarm.client.textgen import SwarmTextService

    service = await SwarmTextService.connect(smol_swarm.initial_peers)
    try:
        await service.client.wait_for_chain()

        def run(prompt_ids, new_tokens):
            return greedy(service, prompt_ids, new_tokens)

        def expected(prompt_ids, new_tokens):
            x = torch.tensor([prompt_ids])
            return reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None)[0, len(prompt_ids):].tolist()

        system = {"role": "system", "content": "You are a patient assistant. You answer plainly and briefly."}
        first = [system, {"role": "user", "content": PROMPT}]
        prompt_a = service.encode_chat(first)
        answer = service.decode(await run(prompt_a, 16))
        prompt_b = service.encode_chat([system, {"role": "user", "content": "Name three colours of the sea."}])
        shared = next(i for i, (x, y) in enumerate(zip(prompt_a, prompt_b, strict=False)) if x != y)
        assert shared >= service.MIN_REUSE
        reused = service.reused_tokens
        assert await run(prompt_b, 12) == expected(prompt_b, 12)
        assert service.forked_sessions == 1 and service.reused_tokens - reused == shared
        prompt_a2 = service.encode_chat([*first, {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "Give the story a title."}])
        reused = service.reused_tokens
        assert await run(prompt_a2, 12) == expected(prompt_a2, 12)
        assert service.reused_tokens - reused >= len(prompt_a) and service.forked_sessions == 1  # its own, taken
    finally:
        await service.close()


QUOTE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. She trimmed the wick, polished the "
         "great lens and wrote the weather in her logbook: wind from the west, a light rain, three ships passing.")


@pytest.mark.parametrize("prediction", [False, True])
async def test_speculative_decoding_is_token_identical_and_keeps_drafts(smol_swarm, source, reference, prediction):
    """Greedy with drafts by prompt lookup (and from a prediction of the answer) gives transformers' tokens exactly,
    while most of a quoted text comes from kept drafts (several tokens per step through the chain)."""
    from swarm.client.requests import GenerationRequest
    from swarm.client.textgen import SwarmTextService

    service = await SwarmTextService.connect(smol_swarm.initial_peers)
    try:
        await service.client.wait_for_chain()
        prompt = service.encode_chat([{"role": "user", "content": f"Repeat this text word for word:\n\n{QUOTE}"}])
        x = torch.tensor([prompt])
        expected = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                                      eos_token_id=None)[0, len(prompt):].tolist()
        guess = service.encode(QUOTE) if prediction else []
        request = GenerationRequest(prompt, 40, temperature=0.0, stop_token_ids=(), speculative=True,
                                    prediction=tuple(guess))
        events = [events[0] async for events in service.generate(request)]
        assert [e.token_id for e in events] == expected
        kept = sum(e.kept_draft for e in events)
        assert kept >= 20, (kept, sum(e.rejected_drafts for e in events))
    finally:
        await service.close()


async def test_drafts_from_a_local_model_are_token_identical_on_free_text(smol_swarm, local_tokens, monkeypatch):
    """A free story (nothing for prompt lookup to find) with drafts from a local draft model (here the served model
    itself: the only one sharing its tokenizer on these machines): transformers' greedy tokens exactly, and most of
    them from kept drafts; sampled, many of them too; each generation's drafter closed at its end."""
    from swarm.client.drafting import ModelDrafter
    from swarm.client.requests import GenerationRequest
    from swarm.client.textgen import SwarmTextService

    # Every step drafts (up to 4 tokens, cut where the model doubts): how long a draft pays is the policy's choice
    # from the times it measures (test_drafting), and on 2 cores shared by the drafter and the peers those times are
    # the machine's. CI once measured a sampled generation drafting a plain step after its first few (5 kept, none
    # rejected). What is tested here is what the chain does with the drafts.
    monkeypatch.setattr(ModelDrafter, "_length", lambda self, limit: min(limit, ModelDrafter.FIRST_DRAFT))
    service = await SwarmTextService.connect(smol_swarm.initial_peers)
    try:
        await service.load_draft_model(DEFAULT_MODEL_ID)
        await service.client.wait_for_chain()
        prompt = service.encode_chat([{"role": "user", "content": PROMPT}])
        request = GenerationRequest(prompt, NEW_TOKENS, temperature=0.0, stop_token_ids=(), speculative=True)
        events = [events[0] async for events in service.generate(request)]
        assert [e.token_id for e in events] == local_tokens
        kept = sum(e.kept_draft for e in events)
        assert kept >= NEW_TOKENS // 2, (kept, sum(e.rejected_drafts for e in events))
        # sampled: drafts sampled from the drafter's distribution, kept 1 - TV(p, q) of the time (the same model:
        # nearly always; greedy drafts would be kept p(argmax) of the time)
        sampled = GenerationRequest(prompt, NEW_TOKENS, temperature=1.0, stop_token_ids=(), speculative=True)
        events = [events[0] async for events in service.generate(sampled)]
        kept = sum(e.kept_draft for e in events)
        assert len(events) == NEW_TOKENS and kept >= NEW_TOKENS // 3, (kept, sum(e.rejected_drafts for e in events))
        assert service.draft_model.held == 0  # every drafter closed, its budget returned
        for _ in range(100):  # and its cache dropped on the drafter's thread
            if service.draft_model.busy == 0:
                break
            await asyncio.sleep(0.05)
        assert service.draft_model.busy == 0
    finally:
        await service.close()
