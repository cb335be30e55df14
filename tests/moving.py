"""A move of a peer fetched by content id, with and without prefetch (issue 20), as the e2e test and
benchmarks/fetch.py run it.

A swarm of a model in three spans of `k` blocks: a peer with the model's files serves the first span (and sends every
block's tensors to fetchers), two peers started with only the content id serve the others (fixed). A mover, also
started with the content id, places itself with `--num-blocks k`: the model is covered, so it doubles a span. Then a
sole server of another span (never the source, nor the span the mover doubles) stops: the mover, the swarm's only
movable peer, fills the hole. A second mover does the same after it. What each mover's log says of its move is read
back: the time it was out of service, how long the fetch of its new span took and whether it came before or after
the drain, the store's size after eviction; and which shards are left in its directory.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from swarm.model.fetch import block_entries
from swarm.model.manifest import load_manifest, tensor_bytes
from swarm_kernels.filecache import cache_root
from tests.launcher import LocalSwarm

MOVE_TIMEOUT = 180.0


def blocks_of(proc) -> tuple[int, int]:
    start, end = proc.wait_for(r"peer ready: .* blocks=(\d+):(\d+)").groups()
    return int(start), int(end)


def move_of(proc, since: int) -> dict[str, Any]:
    """What a peer's log says of its first move after `since`: the gap, the fetch, the store after it."""
    moved = proc.wait_for(r"peer moved: blocks=(\d+):(\d+) .* out of service ([\d.]+) s", timeout=MOVE_TIMEOUT)
    log = proc.log()[since:]
    target = f"{moved.group(1)}:{moved.group(2)}"
    fetch = re.search(rf"fetched blocks {target}: (\d+) bytes from \d+ peer\(s\) in ([\d.]+) s", log)
    stores = re.findall(r"store: (\d+) bytes, budget (\d+); evicted (\d+) tensors", log)
    assert fetch is not None and stores, log[-3000:]
    return {"span": (int(moved.group(1)), int(moved.group(2))), "gap_s": float(moved.group(3)),
            "fetch_s": float(fetch.group(2)), "fetch_bytes": int(fetch.group(1)),
            "fetched_before_drain": log.index(fetch.group(0)) < log.index("moving from blocks"),
            "store": [tuple(map(int, s)) for s in stores]}


def span_bytes(model: Path, k: int) -> int:
    """The largest of the three spans' tensor bytes."""
    manifest = load_manifest(model)
    return max(sum(tensor_bytes(e) for e in block_entries(manifest, b, b + k)) for b in (0, k, 2 * k))


def run_moves(swarm: LocalSwarm, model: Path, cid: str, k: int, peer_args: tuple[str, ...], budget_gib: float,
              caches: Path, order: tuple[str, ...] = ("prefetch", "no-prefetch")) -> dict[str, dict[str, Any]]:
    """The scenario above in `swarm` (started, bootstrap running); movers in `order`, each with `--cache-budget`
    `budget_gib` and a store of its own under `caches`. Returns, per mover, move_of's figures and `shards`."""
    def cache(name: str) -> dict[str, str]:
        root, kernels = caches / name, cache_root() / "kernels"
        if kernels.is_dir() and not (root / "kernels").exists():  # the compiled CPU kernel: not built again
            shutil.copytree(kernels, root / "kernels")
        return {"SWARM_CACHE_DIR": str(root)}

    source = swarm.start_peer(str(model), f"0:{k}", *peer_args)
    fixed = {f"{a}:{a + k}": swarm.start_peer(cid, f"{a}:{a + k}", *peer_args, env=cache(f"fixed-{a}"), wait=False)
             for a in (k, 2 * k)}
    servers = {(0, k): source, **{blocks_of(proc): proc for proc in fixed.values()}}
    results = {}
    for name in order:
        extra = ("--no-prefetch",) if name == "no-prefetch" else ()
        mover = swarm.start_placed_peer(cid, *peer_args, "--num-blocks", str(k), "--rebalance-period", "1",
                                        "--drain-timeout", "1", "--cache-budget", str(budget_gib), *extra,
                                        env=cache(name))
        doubled = blocks_of(mover)
        since = len(mover.log())
        leaving = next(span for span in servers if span not in ((0, k), doubled))
        servers.pop(leaving).stop()
        result = move_of(mover, since)
        assert result["span"] == leaving, (result, leaving)
        servers[leaving] = mover  # a sole server from now on (its old span has its fixed server still)
        remote = caches / name / "remote" / cid.removeprefix("sha256:")
        result["shards"] = sorted(p.name for p in remote.glob("block-*.safetensors"))
        results[name] = result
    return results
