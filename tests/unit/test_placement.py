"""Self-placement on synthetic swarms: where a joining peer goes, when a running one moves, how many blocks fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from swarm.model.precision import Precision
from swarm.protocol import SpanInfo
from swarm.server.memory import kv_bytes_per_token
from swarm.server.placement import (
    better_span,
    block_throughputs,
    block_weight_bytes,
    blocks_that_fit,
    choose_span,
)


def peer(name: str, start: int, end: int, throughput: float = 100.0, state: str = "online",
         target: tuple[int, int] = (0, 0), num_blocks: int = 30) -> SpanInfo:
    return SpanInfo(peer_id=name, model_id="m", start=start, end=end, num_blocks=num_blocks, hidden_size=8,
                    dtype="float32", quant="none", max_length=64, kv_budget_tokens=100, free_kv_tokens=100,
                    active_sessions=0, throughput=throughput, state=state, target_start=target[0],
                    target_end=target[1])


def test_the_first_peer_starts_at_block_zero_and_the_next_ones_fill_the_rest():
    assert choose_span([], 30, 10) == (0, 10)
    assert choose_span([peer("a", 0, 10)], 30, 10) == (10, 20)
    assert choose_span([peer("a", 0, 10), peer("b", 10, 20)], 30, 10) == (20, 30)
    # all covered once: the next one doubles the first window (deterministic tie)
    assert choose_span([peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30)], 30, 10) == (0, 10)


def test_the_weakest_part_wins_and_a_hole_first():
    swarm = [peer("a", 0, 30, throughput=100), peer("b", 0, 12, throughput=500)]
    assert choose_span(swarm, 30, 10) == (12, 22)  # 12:30 has only a's 100 tok/s
    assert choose_span([peer("a", 0, 10), peer("c", 25, 30)], 30, 8) == (10, 18)
    assert choose_span([peer("a", 0, 10), peer("c", 25, 30)], 30, 20) == (5, 25)  # the whole hole, least overlap


def test_joining_and_moving_peers_count_where_they_are_going():
    joining = peer("j", 0, 10, state="joining", target=(0, 10))
    moving = peer("m", 0, 10, state="draining", target=(10, 20))
    strength = block_throughputs([joining, moving], 30)
    assert strength[:10] == [100.0] * 10 and strength[10:20] == [100.0] * 10 and strength[20:] == [0.0] * 10
    assert choose_span([joining, moving], 30, 10) == (20, 30)
    assert block_throughputs([peer("gone", 0, 30, state="offline")], 30) == [0.0] * 30


def test_a_peer_whose_span_is_duplicated_moves_to_a_hole():
    me = peer("me", 0, 10)
    swarm = [me, peer("a", 0, 10), peer("c", 20, 30)]  # nobody serves 10:20
    assert better_span(swarm, me) == (10, 20)


def test_a_peer_does_not_leave_blocks_whose_other_server_is_still_loading_them():
    """A joining peer counts where it is going, but until it serves, the blocks it loads have only me: leaving them
    would open a hole users meet (10-peer swarms under heavy churn, benchmarks/README.md, session 52). Blocks a move
    keeps do not count."""
    me = peer("me", 0, 10)
    loading = peer("a", 0, 10, state="joining", target=(0, 10))
    swarm = [me, loading, peer("c", 20, 30)]  # 10:20 is a hole
    assert better_span(swarm, me) is None
    swarm = [me, dataclasses.replace(loading, state="online"), peer("c", 20, 30)]  # a serves 0:10 now
    assert better_span(swarm, me) == (10, 20)
    leaving = peer("b", 0, 10, state="draining", target=(20, 30))  # on its way elsewhere: not a server of 0:10
    assert better_span([me, leaving, peer("c", 10, 20)], me) is None
    # my own record missing from what I read (not announced yet, a stale read) or there: the same decision
    assert better_span([dataclasses.replace(loading, state="online"), peer("c", 20, 30)], me) == (10, 20)
    # the only server of some blocks still moves to close a hole where it keeps them (2:4 here)
    me = peer("me", 2, 12)
    swarm = [me, peer("a", 4, 14), peer("b", 14, 24), peer("c", 20, 30)]  # 0:2 is a hole
    assert better_span(swarm, me) == (0, 10)


def test_the_only_server_of_a_span_never_moves_to_fill_another_hole():
    me = peer("me", 10, 20)
    swarm = [me, peer("a", 0, 10)]  # 20:30 is a hole, but leaving 10:20 opens one of the same size
    assert better_span(swarm, me) is None


def test_a_balanced_swarm_does_not_move_and_small_gains_are_ignored():
    me = peer("me", 0, 10)
    swarm = [me, peer("b", 10, 20), peer("c", 20, 30)]
    assert better_span(swarm, me) is None
    # moving me from 0:10 (two peers) to 10:20 would raise the minimum from 100 to 110: below the 1.5x bar
    swarm = [me, peer("a", 0, 10, throughput=100), peer("b", 10, 20, throughput=110),
             peer("c", 20, 30, throughput=110)]
    assert better_span(swarm, me) is None
    # ...but a weak part served at 20 tok/s is worth moving to
    swarm = [me, peer("a", 0, 10), peer("b", 10, 20, throughput=20), peer("c", 20, 30)]
    assert better_span(swarm, me) == (10, 20)


def test_moves_close_part_of_a_hole_too_large_for_one_peer():
    me = peer("me", 0, 5)
    swarm = [me, peer("a", 0, 10), peer("c", 25, 30)]  # 10:25 is a hole; me covers 5 of its blocks by moving
    assert better_span(swarm, me) == (10, 15)


def test_blocks_that_fit_count_weights_and_kv():
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    fp32 = Precision("cpu", torch.float32, "none")
    per_block = block_weight_bytes(config, fp32)
    # attention 4 projections (q, o: 256x256; k, v: 256x128) + MLP 3x 256x512 + two norms, 4 bytes each
    assert per_block == 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256)
    int8 = block_weight_bytes(config, Precision("cpu", torch.float32, "int8"))
    assert per_block / 4 < int8 < per_block / 3  # int8 weights, fp32 norms
    kv = kv_bytes_per_token(config, 1, torch.float32)
    assert blocks_that_fit(config, fp32, 5 * (per_block + 100 * kv), kv_tokens=100) == 5
    assert blocks_that_fit(config, fp32, 5 * (per_block + 100 * kv) - 1, kv_tokens=100) == 4
    assert blocks_that_fit(config, fp32, 1 << 40, kv_tokens=100) == 12  # never more than the model
    assert blocks_that_fit(config, fp32, 1, kv_tokens=100) == 1  # a peer always serves something


@pytest.mark.parametrize("n", [1, 7])
def test_a_peer_that_serves_everything_has_nowhere_to_go(n):
    me = dataclasses.replace(peer("me", 0, n, num_blocks=n))
    assert better_span([me], me) is None


def simulate(lengths: list[int], rates: list[float], num_blocks: int = 30, seed: int = 0,
             leave: int | None = None) -> tuple[list[SpanInfo], int]:
    """Peers join one by one (choose_span), one may leave, then everyone runs better_span in random order until
    nobody moves. Returns the final swarm and the number of moves (fails if it does not settle)."""
    import random

    rng = random.Random(seed)
    swarm: list[SpanInfo] = []
    for i, (length, rate) in enumerate(zip(lengths, rates, strict=True)):
        start, end = choose_span(swarm, num_blocks, length)
        swarm.append(peer(f"p{i}", start, end, throughput=rate, num_blocks=num_blocks))
    if leave is not None:
        swarm = [s for s in swarm if s.peer_id != f"p{leave}"]
    moves = 0
    for _ in range(20):  # rounds
        moved = False
        for i in rng.sample(range(len(swarm)), len(swarm)):
            target = better_span(swarm, swarm[i])
            if target is not None:
                swarm[i] = dataclasses.replace(swarm[i], start=target[0], end=target[1])
                moves += 1
                moved = True
        if not moved:
            return swarm, moves
    raise AssertionError(f"placement did not settle: {[(s.start, s.end) for s in swarm]}")


@pytest.mark.parametrize("seed", range(20))
def test_random_swarms_settle_without_holes_after_a_departure(seed):
    import random

    rng = random.Random(seed)
    count = rng.randrange(4, 9)
    lengths = [rng.randrange(6, 16) for _ in range(count)]
    rates = [rng.choice([50.0, 100.0, 400.0]) for _ in range(count)]
    swarm, _ = simulate(lengths, rates, seed=seed)
    assert not [b for b, x in enumerate(block_throughputs(swarm, 30)) if x == 0], "joining left a hole"
    leaver = rng.randrange(count)
    swarm, moves = simulate(lengths, rates, seed=seed, leave=leaver)
    if sum(length for i, length in enumerate(lengths) if i != leaver) >= 30 + 15:  # capacity to spare
        assert min(block_throughputs(swarm, 30)) > 0, [(s.start, s.end) for s in swarm]
    assert moves <= 2 * count  # settles in a few moves, no ping-pong


def test_of_two_replicas_that_could_fill_a_hole_only_the_smaller_id_moves():
    from swarm.server.placement import move_for

    a = dataclasses.replace(peer("a", 0, 10), movable=True)
    b = dataclasses.replace(peer("b", 0, 10), movable=True)
    swarm = [a, b, peer("c", 20, 30)]
    assert better_span(swarm, a) == better_span(swarm, b) == (10, 20)
    assert move_for(swarm, a) == (10, 20) and move_for(swarm, b) is None
    # a peer pinned with --blocks never moves, so nobody waits for it
    pinned = dataclasses.replace(a, movable=False)
    assert move_for([pinned, b, peer("c", 20, 30)], b) == (10, 20)
    # once a announces its move, b has no reason left
    moving = dataclasses.replace(a, state="draining", target_start=10, target_end=20)
    assert move_for([moving, b, peer("c", 20, 30)], b) is None


def test_move_for_sums_the_swarm_once_and_decides_as_checking_each_peer_alone():
    """move_for takes each other peer's share out of one sum instead of re-reading every record per peer (O(peers)
    a check, not O(peers²)); its decisions are those of better_span() run on each peer from scratch."""
    import random

    from swarm.server.placement import move_for

    def naive(spans, me):
        target = better_span(spans, me)
        if target is None:
            return None
        for other in spans:
            if other.movable and other.routable and other.peer_id < me.peer_id:
                theirs = better_span(spans, other)
                if theirs is not None and theirs[0] < target[1] and target[0] < theirs[1]:
                    return None
        return target

    with_moves = 0
    for seed in range(60):
        with_moves += compare(random.Random(seed), naive, move_for)
    assert with_moves >= 15  # the comparison covers moves, not only "stay"


def compare(rng, naive, move_for) -> bool:
    """One random swarm (fractional rates, whose sums do not cancel exactly): move_for == naive for every online
    peer; whether anyone would move."""
    swarm = []
    for _ in range(rng.randrange(5, 40)):
        start = rng.randrange(0, 75)
        state = rng.choice(["online"] * 6 + ["joining", "draining", "offline"])
        target = (s := rng.randrange(0, 70), s + rng.randrange(1, 10)) if state in ("joining", "draining") else (0, 0)
        swarm.append(dataclasses.replace(
            peer(f"p{rng.getrandbits(32):08x}", start, min(80, start + rng.randrange(2, 20)),
                 throughput=rng.choice([0.0, 0.1, 0.2, 0.7, 100.0, rng.uniform(0.01, 900)]), state=state,
                 target=target,
                 num_blocks=80), movable=rng.random() < 0.8))
    decided = [move_for(swarm, me) for me in swarm if me.routable]
    assert decided == [naive(swarm, me) for me in swarm if me.routable]
    return any(d is not None for d in decided)
