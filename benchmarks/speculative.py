"""Speculative decoding (drafts by prompt lookup) on the path users run: one streaming chat at a time through
`uvicorn app.main:app` over HTTP, the gateway joined to 2 int4 peers of the default model (0:15, 15:30).

    python -m benchmarks.speculative [--rounds 3] [--delays 0,0.05] [--out benchmarks/results]

Per peer delay (0: loopback; d: every forward of each peer sleeps d seconds, `--fault-step-delay`, a stand-in for a
network's latency per hop until a link emulator exists: it delays a step as a link would, but also holds the peer),
one swarm and two gateways on it, GATEWAY_SPECULATIVE=off and =on, taking turns. Tasks, each greedy:
- `quote`: "Repeat this text word for word" over a ~400-token passage (the answer is its input);
- `edit`: "Fix the spelling" of the passage with a few typos, with the passage sent as the prediction (OpenAI's
  Predicted Outputs);
- `chat`: a free story (nothing to look up: speculation must not cost).
Per run: decode tok/s (tokens after the first ÷ time from the first to the last), time to first token, and the
drafted tokens kept and not kept (usage.completion_tokens_details); per task, medians and the ratio on ÷ off per
round, and whether the two gateways' texts were identical (they must be). JSON on stdout and in OUT/speculative.json.
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
from benchmarks.serve import free_port
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm

PASSAGE = (
    "The lighthouse stood on a spur of black rock at the northern end of the bay, and for forty years the same family "
    "had kept its lamp. Every evening at dusk the keeper climbed the one hundred and twelve steps of the spiral stair, "
    "trimmed the wick, polished the great lens until it shone, and wound the clockwork that turned it through the "
    "night. In the morning she wrote the weather in the logbook: the direction of the wind, the height of the swell, "
    "the ships that had passed and the time they passed. Most nights were quiet. Fishing boats came home late with "
    "their lanterns swinging, a cargo steamer crossed the horizon on its way to the southern ports, and once in a "
    "while a yacht anchored in the lee of the headland to wait out a storm. The keeper knew the sounds of the sea as "
    "well as the sounds of her own house: the long hiss of a calm tide over shingle, the boom of the winter waves in "
    "the cave below the tower, the sudden silence before a squall. When the new electric lamp was installed and the "
    "clockwork was taken away, she stayed on for another winter, climbing the stairs each evening out of habit, "
    "watching the beam sweep over the water that she had watched for most of her life."
)
TYPOS = PASSAGE.replace("lighthouse", "lighthuose").replace("evening", "evenning").replace("polished", "polshed") \
    .replace("weather", "wether").replace("horizon", "horizen").replace("squall", "squal")
TASKS = {
    "quote": {"content": f"Repeat this text word for word:\n\n{PASSAGE}", "prediction": None, "max_tokens": 128},
    "edit": {"content": f"Fix the spelling mistakes in this text and return all of it:\n\n{TYPOS}",
             "prediction": PASSAGE, "max_tokens": 128},
    "chat": {"content": "Write a short story about a robot who learns to paint.", "prediction": None,
             "max_tokens": 96},
}
# the free story sampled as chat frontends send it (texts then differ between runs; benchmarks.wan --tasks)
SAMPLED_CHAT = {**TASKS["chat"], "temperature": 0.7}


async def one_chat(port: int | str, task: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat of `task` through the gateway at 127.0.0.1:`port` (or the Unix socket at that path)."""
    body: dict[str, Any] = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": task["content"]}],
                            "max_tokens": task["max_tokens"], "temperature": task.get("temperature", 0),
                            "stream": True,
                            "stream_options": {"include_usage": True}}
    if task["prediction"]:
        body["prediction"] = {"type": "content", "content": task["prediction"]}
    stamps: list[float] = []
    text, usage = "", {}
    sent = time.perf_counter()
    transport = httpx.AsyncHTTPTransport(uds=port) if isinstance(port, str) else None
    base = "http://gateway" if isinstance(port, str) else f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=600, transport=transport) as client, client.stream(
            "POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text += choice["delta"]["content"]
    tokens = usage["completion_tokens"]
    details = usage["completion_tokens_details"]
    return {"decode_tok_s": (tokens - 1) / (stamps[-1] - stamps[0]), "ttft_s": stamps[0] - sent, "tokens": tokens,
            "kept": details["accepted_prediction_tokens"], "rejected": details["rejected_prediction_tokens"],
            "text": text}


async def interleave(targets: dict[str, int | str], tasks: dict[str, dict[str, Any]], rounds: int,
                     label: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """A warm-up chat on each gateway (`targets`: mode → port or socket), then `rounds` rounds of every task on
    each, the order of the modes alternating per round → task → mode → its runs (each printed, with `label`)."""
    for target in targets.values():
        await one_chat(target, {**TASKS["chat"], "max_tokens": 8})
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {mode: [] for mode in targets} for t in tasks}
    modes = list(targets)
    for round_ in range(rounds):
        for name, task in tasks.items():
            for mode in modes[:: 1 if round_ % 2 == 0 else -1]:
                result = await one_chat(targets[mode], task)
                runs[name][mode].append(result)
                print(json.dumps({**label, "round": round_, "task": name, "mode": mode,
                                  **{k: round(v, 3) for k, v in result.items() if k != "text"}}), flush=True)
    return runs


async def run_delay(delay: float, rounds: int, workdir: Path) -> dict[str, Any]:
    swarm = LocalSwarm(workdir)
    swarm.peer_env.pop("SWARM_PEER_QUANT", None)
    try:
        swarm.start_bootstrap()
        extra = ("--fault-step-delay", str(delay), "--throughput", "100") if delay else ()
        for proc in [swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--quant", "int4", "--num-threads", "1", *extra,
                                      wait=False) for blocks in ("0:15", "15:30")]:
            LocalSwarm.peer_id(proc)
        ports = {mode: free_port() for mode in ("off", "on")}
        for mode, port in ports.items():
            swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers),
                                       "GATEWAY_SPECULATIVE": mode})
        runs = await interleave(dict(ports), TASKS, rounds, {"delay": delay})
    finally:
        swarm.stop()
    out: dict[str, Any] = {}
    for name, modes in runs.items():
        entry: dict[str, Any] = {}
        for mode, results in modes.items():
            entry[mode] = {key: round(median([r[key] for r in results]), 3) for key in
                           ("decode_tok_s", "ttft_s", "tokens", "kept", "rejected")}
        ratios = [on["decode_tok_s"] / off["decode_tok_s"] for on, off in zip(modes["on"], modes["off"], strict=True)]
        entry["ratio_on_to_off"] = round(median(ratios), 3)
        entry["ratio_runs"] = [round(r, 3) for r in ratios]
        entry["identical_text"] = all(on["text"] == off["text"] for on, off in zip(modes["on"], modes["off"],
                                                                                  strict=True))
        out[name] = entry
    return out


async def run(args) -> dict[str, Any]:
    delays = [float(d) for d in args.delays.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for delay in delays:
            results[f"delay_{delay:g}"] = await run_delay(delay, args.rounds, Path(tmp) / f"delay-{delay:g}")
    return {"benchmark": "speculative", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "peers": "2 x int4 (0:15, 15:30), 1 thread each",
                         "rounds": args.rounds, "delays_s_per_peer_forward": delays,
                         "tasks": {k: {"max_tokens": v["max_tokens"], "prediction": bool(v["prediction"])}
                                   for k, v in TASKS.items()}},
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delays", default="0,0.05", help="per-peer forward delays in seconds, comma-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit("speculative", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
