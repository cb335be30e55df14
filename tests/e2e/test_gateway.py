"""The gateway as a real uvicorn process over a real swarm of SmolLM2, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.e2e.conftest import poll
from tests.launcher import LocalSwarm

MODEL = DEFAULT_MODEL_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    resolve_model(MODEL)
    with LocalSwarm(tmp_path_factory.mktemp("gateway-swarm")) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(MODEL, blocks, "--kv-budget-tokens", "40000", wait=False)
                 for blocks in ("0:15", "15:30")]
        swarm.peer_ids = [LocalSwarm.peer_id(p) for p in peers]
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers)})
        swarm.url = f"http://127.0.0.1:{port}"
        yield swarm


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(MODEL).path)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def stream_text(sdk, messages, **kwargs) -> tuple[str, str | None, list]:
    chunks = [c async for c in await sdk.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                                  **kwargs)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next((c.choices[0].finish_reason for c in reversed(chunks) if c.choices), None)
    return text, finish, chunks


async def test_models_and_health(sdk, gateway):
    assert [m.id for m in (await sdk.models.list()).data] == [MODEL]
    health = httpx.get(f"{gateway.url}/health").json()
    assert health["complete_chain"] is True


async def test_streaming_equals_non_streaming_greedy_with_exact_usage(sdk, tokenizer, gateway):
    messages = user("Write a short story about a robot who learns to paint.")
    full = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    text, finish, chunks = await stream_text(sdk, messages, temperature=0, max_tokens=24,
                                             stream_options={"include_usage": True})
    # the gateway's own log lines reach its stderr under plain uvicorn (the README's "one log line per generation")
    log = next(p for p in gateway.processes if p.name.startswith("gateway-")).log()
    assert f"app.main: gateway ready: serving {MODEL}" in log
    assert re.search(r"INFO app\.requests: generation id=\S+ .*completion_tokens=24", log), log[-2000:]
    assert full.choices[0].message.content == text
    assert text.startswith('As the AI, AI-powered robot, "Pixel,"'), text
    assert full.choices[0].finish_reason == finish == "length"
    prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (prompt_tokens, 24)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == prompt_tokens + 24
    assert len({c.id for c in chunks}) == 1


async def test_stop_strings_n_and_seed(sdk):
    messages = user("Write a short story about a robot who learns to paint.")
    stopped = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                stop=["robot"])
    assert stopped.choices[0].message.content == "As the AI, AI-powered "
    assert stopped.choices[0].finish_reason == "stop"
    text, _, _ = await stream_text(sdk, messages, temperature=0, max_tokens=24, stop=["robot"])
    assert text == "As the AI, AI-powered "
    two = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, n=2)
    assert len(two.choices) == 2 and two.choices[0].message.content == two.choices[1].message.content
    sampled = [await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=s,
                                                 max_tokens=12) for s in (5, 5, 6)]
    texts = [r.choices[0].message.content for r in sampled]
    assert texts[0] == texts[1] and texts[0] != texts[2]


async def test_logprobs_logit_bias_and_penalties_on_the_real_model(sdk):
    messages = user("Write a short story about a robot who learns to paint.")
    scored = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3,
                                               logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert "".join(c.token for c in content) == scored.choices[0].message.content == "As the AI"
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry.logprob <= 0 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    banned = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3,
                                               logit_bias={"1653": -100})  # 1653 = "As"
    assert not banned.choices[0].message.content.startswith("As")
    penalized = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                                  frequency_penalty=2.0, presence_penalty=2.0)
    # Greedy repeats "AI" (", AI-powered"); strong penalties steer away from repeating it.
    assert penalized.choices[0].message.content.count("AI") <= 1


async def test_echoed_prompt_logprobs_equal_transformers_on_the_same_tokens(sdk, tokenizer):
    """/v1/completions echo + logprobs (how lm-eval-harness scores a text): the prompt's own log-probabilities, each
    token given the ones before it, as local transformers computes them."""
    text = "The capital of France is Paris. The capital of Italy is"
    completion = await sdk.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True,
                                              logprobs=1)
    choice = completion.choices[0]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert choice.text.startswith(text) and len(choice.logprobs.tokens) == len(ids) + 1
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL).path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    local = [float(expected[j - 1, ids[j]]) for j in range(1, len(ids))]
    served = choice.logprobs.token_logprobs
    assert served[0] is None and choice.logprobs.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(served[1 : len(ids)], local, strict=True)) < 1e-3  # fp32 peers
    assert choice.logprobs.text_offset[: 2] == [0, len(choice.logprobs.tokens[0])]


async def test_a_predicted_output_is_drafted_from_and_the_answer_equals_transformers(sdk, tokenizer):
    """OpenAI's Predicted Outputs: the gateway decodes speculatively with drafts from the prediction; the greedy
    answer is transformers' own, and usage counts the drafted tokens kept and not kept."""
    quote = ("The keeper climbed the stairs at dusk, trimmed the wick, polished the lens and wrote in her logbook: "
             "wind from the west, light rain, three ships passing.")
    messages = user(f"Repeat this text exactly:\n\n{quote}")
    answer = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                               prediction={"type": "content", "content": quote})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL).path, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                              eos_token_id=None)[0, len(prompt):].tolist()
    assert answer.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    details = answer.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 16, details
    assert answer.usage.completion_tokens == 32


async def test_repetition_penalty_greedy_equals_transformers(sdk, tokenizer):
    """vLLM's extra sampling parameters as frontends send them: greedy under a repetition penalty (on the prompt's
    tokens and the answer's) gives transformers' generate(repetition_penalty=...) tokens."""
    messages = user("Write a short story about a robot who learns to paint.")
    answer = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                               extra_body={"repetition_penalty": 1.5, "top_k": 40, "min_p": 0.1})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL).path, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                              repetition_penalty=1.5, eos_token_id=None)[0, len(prompt):].tolist()
    plain = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                           eos_token_id=None)[0, len(prompt):].tolist()
    assert expected != plain  # the penalty changes this answer
    assert answer.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)


async def test_metrics_show_the_route_and_each_peers_observed_step(sdk, gateway):
    await sdk.chat.completions.create(model=MODEL, messages=user("Count to five."), temperature=0, max_tokens=8)
    text = httpx.get(f"{gateway.url}/metrics").text
    steps = dict(re.findall(r'^swarm_client_peer_step_seconds\{peer="(\w+)"\} (\S+)$', text, re.M))
    assert set(gateway.peer_ids) <= set(steps), (gateway.peer_ids, steps)
    assert all(0 < float(steps[peer]) < 1 for peer in gateway.peer_ids)
    assert re.search(r'^swarm_gateway_route_peers_bucket\{le="2.0"\} [1-9]', text, re.M)  # routes of 2 peers
    assert re.search(r'^swarm_gateway_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', text,
                     re.M)


async def test_eight_concurrent_streams_each_equal_its_sequential_result(sdk):
    prompts = [user(f"Name {i + 2} colours of the rainbow.") for i in range(8)]
    sequential = [(await stream_text(sdk, p, temperature=0, max_tokens=8))[0] for p in prompts]
    concurrent = await asyncio.gather(*(stream_text(sdk, p, temperature=0, max_tokens=8) for p in prompts))
    assert [text for text, _, _ in concurrent] == sequential


async def test_a_second_turn_reuses_the_first_turns_session_and_computes_what_a_fresh_gateway_does(
        gateway, sdk, tokenizer):
    """Turn 2 of a chat repeats turn 1's prompt and answer: over HTTP, its usage says at least turn 1's prompt was
    cached, and its greedy text is what a fresh gateway (nothing parked; its usage says 0 cached) computes for the
    same request. The system prompt is this test's own, so that no session parked by another test shares more than
    its first few tokens with it (prefix reuse needs 16)."""
    system = {"role": "system", "content": "You are Quillon, a terse assistant for lighthouse keepers."}
    turn1 = [system, *user("Name three things a lighthouse keeper checks every night.")]
    first = await sdk.chat.completions.create(model=MODEL, messages=turn1, temperature=0, max_tokens=24)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             *user("Which of them matters most, and why?")]
    text, _, chunks = await stream_text(sdk, turn2, temperature=0, max_tokens=24,
                                        stream_options={"include_usage": True})
    reused = chunks[-1].usage
    turn1_prompt = len(tokenizer.apply_chat_template(turn1, add_generation_prompt=True)["input_ids"])
    assert turn1_prompt <= reused.prompt_tokens_details.cached_tokens < reused.prompt_tokens

    port = free_port()
    fresh = gateway.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(gateway.initial_peers)})
    try:
        other = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        again = await other.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=24)
        await other.close()
    finally:
        fresh.stop()
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens == reused.prompt_tokens
    assert again.choices[0].message.content == text


async def test_concurrent_chats_sharing_a_system_prompt_all_start_from_it_and_the_first_keeps_its_history(
        sdk, tokenizer):
    """Over HTTP, one tenant: a first chat parks its session; then 4 new chats with the same system prompt at once
    each start from a copy of that prefix on the peers (a fork each: usage says the system prompt was cached for all
    4, where taking the one parked session could serve one of them), and the first chat's turn 2 still reuses its
    whole turn 1."""
    system = {"role": "system", "content": "You are Brambleton, a careful assistant for beekeepers and gardeners."}
    turn1 = [system, *user("What should a beekeeper check in early spring?")]
    first = await sdk.chat.completions.create(model=MODEL, messages=turn1, temperature=0, max_tokens=16)
    others = await asyncio.gather(*(sdk.chat.completions.create(
        model=MODEL, messages=[system, *user(f"Name {k} flowers bees like.")], temperature=0, max_tokens=8)
        for k in range(2, 6)))
    prefix = len(tokenizer.apply_chat_template([system], add_generation_prompt=False)["input_ids"])
    assert prefix >= 16 and all(o.usage.prompt_tokens_details.cached_tokens >= prefix for o in others), \
        [o.usage.prompt_tokens_details.cached_tokens for o in others]
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             *user("And in late autumn?")]
    second = await sdk.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=8)
    turn1_prompt = len(tokenizer.apply_chat_template(turn1, add_generation_prompt=True)["input_ids"])
    assert second.usage.prompt_tokens_details.cached_tokens >= turn1_prompt


BAD = {
    "temperature": {"temperature": 7},
    "n": {"n": 0},
    "max_tokens over context": {"max_tokens": 100000},
    "role": {"messages": [{"role": "wizard", "content": "x"}]},
    "stop list": {"stop": ["a", "b", "c", "d", "e"]},
}


async def test_bad_requests_are_400_and_serving_continues(sdk):
    for name, overrides in BAD.items():
        args = {"model": MODEL, "messages": user("hi"), "max_tokens": 4, **overrides}
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.chat.completions.create(**args)
        assert info.value.body["message"], name
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="no/such-model", messages=user("hi"))
    ok = await sdk.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4)
    assert ok.choices[0].message.content


async def test_client_disconnect_cancels_generation_and_frees_peer_kv(gateway, tokenizer):
    # Sessions of finished requests may stay parked for prefix reuse: the check is relative to what is held before.
    client = await SwarmClient.connect(gateway.initial_peers)
    try:
        async def held():
            infos = [await client.peer_info(p) for p in gateway.peer_ids]
            return [(i.active_sessions, i.kv_budget_tokens - i.free_kv_tokens) for i in infos]

        baseline = await held()

        async def all_free():
            return await held() == baseline

        # No end-of-sequence token can be sampled: left alone, this generation runs its 500 steps. Two choices: a
        # session of several is never parked for prefix reuse (swarm/client/textgen.py), so a cancelled one is closed.
        no_eos = {str(t): -100 for t in tokenizer.convert_tokens_to_ids(["<|endoftext|>", tokenizer.eos_token])}
        body = {"model": MODEL, "messages": user("Tell me a very long story."), "max_tokens": 500, "stream": True,
                "logit_bias": no_eos, "n": 2}
        arrivals: list[float] = []
        async with httpx.AsyncClient(timeout=60) as http, http.stream(
                "POST", f"{gateway.url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
                if len(arrivals) == 24:  # the role chunk, then one chunk per step
                    # Checked before leaving the loop: leaving it closes the response, which is the disconnect.
                    now = await held()
                    assert all(a == b[0] + 1 for (a, _), b in zip(now, baseline, strict=True)), (now, baseline)
                    break
        # The last 20 chunks time this machine's decode steps. Freed in under half the time the remaining ~476
        # steps would take (and the peers' idle timeout is 300 s), the generation was cancelled, not finished.
        seconds_per_step = (arrivals[-1] - arrivals[3]) / 20
        await poll(all_free, timeout=min(15.0, 0.5 * (500 - len(arrivals)) * seconds_per_step))
    finally:
        await client.close()


NODE_SCRIPT = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "unused" });
const stream = await client.chat.completions.create({
  model: process.env.MODEL,
  messages: [{ role: "user", content: "Write a short story about a robot who learns to paint." }],
  temperature: 0, max_tokens: 12, stream: true,
});
let text = "";
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
console.log(JSON.stringify({ text }));
"""


@pytest.fixture(scope="module")
def npm() -> str:
    """npm, once its registry answers (the client under test is installed from it); the test skips otherwise."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are part of this project's test environment"
    try:
        ping = subprocess.run([npm, "ping", "--fetch-timeout=5000", "--fetch-retries=0"], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("the npm registry did not answer `npm ping` within 20 s")
    if ping.returncode != 0:
        errors = [line for line in ping.stderr.splitlines() if "error" in line][:2]
        pytest.skip(f"the npm registry is unreachable from here (`npm ping`: {' / '.join(errors)})")
    return npm


def test_official_openai_npm_client_streams_from_the_gateway(npm, gateway, tmp_path):
    subprocess.run([npm, "init", "-y"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "openai@4"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    (tmp_path / "stream.mjs").write_text(NODE_SCRIPT)
    result = subprocess.run(["node", "stream.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "BASE_URL": f"{gateway.url}/v1", "MODEL": MODEL})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"].startswith("As the AI, AI-powered robot")


async def test_a_gateway_with_a_draft_model_answers_the_same_from_kept_drafts(gateway, sdk, tiny_model_dir):
    """GATEWAY_DRAFT_MODEL through HTTP: a free story (nothing for prompt lookup) gives the plain gateway's greedy
    text, most of it from the draft model's kept drafts (usage); a draft model without the served model's tokenizer
    stops the gateway at start-up with the reason."""
    from tests.launcher import ProcessFailed

    port = free_port()
    proc = gateway.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(gateway.initial_peers),
                                        "GATEWAY_DRAFT_MODEL": MODEL, "GATEWAY_SPECULATIVE": "on"})
    try:
        drafting = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        messages = user("Write a short story about a robot who learns to paint.")
        plain = await sdk.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48)
        drafted = await drafting.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48)
        assert drafted.choices[0].message.content == plain.choices[0].message.content
        details = drafted.usage.completion_tokens_details
        assert details.accepted_prediction_tokens >= 24, details
    finally:
        proc.stop()
    with pytest.raises(ProcessFailed, match="has no tokenizer to compare"):
        gateway.start_gateway(free_port(), {"SWARM_INITIAL_PEERS": " ".join(gateway.initial_peers),
                                            "GATEWAY_DRAFT_MODEL": str(tiny_model_dir("llama"))})
