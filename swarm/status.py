"""What an operator looks at first: the swarm of one model as a table.

    python -m swarm.status --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... [--model-id ID] [--json]

Joins the DHT as a client, reads every peer's record, probes each peer (the info RPC: its current load and the round
trip from here), and prints one row per peer (blocks, state, precision, measured throughput, sessions, queue, free
KV, RTT), then how many peers serve each stretch of blocks, the holes, and the chain a client here would take now
with its expected time per token. --json prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from swarm.client.router import probe
from swarm.client.routing import PeerView, chain_seconds, find_chain, missing_blocks
from swarm.dht import get_spans, start_dht
from swarm.model.source import DEFAULT_MODEL_ID
from swarm.protocol import NoChainError, SpanInfo


async def collect(initial_peers: Sequence[str], model_id: str, probe_timeout: float = 5.0) -> dict[str, Any]:
    """A snapshot of the swarm of `model_id`, as plain JSON-able data."""
    loop = asyncio.get_running_loop()
    dht = await loop.run_in_executor(None, lambda: start_dht(initial_peers, client_mode=True))
    try:
        p2p = await dht.replicate_p2p()
        try:
            return await snapshot(await get_spans(dht, model_id), model_id,
                                  lambda peer: probe(p2p, peer, probe_timeout))
        finally:
            await p2p.shutdown()
    finally:
        await loop.run_in_executor(None, dht.shutdown)


async def snapshot(spans: list[SpanInfo], model_id: str, prober) -> dict[str, Any]:
    """Probe every peer of `spans` with `prober(peer_id) -> (SpanInfo, rtt)` and summarize."""
    results = await asyncio.gather(*(prober(s.peer_id) for s in spans), return_exceptions=True)
    peers, current, views = [], [], {}
    for span, result in zip(spans, results, strict=True):
        if isinstance(result, BaseException):  # listed, but neither coverage nor the chain count on it
            peers.append({**span.to_dict(), "rtt_ms": None, "probe_error": repr(result)})
            continue
        info, rtt = result
        peers.append({**info.to_dict(), "rtt_ms": round(rtt * 1000, 2), "probe_error": None})
        current.append(info)
        views[info.peer_id] = PeerView(rtt=rtt)
    num_blocks = max((s.num_blocks for s in spans), default=0)
    serving = [s for s in current if s.routable]
    replicas = [sum(s.start <= b < s.end for s in serving) for b in range(num_blocks)]
    coverage: list[dict[str, int]] = []
    for b, count in enumerate(replicas):
        if coverage and coverage[-1]["replicas"] == count:
            coverage[-1]["end"] = b + 1
        else:
            coverage.append({"start": b, "end": b + 1, "replicas": count})
    try:
        chain = find_chain(current, model_id, num_blocks, views=views) if num_blocks else []
        best = {"links": [{"peer_id": link.peer.peer_id, "start": link.start, "end": link.end} for link in chain],
                "ms_per_token": round(chain_seconds(chain, views) * 1000, 2)} if chain else None
    except NoChainError:
        best = None
    holes = [{"start": s, "end": e} for s, e in missing_blocks(serving, num_blocks)]
    peers.sort(key=lambda p: (p["start"], p["end"], p["peer_id"]))
    return {"model_id": model_id, "num_blocks": num_blocks, "peers": peers, "coverage": coverage, "holes": holes,
            "best_chain": best}


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}…{peer_id[-6:]}"


def render(data: dict[str, Any]) -> str:
    peers = data["peers"]
    lines = []
    complete = "complete" if not data["holes"] and data["num_blocks"] else "INCOMPLETE"
    lines.append(f"{data['model_id']}: {data['num_blocks']} blocks, {len(peers)} peers, {complete}")
    columns = ("PEER", "NAME", "BLOCKS", "STATE", "DEVICE/DTYPE/QUANT", "TOK/S/BLOCK", "x8 BATCHED", "SESSIONS",
               "QUEUED", "FREE KV", "RTT MS", "VERSION")
    rows = []
    for p in peers:
        blocks = f"{p['start']}:{p['end']}"
        if p["state"] in ("joining", "draining") and p["target_end"] > p["target_start"]:
            blocks += f" → {p['target_start']}:{p['target_end']}"
        rows.append((_short(p["peer_id"]), p["public_name"] or "-", blocks, p["state"],
                     f"{p['device']}/{p['dtype']}/{p['quant']}", f"{p['throughput']:.1f}",
                     f"{p['batch_throughput']:.1f}", str(p["active_sessions"]), str(p["queued_steps"]),
                     f"{p['free_kv_tokens']}/{p['kv_budget_tokens']}",
                     "unreachable" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}",
                     f"{p['software'] or '?'} (v{p['version']})"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in (columns, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if data["coverage"]:
        lines.append("coverage: " + ", ".join(f"{c['start']}:{c['end']} x{c['replicas']}" for c in data["coverage"]))
    lines.append("holes: " + (", ".join(f"{h['start']}:{h['end']}" for h in data["holes"]) or "none"))
    best = data["best_chain"]
    if best:
        hops = " → ".join(f"{_short(link['peer_id'])} [{link['start']}:{link['end']})" for link in best["links"])
        lines.append(f"best chain from here: {hops}, {best['ms_per_token']:.1f} ms/token expected")
    else:
        lines.append("best chain from here: none (the swarm does not cover the model)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of DHT nodes")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help=f"model as announced (default {DEFAULT_MODEL_ID})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--probe-timeout", type=float, default=5.0, help="seconds to wait for each peer's answer")
    args = parser.parse_args(argv)
    data = asyncio.run(collect(args.initial_peers, args.model_id, args.probe_timeout))
    print(json.dumps(data, indent=1) if args.json else render(data))
    return 0 if not data["holes"] and data["num_blocks"] else 1


if __name__ == "__main__":
    sys.exit(main())
