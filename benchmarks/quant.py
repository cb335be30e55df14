"""Decode speed of the default model through a 2-peer swarm: fp32 vs int8 vs int4 spans, on this machine.

    python -m benchmarks.quant [--new-tokens 32] [--runs 5] [--threads 1] [--out DIR]

Chains of two peers each (blocks 0:15 and 15:30): unquantized fp32, int8 and int4 (the CPU default for this Q4_1
checkpoint) on the native kernel as `auto` picks them, and both on torch's bf16 kernels (SWARM_KERNELS=torch), all
running at once; rounds are interleaved (the order rotates) and ratios to fp32
are taken per round, then the median. The JSON also says how many greedy tokens each quantized chain shares with the
fp32 one and each peer's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, peak_rss_mib, versions
from benchmarks.swarm_runs import PROMPT, chain_of, default_model_prompt, swarm_run
from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

SPANS = ("0:15", "15:30")
# chain name → (--quant, the peers' environment): the defaults, and the other kernel of each method for comparison
CHAINS = {"none": ("none", {}), "int8": ("int8", {}), "int4": ("int4", {}),
          "int8-torch": ("int8", {"SWARM_KERNELS": "torch"}), "int4-torch": ("int4", {"SWARM_KERNELS": "torch"})}
VARIANTS = tuple(CHAINS)


async def run(args) -> dict:
    torch.set_num_threads(args.threads)
    _, tokenizer, prompt_ids = default_model_prompt(PROMPT)
    suppress = [tokenizer.eos_token_id]
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        procs = {(name, blocks): swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--num-threads", str(args.threads),
                                                  "--quant", quant, wait=False, env=env)
                 for name, (quant, env) in CHAINS.items() for blocks in SPANS}
        ids: dict[str, dict[str, str]] = {quant: {} for quant in VARIANTS}
        for (quant, blocks), proc in procs.items():
            ids[quant][blocks] = LocalSwarm.peer_id(proc)
        client = await SwarmClient.connect(swarm.initial_peers)
        try:
            chains = {quant: await chain_of(client, peers) for quant, peers in ids.items()}
            runs: dict[str, list[tuple[float, float]]] = {quant: [] for quant in VARIANTS}
            tokens: dict[str, list[int]] = {}
            for quant in VARIANTS:  # warm-up
                await swarm_run(client, chains[quant], prompt_ids, 4, suppress)
            for round_ in range(args.runs):
                shift = round_ % len(VARIANTS)
                for quant in VARIANTS[shift:] + VARIANTS[:shift]:
                    ttft, rate, toks = await swarm_run(client, chains[quant], prompt_ids, args.new_tokens, suppress)
                    runs[quant].append((ttft, rate))
                    tokens[quant] = toks
            rss = {f"{quant}:{blocks}": peak_rss_mib(proc.pid)["main"] for (quant, blocks), proc in procs.items()}
        finally:
            await client.close()
    fp32 = runs["none"]
    variants = {}
    for quant, figures in runs.items():
        entry = {"decode_tok_s": [round(r, 2) for _, r in figures],
                 "median_decode_tok_s": round(median([r for _, r in figures]), 2),
                 "median_ttft_s": round(median([t for t, _ in figures]), 4),
                 "tokens_shared_with_fp32": sum(a == b for a, b in zip(tokens[quant], tokens["none"], strict=True)),
                 "text": tokenizer.decode(tokens[quant])}
        if quant != "none":
            entry["ratio_decode_vs_fp32"] = round(median([r / f for (_, r), (_, f) in zip(figures, fp32,
                                                                                          strict=True)]), 3)
        variants[quant] = entry
    return {"benchmark": "quant", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "spans": SPANS, "chains": CHAINS, "prompt": PROMPT,
                         "new_tokens": args.new_tokens,
                         "runs": args.runs, "torch_threads_per_process": args.threads, "eos_suppressed": True},
            "variants": variants, "peak_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write DIR/quant.json")
    args = parser.parse_args()
    emit("quant", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
