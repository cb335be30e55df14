"""Verification of peers' answers: the tolerance between precisions, the verdict of a third opinion, and how often
a peer is checked as its record grows."""

from __future__ import annotations

import random

import torch

from swarm.client.health import PeerHealth
from swarm.client.verification import SAME_PRECISION, distance, judge, tolerance
from swarm.protocol import SpanInfo


def info(quant: str = "none", dtype: str = "float32", activations: str = "float32",
         kv_dtype: str = "float32") -> SpanInfo:
    return SpanInfo(peer_id="p", model_id="m", start=0, end=4, num_blocks=4, hidden_size=8, dtype=dtype, quant=quant,
                    max_length=64, kv_budget_tokens=100, free_kv_tokens=100, active_sessions=0,
                    activations=activations, kv_dtype=kv_dtype)


def test_tolerance_follows_the_two_precisions():
    assert tolerance(info(), [info()]) == SAME_PRECISION == tolerance(info("int4"), [info("int4")])
    assert tolerance(info(), [info("int8")]) < tolerance(info(), [info("int4")]) < tolerance(info(), [info("nf4")])
    assert tolerance(info(), [info("none", "bfloat16")]) > SAME_PRECISION
    assert tolerance(info(), [info(), info("int4")]) == tolerance(info(), [info("int4")])  # the loosest link
    # int8 activations: the same bits between two such peers, not within rounding of float32 ones (measured up to
    # 6.4e-2 relative L2 over SmolLM2's 30 blocks: an honest peer must pass, a wrong answer (O(1)) must not)
    a8 = info("int4", activations="int8")
    assert 2 * 6.4e-2 < tolerance(a8, [info("int4")]) == tolerance(info("int4"), [a8]) < 0.5
    assert tolerance(info(), [a8]) > 2 * 6.4e-2
    # two such peers: a verifier's replay (one prefill) and the peer's decode steps land 1e-2 to 3e-2 apart
    assert 2 * 3e-2 < tolerance(a8, [info("int4", activations="int8")]) < 0.5
    # a mode this reader does not know: the loosest tolerance there is, not rounding
    assert tolerance(info("int4", activations="fp4"), [info("int4", activations="fp4")]) >= tolerance(a8, [info()])


def test_float16_caches_are_held_to_rounding_only_beside_their_like():
    # measured over SmolLM2's 30 int4 blocks: float16 against float32 caches up to 5.8e-4 relative L2 (an unquantized
    # span's own level is 1e-4), a link replayed on a float16 cache 1.4e-4 from its decoding on one
    kv16 = info("int4", kv_dtype="float16")
    assert tolerance(kv16, [info("int4", kv_dtype="float16")]) == SAME_PRECISION
    assert tolerance(kv16, [info("int4")]) == tolerance(info("int4"), [kv16]) > tolerance(info(), [info("int4")])
    assert tolerance(info(kv_dtype="float16"), [info()]) > 2 * 5.8e-4
    assert tolerance(info(kv_dtype="float8"), [info()]) >= tolerance(info(), [info("nf4")])  # unknown: the loosest


def test_distance_tells_rounding_from_a_wrong_answer():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(2, 5, 64, generator=g) * 30
    assert distance(honest + 1e-5 * torch.randn(2, 5, 64, generator=g), honest) < 1e-5
    for lie in (-honest, honest.roll(1, dims=-1), torch.zeros_like(honest), honest[:, :, torch.randperm(64)]):
        assert distance(lie, honest) > 0.5  # a liar of the right shape and scale is off by O(1)
    assert distance(honest[:, :4], honest) == float("inf")
    assert distance(torch.full_like(honest, float("nan")), honest) == float("inf")


def test_a_third_opinion_decides_who_is_wrong():
    truth = torch.ones(1, 2, 8)
    assert judge(-truth, truth, truth, 1e-3, 1e-3) == (True, False)  # the peer lied
    assert judge(truth, -truth, truth, 1e-3, 1e-3) == (False, True)  # the verifier lied
    assert judge(truth, -truth, None, 1e-3, 1e-3) == (True, True)  # no third opinion: both are suspect


def test_a_new_peer_is_checked_on_every_step_then_less_as_its_record_grows():
    health, rng = PeerHealth(), random.Random(0)
    due = [health.verify_due("p", 0.01, 3, rng.random()) for _ in range(3)]
    assert due == [True] * 3  # never checked yet
    for _ in range(3):
        health.check_passed("p")
    rates = []
    for passed in (3, 10, 100, 10_000):
        while health._peer("p").checks_passed < passed:
            health.check_passed("p")
        rates.append(sum(health.verify_due("p", 0.01, 3, rng.random()) for _ in range(20_000)) / 20_000)
    assert 0.2 < rates[0] < 0.3 and rates[0] > rates[1] > rates[2] and 0.005 < rates[3] < 0.015, rates  # floor 1%
    assert not any(health.verify_due("q", 0.0, 3, rng.random()) for _ in range(100))  # rate 0: off
