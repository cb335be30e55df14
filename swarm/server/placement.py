"""Where a peer serves: how many blocks fit it, which span the swarm needs most, and when moving is worth it.

The swarm's strength at block b is the sum of the throughputs (tokens/s through one block) of the peers serving b;
the swarm is as fast as its weakest block. A joining peer takes the window of its length that covers the weakest
blocks (a hole first). A running peer moves only when that makes the weakest block clearly stronger: with the
peer taken out and put back at its best window, the swarm's minimum must grow by more than `MOVE_GAIN` (a hole
closed always counts). Peers whose departure would open a hole never move, since the minimum would drop to 0; nor
does a peer leave a block that no other peer serves yet (one still loading it counts for where the swarm is going,
not as a server).

Peers that are joining or moving announce where they are going (`SpanInfo.target`), so that peers deciding at the
same time see each other's choice instead of all piling onto the same hole.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.model.anatomy import find_anatomy, skeleton
from swarm.model.precision import Precision
from swarm.protocol import PeerState, SpanInfo
from swarm.server.memory import kv_bytes_per_token

MOVE_GAIN = 1.5  # moving must raise the swarm's weakest block throughput by this factor (Petals: 1/0.75)
SIZING_KV_TOKENS = 4096  # KV tokens per block assumed when sizing a span by memory (unless --kv-budget-tokens)
UNKNOWN_THROUGHPUT = 1.0  # weight of a peer that announced no throughput: it still counts for coverage

# Bytes per weight of a quantized linear layer, scales included (swarm_kernels/reference.py's layouts).
QUANT_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / 32, "nf4": 0.5 + 4 / 64}


def planned_range(info: SpanInfo) -> tuple[int, int] | None:
    """The blocks a peer will serve from now on: its target while joining or moving, none once it is offline."""
    if info.state == PeerState.OFFLINE:
        return None
    if info.state in (PeerState.JOINING, PeerState.DRAINING) and info.target_end > info.target_start:
        return info.target_start, info.target_end
    return info.start, info.end


def block_throughputs(spans: Iterable[SpanInfo], num_blocks: int, exclude: str | None = None) -> list[float]:
    """Per block: the summed throughput of the peers that will serve it (joining/moving ones at their target).
    One pass over the records (each adds its rate where its range starts and takes it off where it ends), so a check
    in a swarm of thousands costs a few milliseconds; a block no record covers is exactly 0."""
    strength, covered = _strength(spans, num_blocks, exclude)
    return np.where(covered > 0, strength, 0.0).tolist()


def _strength(spans: Iterable[SpanInfo], num_blocks: int, exclude: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(summed rate, number of peers) per block; the sums may carry rounding residue where the count is 0."""
    starts, ends, rates = [], [], []
    for info in spans:
        planned = planned_range(info)
        if info.peer_id == exclude or planned is None:
            continue
        start, end = max(planned[0], 0), min(planned[1], num_blocks)
        if start < end:
            starts.append(start)
            ends.append(end)
            rates.append(_rate(info))
    delta, count = np.zeros(num_blocks + 1), np.zeros(num_blocks + 1, dtype=np.int64)
    np.add.at(delta, starts, rates)
    np.add.at(delta, ends, np.negative(rates))
    np.add.at(count, starts, 1)
    np.add.at(count, ends, -1)
    return np.cumsum(delta[:-1]), np.cumsum(count[:-1])


def choose_start(strength: list[float], length: int) -> int:
    """Start of the window of `length` blocks that covers the weakest part of the swarm: the lowest minimum,
    then the lowest total, then the earliest start (deterministic ties)."""
    length = min(length, len(strength))
    windows = range(len(strength) - length + 1)
    return min(windows, key=lambda s: (min(strength[s : s + length]), sum(strength[s : s + length]), s))


def with_peer(strength: list[float], start: int, end: int, rate: float) -> list[float]:
    return [x + rate if start <= b < end else x for b, x in enumerate(strength)]


def choose_span(spans: Iterable[SpanInfo], num_blocks: int, length: int, exclude: str | None = None) -> tuple[int, int]:
    """The span a peer of `length` blocks should serve now, given the others' announcements."""
    length = max(1, min(length, num_blocks))
    start = choose_start(block_throughputs(spans, num_blocks, exclude), length)
    return start, start + length


def better_span(spans: Iterable[SpanInfo], me: SpanInfo, gain: float = MOVE_GAIN) -> tuple[int, int] | None:
    """Where `me` should move to, or None when its current span is (near) the best for the swarm, or when the move
    would leave a block that has no other server online: a peer still loading it (joining or moving there) counts
    for where the swarm is going, but until it serves, leaving would open a hole users meet (in simulated swarms of
    10 peers under heavy churn, nearly half the times a block lost its last server were moves)."""
    spans = list(spans)
    target = _better_span(block_throughputs(spans, me.num_blocks, exclude=me.peer_id), me, gain)
    if target is None or _leaves_alone(_serving(spans, me.num_blocks, exclude=me.peer_id), me, target):
        return None
    return target


def _serving(spans: list[SpanInfo], num_blocks: int, exclude: str | None = None) -> np.ndarray:
    """Per block, how many peers serve it now (online, in their own range; not joining or moving there), `exclude`
    left out (whether or not its own record is among `spans`)."""
    return _strength([info for info in spans if info.state == PeerState.ONLINE], num_blocks, exclude)[1]


def _leaves_alone(serving: np.ndarray, me: SpanInfo, target: tuple[int, int], counted: bool = False) -> bool:
    """Whether `me`, moving to `target`, would leave a block that has no other server now (`serving`: from _serving;
    `counted`: `me`'s own record is counted in it). Blocks it keeps (in both spans) do not count."""
    others = serving - (1 if counted else 0)
    return any(others[b] <= 0 for b in range(max(me.start, 0), min(me.end, len(serving)))
               if not target[0] <= b < target[1])


def _better_span(others: list[float], me: SpanInfo, gain: float) -> tuple[int, int] | None:
    """better_span() given the strength of the swarm without `me`."""
    rate = _rate(me)
    length = me.end - me.start
    start = choose_start(others, length)
    if start == me.start:
        return None
    now = with_peer(others, me.start, me.end, rate)
    after = with_peer(others, start, start + length, rate)
    holes_now, holes_after = now.count(0.0), after.count(0.0)
    if holes_now != holes_after:  # fewer uncovered blocks wins; never open a hole to move
        return (start, start + length) if holes_after < holes_now else None
    return (start, start + length) if min(after) > min(now) * gain else None


def move_for(spans: list[SpanInfo], me: SpanInfo, gain: float = MOVE_GAIN) -> tuple[int, int] | None:
    """better_span(), unless a movable online peer with a smaller id would move onto the same blocks: of several
    peers that see the same hole, the one with the smallest id goes (the others see its target next time).
    The swarm's strength is summed once and each other peer's own share taken out of it, so a check reads every
    record a constant number of times (not once per other peer)."""
    target = better_span(spans, me, gain)
    if target is None:
        return None
    total, covered = _strength(spans, me.num_blocks)
    serving = _serving(spans, me.num_blocks)
    for other in spans:
        if other.movable and other.routable and other.peer_id < me.peer_id:
            theirs = _better_span(_without(total, covered, other), other, gain)
            if theirs is not None and _leaves_alone(serving, other, theirs, counted=True):  # (routable: online)
                theirs = None
            if theirs is not None and theirs[0] < target[1] and target[0] < theirs[1]:
                return None
    return target


def _rate(info: SpanInfo) -> float:
    return info.throughput if info.throughput > 0 else UNKNOWN_THROUGHPUT


def _without(strength: np.ndarray, covered: np.ndarray, info: SpanInfo) -> list[float]:
    """The swarm's strength less `info`'s own share; a block no other peer covers is exactly 0 (by the count: the
    sums' rounding residue must not hide a hole)."""
    strength, covered = strength.copy(), covered.copy()
    planned = planned_range(info)
    if planned is not None:
        start, end = max(planned[0], 0), min(planned[1], len(strength))
        strength[start:end] -= _rate(info)
        covered[start:end] -= 1
    return np.where(covered > 0, strength, 0.0).tolist()


def block_weight_bytes(config: PretrainedConfig, precision: Precision) -> int:
    """Bytes the weights of one block take once loaded as `precision` (the largest block, for mixed layer types)."""
    model = skeleton(config, precision.dtype)
    anatomy = find_anatomy(model, config)
    element = torch.finfo(precision.dtype).bits // 8
    largest = 0
    blocks = model.get_submodule(anatomy.blocks)
    assert isinstance(blocks, nn.ModuleList)
    for block in blocks:
        total = 0.0
        for module in block.modules():
            for name, param in module.named_parameters(recurse=False):
                quantized = precision.quant != "none" and isinstance(module, nn.Linear) and name == "weight"
                total += param.numel() * (QUANT_BYTES.get(precision.quant, element) if quantized else element)
        largest = max(largest, int(total))
    return largest


def blocks_that_fit(config: PretrainedConfig, precision: Precision, memory_bytes: int, kv_tokens: int) -> int:
    """How many blocks (weights + a KV cache of `kv_tokens` tokens each) fit in `memory_bytes`; at least 1."""
    per_block = block_weight_bytes(config, precision) + kv_tokens * kv_bytes_per_token(config, 1, precision.dtype)
    return max(1, min(config.num_hidden_layers, memory_bytes // per_block))
