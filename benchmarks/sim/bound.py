"""What no placement and no routing can beat in a world: every request at its user's floor.

The engine (`benchmarks.sim.engine`) makes a token of a session take at least its chain's network time plus its
blocks' compute alone (load only adds to it), and a request at least its prompt's trip and prefill plus its answer's
tokens. Both have floors that no policy's choice of spans or chains can go under:
- compute: NUM_BLOCKS blocks at the fastest true speed of any peer of the world;
- network: a chain needs at least `hops` peers (no peer holds every block), and a pushed token goes user → first peer
  → … → last peer → user, so it crosses hops + 1 legs, each at least the RTT within one region plus the access
  latencies at its ends (every host has its own access latency; peers' at least the world's least): half their sum
  is at least (hops + 1) × INTRA_REGION_MS / 2 + the user's access + hops × the least peer access. Relayed, each of
  the hops is a round trip from the user.

`bound` runs every user's closed loop (request, answer at the floor, pause, next request: the world's own draws,
the same in every policy's run) with no queueing, no KV limits and no failures. With `tick_s` (the engine's
TICK_S), it keeps the engine's clock: a request is routed on the next tick and its end seen on the first tick after
its last token, as in every policy's run (`tick_s=0`: continuous time, the floor of any system, not only of this
engine). Any policy's answer token j of request n then comes no earlier than the bound's, so its tokens served by
any time are at most the bound's (`tokens_all`, rigorous); the measured window's figures (`throughput_tok_s`,
`p90_latency_s`) are what the same comparison gives there (near-bounds: a faster loop shifts which requests fall in
the window).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.sim.world import INTRA_REGION_MS, NUM_BLOCKS, World

PREFILL_GAIN = 40.0  # the engine's largest prefill speed-up over decoding (GPUs; CPUs 4)


def floors(world: World, push: bool = True) -> dict[str, Any]:
    """Per user, the least seconds a token can take, and the least a prompt token's prefill can (the world's)."""
    fastest = max(spec.true for spec in world.peers)
    hops = math.ceil(NUM_BLOCKS / max(spec.length for spec in world.peers))
    least_access = min(spec.host.access_ms for spec in world.peers)
    compute = NUM_BLOCKS / fastest
    network = []
    for user in world.users:
        if push:
            ms = (hops + 1) * INTRA_REGION_MS / 2 + user.access_ms + hops * least_access
        else:
            ms = hops * (INTRA_REGION_MS + user.access_ms + least_access)
        network.append(ms / 1000)
    return {"token_s": [n + compute for n in network], "network_s": network, "compute_s": compute,
            "prefill_token_s": NUM_BLOCKS / (fastest * PREFILL_GAIN), "hops": hops}


def floor_requests(world: World, duration_s: float, push: bool = True,
                   tick_s: float = 0.0) -> Iterator[tuple[int, int, float, float, float, float]]:
    """Every request of every user's closed loop at the floor, in the run's [0, duration_s): (user, number, sent,
    first: its answer's decoding begins, done: its last token, token_s: seconds a token)."""
    f = floors(world, push)
    for user in range(len(world.users)):
        token_s, network_s = f["token_s"][user], f["network_s"][user]
        t, number = world.think(user, 0), 0
        while t < duration_s:
            req = world.request(user, number)
            first = _tick(t, tick_s) + network_s + req.prompt * f["prefill_token_s"]  # the prompt's trip, prefill
            done = first + req.output * token_s
            yield user, number, t, first, done, token_s
            number += 1
            t = _tick(done, tick_s) + world.think(user, number)


def bound(world: World, duration_s: float, warmup_s: float, push: bool = True, tick_s: float = 0.0) -> dict[str, Any]:
    """Served tokens and request latencies if every request ran at its user's floor (see the module)."""
    f = floors(world, push)
    window = duration_s - warmup_s
    tokens_all = tokens_window = 0.0
    latencies = []
    for _, _, sent, first, done, token_s in floor_requests(world, duration_s, push, tick_s):
        tokens_all += _tokens(first, done, token_s, 0.0, duration_s)
        tokens_window += _tokens(first, done, token_s, warmup_s, duration_s)
        if sent > warmup_s:  # its end as the engine records it: on the tick after its last token
            latencies.append(min(_tick(done, tick_s), duration_s) - sent)
    lat = np.array(latencies or [np.nan])
    return {
        "throughput_tok_s": round(tokens_window / window, 1),
        "tokens_all": round(tokens_all, 1),
        "p50_latency_s": round(float(np.nanpercentile(lat, 50)), 2),
        "p90_latency_s": round(float(np.nanpercentile(lat, 90)), 2),
        "requests_measured": len(latencies),
        "token_floor_ms_median": round(float(np.median(f["token_s"])) * 1000, 1),
        "compute_floor_ms": round(f["compute_s"] * 1000, 1),
        "hops_at_least": f["hops"],
    }


def _tokens(first: float, done: float, token_s: float, lo: float, hi: float) -> float:
    """Answer tokens made in [lo, hi) by a request decoding from `first` to `done` at one per `token_s`."""
    return max(0.0, min(done, hi) - max(first, lo)) / token_s


def _tick(t: float, tick_s: float) -> float:
    """The first tick at or after `t` (ticks at tick_s, 2 tick_s, ...); `t` itself without ticks."""
    return max(tick_s, math.ceil(t / tick_s - 1e-9) * tick_s) if tick_s else t
