"""Many users behind one API key (a chat frontend's): conversations that share a system prompt, through HTTP.

    python -m benchmarks.users [--users 16] [--rounds 3] [--configs embedded,embedded_nofork] [--baseline DIR]
                               [--out DIR]

A chat frontend sends every user's requests with its one key and its one system prompt. Per round, through `make
serve`'s gateway (each configuration its own, as in benchmarks.serve; rounds interleave them):
- `first`: N users start a conversation at once (the system prompt, a question of their own), 32 tokens each;
- `newcomers`: N other users start theirs at once;
- `second`: the first N users' second turns at once (their history, a follow-up), 16 tokens each;
- `joining`: N visitors start conversations 0.15 s apart, 32 tokens each: most arrive while others decode, as
  users of a frontend do (their forks join running rounds).
Per phase: time to first token p50 / p90 / max, the prompt tokens the gateway reports as cached (usage), and the
aggregate tok/s. `embedded` forks a parked session's shared prefix into each newcomer's session (swarm.protocol:
fork) and leaves the parked conversations for their second turns; `embedded_nofork` (SWARM_FORK_SESSIONS=0) takes the
parked sessions as before forks existed, so newcomers rewind the first users' sessions and their second turns
compute their history again. Greedy, end-of-text suppressed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, machine, median, versions
from benchmarks.serve import CONFIGS, _revision, percentile, sse_chunks, start_config
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

SYSTEM = ("You are Marigold, the assistant of a community gardening website. Answer in plain words, briefly and "
          "kindly. If a question is not about gardens, plants, soil or weather, say so politely and suggest where "
          "the user might look instead. Never invent facts about plant safety.")
QUESTIONS = ["how to start a compost heap", "when to plant garlic", "why tomato leaves curl", "how deep to sow peas",
             "how to keep slugs off lettuce", "what to grow in shade", "how often to water basil",
             "how to prune roses", "which herbs grow well together", "how to save seeds from beans",
             "what makes soil acidic", "how to protect plants from frost", "when to harvest potatoes",
             "how to attract bees", "why my cucumbers are bitter", "how to grow strawberries in pots"]


PHASES = ("first", "newcomers", "second", "joining")
JOIN_GAP_S = 0.15  # between the arrivals of the `joining` phase


def conversation(round_: int, user: int, newcomer: bool = False, visitor: bool = False) -> list[dict[str, str]]:
    topic = QUESTIONS[user % len(QUESTIONS)]
    who = "A visitor" if visitor else "Another gardener" if newcomer else "A gardener"
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{who} ({round_}.{user}) asks: {topic}?"}]


async def chat(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], tokens: int,
               eos: int) -> dict[str, Any]:
    body = {"model": DEFAULT_MODEL_ID, "messages": messages, "max_tokens": tokens, "temperature": 0,
            "logit_bias": {str(eos): -100}, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, text, usage = None, [], None
    async for chunk in sse_chunks(client, url, body):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                first = first or time.perf_counter()
                text.append(choice["delta"]["content"])
    if usage is None or first is None or usage["completion_tokens"] != tokens:
        raise RuntimeError(f"a stream ended without its {tokens} tokens or its usage")
    return {"ttft": first - sent, "end": time.perf_counter(), "sent": sent, "text": "".join(text),
            "cached": usage["prompt_tokens_details"]["cached_tokens"], "prompt": usage["prompt_tokens"],
            "tokens": tokens}


async def phase(client: httpx.AsyncClient, url: str, conversations: list[list[dict[str, str]]], tokens: int,
                eos: int, gap: float = 0.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The conversations' next turns, sent at once (or `gap` seconds apart)."""
    async def later(i: int, messages: list[dict[str, str]]) -> dict[str, Any]:
        await asyncio.sleep(i * gap)
        return await chat(client, url, messages, tokens, eos)

    results = await asyncio.gather(*(later(i, messages) for i, messages in enumerate(conversations)))
    ttft = [r["ttft"] for r in results]
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    return {"ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p90_s": round(percentile(ttft, 0.9), 3),
            "ttft_max_s": round(max(ttft), 3), "cached_tokens": sum(r["cached"] for r in results),
            "prompt_tokens": sum(r["prompt"] for r in results),
            "aggregate_tok_s": round(sum(r["tokens"] for r in results) / wall, 2)}, results


async def one_round(port: int, users: int, round_: int, eos: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        first_turns = [conversation(round_, u) for u in range(users)]
        first, answers = await phase(client, url, first_turns, 32, eos)
        newcomers, _ = await phase(client, url, [conversation(round_, u, newcomer=True) for u in range(users)], 32,
                                   eos)
        second_turns = [[*messages, {"role": "assistant", "content": answer["text"]},
                         {"role": "user", "content": "Thank you. What is the most common mistake there?"}]
                        for messages, answer in zip(first_turns, answers, strict=True)]
        second, _ = await phase(client, url, second_turns, 16, eos)
        joining, _ = await phase(client, url, [conversation(round_, u, visitor=True) for u in range(users)], 32, eos,
                                 JOIN_GAP_S)
    return {"first": first, "newcomers": newcomers, "second": second, "joining": joining}


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    eos = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path).eos_token_id
    names = args.configs.split(",")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        swarms = {name: LocalSwarm(Path(tmp) / name) for name in names}
        try:
            gateways = {}
            for name, swarm in swarms.items():
                swarm.peer_env.pop("SWARM_PEER_QUANT", None)
                gateways[name] = start_config(swarm, name, 2 * args.users + 8, args.baseline)
            for port, _ in gateways.values():  # warm-up, and a first set of parked sessions
                await one_round(port, 2, -1, eos)
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                for name in order:
                    figures = await one_round(gateways[name][0], args.users, round_, eos)
                    rounds[name].append(figures)
                    print(json.dumps({"round": round_, "config": name, **figures}), flush=True)
        finally:
            for swarm in swarms.values():
                swarm.stop()
    summary = {name: {part: {key: median([r[part][key] for r in runs]) for key in runs[0][part]}
                      for part in PHASES} for name, runs in rounds.items()}
    return {"benchmark": "users", "machine": machine(), "versions": versions(),
            "settings": {"users": args.users, "rounds": args.rounds, "configs": {n: CONFIGS[n] for n in names},
                         "tokens": {"first": 32, "newcomers": 32, "second": 16, "joining": 32},
                         "join_gap_s": JOIN_GAP_S,
                         "baseline": None if args.baseline is None else {
                             "dir": str(args.baseline), "revision": _revision(args.baseline)}},
            "rounds": rounds, "median": summary}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.users", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="embedded,embedded_nofork")
    parser.add_argument("--out", default=None, help="also write DIR/users.json")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of another revision, run as the `baseline` configuration (benchmarks.serve)")
    args = parser.parse_args()
    emit("users", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
