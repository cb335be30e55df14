"""What a grammar costs per token: structured outputs against free text, through `uvicorn app.main:app` over HTTP.

    python -m benchmarks.grammar [--streams 1,16] [--tokens 48] [--rounds 3] [--out benchmarks/results]

One embedded gateway (the configuration `make serve` runs). A run sends N streaming chats at once, `max_tokens`
each, greedy, end-of-text suppressed, either free (`text`) or with `response_format` `json_schema` (`json`): a story
object whose schema needs more than `max_tokens` tokens (a string of at least 400 characters), so both variants
generate exactly `max_tokens` tokens and their aggregate tok/s and inter-token latencies compare directly. Variants
alternate within each round; medians of per-round ratios. The grammar's share: its masks are computed (llguidance,
in a worker thread) while the peers compute the next forward, so only a mask not ready when the logits arrive adds
latency.

Also, in this process: the time from a token to its row's next mask applied to the logits (SmolLM2's 49k vocabulary),
waited for at once, as if the forward took no time, along a real answer of this schema, per token (median, p90,
max), for 1 row and for 16 rows at once (one constraint of 16 rows, as `n` = 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import emit, machine, median, versions
from benchmarks.serve import percentile, run_streams, start_config
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "story"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "story": {"type": "string", "minLength": 400, "maxLength": 2000}}}
JSON = {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA,
                                                                    "strict": True}}}
VARIANTS = {"text": None, "json": JSON}


def mask_times(tokenizer: Any, rows: int, steps: int = 64) -> list[float]:
    """Seconds per mask computation of a `rows`-row constraint, along one valid answer of SCHEMA."""
    from swarm.client.grammar import Grammars
    from swarm.client.requests import Grammar

    grammars = Grammars(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    answer = json.dumps({"title": "The keeper", "story": "The lighthouse keeper counted the ships. " * 20})
    ids = tokenizer.encode(answer, add_special_tokens=False)[:steps]
    constraint = grammars.constraint(Grammar("json_schema", json.dumps(SCHEMA)), rows)
    logits = torch.zeros(rows, len(tokenizer))
    constraint.apply(logits)
    times = []
    for token in ids:
        constraint.advance(torch.tensor([token] * rows))
        started = time.perf_counter()  # the next masks, waited for at once: as if the forward took no time
        constraint.apply(logits)
        times.append(time.perf_counter() - started)
    return times


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path)
    eos = tokenizer.eos_token_id
    counts = [int(n) for n in args.streams.split(",")]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {v: {n: [] for n in counts} for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(Path(tmp))
        swarm.peer_env.pop("SWARM_PEER_QUANT", None)
        try:
            port, _ = start_config(swarm, "embedded", max(counts) + 8)
            for extra in VARIANTS.values():
                await run_streams(port, 2, 8, -1, eos, extra)  # warm-up
            for round_ in range(args.rounds):
                order = list(VARIANTS)[round_ % 2:] + list(VARIANTS)[: round_ % 2]
                for n in counts:
                    for name in order:
                        result = await run_streams(port, n, args.tokens, round_, eos, VARIANTS[name])
                        runs[name][n].append(result)
                        print(json.dumps({"round": round_, "variant": name, **{
                            k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}}), flush=True)
        finally:
            swarm.stop()
    results: dict[str, Any] = {}
    for n in counts:
        entry: dict[str, Any] = {}
        for name in VARIANTS:
            rounds = runs[name][n]
            entry[name] = {key: round(median([r[key] for r in rounds]), 3) for key in rounds[0] if key != "streams"}
            entry[name]["aggregate_tok_s_runs"] = [round(r["aggregate_tok_s"], 2) for r in rounds]
        ratios = [j["aggregate_tok_s"] / t["aggregate_tok_s"] for j, t in zip(runs["json"][n], runs["text"][n],
                                                                            strict=True)]
        itl = [j["itl_p50_ms"] / t["itl_p50_ms"] for j, t in zip(runs["json"][n], runs["text"][n], strict=True)]
        entry["json_tok_s_over_text"] = round(median(ratios), 3)
        entry["json_itl_p50_over_text"] = round(median(itl), 3)
        entry["added_per_token_pct"] = round(100 * (1 / median(ratios) - 1), 1)
        results[str(n)] = entry
    masks = {}
    for rows in (1, 16):
        times = mask_times(tokenizer, rows)
        masks[f"{rows}_rows_ms"] = {"median": round(1000 * median(times), 3),
                                    "p90": round(1000 * percentile(times, 0.9), 3),
                                    "max": round(1000 * max(times), 3)}
    return {"benchmark": "grammar", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "tokens": args.tokens, "rounds": args.rounds, "streams": counts,
                         "config": "embedded", "schema": SCHEMA, "greedy": True, "eos_suppressed": True},
            "results": results, "mask_compute": masks}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grammar", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,16", help="comma-separated concurrent stream counts")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write OUT/grammar.json")
    args = parser.parse_args()
    emit("grammar", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
