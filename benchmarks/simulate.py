"""A swarm of 1,000–10,000 heterogeneous peers with churn, simulated with the shipped placement and routing.

    python -m benchmarks.simulate --peers 1000            # the standard scenario, both policies: one JSON object
    python -m benchmarks.simulate --route-scale 1000,10000 # route search time of a placed swarm of N peers
    python -m benchmarks.simulate --peers 1000 --out benchmarks/results --plots

The world (`benchmarks.sim.world`: peer mix, regions, churn, requests) and the engine (`benchmarks.sim.engine`) are
shared; the policies (`benchmarks.sim.policies`) are this project's (`ours`: swarm.server.placement and
swarm.client.routing, unchanged) and Petals' as published (`petals`). Both run on the same world from the same
seed, in two processes (one per core). Peers push hidden states to each other and announce the round trips they
measured to the peers that may follow them, as both real systems do by default (`--relay`: the client relays every
hop, this simulator's model before 2026-12-04). Petals' servers run each session's step on its own, as its task
pool does (`--petals-batches`: batched as ours, so that only placement and routing differ). Printed: per policy
`throughput_tok_s` (answer tokens per second served in the measured window), `p90_latency_s` (request sent →
last token, requests begun in the window), and the rest of what the engine measures (holes, moves, failovers,
route search time, DHT traffic per peer). `--saturated`: the engine's older, harsher model of a busy peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import machine, median
from benchmarks.sim.bound import bound
from benchmarks.sim.engine import TICK_S, Simulation
from benchmarks.sim.policies import Ours, Petals, dijkstra_chain
from benchmarks.sim.world import NUM_BLOCKS, make_world, rtt_s

POLICIES = {"ours": Ours, "petals": Petals}


def run_policy(name: str, peers: int, duration: float, warmup: float, seed: int, world_args: dict,
               push: bool = True, petals_batches: bool = False, saturated: bool = False) -> dict:
    world = make_world(peers, duration, seed=seed, **world_args)
    policy = Petals(batches_sessions=petals_batches) if name == "petals" else POLICIES[name]()
    return Simulation(world, policy, duration, warmup, push=push, saturated=saturated).run()


def scenario(peers: int, duration: float, warmup: float, seed: int, world_args: dict,
             push: bool = True, petals_batches: bool = False, saturated: bool = False) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_policy, name, peers, duration, warmup, seed, world_args, push,
                                     petals_batches, saturated)
                   for name in POLICIES}
        results = {name: future.result() for name, future in futures.items()}
    ours, petals = results["ours"], results["petals"]
    return with_bound({
        "peers": peers, "seed": seed, "duration_s": duration, "warmup_s": warmup, "world": world_args,
        "execution": "push" if push else "relay",
        "petals_steps": "batched, as ours" if petals_batches else "one session at a time",
        "contention": "saturated" if saturated else "bound",
        **results,
        "ratios": {
            "throughput_ours_over_petals": round(ours["throughput_tok_s"] / max(petals["throughput_tok_s"], 1e-9), 3),
            "p90_latency_ours_over_petals": round(ours["p90_latency_s"] / max(petals["p90_latency_s"], 1e-9), 3),
        },
    })


def with_bound(result: dict[str, Any]) -> dict[str, Any]:
    """`result` (a scenario's) with what no placement or routing could beat in its world (benchmarks.sim.bound): on
    the engine's clock, as every policy's run (`bound`), and in continuous time, any system's floor; and how far
    each policy's tokens of the whole run and p90 are from it."""
    world = make_world(result["peers"], result["duration_s"], seed=result["seed"], **result["world"])
    args = (world, result["duration_s"], result["warmup_s"], result["execution"] == "push")
    floor = result["bound"] = bound(*args, tick_s=TICK_S)
    result["bound_without_ticks"] = bound(*args)
    for name in POLICIES:
        result["ratios"][f"bound_tokens_over_{name}"] = round(floor["tokens_all"] / max(result[name]["tokens_all"],
                                                                                        1e-9), 3)
        result["ratios"][f"bound_p90_over_{name}"] = round(floor["p90_latency_s"] / max(result[name]["p90_latency_s"],
                                                                                       1e-9), 3)
    return result


def placed_swarm(peers: int, seed: int) -> tuple[list, Any]:
    """A swarm of `peers` placed one after another by the shipped join rule (strength kept incrementally here,
    which gives the same choices as re-reading every record), with random loads, for route timing."""
    import dataclasses

    import numpy as np

    from benchmarks.sim.engine import Peer, Simulation
    from swarm.server.placement import choose_start

    world = make_world(peers, 0.0, seed=seed)
    sim = Simulation(world, Ours(), 0.0, 0.0)
    rng = random.Random(seed)
    strength = np.zeros(NUM_BLOCKS)
    records = []
    for spec in world.peers:
        start = choose_start(strength.tolist(), spec.length)
        end = min(NUM_BLOCKS, start + spec.length)
        strength[start:end] += spec.announced
        peer = Peer(spec, state="online", start=start, end=end)
        record = sim._record(peer)
        records.append(dataclasses.replace(record, active_sessions=rng.randrange(0, 8),
                                           free_kv_tokens=rng.choice((0, 4096, 16384))))
    return records, world


def route_scale(sizes: list[int], seed: int, searches: int = 9) -> dict[str, Any]:
    """Median wall time of one route search (a whole chain, one client's view) over placed swarms of each size:
    ours as the client's router runs it (`find_chain` over the view's SpanTable, with the client's PeerHealth,
    holding an RTT for every peer, as the views; its pruning pass in C where built, `ours_numpy` without: the same
    chain asserted), the table's building (once per read of the records, not per
    route), the whole of the router's `route` (its health's bans and refusals included; the view already read),
    ours with push over records that each name 4 measured hops (`with_hops`): the C search over every span where it
    is built (`ours_push_hops`) and the pruned numpy search (`ours_push_hops_numpy`), the same cost asserted,
    ours over a list of records and a dict of PeerViews (the table built inside each search), the same
    without pruning (up to 3,000 peers), and Petals' Dijkstra over (block, server)."""
    from swarm.client import routing
    from swarm.client.health import PeerHealth
    from swarm.client.routing import PeerView, SpanTable, chain_seconds, find_chain
    from swarm_kernels import route_search

    out: dict[str, Any] = {}
    built = route_search.available()  # (before any search is timed)
    assert built or os.environ.get("SWARM_NATIVE_ROUTE") == "0", "no C compiler: set SWARM_NATIVE_ROUTE=0 to time numpy"
    for size in sizes:
        records, world = placed_swarm(size, seed)
        hosts = {s.peer_id: s.host for s in world.peers}
        timings: dict[str, list[float]] = {name: [] for name in
                                           ("ours", "ours_numpy", "ours_router", "ours_push_hops",
                                            "ours_push_hops_numpy",
                                            "ours_table", "ours_records", "ours_unpruned", "petals_dijkstra")}
        chains: dict[str, list] = {}
        for i in range(searches):
            user = world.users[i % len(world.users)]
            views = {r.peer_id: PeerView(rtt=rtt_s(user, hosts[r.peer_id])) for r in records}
            health = PeerHealth(clock=lambda: 0.0)
            for peer_id, view in views.items():
                health.rtt_sample(peer_id, view.rtt)
            began = time.perf_counter()
            table = SpanTable(records)
            timings["ours_table"].append(time.perf_counter() - began)
            health.view_columns(table)  # (rows → the health's slots: once per table)
            began = time.perf_counter()
            chain = find_chain(table, "m", NUM_BLOCKS, (), 0, None, health, 1000)
            timings["ours"].append(time.perf_counter() - began)
            native, routing._native_ready = routing._native_ready, lambda: False
            began = time.perf_counter()
            numpy_chain = find_chain(table, "m", NUM_BLOCKS, (), 0, None, health, 1000)
            timings["ours_numpy"].append(time.perf_counter() - began)
            routing._native_ready = native
            assert [(x.peer.peer_id, x.start, x.end) for x in chain] == \
                [(x.peer.peer_id, x.start, x.end) for x in numpy_chain]
            began = time.perf_counter()
            same = find_chain(records, "m", NUM_BLOCKS, (), 0, None, views, 1000)
            timings["ours_records"].append(time.perf_counter() - began)
            assert [(x.peer.peer_id, x.start, x.end) for x in chain] == [(x.peer.peer_id, x.start, x.end) for x in same]
            timings["ours_router"].append(_router_route(records, health))
            if i == 0:
                measured = SpanTable(with_hops(records, hosts, random.Random(seed)))
                health.view_columns(measured)
            native = routing._native_ready
            for name, ready in (("ours_push_hops", native), ("ours_push_hops_numpy", lambda: False)):
                routing._native_ready = ready
                began = time.perf_counter()
                chains[name] = find_chain(measured, "m", NUM_BLOCKS, (), 0, None, health, 1000, push=True)
                timings[name].append(time.perf_counter() - began)
            routing._native_ready = native
            costs = {chain_seconds(chain, health, push=True) for chain in chains.values()}
            assert max(costs) - min(costs) <= 1e-9 * max(costs)  # (the pruned numpy search: the same cost)
            if size <= 3000:  # the exact search over every span, as before pruning
                limit, routing.PRUNE_ABOVE = routing.PRUNE_ABOVE, 10**9
                began = time.perf_counter()
                find_chain(records, "m", NUM_BLOCKS, (), 0, None, views, 1000)
                timings["ours_unpruned"].append(time.perf_counter() - began)
                routing.PRUNE_ABOVE = limit
            if size <= 2000 or i < 3:
                began = time.perf_counter()
                dijkstra_chain(records, views, NUM_BLOCKS, 1000)
                timings["petals_dijkstra"].append(time.perf_counter() - began)
        out[str(size)] = {name: round(median(values) * 1000, 2) for name, values in timings.items() if values}
        print(json.dumps({"peers": size, "route_ms": out[str(size)]}), file=sys.stderr)
    return out


def with_hops(records: list, hosts: dict, rng: random.Random) -> list:
    """`records` as peers that push would announce them: each names the round trips (the world's geography) to
    the 4 nearest of up to 16 peers that may follow it (as swarm.server.latency probes a few in turns)."""
    import dataclasses

    from swarm.protocol import MAX_NEXT_RTT

    following: dict[int, list] = {}  # a span's end → the records that may follow it
    for end in {r.end for r in records}:
        following[end] = [s for s in records if s.start <= end < s.end]
    out = []
    for record in records:
        after = [s for s in following[record.end] if s.peer_id != record.peer_id]
        probed = rng.sample(after, min(16, len(after)))
        nearest = sorted((rtt_s(hosts[record.peer_id], hosts[s.peer_id]), s.peer_id) for s in probed)[:MAX_NEXT_RTT]
        out.append(dataclasses.replace(record, push=True, next_rtt=tuple((peer, rtt) for rtt, peer in nearest)))
    return out


def _router_route(records: list, health: Any) -> float:
    """Seconds of one `Router.route` over `records` already read (no network: the view is set by hand)."""
    from swarm.client.router import Router

    router = Router(None, None, "m", NUM_BLOCKS, clock=lambda: 0.0)
    router.health, router.start = health, lambda: None
    router.spans, router.updated = records, 0.0
    assert len(router.table) == len(records)  # (built once per read, before the route is timed)

    async def route() -> float:
        began = time.perf_counter()
        await router.route(length=1000)
        return time.perf_counter() - began

    return asyncio.run(route())


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if result.get("route_scale"):
        return [_scale_plot(plt, result["route_scale"], out_dir)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in POLICIES:
        timeline = result[name]["timeline"]
        axes[0].plot([t / 60 for t, _ in timeline], [x for _, x in timeline], label=name)
        axes[1].plot(result[name]["latency_percentiles"], [q / 100 for q in range(101)], label=name)
    axes[0].axvline(result["warmup_s"] / 60, color="grey", linestyle=":")
    if "bound" in result:  # the measured window's tokens/s were every request at its floor (benchmarks.sim.bound)
        axes[0].axhline(result["bound"]["throughput_tok_s"], color="black", linestyle="--", label="floor bound")
    axes[0].set(xlabel="minutes", ylabel="tokens/s served (per minute)", title=f"{result['peers']} peers, churn")
    axes[1].set(xlabel="request latency, s", ylabel="share of requests", title="latency CDF (measured window)",
                xscale="log")
    for ax in axes:
        ax.legend()
    suffix = f"_{result['name']}" if result.get("name") else ""
    path = out_dir / f"simulate_{result['peers']}{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    written.append(str(path))
    return written


def _scale_plot(plt: Any, scale: dict[str, Any], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sizes = [int(k) for k in scale]
    for name in ("ours", "ours_numpy", "ours_push_hops", "ours_push_hops_numpy", "ours_records", "ours_unpruned",
                 "petals_dijkstra"):
        have = [k for k in sizes if name in scale[str(k)]]
        ax.plot(have, [scale[str(k)][name] for k in have], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="peers", ylabel="ms per route search", title="route search")
    ax.legend()
    path = out_dir / "simulate_route_scale.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=900.0, help="simulated seconds in all")
    parser.add_argument("--warmup", type=float, default=300.0, help="simulated seconds before measuring")
    parser.add_argument("--users-per-peer", type=float, default=1.0)
    parser.add_argument("--stay-scale", type=float, default=1.0, help="multiplies each kind's mean stay (< 1: churn)")
    parser.add_argument("--failure-every", type=float, default=900.0, help="mean seconds between region failures")
    parser.add_argument("--relay", action="store_true", help="the client relays every hop (default: peers push)")
    parser.add_argument("--petals-batches", action="store_true",
                        help="Petals' servers batch sessions' steps as ours do (the policies alone, same execution)")
    parser.add_argument("--saturated", action="store_true",
                        help="a token waits for every session's step on each link (default: the busiest link's bound)")
    parser.add_argument("--name", default="", help="suffix of the result files (a scenario's name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--route-scale", default="", help="comma-separated swarm sizes: time route search only")
    parser.add_argument("--out", default=None, help="directory for simulate.json (and the plots)")
    parser.add_argument("--plots", action="store_true")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.route_scale:
        result: dict[str, Any] = {"route_scale": route_scale([int(x) for x in args.route_scale.split(",")],
                                                              args.seed)}
    else:
        result = scenario(args.peers, args.duration, args.warmup, args.seed,
                          {"users_per_peer": args.users_per_peer, "stay_scale": args.stay_scale,
                           "failure_every_s": args.failure_every}, push=not args.relay,
                          petals_batches=args.petals_batches, saturated=args.saturated)
        result["name"] = args.name
    result["wall_s"] = round(time.perf_counter() - began, 1)
    result["machine"] = machine()
    bulky = ("timeline", "latency_percentiles")
    compact = {k: ({kk: vv for kk, vv in v.items() if kk not in bulky} if k in POLICIES else v)
               for k, v in result.items()}
    print(json.dumps(compact))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f"_{args.name}" if args.name else ""
        name = "simulate_route_scale.json" if args.route_scale else f"simulate_{args.peers}{suffix}.json"
        (out / name).write_text(json.dumps(result, indent=1) + "\n")
        if args.plots:
            plots(result, out)


if __name__ == "__main__":
    main()
