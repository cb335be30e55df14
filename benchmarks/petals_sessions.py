"""Concurrent sessions on one server, side by side with the real Petals 2.2: does its server batch their decode steps?

    benchmarks/petals_sessions.sh [--sessions 1,4,8] [--rounds 3] [--tokens 48] [--configs fp32_1x2] [--out DIR]

Petals: its DHT and ONE server holding all 30 blocks (0:30; float32, its CPU default) started by
../shared/petals/petals_swarm.sh. A run launches N processes of its own client (../shared/petals/petals_bench.py,
greedy, end-of-text suppressed, the chat template applied, 1 run, no warm-up) at once, each with a distinct prompt.
Loading a client takes seconds (N at once on 2 cores: longer), so each client is held at a start line inside its
generate() call until all N are there (a few lines run around petals_bench.py, below: it is otherwise unchanged), and
notes when each of its new tokens arrives (the times petals_bench.py itself measures from).
Ours: a gateway and its peers as benchmarks.serve starts them (`fp32_1x2`: one fp32 peer 0:30 with 2 threads, the
closest to that Petals server), N streaming chat requests at once over HTTP with the same prompts; its "tokens" are
the stream's content chunks (a chunk may hold more than one token: if anything, ours' rates are understated).
Per run, from every session's token times (decode = after its first token): each session's decode tok/s ((n-1) /
first→last token), `sum_tok_s` (their sum), `span_tok_s` (all decode tokens ÷ earliest first token → latest last
token) and `overlap_tok_s` (the tokens that arrived while all N sessions were decoding ÷ that interval: the aggregate
rate of N sessions at once). A server that runs sessions' steps one after another gives aggregate(N) ≈ aggregate(1)
and a session 1/N of its rate alone; one that batches them gives more. Rounds interleave both sides and every N
(order rotated per round); medians, ratios to N=1 per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, machine, median, versions
from benchmarks.petals import PETALS_BENCH, petals_arguments, start_ours
from benchmarks.serve import CONFIGS, one_stream, prompt
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

# Run with the Petals venv's python as `-c CLIENT petals_bench.py ARGS...`: petals_bench.py as it is, its model's
# generate() made to wait for the file $PS_GO (after touching $PS_READY), then to write its token times to $PS_STAMPS.
CLIENT = """
import json, os, runpy, sys, time
import petals

auto, load = petals.AutoDistributedModelForCausalLM, petals.AutoDistributedModelForCausalLM.from_pretrained

def from_pretrained(*args, **kwargs):
    model = load(*args, **kwargs)
    generate = model.generate

    def gated(*a, **kw):
        open(os.environ["PS_READY"], "w").close()
        while not os.path.exists(os.environ["PS_GO"]):
            time.sleep(0.01)
        go = time.perf_counter()
        out = generate(*a, **kw)
        with open(os.environ["PS_STAMPS"], "w") as f:
            json.dump({"go": go, "stamps": kw["streamer"].times}, f)
        return out

    model.generate = gated
    return model

auto.from_pretrained = from_pretrained
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def figures(sessions: list[list[float]], start: float) -> dict[str, Any]:
    """The run's figures from each session's token arrival times (perf_counter: one clock for every process)."""
    rates = [(len(s) - 1) / (s[-1] - s[0]) for s in sessions]
    first, last = min(s[0] for s in sessions), max(s[-1] for s in sessions)
    all_in, first_out = max(s[0] for s in sessions), min(s[-1] for s in sessions)  # all N decoding in between
    overlap = sum(1 for s in sessions for t in s[1:] if all_in < t <= first_out)
    return {
        "session_tok_s": [round(r, 3) for r in rates],
        "sum_tok_s": sum(rates),
        "span_tok_s": sum(len(s) - 1 for s in sessions) / (last - first),
        "overlap_tok_s": overlap / (first_out - all_in) if first_out - all_in > 0.5 else None,
        "overlap_s": first_out - all_in,
        "ttft_max_s": all_in - start,
    }


def petals_run(args, n: int, round_: int, tokens: int, tmp: Path) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    go = run_dir / "go"
    client = [args.petals_py, "-c", CLIENT, str(PETALS_BENCH), args.petals_maddr, args.petals_model, args.petals_prefix]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    try:
        for i in range(n):
            files = {"PS_READY": str(run_dir / f"ready{i}"), "PS_GO": str(go), "PS_STAMPS": str(run_dir / f"stamps{i}")}
            with open(run_dir / f"client{i}.log", "wb") as log:
                argv = [*client, prompt(round_, i), str(tokens), "1", "--noeos", "--warmup", "0"]
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        env={**env, **files},
                        text=True,
                        start_new_session=True,
                    )
                )  # its group: killed below
        deadline = time.monotonic() + 600
        while not all((run_dir / f"ready{i}").exists() for i in range(n)):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                i = next((i for i, p in enumerate(procs) if p.poll() is not None), 0)
                tail = (run_dir / f"client{i}.log").read_text()[-2000:]
                raise RuntimeError(f"Petals client {i} did not get ready: {tail}")
            time.sleep(0.05)
        go.touch()
        deadline = time.monotonic() + 900  # for all of them, not each
        outs = [
            json.loads(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].strip().splitlines()[-1])
            for p in procs
        ]
    finally:
        for p in procs:  # the clients' own DHT processes and p2pd are in their process groups
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    if errors := [o["error"] for o in outs if "error" in o]:
        raise RuntimeError(f"petals_bench: {errors}")
    stamps = [json.loads((run_dir / f"stamps{i}").read_text()) for i in range(n)]
    result = figures([s["stamps"] for s in stamps], min(s["go"] for s in stamps))
    result["petals_bench_tok_s"] = [round(o["decode_tok_s"][0], 3) for o in outs]  # its own figure: the same rates
    return result


async def ours_run(port: int, n: int, round_: int, tokens: int, eos: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        results = await asyncio.gather(
            *(
                one_stream(client, f"http://127.0.0.1:{port}/v1/chat/completions", prompt(round_, i), tokens, eos)
                for i in range(n)
            )
        )
    return figures([r["stamps"] for r in results], min(r["sent"] for r in results))


def summarize(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, by_n in runs.items():
        out[side] = {}
        for n, rounds in by_n.items():
            entry: dict[str, Any] = {
                "session_tok_s": round(median([x for r in rounds for x in r["session_tok_s"]]), 2),
                "ttft_max_s": round(median([r["ttft_max_s"] for r in rounds]), 3),
            }
            for key in ("overlap_tok_s", "sum_tok_s", "span_tok_s"):  # overlap: None where under 0.5 s
                values = [r[key] for r in rounds if r[key] is not None]
                entry[key] = round(median(values), 2) if values else None
                entry[f"{key}_runs"] = [None if r[key] is None else round(r[key], 2) for r in rounds]
                pairs = [(r[key], one[key]) for r, one in zip(rounds, by_n[1], strict=True) if r[key] and one[key]]
                if n != 1 and pairs:
                    entry[f"{key}_vs_1"] = round(median([x / one for x, one in pairs]), 2)
            entry["runs"] = rounds
            out[side][str(n)] = entry
    return out


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    eos = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path).eos_token_id
    counts = [int(n) for n in args.sessions.split(",")]
    assert counts[0] == 1, "the ratios are to one session: --sessions starts with 1"
    names = args.configs.split(",")
    sides = ["petals", *names]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {side: {n: [] for n in counts} for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        swarms: dict[str, LocalSwarm] = {}
        try:
            ports = start_ours(names, tmp, max(counts) + 8, swarms)
            for name in names:  # warm-up: first-call costs on every side
                await ours_run(ports[name], 2, -1, 8, eos)
            petals_run(args, 1, -1, 4, Path(tmp))
            for round_ in range(args.rounds):
                for n in counts[round_ % len(counts) :] + counts[: round_ % len(counts)]:
                    for side in sides[round_ % len(sides) :] + sides[: round_ % len(sides)]:
                        if side == "petals":
                            result = petals_run(args, n, round_, args.tokens, Path(tmp))
                        else:
                            result = await ours_run(ports[side], n, round_, args.tokens, eos)
                        runs[side][n].append(result)
                        print(
                            json.dumps(
                                {
                                    "round": round_,
                                    "side": side,
                                    "n": n,
                                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
                                }
                            ),
                            flush=True,
                        )
        finally:
            for swarm in swarms.values():
                swarm.stop()
    return {
        "benchmark": "petals_sessions",
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "model": DEFAULT_MODEL_ID,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "sessions": counts,
            "petals": "2.2, 1 server 0:30, float32; N of its own clients (a process each) at once, "
            "held at a start line in generate()",
            "ours": {name: CONFIGS[name] for name in names},
            "greedy": True,
            "eos_suppressed": True,
        },
        "results": summarize(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.petals_sessions", description=__doc__.splitlines()[0])
    petals_arguments(parser)
    parser.add_argument("--sessions", default="1,4,8", help="comma-separated concurrent session counts, 1 first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--configs", default="fp32_1x2", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=None, help="also write DIR/petals_sessions.json")
    args = parser.parse_args()
    if args.tokens < 8:
        parser.error("--tokens: at least 8 (a session's decode rate needs tokens after its first)")
    emit("petals_sessions", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
