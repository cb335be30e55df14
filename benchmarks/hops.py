"""The protocol's own cost per hop: a tiny random-weight model (hidden 64, 6 blocks) across 1..4 peers.

    python -m benchmarks.hops [--new-tokens 64] [--runs 5] [--out bench-results]

Compute is negligible at this size, so ms per token grows with the number of hops by what one hop costs: a
round trip over a persistent stream, (de)serialization, validation and the peer's scheduling. The figure is the
least-squares slope of median ms/token against hops; `local` is the same model in this process (0 hops). Every
peer also listens on a Unix socket (--local-socket), and each run goes through both transports in turn: `p2p` (a
hivemind stream: the two p2p daemons and a loopback TCP hop) and `unix` (the same frames over the peers' sockets,
as `make serve`'s gateway reaches its embedded peer).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import emit, machine, median, versions
from benchmarks.swarm_runs import chain_of, local_run, start_peers, swarm_run
from swarm.client import SwarmClient
from tests.launcher import LocalSwarm
from tests.tiny_models import make_tiny_model

LAYOUTS = {1: ["0:6"], 2: ["0:3", "3:6"], 3: ["0:2", "2:4", "4:6"], 4: ["0:2", "2:3", "3:4", "4:6"]}


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


async def run(args) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        path = make_tiny_model("llama", Path(tmp) / "tiny-llama")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = list(range(2, 10))
        swarm.start_bootstrap()
        sockets = tempfile.mkdtemp(prefix="hops-")  # mode 700, short enough for socket addresses
        ids = start_peers(swarm, str(path), {str(h): spans for h, spans in LAYOUTS.items()},
                          "--local-socket", sockets)
        clients = {"p2p": await SwarmClient.connect(swarm.initial_peers, str(path)),
                   "unix": await SwarmClient.connect(swarm.initial_peers, str(path), local_sockets=sockets)}
        try:
            chains = {h: await chain_of(clients["p2p"], ids[str(h)]) for h in LAYOUTS}
            ms: dict[str, list[float]] = {"local": [], **{f"{t}_{h}": [] for t in clients for h in LAYOUTS}}
            for client in clients.values():
                for h in LAYOUTS:
                    await swarm_run(client, chains[h], prompt, 4, [])  # warm-up
            for _ in range(args.runs):
                ms["local"].append(1000 / local_run(model, prompt, args.new_tokens, [])[1])
                for transport, client in clients.items():
                    for h in LAYOUTS:
                        ms[f"{transport}_{h}"].append(
                            1000 / (await swarm_run(client, chains[h], prompt, args.new_tokens, []))[1])
            if clients["unix"].p2p.connections == 0:
                raise RuntimeError("no stream went through the peers' Unix sockets")
        finally:
            for client in clients.values():
                await client.close()
            shutil.rmtree(sockets, ignore_errors=True)
    medians = {name: round(median(values), 3) for name, values in ms.items()}
    hops = list(LAYOUTS)
    per_hop = {t: round(slope([float(h) for h in hops], [medians[f"{t}_{h}"] for h in hops]), 3) for t in clients}
    return {
        "benchmark": "hops", "machine": machine(), "versions": versions(),
        "settings": {"model": "tiny random llama, hidden 64, 6 blocks", "new_tokens": args.new_tokens,
                     "runs": args.runs, "layouts": LAYOUTS, "torch_threads_per_process": 1,
                     "transports": {"p2p": "hivemind streams (p2pd)", "unix": "the peers' --local-socket"}},
        "ms_per_token": {name: [round(v, 3) for v in values] for name, values in ms.items()},
        "median_ms_per_token": medians,
        "ms_per_hop": per_hop,
        "client_overhead_ms": {t: round(medians[f"{t}_1"] - per_hop[t] - medians["local"], 3) for t in clients},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hops", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write DIR/hops.json")
    args = parser.parse_args()
    emit("hops", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
