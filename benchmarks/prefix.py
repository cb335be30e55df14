"""Time to first token of a chat's second turn, with and without reusing the KV the peers hold for the first turn.

    python -m benchmarks.prefix [--history-tokens 500] [--runs 5] [--out DIR]

Two peers of the default model (0:15, 15:30, fp32). Turn 1: a user message of about `history-tokens` tokens (text
from tests/data/eval_text.txt) and a 32-token greedy answer. Turn 2 repeats turn 1 and its answer and asks one more
question. `reuse`: turn 2 takes the session turn 1 parked and computes only the new suffix; `fresh`: turn 2 opens a
new session and computes the whole history. Runs alternate; TTFT is from the request to the first token event.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, versions
from swarm.client.requests import GenerationRequest
from swarm.client.textgen import SwarmTextService
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.launcher import LocalSwarm

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"


async def turn(service: SwarmTextService, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    first, tokens = None, []
    async for events in service.generate(GenerationRequest(prompt_ids, new_tokens, temperature=0.0)):
        first = first or time.perf_counter() - start
        tokens.append(events[0].token_id)
    return first or float("nan"), tokens


async def run(args) -> dict:
    torch.set_num_threads(1)
    resolve_model(DEFAULT_MODEL_ID)
    results: dict[str, list[float]] = {"reuse": [], "fresh": []}
    texts: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--num-threads", "1", "--quant", "none", wait=False)
                 for blocks in ("0:15", "15:30")]
        for proc in procs:
            LocalSwarm.peer_id(proc)
        service = await SwarmTextService.connect(swarm.initial_peers)
        try:
            await service.client.wait_for_chain()
            words = TEXT.read_text().split()
            history = " ".join(words[: int(args.history_tokens * 0.75)])
            turn1 = [{"role": "user", "content": f"Read this:\n{history}"}]
            prompt1 = service.encode_chat(turn1)
            for round_ in range(args.runs + 1):  # round 0 warms up
                for mode in (("reuse", "fresh") if round_ % 2 else ("fresh", "reuse")):
                    service.reuse_sessions = 8 if mode == "reuse" else 0
                    _, answer = await turn(service, prompt1, 32)
                    prompt2 = service.encode_chat([*turn1, {"role": "assistant", "content": service.decode(answer)},
                                                   {"role": "user", "content": "Summarize it in one sentence."}])
                    ttft, tokens = await turn(service, prompt2, 8)
                    if round_:
                        results[mode].append(ttft)
                        texts[mode] = tokens
        finally:
            await service.close()
    return {"benchmark": "prefix", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "spans": ["0:15", "15:30"], "dtype": "float32",
                         "turn1_prompt_tokens": len(prompt1), "turn2_prompt_tokens": len(prompt2),
                         "runs": args.runs},
            "ttft_s": {mode: [round(t, 4) for t in values] for mode, values in results.items()},
            "median_ttft_s": {mode: round(median(values), 4) for mode, values in results.items()},
            "ratio_fresh_over_reuse": round(median(results["fresh"]) / median(results["reuse"]), 2),
            "same_tokens": texts.get("reuse") == texts.get("fresh")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix", description=__doc__.splitlines()[0])
    parser.add_argument("--history-tokens", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write DIR/prefix.json")
    args = parser.parse_args()
    emit("prefix", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
