"""The simulated world: what peers and users are like, where they sit, how long they stay.

Every draw comes from one `random.Random(seed)`, so a scenario is the same for every policy run on it.

The model is Llama-2-70B-shaped: 80 blocks, int4/nf4 weights (~0.45 GB a block with its share of KV cache), the
model of Petals' own headline figures. The peer mix is an assumption, not a measurement: loosely after the public
Petals swarm's health page (mostly consumer GPUs, a few datacenter cards, some CPU volunteers), with per-block
decode speeds from memory bandwidth (a block's ~0.43 GB of int4 weights read once per step):

    kind        share  tok/s per block  batch-8 gain  blocks it holds  bandwidth     stays (mean)
    datacenter    5%         2500            7×            50–70        1 Gbit/s        6 h
    consumer_hi  40%         1200            6×            20–40        100–300 Mbit/s  2 h
    consumer_lo  35%          500            5×            10–22        50–200 Mbit/s   2 h
    cpu          20%           40            2.5×          20–60        50–100 Mbit/s   1 h

A peer's true speed is its announced speed × a log-normal factor (σ 0.15): measurements are imperfect.

Network: hosts sit in six regions weighted like the internet's population of such machines; the RTT between two
hosts is the RTT between their regions (rounded medians of public inter-region ping tables) + each host's access
latency (datacenter 1 ms, others 3–25 ms).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

NUM_BLOCKS = 80
BLOCK_GBIT = 0.45 * 8  # one block's weights, in Gbit (for download times)
DISK_SECONDS_PER_BLOCK = 0.5  # loading a block this host already has

REGIONS = ("na_east", "na_west", "europe", "asia", "south_america", "oceania")
REGION_WEIGHTS = (0.25, 0.15, 0.33, 0.17, 0.05, 0.05)
_INTER_MS = {  # RTT between regions, ms
    ("na_east", "na_west"): 65, ("na_east", "europe"): 85, ("na_east", "asia"): 200,
    ("na_east", "south_america"): 120, ("na_east", "oceania"): 210, ("na_west", "europe"): 145,
    ("na_west", "asia"): 130, ("na_west", "south_america"): 170, ("na_west", "oceania"): 150,
    ("europe", "asia"): 230, ("europe", "south_america"): 200, ("europe", "oceania"): 280,
    ("asia", "south_america"): 300, ("asia", "oceania"): 130, ("south_america", "oceania"): 300,
}
INTRA_REGION_MS = 20


def region_rtt_ms(a: str, b: str) -> float:
    if a == b:
        return INTRA_REGION_MS
    return _INTER_MS.get((a, b)) or _INTER_MS[(b, a)]


@dataclass(frozen=True)
class Kind:
    name: str
    share: float
    throughput: float  # decode tokens/s of one session through one block
    batch_gain: float  # batch-8 throughput ÷ single
    blocks: tuple[int, int]
    mbit: tuple[float, float]
    mean_stay_s: float
    access_ms: tuple[float, float]


KINDS = (
    Kind("datacenter", 0.05, 2500, 7.0, (50, 70), (1000, 1000), 6 * 3600, (1, 1)),
    Kind("consumer_hi", 0.40, 1200, 6.0, (20, 40), (100, 300), 2 * 3600, (3, 25)),
    Kind("consumer_lo", 0.35, 500, 5.0, (10, 22), (50, 200), 2 * 3600, (3, 25)),
    Kind("cpu", 0.20, 40, 2.5, (20, 60), (50, 100), 1 * 3600, (3, 25)),
)


@dataclass
class Host:
    region: str
    access_ms: float


def rtt_s(a: Host, b: Host) -> float:
    return (region_rtt_ms(a.region, b.region) + a.access_ms + b.access_ms) / 1000


@dataclass
class PeerSpec:
    """One peer as the world makes it: what it is, not what a policy does with it."""

    peer_id: str
    kind: Kind
    host: Host
    announced: float  # the tok/s per block it measured and announces
    true: float  # what it really does
    batch_gain: float
    length: int  # blocks it holds
    mbit: float
    kv_budget_tokens: int
    arrive_s: float
    stay_s: float
    abrupt: bool  # leaves without withdrawing its record (crash, lost link) rather than shutting down cleanly

    def marginal_s(self) -> float:
        """Seconds each additional session adds to a step of one block (batching: far below 1/throughput)."""
        single = 1 / self.true
        batched = 8 / (self.true * self.batch_gain)
        return max(0.0, (batched - single) / 7)

    def download_s(self, blocks: int) -> float:
        return blocks * BLOCK_GBIT * 1000 / self.mbit


MAX_TOKENS = 512  # the answer cap a client sends (the drawn answers stay under 500 tokens)


@dataclass
class Request:
    prompt: int
    output: int
    max_tokens: int = MAX_TOKENS


@dataclass
class World:
    seed: int
    peers: list[PeerSpec]
    users: list[Host]
    region_failures: list[tuple[float, str, float]]  # (time, region, share of its peers that fail at once)
    think_s: float

    def request(self, user: int, number: int) -> Request:
        """User `user`'s `number`-th chat request (the same in every policy's run): log-normal lengths, prompt
        median 300 tokens, answer median 100."""
        rng = random.Random(f"{self.seed}/{user}/{number}")
        prompt = min(2000, max(8, int(rng.lognormvariate(math.log(300), 0.8))))
        output = min(500, max(8, int(rng.lognormvariate(math.log(100), 0.6))))
        return Request(prompt, output)

    def think(self, user: int, number: int) -> float:
        return random.Random(f"{self.seed}/{user}/{number}/think").expovariate(1 / self.think_s)


def _host(rng: random.Random, kind: Kind | None = None) -> Host:
    region = rng.choices(REGIONS, REGION_WEIGHTS)[0]
    low, high = kind.access_ms if kind else (3, 25)
    return Host(region, rng.uniform(low, high))


def _peer(rng: random.Random, arrive_s: float, stay_scale: float = 1.0) -> PeerSpec:
    kind = rng.choices(KINDS, [k.share for k in KINDS])[0]
    announced = kind.throughput * rng.uniform(0.8, 1.25)
    return PeerSpec(
        peer_id=f"{rng.getrandbits(64):016x}", kind=kind, host=_host(rng, kind), announced=announced,
        true=announced * rng.lognormvariate(0, 0.15), batch_gain=kind.batch_gain,
        length=rng.randint(*kind.blocks), mbit=rng.uniform(*kind.mbit), kv_budget_tokens=rng.choice((32768, 65536)),
        arrive_s=arrive_s, stay_s=rng.expovariate(1 / (kind.mean_stay_s * stay_scale)), abrupt=rng.random() < 0.5)


def make_world(num_peers: int, duration_s: float, seed: int = 0, users_per_peer: float = 1.0,
               start_window_s: float = 60.0, think_s: float = 10.0, stay_scale: float = 1.0,
               failure_every_s: float = 900.0) -> World:
    """`num_peers` peers arriving over the first minute, then churn: each stays an exponential time of its kind's
    mean (× `stay_scale`) and a new one arrives at the rate that keeps the swarm's size (Poisson); about every
    `failure_every_s` (15 minutes) a region loses 30% of its peers at once (a correlated failure: a provider's
    outage, a cut cable). KV budgets of 32k–64k tokens a peer (what a 24 GB card holds beside ~30 int4 blocks)."""
    rng = random.Random(seed)
    peers = [_peer(rng, rng.uniform(0, start_window_s), stay_scale) for _ in range(num_peers)]
    mean_stay = sum(k.share * k.mean_stay_s for k in KINDS) * stay_scale
    t = start_window_s
    while True:
        t += rng.expovariate(num_peers / mean_stay)
        if t >= duration_s:
            break
        peers.append(_peer(rng, t, stay_scale))
    failures, t = [], 0.0
    while True:
        t += rng.expovariate(1 / failure_every_s)
        if t >= duration_s:
            break
        failures.append((t, rng.choices(REGIONS, REGION_WEIGHTS)[0], 0.3))
    users = [_host(rng) for _ in range(max(1, int(num_peers * users_per_peer)))]
    return World(seed, peers, users, failures, think_s)
