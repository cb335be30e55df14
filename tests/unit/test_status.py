"""`python -m swarm.status` without a network: the snapshot and the table from synthetic records and probes."""

from __future__ import annotations

import dataclasses

from swarm.protocol import SpanInfo
from swarm.status import prometheus, render, snapshot


def record(peer: str, start: int, end: int, **kw) -> SpanInfo:
    base = SpanInfo(peer_id=peer, model_id="m", start=start, end=end, num_blocks=30, hidden_size=8, dtype="float32",
                    quant="int8", max_length=64, kv_budget_tokens=4096, free_kv_tokens=4000, active_sessions=1,
                    throughput=400.0, batch_throughput=1600.0, software="0.1.0")
    return dataclasses.replace(base, **kw)


async def test_snapshot_lists_peers_coverage_holes_and_the_best_chain():
    spans = [record("QmFirstPeerIdentifier0001", 0, 15, public_name="alpha"), record("b", 15, 30),
             record("c", 15, 30, state="draining", target_start=0, target_end=15), record("dead", 0, 10)]
    fresh = {s.peer_id: dataclasses.replace(s, active_sessions=3) for s in spans}

    async def prober(peer_id):
        if peer_id == "dead":
            raise TimeoutError
        return fresh[peer_id], 0.004 if peer_id == "b" else 0.002

    data = await snapshot(spans, "m", prober)
    assert [p["peer_id"] for p in data["peers"]] == ["dead", "QmFirstPeerIdentifier0001", "b", "c"]
    rows = {p["peer_id"]: p for p in data["peers"]}
    assert rows["b"]["rtt_ms"] == 4.0 and rows["b"]["active_sessions"] == 3  # what the probe said, not the DHT
    assert rows["dead"]["rtt_ms"] is None and "TimeoutError" in rows["dead"]["probe_error"]
    # the draining peer takes no new sessions and the unreachable one serves nobody: one replica everywhere
    assert data["coverage"] == [{"start": 0, "end": 30, "replicas": 1}]
    assert data["holes"] == []
    links = [(x["peer_id"], x["start"], x["end"]) for x in data["best_chain"]["links"]]
    assert links[-1] == ("b", 15, 30) and links[0][1] == 0
    table = render(data)
    assert "complete" in table and "INCOMPLETE" not in table
    assert "QmFirs…er0001" in table and "alpha" in table and "15:30 → 0:15" in table and "unreachable" in table
    assert "cpu/float32/int8" in table and "400.0" in table and "4000/4096" in table
    assert "ms/token expected" in table


async def test_a_hole_is_shown():
    async def prober(peer_id):
        return spans[0], 0.001

    spans = [record("a", 0, 10)]
    data = await snapshot(spans, "m", prober)
    assert data["holes"] == [{"start": 10, "end": 30}] and data["best_chain"] is None
    table = render(data)
    assert "INCOMPLETE" in table and "holes: 10:30" in table and "best chain from here: none" in table


async def test_the_snapshot_as_prometheus_metrics_parses_and_escapes_what_peers_announce():
    from prometheus_client.parser import text_string_to_metric_families

    spans = [record("a", 0, 15, public_name='evil"} 1\nswarm_holes 99'), record("b", 15, 30, decode_forwards=10,
                                                                             decode_rows=40)]

    async def prober(peer_id):
        if peer_id == "b":
            raise TimeoutError
        return spans[0], 0.002

    text = prometheus(await snapshot(spans, "m", prober))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("swarm_peer_up", (("peer", "a"),))] == 1 and samples[("swarm_peer_up", (("peer", "b"),))] == 0
    assert samples[("swarm_peer_rtt_seconds", (("peer", "a"),))] == 0.002
    assert samples[("swarm_peer_kv_tokens_free", (("peer", "a"),))] == 4000
    assert samples[("swarm_peer_decode_rows_total", (("peer", "b"),))] == 40
    assert samples[("swarm_holes", ())] == 1  # b did not answer: 15:30 is a hole; the name injected nothing
    names = [dict(labels)["name"] for (name, labels) in samples if name == "swarm_peer_info"]
    assert 'evil"} 1\nswarm_holes 99' in names


def test_an_unusable_initial_peer_is_one_line_not_a_traceback(capsys):
    from swarm.status import main

    assert main(["--initial-peers", "garbage"]) == 2
    assert capsys.readouterr().err.strip() == ('cannot join the swarm at garbage: failed to parse multiaddr "garbage": '
                                               "must begin with /")
