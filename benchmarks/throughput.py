"""Aggregate decode throughput of concurrent sessions through a 2-peer swarm of the default model, with the peers'
continuous batching on and off.

    python -m benchmarks.throughput [--sessions 1,4,16,64] [--new-tokens 32] [--runs 3] [--quant none] [--out DIR]

Two chains of peers (by default two each, blocks 0:15 and 15:30; `--spans 0:30` for one): `batched` (the default,
up to 32 sessions per forward) and `unbatched` (`--max-batch-sessions 1`: one session at a time, as Petals serves).
For each session count N, N sessions start together from one client process, each prefills the same chat prompt
and decodes `new_tokens` greedy tokens (end of text suppressed). Reported per (chain, N): aggregate decode tok/s
(all sessions' tokens after their first / time from the first first-token to the last token: the later sessions'
prefills run inside that window), TTFT p50/p90, per-session inter-token latency p50/p90; then the same N sessions
again with a barrier after their prefills, for the decode phase alone (`decode_phase_tok_s`: every session's tokens
after its first / time from the barrier to the last token, as llama.cpp's batched-bench reports generation apart
from prompt processing). Medians over `runs` rounds, each measuring every N on every chain in turn (so a slow spell
of this shared machine falls on all counts alike); each N's figures are also given as a ratio to N=1 on the same
chain. The client is the library's own: it sends its sessions' decode steps in lockstep groups (swarm.client.decoding,
`--decode-groups`), on both chains.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, peak_rss_mib, versions
from benchmarks.swarm_runs import PROMPT, chain_of, default_model_prompt
from swarm.client import SwarmClient
from swarm.client.session import InferenceSession
from swarm.model.source import DEFAULT_MODEL_ID
from swarm_kernels import packed
from tests.launcher import LocalSwarm

CHAINS = {"batched": [], "unbatched": ["--max-batch-sessions", "1"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_session(client: SwarmClient, chain, prompt_ids: list[int], new_tokens: int, suppress: int,
                      prefilled: asyncio.Barrier | None = None):
    start = time.perf_counter()
    session = await InferenceSession.open(client.p2p, chain, max_length=len(prompt_ids) + new_tokens)
    stamps = []
    async with session:
        logits = await client.prefill(session, torch.tensor([prompt_ids]))
        if prefilled is not None:  # the decode phase alone: every session starts decoding once all have prefilled
            await prefilled.wait()
            start = time.perf_counter()
        for _ in range(new_tokens):
            logits = logits.reshape(-1).clone()
            logits[suppress] = float("-inf")
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
            logits = await client.decode(session, logits.argmax(dim=-1))
    return start, stamps


async def run_once(client, chain, prompt_ids, n: int, new_tokens: int, suppress: int) -> dict:
    results = await asyncio.gather(*(one_session(client, chain, prompt_ids, new_tokens, suppress) for _ in range(n)))
    first = min(stamps[0] for _, stamps in results)
    last = max(stamps[-1] for _, stamps in results)
    gaps = [b - a for _, stamps in results for a, b in itertools.pairwise(stamps)]
    prefilled = asyncio.Barrier(n)
    phase = await asyncio.gather(*(one_session(client, chain, prompt_ids, new_tokens, suppress, prefilled)
                                   for _ in range(n)))
    released = min(start for start, _ in phase)
    return {"aggregate_tok_s": n * (new_tokens - 1) / (last - first),
            "decode_phase_tok_s": n * (new_tokens - 1) / (max(stamps[-1] for _, stamps in phase) - released),
            "ttft_p50_s": percentile([s[0] - t for t, s in results], 0.5),
            "ttft_p90_s": percentile([s[0] - t for t, s in results], 0.9),
            "itl_p50_s": percentile(gaps, 0.5), "itl_p90_s": percentile(gaps, 0.9)}


async def run(args) -> dict:
    torch.set_num_threads(1)
    counts = [int(x) for x in args.sessions.split(",")]
    spans = args.spans.split(",")
    _, tokenizer, prompt_ids = default_model_prompt(PROMPT)
    budget = str(max(counts) * (len(prompt_ids) + args.new_tokens) * 2)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(args.workdir or tmp)) as swarm:
        swarm.start_bootstrap()
        procs = {(name, blocks): swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--num-threads", str(args.threads),
                                                  "--quant", args.quant, "--kv-budget-tokens", budget,
                                                  "--max-sessions", str(max(counts)), *args.peer_args.split(), *extra,
                                                  wait=False)
                 for name, extra in CHAINS.items() for blocks in spans}
        ids: dict[str, dict[str, str]] = {name: {} for name in CHAINS}
        for (name, blocks), proc in procs.items():
            ids[name][blocks] = LocalSwarm.peer_id(proc)
        client = await SwarmClient.connect(swarm.initial_peers, decode_groups=args.decode_groups)
        try:
            chains = {name: await chain_of(client, peers) for name, peers in ids.items()}
            for chain in chains.values():  # warm-up
                await run_once(client, chain, prompt_ids, 2, 4, tokenizer.eos_token_id)
            # rounds outermost: every session count is measured in every round, so a slower or faster spell of
            # this shared machine moves all of them, not just the counts measured during it
            collected: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in counts} for name in chains}
            for round_number in range(args.runs):
                for n in counts:
                    for name, chain in chains.items():
                        one = await run_once(client, chain, prompt_ids, n, args.new_tokens, tokenizer.eos_token_id)
                        collected[name][n].append(one)
                        print(f"round {round_number}", name, n, {k: round(v, 3) for k, v in one.items()}, flush=True)
            for name, per_n in collected.items():
                for n, runs in per_n.items():
                    entry = {key: round(median([r[key] for r in runs]), 4) for key in runs[0]}
                    entry["aggregate_tok_s_runs"] = [round(r["aggregate_tok_s"], 2) for r in runs]
                    entry["decode_phase_tok_s_runs"] = [round(r["decode_phase_tok_s"], 2) for r in runs]
                    results.setdefault(name, {})[str(n)] = entry
            groups = client.pipeline.groups
            decode_rounds = {"rounds": groups.rounds, "steps": groups.rows} if groups else {}
            rss = {f"{name}:{blocks}": peak_rss_mib(proc.pid)["main"] for (name, blocks), proc in procs.items()}
        finally:
            await client.close()
    for per_n in results.values():
        base = per_n[str(counts[0])]["aggregate_tok_s"]
        decode_base = per_n[str(counts[0])]["decode_phase_tok_s"]
        for entry in per_n.values():
            entry["aggregate_vs_first_count"] = round(entry["aggregate_tok_s"] / base, 2)
            entry["decode_phase_vs_first_count"] = round(entry["decode_phase_tok_s"] / decode_base, 2)
    summary = {str(n): round(results["batched"][str(n)]["aggregate_tok_s"] /
                             results["unbatched"][str(n)]["aggregate_tok_s"], 2) for n in counts}
    return {"benchmark": "throughput", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "spans": spans, "quant": args.quant, "sessions": counts,
                         "peer_args": args.peer_args,
                         "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids), "runs": args.runs,
                         "chains": CHAINS, "torch_threads_per_peer": args.threads, "client_torch_threads": 1,
                         "client_processes": 1, "decode_groups": args.decode_groups,
                         "packed_linears": packed.available()},
            "client_decode_rounds": decode_rounds,
            "chains": results, "batched_vs_unbatched_aggregate": summary, "peak_rss_mib": rss,
            "statistics": "medians over runs (rounds over every session count and chain, interleaved); ratios of "
                          "medians"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--spans", default="0:15,15:30", help="each chain's peers (comma separated START:END)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quant", default="none", help="the peers' --quant (none: fp32)")
    parser.add_argument("--threads", type=int, default=1, help="each peer's torch threads")
    parser.add_argument("--workdir", default=None, help="keep the processes' logs here (default: a temp dir)")
    parser.add_argument("--decode-groups", type=int, default=None,
                        help="the client's lockstep decode groups per chain (default: one per peer; 0: none)")
    parser.add_argument("--peer-args", default="", help="extra flags for every peer, e.g. '--batch-wait-ms 10'")
    parser.add_argument("--out", default=None, help="also write DIR/throughput.json")
    args = parser.parse_args()
    emit("throughput", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
