"""Weights shared peer to peer, on this machine (issue 20): fetch throughput from one vs two source peers over
loopback, and how much a store saves on a fine-tune of a model it already holds.

    python -m benchmarks.fetch [--runs 3] [--out DIR]

Two peers serve the default model (SmolLM2-135M, fp32 safetensors, 0.50 GiB over 30 blocks) from their own files.
Each run fetches every block's tensors into an empty store with swarm.model.fetch.Fetcher (verified by hash), from
one peer, then from both; rounds alternate which goes first, and the ratio is taken per round, then the median.
The dedup figure: the default model and a copy with 6 of its 30 blocks changed (a fine-tune of those), put in one
store: the bytes the copy adds, over its size.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, machine, median, versions
from swarm.dht import get_providers, start_dht, stop_dht
from swarm.model.fetch import Fetcher, block_entries
from swarm.model.manifest import load_manifest, shared_tensors
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.store import ObjectStore
from tests.launcher import LocalSwarm

CHANGED_BLOCKS = (3, 9, 14, 20, 25, 29)


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


async def run(args) -> dict:
    source = resolve_model(DEFAULT_MODEL_ID)
    manifest = load_manifest(source.path)
    cid = manifest["content_id"]
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        swarm.start_bootstrap()
        peers = [LocalSwarm.peer_id(swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--throughput", "1", "--quant",
                                                     "none")) for blocks in ("0:15", "15:30")]
        dht = start_dht(swarm.initial_peers, client_mode=True)
        try:
            p2p = await dht.replicate_p2p()
            while len(await get_providers(dht, cid)) < 2:
                await asyncio.sleep(0.5)
            runs: dict[str, list[tuple[float, int]]] = {"one": [], "two": []}
            for round_ in range(args.runs):
                for name in (("one", "two") if round_ % 2 == 0 else ("two", "one")):
                    providers = peers[:1] if name == "one" else peers
                    root = Path(tmp) / f"store-{name}-{round_}"
                    runs[name].append(await fetch_all(p2p, providers, manifest, root))
                    shutil.rmtree(root)
        finally:
            stop_dht(dht)
        tuned = fine_tune_copy(source.path, Path(tmp) / "tuned")
        shared, total = shared_tensors(manifest, load_manifest(tuned))
    rates = {name: [size / seconds / 2**20 for seconds, size in figures] for name, figures in runs.items()}
    return {
        "benchmark": "fetch", "machine": machine(), "versions": versions(),
        "settings": {"model": DEFAULT_MODEL_ID, "runs": args.runs, "parallel_tensors": 4, "chunk_bytes": 1 << 20,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit("fetch", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
