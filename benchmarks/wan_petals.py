"""Side by side with the real Petals 2.2 across hosts at wide-area latency: the same test bed as `benchmarks.wan`
(every process in its own network namespace, every packet through `tests.netem`), both systems on the same hosts.

    python -m benchmarks.wan_petals [--rtt 100] [--rounds 3] [--task chat|quote] [--tokens N] [--draft-model REF]
                                    [--out DIR]

Hosts: `boot` (our DHT bootstrap node and Petals' DHT), `a` (blocks 0:15 of the default model: one of our peers and
one Petals server), `b` (15:30: the same), `gw` (our gateways and Petals' client). Ours: peers at their default
precision, one thread each; three gateways: `ours` (as a user runs it: push, GATEWAY_SPECULATIVE=auto, which drafts
for a lone chat), `ours_nospec` (push, speculation off) and `ours_relay` (SWARM_PUSH=false, speculation off).
Petals: float32 (its CPU default), its own client (../shared/petals/petals_bench.py, greedy, end-of-text suppressed,
chat template applied) in a fresh process per run, from the `gw` host. The same prompt on every side each round
(distinct per round), sides in rotating order; medians; ratios ours ÷ Petals per round. Tasks: `chat` (a ~40-token
request for a story: free text, where drafts by prompt lookup find little) and `quote` (repeat a ~400-token passage
word for word, `benchmarks.speculative`'s input-grounded task, numbered per round). Decode tok/s is (tokens - 1) /
(last token's time - first token's) on every side; end to end is tokens / (last token's time - request sent).
`--draft-model REF`: a fourth gateway, `ours_draft`, as `ours` with GATEWAY_DRAFT_MODEL=REF (drafts from that local
model where prompt lookup finds none; results then in wan_petals_draft[_quote].json). Petals is set up first if
needed (../shared/petals/petals_setup.sh, ~3 min). Idle peers of the other system stay up while one runs (they cost
little).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, machine, versions
from benchmarks.petals import versus_petals
from benchmarks.serve import one_stream, prompt
from benchmarks.speculative import TASKS
from benchmarks.wan import start_gateway, start_swarm
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.netbed import NetBed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "petals"
PETALS_VENV = Path("/tmp/petals-venv")
PETALS_MODEL = Path("/tmp/petals-model")
PETALS_PREFIX = "smollm2-petals-wan"
PETALS_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
              "TOKENIZERS_PARALLELISM": "false"}
GATEWAYS = {
    "ours": {},
    "ours_nospec": {"GATEWAY_SPECULATIVE": "off"},
    "ours_relay": {"GATEWAY_SPECULATIVE": "off", "SWARM_PUSH": "false"},
}


def petals_ready() -> None:
    if not (PETALS_VENV / "bin" / "python").exists() or not (PETALS_MODEL / ".petals-model-ok").exists():
        subprocess.run(["bash", str(SHARED / "petals_setup.sh")], check=True, cwd=Path(__file__).resolve().parents[1])


def start_petals(bed: NetBed) -> str:
    """Petals' DHT on `boot` and a server per span on `a` and `b`, ready; the DHT's multiaddr."""
    python = str(PETALS_VENV / "bin" / "python")
    boot = bed.address("boot")
    dht = bed.spawn("boot", "petals-dht", ["-m", "petals.cli.run_dht", "--host_maddrs", f"/ip4/{boot}/tcp/31338"],
                    PETALS_ENV, python=python)
    maddr = dht.wait_for(rf"(/ip4/{re.escape(boot)}/tcp/31338/p2p/[A-Za-z0-9]+)", timeout=300).group(1)
    servers = [bed.spawn(host, f"petals-{host}", ["-m", "petals.cli.run_server", str(PETALS_MODEL), "--initial_peers",
                                                  maddr, "--block_indices", span, "--dht_prefix", PETALS_PREFIX,
                                                  "--device", "cpu", "--torch_dtype", "float32", "--throughput", "1",
                                                  "--host_maddrs", f"/ip4/{bed.address(host)}/tcp/0",
                                                  "--no_auto_relay"], PETALS_ENV, python=python)
               for host, span in (("a", "0:15"), ("b", "15:30"))]
    for server in servers:
        server.wait_for(r"(^|[\] ])Started", timeout=600)
    return maddr


def petals_run(bed: NetBed, maddr: str, text: str, tokens: int) -> dict[str, float]:
    out = bed.run("gw", ["env", *(f"{k}={v}" for k, v in PETALS_ENV.items()), str(PETALS_VENV / "bin" / "python"),
                         str(SHARED / "petals_bench.py"), maddr, str(PETALS_MODEL), PETALS_PREFIX, text, str(tokens),
                         "1", "--noeos", "--warmup", "0"], timeout=900)
    result = json.loads(out.strip().splitlines()[-1])
    if "error" in result:
        raise RuntimeError(f"petals_bench: {result['error']}")
    ttft, decode, made = result["ttft_s"][0], result["decode_tok_s"][0], result["n_tokens"][0]
    if made != tokens or not decode:
        raise RuntimeError(f"petals_bench made {made} tokens of {tokens}")
    return {"ttft_s": ttft, "decode_tok_s": decode, "e2e_tok_s": made / (ttft + (made - 1) / decode)}


async def ours_run(socket: str, text: str, tokens: int, eos: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600, transport=httpx.AsyncHTTPTransport(uds=socket)) as client:
        r = await one_stream(client, "http://gateway/v1/chat/completions", text, tokens, eos)
    stamps = r["stamps"]  # a text chunk's arrival; a chunk may carry more than one token when drafts are kept
    return {"ttft_s": stamps[0] - r["sent"], "decode_tok_s": (r["tokens"] - 1) / (stamps[-1] - stamps[0]),
            "e2e_tok_s": r["tokens"] / (stamps[-1] - r["sent"])}


def task_prompt(task: str, round_: int) -> str:
    """The request's text: a chat's own per round, or the passage to quote behind a round number (so that no side
    reuses a previous round's prompt beyond the chat template's system prompt)."""
    return prompt(round_, 0) if task == "chat" else f"({round_ + 1}) {TASKS['quote']['content']}"


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    reason = NetBed.available()
    if reason is not None:
        raise SystemExit(f"no test bed here: {reason}")
    petals_ready()
    gateways = dict(GATEWAYS)
    if args.draft_model:
        gateways["ours_draft"] = {"GATEWAY_DRAFT_MODEL": args.draft_model}
    eos = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path).eos_token_id
    sides = ["petals", *gateways]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp, NetBed(["boot", "a", "b", "gw"], Path(tmp),
                                                      delay_ms=args.rtt / 2) as bed:
        initial = start_swarm(bed, {"a": "0:15", "b": "15:30"})
        sockets = {name: start_gateway(bed, name, initial, env) for name, env in gateways.items()}
        maddr = start_petals(bed)
        measured = bed.rtt_ms("gw", "a")
        for name in gateways:  # warm-up: first-call costs on every side
            await ours_run(sockets[name], prompt(-1, 0), 8, eos)
        petals_run(bed, maddr, prompt(-1, 0), 8)
        for round_ in range(args.rounds):
            text = task_prompt(args.task, round_)
            for side in sides[round_ % len(sides):] + sides[: round_ % len(sides)]:
                result = (petals_run(bed, maddr, text, args.tokens) if side == "petals"
                          else await ours_run(sockets[side], text, args.tokens, eos))
                runs[side].append(result)
                print(json.dumps({"round": round_, "side": side, **{k: round(v, 3) for k, v in result.items()}}),
                      flush=True)
    out: dict[str, Any] = {"rtt_ms_measured": round(measured, 1), **versus_petals(runs)}
    return {"benchmark": "wan_petals", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "rtt_ms": args.rtt, "tokens": args.tokens, "rounds": args.rounds,
                         "task": args.task,
                         "link": "tests.netem: one-way delay = RTT / 2 between every two hosts",
                         "petals": "2.2, servers 0:15 and 15:30 on two hosts, float32, its own client per run",
                         "ours": "peers 0:15 and 15:30 on the same hosts, default precision, 1 thread; gateways: "
                                 + ", ".join(f"{k} {v or 'defaults'}" for k, v in gateways.items()),
                         "greedy": True, "eos_suppressed": True},
            "results": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt", type=float, default=100.0, help="round-trip time between hosts, ms")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=None, help="tokens to generate (default: chat 32, quote 128)")
    parser.add_argument("--task", choices=("chat", "quote"), default="chat")
    parser.add_argument("--draft-model", default="", help="also a gateway drafting with this local model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = 32 if args.task == "chat" else 128
    name = "wan_petals" + ("_draft" if args.draft_model else "") + ("" if args.task == "chat" else f"_{args.task}")
    emit(name, asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
