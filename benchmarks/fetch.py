"""Weights shared peer to peer, on this machine (issue 20).

    python -m benchmarks.fetch [--runs 3] [--parts throughput,moves,serving] [--out DIR]

- `throughput`: fetch throughput from one vs two source peers over loopback. Two peers serve the default model
  (SmolLM2-135M, fp32 safetensors, 0.50 GiB over 30 blocks) from their own files, unpaced (`--share-rate 0`). Each
  run fetches every block's tensors into an empty store with swarm.model.fetch.Fetcher (verified by hash), from one
  peer, then from both; rounds alternate which goes first, the ratio is taken per round, then the median. With it,
  the dedup figure: the default model and a copy with 6 of its 30 blocks changed (a fine-tune of those) in one store:
  the bytes the copy adds, over its size.
- `moves`: time out of service when a peer moves, with and without prefetch (tests/moving.py: the default model in
  three spans of 10 blocks, a source peer and two peers fetched by content id, then two movers, each filling a hole
  left by a stopped peer; each peer on a store of its own, as on separate machines). Every peer at the default
  precision and `--share-rate`; the movers' order alternates between rounds.
- `serving`: what sending weights costs a peer's inference. One peer serves all 30 blocks (default precision); a
  client decodes 128 tokens through it alone, then while another process fetches the whole model from it over and
  over; per `--share-rate`/`--share-rate-busy` (`--rates`: no fetcher at all, the noise floor; unpaced; the
  defaults; 8 and 32 MiB/s), rounds of both, the ratio per round, then the median, and the rate the fetcher received
  while the decode ran (the peer computing all along, its busy rate is the one that counts). On this
  machine the fetcher (hashing, its p2pd) runs on the same 2 cores: the figure is the whole machine's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, versions
from swarm.client import SwarmClient
from swarm.dht import get_providers, start_dht, stop_dht
from swarm.model.fetch import Fetcher, block_entries
from swarm.model.manifest import load_manifest, shared_tensors
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.store import ObjectStore
from swarm.server.settings import SHARE_RATE, SHARE_RATE_BUSY
from tests.launcher import LocalSwarm
from tests.moving import run_moves, span_bytes

CHANGED_BLOCKS = (3, 9, 14, 20, 25, 29)
MOVE_SPAN = 10  # blocks of each of the three spans in `moves`
# label=MiB/s idle[/MiB/s busy]; none: no fetcher (the noise floor). The client decodes all along: the busy rate counts
SERVING_RATES = f"none=-1,unpaced=0,default={SHARE_RATE:g}/{SHARE_RATE_BUSY:g},8=8,32=32"
SERVING_STEPS = 128


async def fetch_all(p2p, providers: list[str], manifest: dict, root: Path) -> tuple[float, int]:
    store = ObjectStore(root)
    fetcher = Fetcher(p2p, providers, store, parallel=4)
    began = time.perf_counter()
    await fetcher.tensors(block_entries(manifest, 0, manifest["num_blocks"]))
    return time.perf_counter() - began, fetcher.fetched_bytes


def fine_tune_copy(path: Path, out: Path) -> Path:
    """The model with CHANGED_BLOCKS' weights scaled by 1.01 (per-block shards: only those files are rewritten)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    for block in CHANGED_BLOCKS:
        shard = out / f"block-{block:05d}.safetensors"
        tensors = {name: t * 1.01 for name, t in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


async def throughput(args, tmp: Path) -> dict:
    source = resolve_model(DEFAULT_MODEL_ID)
    manifest = load_manifest(source.path)
    cid = manifest["content_id"]
    with LocalSwarm(tmp / "swarm") as swarm:
        swarm.start_bootstrap()
        peers = [LocalSwarm.peer_id(swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--throughput", "1", "--quant",
                                                     "none", "--share-rate", "0")) for blocks in ("0:15", "15:30")]
        dht = start_dht(swarm.initial_peers, client_mode=True)
        try:
            p2p = await dht.replicate_p2p()
            while len(await get_providers(dht, cid)) < 2:
                await asyncio.sleep(0.5)
            runs: dict[str, list[tuple[float, int]]] = {"one": [], "two": []}
            for round_ in range(args.runs):
                for name in (("one", "two") if round_ % 2 == 0 else ("two", "one")):
                    providers = peers[:1] if name == "one" else peers
                    root = tmp / f"store-{name}-{round_}"
                    runs[name].append(await fetch_all(p2p, providers, manifest, root))
                    shutil.rmtree(root)
        finally:
            stop_dht(dht)
    tuned = fine_tune_copy(source.path, tmp / "tuned")
    shared, total = shared_tensors(manifest, load_manifest(tuned))
    rates = {name: [size / seconds / 2**20 for seconds, size in figures] for name, figures in runs.items()}
    return {
        "settings": {"runs": args.runs, "parallel_tensors": 4, "chunk_bytes": 1 << 20, "share_rate": "unpaced",
                     "changed_blocks": CHANGED_BLOCKS},
        "bytes": runs["one"][0][1],
        "one_source_mib_s": [round(r, 1) for r in rates["one"]],
        "two_sources_mib_s": [round(r, 1) for r in rates["two"]],
        "median_one_source_mib_s": round(median(rates["one"]), 1),
        "median_two_sources_mib_s": round(median(rates["two"]), 1),
        "ratio_two_vs_one": round(median([b / a for a, b in zip(rates["one"], rates["two"], strict=True)]), 3),
        "fine_tune": {"bytes": total, "bytes_already_stored": shared,
                      "added_fraction": round(1 - shared / total, 4)},
    }


def moves(args, tmp: Path) -> dict:
    source = resolve_model(DEFAULT_MODEL_ID)
    cid = load_manifest(source.path)["content_id"]
    budget = round(1.25 * span_bytes(source.path, MOVE_SPAN) / 2**30, 4)
    rounds = []
    for round_ in range(args.runs):
        order = ("prefetch", "no-prefetch") if round_ % 2 == 0 else ("no-prefetch", "prefetch")
        with LocalSwarm(tmp / f"moves-{round_}") as swarm:
            swarm.start_bootstrap()
            result = run_moves(swarm, source.path, cid, MOVE_SPAN, ("--throughput", "100", "--num-threads", "1"),
                               budget, tmp / f"moves-{round_}" / "caches", order)
        rounds.append({name: {k: v for k, v in r.items() if k != "shards"} for name, r in result.items()})
    gaps = {name: [r[name]["gap_s"] for r in rounds] for name in ("prefetch", "no-prefetch")}
    return {
        "settings": {"runs": args.runs, "span_blocks": MOVE_SPAN, "cache_budget_gib": budget,
                     "share_rate_mib_s": SHARE_RATE, "precision": "default (auto)"},
        "rounds": rounds,
        "median_gap_prefetch_s": round(median(gaps["prefetch"]), 2),
        "median_gap_no_prefetch_s": round(median(gaps["no-prefetch"]), 2),
        "median_fetch_s": round(median([r[n]["fetch_s"] for r in rounds for n in r]), 2),
        "ratio_gap_prefetch_vs_not": round(median([a / b for a, b in zip(gaps["prefetch"], gaps["no-prefetch"],
                                                                         strict=True)]), 3),
    }


async def decode_rate(client: SwarmClient, steps: int) -> float:
    """Tokens per second of one greedy decode after its first token (the prefill left out)."""
    prompt = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 2, 198]])
    began, count = 0.0, 0
    async for _ in client.generate_steps(prompt, steps + 1):
        if count == 0:
            began = time.perf_counter()
        count += 1
    return steps / (time.perf_counter() - began)


async def serving(args, tmp: Path) -> dict:
    cid = load_manifest(resolve_model(DEFAULT_MODEL_ID).path)["content_id"]
    figures: dict[str, dict[str, list[float]]] = {}
    rates = [(label, [float(r) for r in rate.split("/")]) for label, rate in (item.split("=") for item in
                                                                               args.rates.split(","))]
    for label, (rate, *busy) in rates:
        with LocalSwarm(tmp / f"serving-{label}") as swarm:
            swarm.start_bootstrap()
            swarm.start_peer(DEFAULT_MODEL_ID, "0:30", "--throughput", "100", "--share-rate", str(max(rate, 0.0)),
                             "--share-rate-busy", str(max(busy[0] if busy else rate, 0.0)))
            client = await SwarmClient.connect(swarm.initial_peers)
            try:
                await client.wait_for_chain()
                await decode_rate(client, 8)  # warm
                mine = figures[label] = {"idle_tok_s": [], "serving_tok_s": [], "sent_mib_s": []}
                for round_ in range(args.runs):
                    mine["idle_tok_s"].append(await decode_rate(client, SERVING_STEPS))
                    puller = None
                    if rate >= 0:  # a negative rate: the control, a second measure with no fetcher
                        puller = swarm._spawn(f"pull-{label}-{round_}", [
                            "-m", "benchmarks.fetch", "--pull", cid, "--initial-peers", *swarm.initial_peers,
                            "--store", str(tmp / f"pull-{label}-{round_}")])
                        puller.wait_for(r"pulling from")
                        await asyncio.sleep(2.0)  # its fetch at full pace
                    began = time.time()
                    mine["serving_tok_s"].append(await decode_rate(client, SERVING_STEPS))
                    ended = time.time()
                    if puller is not None:
                        await asyncio.sleep(0.6)
                        counts = [(float(t), int(b)) for b, t in re.findall(r"received (\d+) bytes at ([\d.]+)",
                                                                             puller.log())]
                        inside = [(t, b) for t, b in counts if began <= t <= ended + 0.5]
                        puller.stop()
                        shutil.rmtree(tmp / f"pull-{label}-{round_}", ignore_errors=True)
                        if len(inside) >= 2:
                            (t0, b0), (t1, b1) = inside[0], inside[-1]
                            mine["sent_mib_s"].append((b1 - b0) / (t1 - t0) / 2**20)
            finally:
                await client.close()
    return {
        "settings": {"runs": args.runs, "steps": SERVING_STEPS, "peer": "0:30, default precision",
                     "rates_mib_s": dict(rates)},
        "rates": {label: {**{k: [round(v, 2) for v in vs] for k, vs in f.items()},
                          "median_kept": round(median([b / a for a, b in zip(f["idle_tok_s"], f["serving_tok_s"],
                                                                             strict=True)]), 3),
                          "median_sent_mib_s": round(median(f["sent_mib_s"]), 1) if f["sent_mib_s"] else None}
                  for label, f in figures.items()},
    }


async def pull(args) -> None:
    """Fetch the whole model from the swarm into --store over and over (for `serving`), printing the bytes received
    so far every half second."""
    dht = start_dht(args.initial_peers, client_mode=True)
    try:
        p2p = await dht.replicate_p2p()
        while not (found := await get_providers(dht, args.pull)):
            await asyncio.sleep(0.5)
        fetcher = Fetcher(p2p, [peer for peer, _ in found], parallel=4)
        _, manifest, _ = await fetcher.bundle(args.pull)
        print(f"pulling from {len(found)} peer(s)", flush=True)

        async def report() -> None:  # bytes received so far, every half second, for the benchmark's window
            while True:
                print(f"received {sum(fetcher.by_provider.values())} bytes at {time.time():.3f}", flush=True)
                await asyncio.sleep(0.5)

        reporter = asyncio.create_task(report())
        while True:
            fetcher.store = ObjectStore(Path(args.store))
            await fetcher.tensors(block_entries(manifest, 0, manifest["num_blocks"]))
            shutil.rmtree(args.store, ignore_errors=True)
            if reporter.done():
                break
    finally:
        stop_dht(dht)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parts", default="throughput,moves,serving")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rates", default=SERVING_RATES, help="`serving`: label=MiB/s,... (0: unpaced)")
    parser.add_argument("--pull", default=None, help=argparse.SUPPRESS)  # the `serving` part's fetcher process
    parser.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pull:
        asyncio.run(pull(args))
        return
    parts = args.parts.split(",")
    result = {"benchmark": "fetch", "machine": machine(), "versions": versions(), "model": DEFAULT_MODEL_ID}
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" in parts:
            result["throughput"] = asyncio.run(throughput(args, Path(tmp)))
        if "moves" in parts:
            result["moves"] = moves(args, Path(tmp))
        if "serving" in parts:
            result["serving"] = asyncio.run(serving(args, Path(tmp)))
    emit("fetch", result, args.out)


if __name__ == "__main__":
    main()
