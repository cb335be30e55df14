"""Many users on the path they run: N concurrent streaming chats through `uvicorn app.main:app` over HTTP.

    python -m benchmarks.serve [--streams 1,16,64] [--tokens 48] [--rounds 3] [--configs embedded,fp32_2,int4_2]
                               [--baseline DIR] [--out benchmarks/results]

Each configuration is a gateway as its own uvicorn process, started the way a user starts it:
- `embedded`: `uvicorn app.main:app` with no settings, so it starts its embedded swarm (the configuration
  `make serve` runs: one local peer of the default model, its default precision and threads);
- `fp32_2` / `int4_2`: the gateway joined to 2 peers (0:15, 15:30) started by hand with `--quant none` / `int4`;
  `int4_2_relay`: the same without push (`SWARM_PUSH=false`: every hop through the gateway, rounds in group frames);
- `embedded_p2p`: `embedded` with `EMBEDDED_LOCAL_SOCKET=false` (the gateway reaches its peer through the p2p
  daemons rather than a Unix socket); `embedded_draft`: `embedded` with `GATEWAY_DRAFT_MODEL=default` (the gateway
  drafts with a local copy of the served model, on the same 2 cores as its peer);
- `baseline`: `embedded` run from the checkout DIR of `--baseline` (another revision, e.g. `git worktree add DIR
  REV`; this checkout's Python environment), to compare a change with what it changes, side by side.
All gateways run for the whole benchmark, and rounds interleave every configuration and stream count (a slow spell of
the shared machine falls on all of them). A run sends N chat requests at once (`stream: true`, greedy, end-of-text
suppressed with logit_bias, `max_tokens` new tokens each; every prompt distinct, ~40 tokens with the template) and
reads the SSE streams with a raw httpx client. Per run: aggregate tok/s (all tokens ÷ first request sent → last
token received, prefills included), time to first token (p50 / p90 / max), inter-token latency (p50 / p90 / max over
every gap of every stream) and each stream's tok/s. JSON on stdout and in OUT/serve.json; ratios to one stream are
per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, machine, median, peak_rss_mib, versions
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

TOPICS = ["a lighthouse keeper", "a robot who paints", "a lost umbrella", "the first snow of winter",
          "a market at dawn", "an old violin", "a cat on a train", "a garden on the moon", "a letter never sent",
          "a broken clock",
          "a river that sings", "a chess game in the park", "a baker's secret", "a map with no names",
          "a kite in a storm", "a library at midnight"]


def prompt(round_: int, stream: int) -> str:
    """~40 tokens with SmolLM2's chat template (its default system prompt is 21 of them), distinct per stream and
    round: what a session parked by an earlier request can reuse is the system prompt, as for real users."""
    return f"Story {round_}.{stream}: write about {TOPICS[stream % len(TOPICS)]}."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def sse_chunks(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The parsed chunks of a streaming request, as they arrive; RuntimeError for a stream the gateway ended with an
    error."""
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the gateway ended a stream with an error: {chunk['error']}")
            yield chunk


async def one_stream(client: httpx.AsyncClient, url: str, text: str, tokens: int, eos: int,
                     extra: dict[str, Any] | None = None, model: str = DEFAULT_MODEL_ID) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": 0, "logit_bias": {str(eos): -100}, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    sent = time.perf_counter()
    stamps: list[float] = []
    completion_tokens = 0
    async for chunk in sse_chunks(client, url, body):
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    if completion_tokens != tokens or not stamps:
        raise RuntimeError(f"a stream ended with {completion_tokens} tokens, {len(stamps)} text chunks")
    return {"sent": sent, "stamps": stamps, "tokens": completion_tokens}


async def run_streams(port: int, streams: int, tokens: int, round_: int, eos: int,
                      extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                      model: str = DEFAULT_MODEL_ID) -> dict[str, Any]:
    """N streams at once of `model` (request fields `extra` added to each, `headers` sent with each) → the figures of
    the run."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        results = await asyncio.gather(*(one_stream(client, url, prompt(round_, i), tokens, eos, extra, model)
                                         for i in range(streams)))
    start = min(r["sent"] for r in results)
    end = max(r["stamps"][-1] for r in results)
    ttft = [r["stamps"][0] - r["sent"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    per_stream = [r["tokens"] / (r["stamps"][-1] - r["sent"]) for r in results]
    return {"streams": streams, "aggregate_tok_s": sum(r["tokens"] for r in results) / (end - start),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p90_s": percentile(ttft, 0.9), "ttft_max_s": max(ttft),
            "itl_p50_ms": 1000 * percentile(gaps, 0.5), "itl_p90_ms": 1000 * percentile(gaps, 0.9),
            "itl_max_ms": 1000 * max(gaps) if gaps else float("nan"),
            "stream_tok_s_min": min(per_stream), "stream_tok_s_median": statistics.median(per_stream)}


# name → peers started by hand (blocks, --quant, --num-threads) and the gateway's environment; no peers: the gateway
# starts its embedded swarm, as `make serve` does
CONFIGS: dict[str, dict[str, Any]] = {
    "embedded": {"peers": [], "env": {}},
    "baseline": {"peers": [], "env": {}},  # embedded, from the --baseline checkout
    "embedded_1t": {"peers": [], "env": {"EMBEDDED_NUM_THREADS": "1"}},  # the embedded peer's kernel on one thread
    "embedded_generic": {"peers": [], "env": {"SWARM_LEAN_DECODE": "0"}},  # decode rounds through the layers' own
    "embedded_sdpa": {"peers": [], "env": {"SWARM_NATIVE_ATTENTION": "0"}},  # decode rows' attention by torch's SDPA
    "embedded_a8": {"peers": [], "env": {"EMBEDDED_ACTIVATIONS": "int8"}},  # its int4 blocks with int8 activations
    "embedded_noamx": {"peers": [], "env": {"SWARM_AMX": "0"}},  # the kernel off the CPU's tile unit (cpu_amx.h)
    "embedded_generic_prefill": {"peers": [], "env": {"SWARM_LEAN_PREFILL": "0"}},  # chunks through the layers' own
    "embedded_p2p": {"peers": [], "env": {"EMBEDDED_LOCAL_SOCKET": "false"}},  # to its peer through the p2p daemons
    "embedded_nofork": {"peers": [], "env": {"SWARM_FORK_SESSIONS": "0"}},  # shared prefixes taken, not forked
    "embedded_kv16": {"peers": [], "env": {"SWARM_PEER_KV_DTYPE": "float16"}},  # its KV caches in float16
    # drafts from a local model (the served one: the only one sharing its tokenizer here) beside the embedded peer
    "embedded_draft": {"peers": [], "env": {"GATEWAY_DRAFT_MODEL": "default"}},
    "fp32_2": {"peers": [("0:15", "none", 1), ("15:30", "none", 1)], "env": {}},
    "int4_2": {"peers": [("0:15", "int4", 1), ("15:30", "int4", 1)], "env": {}},
    # the same with the peers' and the gateway's kernel off the CPU's tile unit (cpu_amx.h)
    "int4_2_noamx": {"peers": [("0:15", "int4", 1), ("15:30", "int4", 1)], "env": {"SWARM_AMX": "0"},
                     "peer_env": {"SWARM_AMX": "0"}},
    # the same without server-to-server push: every hop through the gateway, a round's steps in group frames
    "int4_2_relay": {"peers": [("0:15", "int4", 1), ("15:30", "int4", 1)], "env": {"SWARM_PUSH": "false"}},
    # candidates for the embedded default, each with the gateway's own torch threads pinned to 1
    "fp32_1x2": {"peers": [("0:30", "none", 2)], "env": {"OMP_NUM_THREADS": "1"}},
    "fp32_1x1": {"peers": [("0:30", "none", 1)], "env": {"OMP_NUM_THREADS": "1"}},
    "fp32_2x1": {"peers": [("0:15", "none", 1), ("15:30", "none", 1)], "env": {"OMP_NUM_THREADS": "1"}},
    "int4_1x2": {"peers": [("0:30", "int4", 2)], "env": {"OMP_NUM_THREADS": "1"}},
    "int4_1x1": {"peers": [("0:30", "int4", 1)], "env": {"OMP_NUM_THREADS": "1"}},
    "int4_2x1": {"peers": [("0:15", "int4", 1), ("15:30", "int4", 1)], "env": {"OMP_NUM_THREADS": "1"}},
}


def start_config(swarm: LocalSwarm, name: str, max_concurrent: int, baseline: Path | None = None) -> tuple[int, Any]:
    config = CONFIGS[name]
    if name == "baseline" and baseline is None:
        raise SystemExit("the baseline configuration needs --baseline DIR (a checkout of the revision to compare)")
    port = free_port()
    env = {"GATEWAY_MAX_CONCURRENT": str(max_concurrent), **config["env"]}
    swarm.peer_env.update(config.get("peer_env", {}))  # the peers' environment (and the gateway's)
    if config["peers"]:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--quant", quant, "--num-threads", str(threads),
                                  wait=False) for blocks, quant, threads in config["peers"]]
        for proc in procs:
            LocalSwarm.peer_id(proc)  # ready
        env["SWARM_INITIAL_PEERS"] = " ".join(swarm.initial_peers)
    return port, swarm.start_gateway(port, env, baseline if name == "baseline" else None)


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path)
    eos = tokenizer.eos_token_id
    counts = [int(n) for n in args.streams.split(",")]
    names = args.configs.split(",")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {n: [] for n in counts} for name in names}
    rss = {}
    with tempfile.TemporaryDirectory() as tmp:
        swarms = {}
        try:
            gateways = {}
            for name in names:
                # the embedded gateway starts its own swarm; the others each get their own bootstrap and peers,
                # with the environment a user's shell has (the launcher's test default of --quant none is not set)
                swarm = swarms[name] = LocalSwarm(Path(tmp) / name)
                swarm.peer_env.pop("SWARM_PEER_QUANT", None)
                gateways[name] = start_config(swarm, name, max(counts) + 8, args.baseline)
            for port, _ in gateways.values():  # warm-up: every path compiled and cached once
                await run_streams(port, 2, 8, -1, eos)
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                for name in order:
                    for n in counts:
                        result = await run_streams(gateways[name][0], n, args.tokens, round_, eos)
                        runs[name][n].append(result)
                        print(json.dumps({"round": round_, "config": name, **{k: round(v, 3) if isinstance(v, float)
                                                                               else v for k, v in result.items()}}),
                              flush=True)
            for name, (_, proc) in gateways.items():
                rss[name] = peak_rss_mib(proc.pid)
        finally:
            for swarm in swarms.values():
                swarm.stop()
    return {"benchmark": "serve", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "tokens": args.tokens, "rounds": args.rounds, "streams": counts,
                         "configs": {name: CONFIGS[name] for name in names}, "greedy": True, "eos_suppressed": True,
                         "baseline": None if args.baseline is None else {
                             "dir": str(args.baseline), "revision": _revision(args.baseline)},
                         "revision": _revision(Path(__file__).resolve().parent.parent)},
            "results": summarize(runs, counts), "peak_rss_mib": rss}


def _revision(checkout: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def summarize(runs: dict[str, dict[int, list[dict[str, Any]]]], counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, by_count in runs.items():
        entry: dict[str, Any] = {}
        for n in counts:
            rounds = by_count[n]
            figures = {key: round(median([r[key] for r in rounds]), 3) for key in rounds[0] if key != "streams"}
            figures["aggregate_tok_s_runs"] = [round(r["aggregate_tok_s"], 2) for r in rounds]
            if n != 1 and 1 in by_count:
                ratios = [r["aggregate_tok_s"] / one["aggregate_tok_s"] for r, one in zip(rounds, by_count[1],
                                                                                         strict=False)]
                figures["ratio_to_one_stream"] = round(median(ratios), 2)
                figures["ratio_runs"] = [round(x, 2) for x in ratios]
            entry[str(n)] = figures
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,16,64", help="comma-separated concurrent stream counts")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="embedded,fp32_2,int4_2", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of another revision, run as the `baseline` configuration")
    parser.add_argument("--out", default=None, help="also write DIR/serve.json")
    args = parser.parse_args()
    emit("serve", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
