"""Decode speed and TTFT: the default model run locally by transformers vs the swarm with 1, 2 and 3 peers.

    python -m benchmarks.decode [--new-tokens 32] [--runs 5] [--threads 1] [--out bench-results]

Variants run interleaved (the order rotates every round) on one machine at one time; ratios swarm ÷ local are taken
per round, then the median. Every variant must produce the same greedy tokens; the JSON says whether they did.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import emit, machine, median, peak_rss_mib, versions
from benchmarks.swarm_runs import PROMPT, chain_of, default_model_prompt, local_run, start_peers, swarm_run
from swarm.client import SwarmClient
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

LAYOUTS = {"swarm_1": ["0:30"], "swarm_2": ["0:15", "15:30"], "swarm_3": ["0:10", "10:20", "20:30"]}


def summarize(runs: dict[str, list[tuple[float, float]]]) -> dict:
    local = runs["local"]
    out = {}
    for name, figures in runs.items():
        entry = {"ttft_s": [round(t, 4) for t, _ in figures], "decode_tok_s": [round(r, 2) for _, r in figures],
                 "median_ttft_s": round(median([t for t, _ in figures]), 4),
                 "median_decode_tok_s": round(median([r for _, r in figures]), 2)}
        if name != "local":
            entry["ratio_decode_vs_local"] = round(median([r / lr for (_, r), (_, lr) in zip(figures, local,
                                                                                                strict=True)]), 3)
            entry["ratio_ttft_vs_local"] = round(median([t / lt for (t, _), (lt, _) in zip(figures, local,
                                                                                              strict=True)]), 3)
        out[name] = entry
    return out


async def run(args) -> dict:
    torch.set_num_threads(args.threads)
    source, tokenizer, prompt_ids = default_model_prompt(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    suppress = [model.config.eos_token_id]
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        ids = start_peers(swarm, DEFAULT_MODEL_ID, LAYOUTS, "--num-threads", str(args.threads))
        client = await SwarmClient.connect(swarm.initial_peers)
        try:
            chains = {name: await chain_of(client, peers) for name, peers in ids.items()}
            names = ["local", *LAYOUTS]
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            tokens: dict[str, list[list[int]]] = {name: [] for name in names}
            for name in names:  # warm-up: first-call costs (allocation, connections) are not what we measure
                if name == "local":
                    local_run(model, prompt_ids, 4, suppress)
                else:
                    await swarm_run(client, chains[name], prompt_ids, 4, suppress)
            for round_ in range(args.runs):
                for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                    if name == "local":
                        ttft, rate, toks = local_run(model, prompt_ids, args.new_tokens, suppress)
                    else:
                        ttft, rate, toks = await swarm_run(client, chains[name], prompt_ids, args.new_tokens,
                                                           suppress)
                    runs[name].append((ttft, rate))
                    tokens[name].append(toks)
            rss = {f"{name}:{blocks}": peak_rss_mib(proc.pid)
                   for (name, blocks), proc in swarm.procs_by_layout.items()}
        finally:
            await client.close()
    reference = tokens["local"][0]
    return {
        "benchmark": "decode", "machine": machine(), "versions": versions(),
        "settings": {"model": DEFAULT_MODEL_ID, "dtype": "float32", "prompt": PROMPT, "prompt_tokens": len(prompt_ids),
                     "new_tokens": args.new_tokens, "runs": args.runs, "torch_threads_per_process": args.threads,
                     "layouts": LAYOUTS, "eos_suppressed": True},
        "tokens_identical": all(t == reference for per in tokens.values() for t in per),
        "text": tokenizer.decode(reference),
        "variants": summarize(runs),
        "peak_rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every process (local and peers)")
    parser.add_argument("--out", default=None, help="also write DIR/decode.json")
    args = parser.parse_args()
    emit("decode", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
