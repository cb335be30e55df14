"""Verification of peers' answers (swarm.client.verification): its cost in decode speed, and how fast it bans a liar.

    python -m benchmarks.verify [--new-tokens 64] [--runs 5] [--warm-generations 4] [--late-trials 5] [--out DIR]

Overhead: two honest replicas of the default model (every block each, 1 torch thread each) and three clients that
generate the same greedy tokens, interleaved (the order rotates every round):
- `off`: verification off (rate 0), the reference;
- `warm`: the default policy on a client that has generated `--warm-generations` times before the measured runs,
  as a gateway that has served a while (its peers have a record of passed checks, so few steps are checked, and
  those beside the decoding);
- `warm_waiting`: the same with every check holding its step (`background=False`, the policy before background
  checks);
- `cold`: the default policy on a fresh client per run: every step of a new peer is checked until it has passed
  `warmup` checks, then 1 / (1 + passed) of them;
- `floor`: the default policy on a client whose record with both replicas is already long enough (1 / rate - 1
  passed checks each) that their steps are checked at the default rate (`VerificationPolicy.rate`): a gateway that
  has served for a long while. That record is entered directly, as if earned: earning it takes ~1 / (2 rate²) steps per
  replica at falling rates (~10,000 steps for the two here, a quarter of an hour); only the count differs.
A check re-runs the step on the other replica from the session's kept inputs (a prefill over its history), on the
same two cores here; in a real swarm the other replica has its own.

Detection: a third replica that claims to be 1000x faster (so routes take it) and answers wrong hidden states from
its N-th forward on: `--fault-wrong-after 1` (wrong from the first decode step) once, and a late liar that turns after
`--late-after` forwards (after the warm-up checks, when steps are sampled) in `--late-trials` fresh trials. Reported:
the decode step at which the client banned it, counted from its first wrong answer, and whether the greedy tokens
equal the honest swarm's (verification re-computes a caught step before its token is released).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, machine, median, versions
from benchmarks.swarm_runs import PROMPT, default_model_prompt
from swarm.client import SwarmClient
from swarm.client.verification import VerificationPolicy
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

PEER_FLAGS = ("--announce-period", "1")  # and 1 torch thread each (LocalSwarm)


async def generate(client: SwarmClient, prompt_ids: list[int], new_tokens: int,
                   liar: str | None = None) -> dict:
    """One greedy generation through the client's routes: decode tok/s, tokens, checks passed meanwhile, and (with
    `liar`) the decode step after which the liar was banned (None: never)."""
    health = client.router.health
    passed_before = sum(health.passed_checks().values())
    session = await client.inference_session(len(prompt_ids) + new_tokens)
    tokens, times, banned_at = [], [], None
    async with session:
        async for step in client.generate_steps(torch.tensor([prompt_ids]), new_tokens, session=session):
            tokens.append(int(step.token_ids[0]))
            times.append(time.perf_counter())
            if liar is not None and banned_at is None and liar in client.router.banned():
                banned_at = len(tokens) - 1  # decode steps answered so far (the first token is the prefill's)
    passed = sum(health.passed_checks().values()) - passed_before
    return {"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": tokens, "checks_passed": passed,
            "banned_at_step": banned_at, "failovers": session.failovers}


async def connect(swarm: LocalSwarm, policy: VerificationPolicy) -> SwarmClient:
    client = await SwarmClient.connect(swarm.initial_peers, DEFAULT_MODEL_ID, verification=policy)
    await client.wait_for_chain()
    return client


async def overhead(swarm: LocalSwarm, prompt_ids: list[int], args) -> dict:
    clients = {"off": await connect(swarm, VerificationPolicy(rate=0)),
               "warm": await connect(swarm, VerificationPolicy()),
               "warm_waiting": await connect(swarm, VerificationPolicy(background=False)),
               "floor": await connect(swarm, VerificationPolicy())}
    runs: dict[str, list[dict]] = {"off": [], "warm": [], "warm_waiting": [], "cold": [], "floor": []}
    try:
        await generate(clients["off"], prompt_ids, 4)
        floor_record = round(1 / VerificationPolicy().rate) - 1
        for span in await clients["floor"].spans(fresh=True):
            for _ in range(floor_record):
                clients["floor"].router.health.check_passed(span.peer_id)
        warm_record = {name: [await generate(clients[name], prompt_ids, args.new_tokens)
                              for _ in range(args.warm_generations)] for name in ("warm", "warm_waiting")}
        names = list(runs)
        for round_ in range(args.runs):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                if name == "cold":
                    cold = await connect(swarm, VerificationPolicy())
                    try:
                        runs[name].append(await generate(cold, prompt_ids, args.new_tokens))
                    finally:
                        await cold.close()
                else:
                    runs[name].append(await generate(clients[name], prompt_ids, args.new_tokens))
        passed = {name: {peer_id[-8:]: n for peer_id, n in clients[name].router.health.passed_checks().items()}
                  for name in ("warm", "warm_waiting", "floor")}
    finally:
        for client in clients.values():
            await client.close()
    reference = runs["off"][0]["tokens"]
    out: dict = {"tokens_identical": all(r["tokens"] == reference for per in runs.values() for r in per),
                 "warm_clients_checks_passed_before_measuring": {name: sum(r["checks_passed"] for r in record)
                                                                 for name, record in warm_record.items()},
                 "floor_client_record_entered": floor_record,
                 "warm_clients_record_at_end": passed}
    for name, per in runs.items():
        out[name] = {"decode_tok_s": [round(r["decode_tok_s"], 2) for r in per],
                     "median_decode_tok_s": round(median([r["decode_tok_s"] for r in per]), 2),
                     "checks_per_run": [r["checks_passed"] for r in per]}
        if name != "off":
            ratios = [r["decode_tok_s"] / o["decode_tok_s"] for r, o in zip(per, runs["off"], strict=True)]
            out[name]["median_overhead_pct"] = round(100 * (1 - median(ratios)), 1)
    return out


async def liar_trial(swarm: LocalSwarm, prompt_ids: list[int], new_tokens: int, wrong_after: int,
                     reference: list[int]) -> dict:
    proc = swarm.start_peer(DEFAULT_MODEL_ID, "0:30", *PEER_FLAGS, "--throughput", "50000",
                            "--fault-wrong-after", str(wrong_after))
    liar = LocalSwarm.peer_id(proc)
    client = await connect(swarm, VerificationPolicy())
    try:
        for _ in range(100):  # until the client sees the liar (it must be routed through it to be tested)
            if liar in {s.peer_id for s in await client.spans(fresh=True)}:
                break
            await asyncio.sleep(0.2)
        await client.router.refresh()
        routed_through_liar = [link.peer.peer_id for link in await client.chain()] == [liar]
        result = await generate(client, prompt_ids, new_tokens, liar)
    finally:
        await client.close()
        proc.stop()
    first_wrong = wrong_after  # forwards 1..wrong_after are right: the prefill and decode steps 1..wrong_after - 1
    banned = result["banned_at_step"]
    return {"wrong_from_decode_step": first_wrong, "routed_through_liar": routed_through_liar,
            "banned_at_decode_step": banned,
            "steps_after_first_lie": None if banned is None else banned - first_wrong + 1,
            "tokens_equal_honest": result["tokens"] == reference, "failovers": result["failovers"]}


async def run(args) -> dict:
    torch.set_num_threads(1)
    _, tokenizer, prompt_ids = default_model_prompt(PROMPT)
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.start_bootstrap()
        for proc in [swarm.start_peer(DEFAULT_MODEL_ID, "0:30", *PEER_FLAGS, wait=False) for _ in range(2)]:
            LocalSwarm.peer_id(proc)  # announced
        cost = await overhead(swarm, prompt_ids, args)
        off = await connect(swarm, VerificationPolicy(rate=0))
        try:
            reference = (await generate(off, prompt_ids, args.liar_tokens))["tokens"]
        finally:
            await off.close()
        liars = {"from_first_decode_step": [await liar_trial(swarm, prompt_ids, args.liar_tokens, 1, reference)],
                 f"after_{args.late_after}_forwards": [
                     await liar_trial(swarm, prompt_ids, args.liar_tokens, args.late_after, reference)
                     for _ in range(args.late_trials)]}
    caught = [t["steps_after_first_lie"] for per in liars.values() for t in per]
    return {
        "benchmark": "verify", "machine": machine(), "versions": versions(),
        "settings": {"model": DEFAULT_MODEL_ID, "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens,
                     "runs": args.runs, "warm_generations": args.warm_generations, "policy": "default "
                     f"(rate {VerificationPolicy().rate}, warmup {VerificationPolicy().warmup})",
                     "honest_replicas": 2, "liar_tokens": args.liar_tokens},
        "text": tokenizer.decode(reference),
        "overhead": cost,
        "liars": liars,
        "max_steps_to_ban_after_first_lie": max((c for c in caught if c is not None), default=None),
        "all_liars_banned": all(c is not None for c in caught),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warm-generations", type=int, default=4)
    parser.add_argument("--liar-tokens", type=int, default=32)
    parser.add_argument("--late-after", type=int, default=8, help="the late liar's right forwards before its lies")
    parser.add_argument("--late-trials", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write DIR/verify.json")
    args = parser.parse_args()
    emit("verify", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
