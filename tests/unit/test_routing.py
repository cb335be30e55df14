"""Route search over synthetic span tables: coverage, holes, overlaps, ties, bans."""

from __future__ import annotations

import pytest

from swarm.client.routing import find_chain, missing_blocks
from swarm.protocol import NoChainError, SpanInfo


def span(peer: str, start: int, end: int, free: int = 1000) -> SpanInfo:
    return SpanInfo(peer_id=peer, model_id="m", start=start, end=end, num_blocks=30, hidden_size=8, dtype="float32",
                    quant="none", max_length=64, kv_budget_tokens=free, free_kv_tokens=free, active_sessions=0)


def links(chain):
    return [(link.peer.peer_id, link.start, link.end) for link in chain]


def test_two_halves_make_a_chain():
    assert links(find_chain([span("b", 15, 30), span("a", 0, 15)], "m", 30)) == [("a", 0, 15), ("b", 15, 30)]


def test_fewest_hops_wins_and_overlaps_are_cut():
    spans = [span("a", 0, 10), span("b", 10, 20), span("c", 20, 30), span("big", 0, 25),
             span("tail", 22, 30, free=2000)]
    assert links(find_chain(spans, "m", 30)) == [("big", 0, 25), ("tail", 25, 30)]


def test_tie_goes_to_more_free_kv():
    spans = [span("full", 0, 30, free=10), span("roomy", 0, 30, free=500)]
    assert links(find_chain(spans, "m", 30)) == [("roomy", 0, 30)]


def test_hole_is_named_in_the_error():
    with pytest.raises(NoChainError, match="blocks 10:20 of m") as info:
        find_chain([span("a", 0, 10), span("c", 20, 30)], "m", 30)
    assert info.value.missing == [(10, 20)]


def test_banned_peer_is_avoided_or_leaves_a_hole():
    spans = [span("a", 0, 30), span("b", 0, 15), span("c", 15, 30)]
    assert links(find_chain(spans, "m", 30, banned={"a"})) == [("b", 0, 15), ("c", 15, 30)]
    with pytest.raises(NoChainError, match="0:15"):
        find_chain(spans, "m", 30, banned={"a", "b"})


def test_no_peers_at_all():
    with pytest.raises(NoChainError, match="0:30"):
        find_chain([], "m", 30)
    assert missing_blocks([span("a", 3, 5)], 8) == [(0, 3), (5, 8)]


def test_a_part_of_the_model_can_be_routed_alone():
    spans = [span("a", 0, 30), span("b", 0, 12), span("c", 12, 30)]
    assert links(find_chain(spans, "m", 30, banned={"a"}, start=10, end=20)) == [("b", 10, 12), ("c", 12, 20)]
    assert links(find_chain(spans, "m", 30, start=10, end=20)) == [("a", 10, 20)]
    with pytest.raises(NoChainError, match="blocks 10:12 of m"):
        find_chain([span("c", 12, 30)], "m", 30, start=10, end=20)
