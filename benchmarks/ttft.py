"""Where one request's time to first token goes on the gateway's path: template, tokenization, session open,
the prefill through the peers, the LM head and sampling, and what HTTP + SSE add.

    python -m benchmarks.ttft [--layout 0:30 | 0:15,15:30] [--quant int4] [--runs 7] [--out benchmarks/results]

One swarm of the default model (the layout's peers at --quant), a gateway as a uvicorn process joined to it, and in
this process the same SwarmTextService the gateway runs, timed stage by stage. Runs alternate between the two, every
prompt distinct; each side parks its session after the request as the gateway does, so both reuse the previous
request's shared prefix (the chat template's system prompt) alike. Medians of `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import emit, machine, median, versions
from benchmarks.serve import free_port
from swarm.client.textgen import SwarmTextService
from swarm.model.source import DEFAULT_MODEL_ID
from swarm_kernels.sampling import Sampler
from tests.launcher import LocalSwarm


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: name a color that starts with the letter {'ABCDEFGH'[i % 8]}."}]


async def stages(service: SwarmTextService, i: int) -> dict[str, float]:
    """One request's first token, in the service the gateway runs, stage by stage (seconds)."""
    marks = [time.perf_counter()]
    prompt = service.encode_chat(messages(i))
    marks.append(time.perf_counter())
    session, start = await service._session_for(prompt, 16, 1)
    marks.append(time.perf_counter())
    pipeline = service.client.pipeline
    logits = await pipeline.prefill(session, torch.tensor([prompt[start:]]), start)
    marks.append(time.perf_counter())
    await pipeline.stage.run(Sampler(1, service.vocab_size), logits)
    marks.append(time.perf_counter())
    await service._park(prompt, session)  # as the gateway's request would, for the next one
    names = ["template_and_tokenize_s", "session_open_s", "prefill_and_head_s", "sample_s"]
    result = {name: b - a for name, a, b in zip(names, marks, marks[1:], strict=False)}
    result["total_s"] = marks[-1] - marks[0]
    result["prompt_tokens"], result["reused_tokens"] = len(prompt), start
    return result


async def http_ttft(client: httpx.AsyncClient, url: str, i: int) -> tuple[float, int]:
    """(time to the first content chunk, prompt tokens the gateway reused). The stream is read to its end, as a
    client reading its answer does: a stream dropped at its first token would leave the gateway nothing to park, and
    the next request would prefill its whole prompt."""
    body = {"model": DEFAULT_MODEL_ID, "messages": messages(i), "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, cached = None, -1
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first, cached


async def run(args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.peer_env.pop("SWARM_PEER_QUANT", None)
        swarm.start_bootstrap()
        procs = [swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--quant", args.quant, wait=False)
                 for blocks in args.layout.split(",")]
        for proc in procs:
            LocalSwarm.peer_id(proc)
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers)})
        service = await SwarmTextService.connect(swarm.initial_peers)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            await service.client.wait_for_chain()
            async with httpx.AsyncClient(timeout=120) as client:
                await http_ttft(client, url, 1000)  # warm-up of both
                await stages(service, 1001)
                measured: list[dict[str, float]] = []
                http: list[float] = []
                http_cached: list[int] = []
                for i in range(args.runs):
                    if i % 2:
                        ttft, cached = await http_ttft(client, url, i)
                        measured.append(await stages(service, 100 + i))
                    else:
                        measured.append(await stages(service, 100 + i))
                        ttft, cached = await http_ttft(client, url, i)
                    http.append(ttft)
                    http_cached.append(cached)
        finally:
            await service.close()
    keys = [k for k in measured[0] if k.endswith("_s")]
    medians = {k: round(median([m[k] for m in measured]), 4) for k in keys}
    return {"benchmark": "ttft", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "layout": args.layout, "quant": args.quant, "runs": args.runs},
            "prompt_tokens": measured[0]["prompt_tokens"], "stages_median": medians,
            "stages_runs": [{k: round(v, 4) for k, v in m.items()} for m in measured],
            "http_ttft_s": [round(t, 4) for t in http], "http_ttft_median_s": round(median(http), 4),
            "http_reused_tokens": http_cached,
            "http_and_serving_overhead_s": round(median(http) - medians["total_s"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttft", description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="0:15,15:30", help="the peers' blocks, comma separated")
    parser.add_argument("--quant", default="int4", help="the peers' --quant")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write DIR/ttft.json")
    args = parser.parse_args()
    emit("ttft", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
