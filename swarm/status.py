"""What an operator looks at first: the swarm of one model as a table.

    python -m swarm.status --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... [--model-id ID] [--json | --prometheus]

Joins the DHT as a client, reads every peer's record, probes each peer (the info RPC: its current load and the round
trip from here), and prints one row per peer (blocks, state, precision, measured throughput, sessions, queue, free
KV, RTT), then how many peers serve each stretch of blocks, the holes, and the chain a client here would take now
with its expected time per token. --json prints the same as one JSON object, --prometheus as Prometheus metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from swarm.client.router import probe
from swarm.client.routing import PeerView, chain_seconds, find_chain, missing_blocks
from swarm.dht import get_spans, start_dht, stop_dht
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
        await loop.run_in_executor(None, stop_dht, dht)


async def snapshot(spans: list[SpanInfo], model_id: str, prober, unusable: frozenset[str] = frozenset()
                   ) -> dict[str, Any]:
    """Probe every peer of `spans` with `prober(peer_id) -> (SpanInfo, rtt)` and summarize; peers in `unusable`
    (e.g. banned by the asking client) are listed but count for neither coverage nor the chain."""
    results = await asyncio.gather(*(prober(s.peer_id) for s in spans), return_exceptions=True)
    peers, current, views = [], [], {}
    for span, result in zip(spans, results, strict=True):
        if isinstance(result, BaseException):  # listed, but neither coverage nor the chain count on it
            peers.append({**span.to_dict(), "rtt_ms": None, "probe_error": repr(result)})
            continue
        info, rtt = result
        peers.append({**info.to_dict(), "rtt_ms": round(rtt * 1000, 2), "probe_error": None})
        if info.peer_id in unusable:
            continue
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
        chain = find_chain(current, model_id, num_blocks, views=views, push=True) if num_blocks else []
        best = {"links": [{"peer_id": link.peer.peer_id, "start": link.start, "end": link.end} for link in chain],
                "ms_per_token": round(chain_seconds(chain, views, push=True) * 1000, 2)} if chain else None
    except NoChainError:
        best = None
    holes = [{"start": s, "end": e} for s, e in missing_blocks(serving, num_blocks)]
    peers.sort(key=lambda p: (p["start"], p["end"], p["peer_id"]))
    return {"model_id": model_id, "num_blocks": num_blocks, "peers": peers, "coverage": coverage, "holes": holes,
            "best_chain": best}


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}…{peer_id[-6:]}"


def _short_content(content_id: str) -> str:
    return content_id[: len("sha256:") + 12] if content_id else "?"


def render(data: dict[str, Any]) -> str:
    peers = data["peers"]
    lines = []
    complete = "complete" if not data["holes"] and data["num_blocks"] else "INCOMPLETE"
    lines.append(f"{data['model_id']}: {data['num_blocks']} blocks, {len(peers)} peers, {complete}")
    columns = ("PEER", "NAME", "BLOCKS", "STATE", "DEVICE/DTYPE/QUANT", "TOK/S/BLOCK", "x8 BATCHED", "SESSIONS",
               "QUEUED", "FREE KV", "RTT MS", "VERSION", "WEIGHTS")
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
                     f"{p['software'] or '?'} (v{p['version']})", _short_content(p.get("content_id", ""))))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in (columns, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    ids = {p.get("content_id", "") for p in peers} - {""}
    if len(ids) > 1:
        counts = ", ".join(f"{_short_content(i)} x{sum(p.get('content_id') == i for p in peers)}" for i in sorted(ids))
        lines.append(f"WEIGHTS DIFFER under one model name: {counts} (clients route only through their own)")
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


# (metric, help, record field) of each peer's gauges; its counters are decode_forwards and decode_rows
PEER_GAUGES = (
    ("swarm_peer_sessions", "Sessions open on the peer", "active_sessions"),
    ("swarm_peer_queued_steps", "Steps waiting for the peer's compute thread", "queued_steps"),
    ("swarm_peer_pending_streams", "Streams not sessions yet (opening, or waiting for capacity)", "pending_streams"),
    ("swarm_peer_kv_tokens_free", "KV cache tokens free", "free_kv_tokens"),
    ("swarm_peer_kv_tokens_budget", "KV cache tokens in all", "kv_budget_tokens"),
    ("swarm_peer_throughput_tokens_per_second", "Decode tokens/s of one session through one block (measured)",
     "throughput"),
    ("swarm_peer_batch_throughput_tokens_per_second", "Decode tokens/s through one block over a batch",
     "batch_throughput"),
)


def prometheus(data: dict[str, Any]) -> str:
    """The snapshot in Prometheus text format: one series per peer (labelled by peer id; `swarm_peer_info` carries
    its blocks, state, precision and software), the blocks' replica counts and the best chain's expected time. A
    scrape job can run `python -m swarm.status --prometheus` (e.g. node_exporter's textfile collector): the peers
    publish these figures in their records and probe answers already, so they need no port of their own."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    class Snapshot(Collector):
        def collect(self):
            info = GaugeMetricFamily("swarm_peer_info", "A peer's record (value 1)", labels=[
                "peer", "name", "blocks", "state", "device", "dtype", "quant", "software"])
            up = GaugeMetricFamily("swarm_peer_up", "1 if the peer answered its probe", labels=["peer"])
            rtt = GaugeMetricFamily("swarm_peer_rtt_seconds", "Probe round trip from here", labels=["peer"])
            gauges = [GaugeMetricFamily(name, text, labels=["peer"]) for name, text, _ in PEER_GAUGES]
            forwards = CounterMetricFamily("swarm_peer_decode_forwards", "Batched decode forwards run", labels=["peer"])
            rows = CounterMetricFamily("swarm_peer_decode_rows", "Session steps those forwards carried (rows / "
                                       "forwards: the mean batch)", labels=["peer"])
            for p in data["peers"]:
                peer = p["peer_id"]
                info.add_metric([peer, p["public_name"], f"{p['start']}:{p['end']}", p["state"], p["device"],
                                 p["dtype"], p["quant"], p["software"]], 1)
                up.add_metric([peer], 0 if p["rtt_ms"] is None else 1)
                if p["rtt_ms"] is not None:
                    rtt.add_metric([peer], p["rtt_ms"] / 1000)
                for gauge, (_, _, field) in zip(gauges, PEER_GAUGES, strict=True):
                    gauge.add_metric([peer], float(p[field]))
                forwards.add_metric([peer], p["decode_forwards"])
                rows.add_metric([peer], p["decode_rows"])
            yield from (info, up, rtt, *gauges, forwards, rows)
            replicas = GaugeMetricFamily("swarm_block_replicas", "Routable peers serving each block", labels=["block"])
            for stretch in data["coverage"]:
                for block in range(stretch["start"], stretch["end"]):
                    replicas.add_metric([str(block)], stretch["replicas"])
            yield replicas
            yield GaugeMetricFamily("swarm_holes", "Stretches of blocks no routable peer serves",
                                    value=len(data["holes"]))
            best = data["best_chain"]
            seconds = best["ms_per_token"] / 1000 if best else float("nan")
            yield GaugeMetricFamily("swarm_best_chain_seconds_per_token", "The best chain's expected time per token "
                                    "from here (NaN: none)", value=seconds)

    registry = CollectorRegistry()
    registry.register(Snapshot())
    return generate_latest(registry).decode()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of DHT nodes")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help=f"model as announced (default {DEFAULT_MODEL_ID})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--prometheus", action="store_true", help="print Prometheus text format instead of a table")
    parser.add_argument("--probe-timeout", type=float, default=5.0, help="seconds to wait for each peer's answer")
    args = parser.parse_args(argv)
    try:
        data = asyncio.run(collect(args.initial_peers, args.model_id, args.probe_timeout))
    except P2PDaemonError as e:  # an address that does not parse, or no bootstrap peer answers: one line
        reason = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", str(e))
        print(f"cannot join the swarm at {' '.join(args.initial_peers)}: {reason}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=1) if args.json else prometheus(data) if args.prometheus else render(data))
    return 0 if not data["holes"] and data["num_blocks"] else 1


if __name__ == "__main__":
    sys.exit(main())
