"""One chat request alone, side by side with the real Petals 2.2 on this machine: time to first token and decode tok/s.

    benchmarks/petals.sh [--rounds 5] [--tokens 32] [--configs fp32_2,int4_2,embedded]   (sets up and starts Petals)

Petals: its DHT and 2 servers (0:15, 15:30; float32, its CPU default) started by ../shared/petals/petals_swarm.sh, and
its own client (../shared/petals/petals_bench.py, greedy, end-of-text suppressed, the chat template applied), a fresh
process per run: TTFT from its generate() call (session open included, tokenization not) to the first new token.
Ours: gateways started as benchmarks.serve starts them (`fp32_2` / `int4_2`: 2 peers 0:15 + 15:30; `embedded`: what
`make serve` runs), one streaming chat request over HTTP: TTFT from the request sent to the first token received
(template, tokenization, HTTP and SSE included). The same prompt text on both sides each round (distinct per round);
rounds interleave every side; medians; ratios ours ÷ Petals per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, machine, median, versions
from benchmarks.serve import CONFIGS, one_stream, prompt, start_config
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

PETALS_BENCH = Path(__file__).resolve().parents[2] / "shared" / "petals" / "petals_bench.py"


def start_ours(names: list[str], tmp: str, sessions: int, swarms: dict[str, LocalSwarm]) -> dict[str, int]:
    """Our configs' swarms and gateways as benchmarks.serve starts them (with the user's defaults), taking `sessions`
    at once: their gateways' ports by name. `swarms` gets each swarm as it starts (the caller stops them)."""
    ports = {}
    for name in names:
        swarm = swarms[name] = LocalSwarm(Path(tmp) / name)
        swarm.peer_env.pop("SWARM_PEER_QUANT", None)  # the user's defaults, not the tests'
        ports[name] = start_config(swarm, name, sessions)[0]
    return ports


def petals_run(args, text: str) -> dict[str, float]:
    out = subprocess.run([args.petals_py, str(PETALS_BENCH), args.petals_maddr, args.petals_model, args.petals_prefix,
                          text, str(args.tokens), "1", "--noeos", "--warmup", "0"],
                         capture_output=True, text=True, timeout=900)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise RuntimeError(f"petals_bench: {result['error']}")
    return {"ttft_s": result["ttft_s"][0], "decode_tok_s": result["decode_tok_s"][0]}


async def ours_run(port: int, text: str, tokens: int, eos: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await one_stream(client, f"http://127.0.0.1:{port}/v1/chat/completions", text, tokens, eos)
    stamps = r["stamps"]
    return {"ttft_s": stamps[0] - r["sent"], "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def versus_petals(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per side (one is "petals"): every run's TTFT and decode tok/s (and end-to-end tok/s where the runs have it),
    their medians, and the other sides' ratios to Petals per round (medians)."""
    keys = [key for key in ("ttft_s", "decode_tok_s", "e2e_tok_s") if all(key in r for r in runs["petals"])]
    out: dict[str, Any] = {}
    for side, per in runs.items():
        entry: dict[str, Any] = {key: [round(r[key], 3) for r in per] for key in keys}
        for key in keys:
            entry[f"median_{key}"] = round(median(entry[key]), 3 if key == "ttft_s" else 2)
        if side != "petals":
            pairs = list(zip(per, runs["petals"], strict=True))
            for key in keys:
                entry[f"{key.split('_')[0]}_vs_petals"] = round(median([o[key] / p[key] for o, p in pairs]), 3)
        out[side] = entry
    return out


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    eos = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path).eos_token_id
    names = args.configs.split(",")
    sides = ["petals", *names]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        swarms: dict[str, LocalSwarm] = {}
        try:
            ports = start_ours(names, tmp, 8, swarms)
            for name in names:  # warm-up: first-call costs on every side
                await ours_run(ports[name], prompt(-1, 0), 8, eos)
            petals_run(args, prompt(-1, 0))
            for round_ in range(args.rounds):
                text = prompt(round_, 0)
                for side in sides[round_ % len(sides):] + sides[: round_ % len(sides)]:
                    result = petals_run(args, text) if side == "petals" else await ours_run(ports[side], text,
                                                                                            args.tokens, eos)
                    runs[side].append(result)
                    print(json.dumps({"round": round_, "side": side, **{k: round(v, 3) for k, v in result.items()}}),
                          flush=True)
        finally:
            for swarm in swarms.values():
                swarm.stop()
    out = versus_petals(runs)
    return {"benchmark": "petals", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "tokens": args.tokens, "rounds": args.rounds,
                         "petals": "2.2, 2 servers 0:15 + 15:30, float32, its own client in a fresh process per run",
                         "ours": {name: CONFIGS[name] for name in names}, "greedy": True, "eos_suppressed": True},
            "results": out}


def petals_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the running Petals is (benchmarks/petals.sh and petals_sessions.sh pass them)."""
    parser.add_argument("--petals-maddr", required=True)
    parser.add_argument("--petals-py", required=True)
    parser.add_argument("--petals-model", required=True)
    parser.add_argument("--petals-prefix", required=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.petals", description=__doc__.splitlines()[0])
    petals_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--configs", default="fp32_2,int4_2,embedded", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=None, help="also write DIR/petals.json")
    args = parser.parse_args()
    emit("petals", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
