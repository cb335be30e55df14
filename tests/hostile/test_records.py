"""Hostile DHT records and probe answers: each malformed class is dropped by itself, never breaks routing."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from swarm import dht as dht_module
from swarm.codec import pack_metadata, unpack_metadata
from swarm.dht import get_spans, owner_marker, record_subkey
from swarm.protocol import SPAN_SCHEMA, SpanInfo

HONEST = SpanInfo(peer_id="honest", model_id="m", start=0, end=30, num_blocks=30, hidden_size=576, dtype="float32",
                  quant="none", max_length=8192, kv_budget_tokens=1000, free_kv_tokens=1000, active_sessions=0,
                  throughput=500.0, batch_throughput=2000.0)

# (what an attacker writes in its own, validly signed record, why a reader must not use it)
MALFORMED = [
    ({"peer_id": 0}, "peer_id not text (crashed get_spans outside its guard)"),
    ({"kv_budget_tokens": "x"}, "a string where routing does arithmetic (TypeError in find_chain)"),
    ({"throughput": math.nan}, "NaN throughput (made every chain cost NaN: NoChainError)"),
    ({"throughput": math.inf}, "infinite throughput"),
    ({"throughput": 1e12}, "a throughput no hardware has (won every chain)"),
    ({"batch_throughput": -5.0}, "negative"),
    ({"num_blocks": 10**9, "end": 10**9}, "a block count a placing peer would allocate for"),
    ({"start": -1}, "a negative block"),
    ({"start": 20, "end": 10}, "an empty span"),
    ({"free_kv_tokens": 10**12}, "more free KV than budget"),
    ({"active_sessions": True}, "a boolean where a count is due"),
    ({"max_length": 2**70}, "an integer past any bound"),
    ({"state": "online\x00"}, "a state that is none"),
    ({"public_name": "x" * 10_000}, "a huge name"),
    ({"dtype": "int64"}, "a dtype hidden states never have"),
    ({"target_start": 5, "target_end": 99}, "a target outside the model"),
    ({"updated_at": math.nan}, "NaN time"),
    ({"throughput": 5e-324}, "a denormal speed (1 / it overflows: every cost NaN, no route at all)"),
    ({"batch_throughput": 1e-9}, "a batched speed next to nothing"),
    ({"next_rtt": [["b", 0.01]] * 5}, "more measured hops than a record carries"),
    ({"next_rtt": [["b", 0.01], ["b", 0.02]]}, "a measured hop named twice"),
    ({"next_rtt": [["b", -0.01]]}, "a negative round trip (a liar's shortcut)"),
    ({"next_rtt": [["b", math.nan]]}, "a NaN round trip"),
    ({"next_rtt": [["b", 1e9]]}, "a round trip past any bound"),
    ({"next_rtt": [["b"]]}, "a hop without its round trip"),
    ({"next_rtt": [[7, 0.01]]}, "a peer id not text"),
    ({"next_rtt": {"b": 0.01}}, "hops as a map, not pairs"),
    ({"activations": 8}, "activations not text"),
    ({"activations": "int8" * 10}, "activations longer than any mode's name"),
    ({"kv_dtype": 16}, "a KV cache dtype not text"),
    ({"kv_dtype": "float16" * 10}, "a KV cache dtype longer than any dtype's name"),
]


def test_every_record_field_has_a_rule_and_honest_records_pass():
    assert SpanInfo.from_dict(HONEST.to_dict()) == HONEST
    assert set(SPAN_SCHEMA) == set(HONEST.to_dict())
    measured = dataclasses.replace(HONEST, push=True, next_rtt=(("b", 0.012), ("c", 0.0)), activations="int8")
    assert SpanInfo.from_dict(unpack_metadata(pack_metadata(measured.to_dict()))) == measured  # as on the wire


def test_a_record_without_activations_or_kv_dtype_is_an_older_peers_float32_and_an_unknown_mode_is_kept():
    record = HONEST.to_dict()
    del record["activations"]
    assert SpanInfo.from_dict(record).activations == "float32"
    # a newer peer's mode: its record stays usable (verification takes it for the loosest precision)
    assert SpanInfo.from_dict({**record, "activations": "fp4"}).activations == "fp4"
    del record["kv_dtype"]  # an older peer's record: float32 caches (verification holds it to its own precision)
    assert SpanInfo.from_dict(record).kv_dtype == "float32"


@pytest.mark.parametrize(("change", "why"), MALFORMED, ids=[why for _, why in MALFORMED])
def test_a_malformed_record_is_refused_by_the_parser(change, why):
    with pytest.raises(ValueError):
        SpanInfo.from_dict({**HONEST.to_dict(), **change})


class FakeDHT:
    def __init__(self, items):
        self.items = items

    async def get(self, key, latest=True, return_future=True):
        return SimpleNamespace(value=self.items)


def signed(info: dict, peer: str, owner: bytes) -> tuple[bytes, SimpleNamespace]:
    return record_subkey(peer, owner), SimpleNamespace(value=info)


async def test_get_spans_keeps_honest_records_among_every_malformed_one(monkeypatch):
    """All malformed classes at once, each validly 'signed' by its writer (ownership is checked by hivemind keys,
    stubbed here): only the honest record comes back, and each bad one is counted as dropped."""
    monkeypatch.setattr(dht_module, "_owned_by", lambda subkey, peer_id: subkey.startswith(peer_id.encode()))
    items = dict([signed(HONEST.to_dict(), "honest", b"[owner:h]")])
    for i, (change, _) in enumerate(MALFORMED):
        record = {**HONEST.to_dict(), "peer_id": f"evil{i}", **change}
        items.update([signed(record, f"evil{i}", b"[owner:e]")])
    items[b"not-even-bytes?"] = "a bare string"  # no .value at all
    items[12345] = SimpleNamespace(value={"peer_id": "x"})  # a subkey of the wrong type
    before = dht_module.dropped_records
    spans = await get_spans(FakeDHT(items), "m", num_blocks=30)
    assert [s.peer_id for s in spans] == ["honest"]
    assert dht_module.dropped_records - before == len(MALFORMED) + 2


async def test_records_of_another_block_count_or_model_are_dropped(monkeypatch):
    monkeypatch.setattr(dht_module, "_owned_by", lambda subkey, peer_id: True)
    other = {**HONEST.to_dict(), "peer_id": "other", "num_blocks": 31}
    elsewhere = {**HONEST.to_dict(), "peer_id": "elsewhere", "model_id": "n"}
    items = dict([signed(HONEST.to_dict(), "honest", b""), signed(other, "other", b""),
                  signed(elsewhere, "elsewhere", b"")])
    assert [s.peer_id for s in await get_spans(FakeDHT(items), "m", num_blocks=30)] == ["honest"]
    assert {s.peer_id for s in await get_spans(FakeDHT(items), "m")} == {"honest", "other"}


def test_owner_marker_is_part_of_the_subkey():
    from swarm.dht import load_identity

    _, key = load_identity(None)
    assert record_subkey("peer", owner_marker(key)).startswith(b"peer[owner:")
