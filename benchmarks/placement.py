"""Routing and placement: route-search time, connection reuse, and how fast a swarm closes a hole.

    python -m benchmarks.placement [--rounds 3] [--out DIR]

1. `route_search_ms`: find_chain over random synthetic swarms (80 blocks; 10, 100, 300 peers of random spans,
   throughputs, loads and RTTs), median of 5 searches each.
2. A real swarm of SmolLM2 (fp32, one thread each): 4 peers started together without --blocks
   (--memory-budget 0.2 → 10 blocks each, --rebalance-period 3, --drain-timeout 3). `status` is the table
   `python -m swarm.status` printed then. `first_probe_ms` / `later_probe_ms`: a new client's first info call to each
   peer (dials a connection) vs the next ones (reuse it). Then `rounds` times: SIGTERM the only server of a span
   and time until a client sees a complete chain again (`reclose_s`), then start a fresh placed peer to get back to
   four.
3. `route_choice`: peers 0:15 + 15:30 and a third serving all 30 blocks in one hop but slow (every forward
   sleeps 50 ms, as a weaker machine would take; it measures and announces that). Decode tok/s of one session
   (32 greedy tokens, interleaved rounds) on the chain this client's router picks vs the fewest-hops chain (the
   slow peer alone), which is what a hop-count router would take.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, versions
from swarm.client import SwarmClient
from swarm.client.router import probe
from swarm.client.routing import Link, PeerView, find_chain
from swarm.client.session import InferenceSession
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.protocol import SpanInfo
from tests.launcher import LocalSwarm

PLACED_ARGS = ("--memory-budget", "0.2", "--rebalance-period", "3", "--drain-timeout", "3", "--announce-period", "1",
               "--num-threads", "1", "--quant", "none")


def route_search(peers: int, blocks: int = 80, runs: int = 5) -> float:
    rng = random.Random(peers)
    spans, views = [], {}
    for i in range(peers):
        start = rng.randrange(0, blocks)
        spans.append(SpanInfo(peer_id=f"p{i}", model_id="m", start=start, end=min(blocks, start + rng.randrange(4, 30)),
                              num_blocks=blocks, hidden_size=8, dtype="float32", quant="none", max_length=64,
                              kv_budget_tokens=1000, free_kv_tokens=1000, active_sessions=rng.randrange(0, 10),
                              throughput=rng.uniform(50, 2000), batch_throughput=rng.uniform(200, 8000)))
        views[f"p{i}"] = PeerView(rtt=rng.uniform(0.001, 0.2))
    spans += [SpanInfo(peer_id="cover", model_id="m", start=0, end=blocks, num_blocks=blocks, hidden_size=8,
                       dtype="float32", quant="none", max_length=64, kv_budget_tokens=1000, free_kv_tokens=1000,
                       active_sessions=0)]  # so that every table has a chain
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        find_chain(spans, "m", blocks, views=views)
        times.append((time.perf_counter() - began) * 1000)
    return round(median(times), 2)


async def settled(client: SwarmClient, count: int, timeout: float = 120.0) -> list[SpanInfo]:
    deadline = time.monotonic() + timeout
    while True:
        spans = await client.spans(fresh=True)
        if len(spans) == count and all(s.routable for s in spans) and not await client.missing_blocks():
            return spans
        if time.monotonic() > deadline:
            raise TimeoutError(f"the swarm did not settle: {[(s.start, s.end, s.state) for s in spans]}")
        await asyncio.sleep(0.5)


async def decode_rate(client: SwarmClient, chain, tokens: int = 32) -> float:
    session = await InferenceSession.open(client.p2p, chain, tokens + 16)
    try:
        ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 2, 198]])
        steps = client.generate_steps(ids, tokens, session=session)
        await anext(steps)  # the prefill
        began = time.perf_counter()
        async for _ in steps:
            pass
        return (tokens - 1) / (time.perf_counter() - began)
    finally:
        await session.close()


async def route_choice(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        args = ("--num-threads", "1", "--quant", "none", "--announce-period", "1")
        procs = [swarm.start_peer(DEFAULT_MODEL_ID, "0:15", *args, wait=False),
                 swarm.start_peer(DEFAULT_MODEL_ID, "15:30", *args, wait=False),
                 swarm.start_peer(DEFAULT_MODEL_ID, "0:30", *args, "--fault-step-delay", "0.05", wait=False)]
        slow = LocalSwarm.peer_id(procs[2])
        for proc in procs[:2]:
            LocalSwarm.peer_id(proc)
        client = await SwarmClient.connect(swarm.initial_peers)
        try:
            spans = await settled(client, 3)
            routed = await client.chain()
            hops_only = [Link(next(s for s in spans if s.peer_id == slow), 0, 30)]
            rates: dict[str, list[float]] = {"routed": [], "fewest_hops": []}
            for round_ in range(rounds + 1):  # round 0 warms up
                for name in (("routed", "fewest_hops") if round_ % 2 else ("fewest_hops", "routed")):
                    rate = await decode_rate(client, routed if name == "routed" else hops_only)
                    if round_:
                        rates[name].append(round(rate, 2))
            return {"routed_chain": [f"{link.start}:{link.end}" for link in routed],
                    "routed_avoids_slow_peer": slow not in {link.peer.peer_id for link in routed},
                    "slow_peer_throughput": next(s.throughput for s in spans if s.peer_id == slow),
                    "tok_s": rates, "median_tok_s": {k: median(v) for k, v in rates.items()},
                    "routed_over_fewest_hops": round(median([a / b for a, b in zip(rates["routed"],
                                                                                  rates["fewest_hops"],
                                                                                  strict=True)]), 2)}
        finally:
            await client.close()


async def run(args) -> dict:
    result: dict = {"route_search_ms": {str(n): route_search(n) for n in (10, 100, 300, 1000)}}
    resolve_model(DEFAULT_MODEL_ID)
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_placed_peer(DEFAULT_MODEL_ID, *PLACED_ARGS, wait=False) for _ in range(4)]
        ids = {LocalSwarm.peer_id(p): p for p in procs}
        client = await SwarmClient.connect(swarm.initial_peers, refresh_period=1.0)
        try:
            spans = await settled(client, 4)
            result["spans"] = sorted(f"{s.start}:{s.end}" for s in spans)
            status = subprocess.run([sys.executable, "-m", "swarm.status", "--initial-peers", *swarm.initial_peers],
                                    capture_output=True, text=True, timeout=120)
            result["status"] = status.stdout.splitlines()

            fresh = await SwarmClient.connect(swarm.initial_peers)
            try:
                first, later = [], []
                for peer in ids:
                    began = time.perf_counter()
                    await probe(fresh.p2p, peer, 10)
                    first.append((time.perf_counter() - began) * 1000)
                    for _ in range(5):
                        began = time.perf_counter()
                        await probe(fresh.p2p, peer, 10)
                        later.append((time.perf_counter() - began) * 1000)
                result["first_probe_ms"] = round(median(first), 2)
                result["later_probe_ms"] = round(median(later), 2)
            finally:
                await fresh.close()

            reclose = []
            for _ in range(args.rounds):
                spans = await settled(client, 4)
                counts: dict[tuple[int, int], list[str]] = {}
                for s in spans:
                    counts.setdefault((s.start, s.end), []).append(s.peer_id)
                sole = next(peers[0] for peers in counts.values() if len(peers) == 1)
                ids[sole].signal(15)
                began = time.perf_counter()
                await asyncio.get_running_loop().run_in_executor(None, ids[sole].proc.wait, 30)
                await client.wait_for_chain(timeout=120, poll=0.1)
                reclose.append(round(time.perf_counter() - began, 2))
                del ids[sole]
                proc = swarm.start_placed_peer(DEFAULT_MODEL_ID, *PLACED_ARGS)
                ids[LocalSwarm.peer_id(proc)] = proc
            result["reclose_s"] = reclose
            result["reclose_median_s"] = median(reclose)
        finally:
            await client.close()
    result["route_choice"] = await route_choice(args.rounds)
    return {"benchmark": "placement", "machine": machine(), "versions": versions(), **result}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit("placement", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
