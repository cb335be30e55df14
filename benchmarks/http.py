"""What a user of the HTTP API sees vs the swarm client itself: TTFT and decode tok/s through the gateway.

    python -m benchmarks.http [--new-tokens 32] [--runs 5] [--out bench-results]

A 2-peer swarm of the default model (0:15, 15:30) and the gateway as a uvicorn process joined to it. Interleaved:
the official `openai` client streaming a chat completion (greedy, end-of-text banned with logit_bias), and the
in-process swarm client running the same prompt through the same chain. The gateway's overhead is 1 - the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

import openai
from transformers import AutoTokenizer

from benchmarks.common import emit, machine, median, peak_rss_mib, versions
from benchmarks.swarm_runs import chain_of, start_peers, swarm_run
from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.launcher import LocalSwarm

PROMPT = "Write a short story about a robot who learns to paint."
LAYOUT = {"swarm_2": ["0:15", "15:30"]}


async def http_run(sdk: openai.AsyncOpenAI, new_tokens: int, eos: int) -> tuple[float, float, str]:
    start = time.perf_counter()
    stream = await sdk.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=new_tokens,
        logit_bias={str(eos): -100}, stream=True, stream_options={"include_usage": True})
    first = last = None
    text, completion_tokens = "", 0
    async for chunk in stream:
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            text += chunk.choices[0].delta.content
    assert first is not None and last is not None and completion_tokens == new_tokens, (completion_tokens, text)
    return first - start, (new_tokens - 1) / (last - first), text


async def run(args) -> dict:
    source = resolve_model(DEFAULT_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                    add_generation_prompt=True)["input_ids"])
    eos = tokenizer.eos_token_id
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        ids = start_peers(swarm, DEFAULT_MODEL_ID, LAYOUT, "--num-threads", "1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        gateway = swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers)})
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        client = await SwarmClient.connect(swarm.initial_peers)
        try:
            chain = await chain_of(client, ids["swarm_2"])
            await http_run(sdk, 4, eos)  # warm-up
            await swarm_run(client, chain, prompt_ids, 4, [eos])
            figures: dict[str, list[tuple[float, float]]] = {"client": [], "http": []}
            texts = []
            for round_ in range(args.runs):
                for name in (["client", "http"] if round_ % 2 == 0 else ["http", "client"]):
                    if name == "http":
                        ttft, rate, text = await http_run(sdk, args.new_tokens, eos)
                        texts.append(text)
                    else:
                        ttft, rate, tokens = await swarm_run(client, chain, prompt_ids, args.new_tokens, [eos])
                        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
                    figures[name].append((ttft, rate))
            rss = {"gateway": peak_rss_mib(gateway.pid),
                   **{f"peer {blocks}": peak_rss_mib(proc.pid) for (_, blocks), proc in swarm.procs_by_layout.items()}}
        finally:
            await client.close()
    pairs = list(zip(figures["client"], figures["http"], strict=True))
    decode_ratio = median([h[1] / c[1] for c, h in pairs])
    return {
        "benchmark": "http", "machine": machine(), "versions": versions(),
        "settings": {"model": DEFAULT_MODEL_ID, "dtype": "float32", "new_tokens": args.new_tokens, "runs": args.runs,
                     "layout": LAYOUT, "torch_threads_per_peer": 1, "eos_suppressed": True},
        "texts_identical": len(set(texts)) == 1,
        "client": {"ttft_s": [round(t, 4) for t, _ in figures["client"]],
                   "decode_tok_s": [round(r, 2) for _, r in figures["client"]],
                   "median_ttft_s": round(median([t for t, _ in figures["client"]]), 4),
                   "median_decode_tok_s": round(median([r for _, r in figures["client"]]), 2)},
        "http": {"ttft_s": [round(t, 4) for t, _ in figures["http"]],
                 "decode_tok_s": [round(r, 2) for _, r in figures["http"]],
                 "median_ttft_s": round(median([t for t, _ in figures["http"]]), 4),
                 "median_decode_tok_s": round(median([r for _, r in figures["http"]]), 2)},
        "ratio_decode_http_vs_client": round(decode_ratio, 3),
        "ratio_ttft_http_vs_client": round(median([h[0] / c[0] for c, h in pairs]), 3),
        "gateway_decode_overhead_pct": round(100 * (1 - decode_ratio), 1),
        "peak_rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write DIR/http.json")
    args = parser.parse_args()
    emit("http", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
