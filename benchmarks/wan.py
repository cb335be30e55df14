"""Decoding across hosts at wide-area latency: peers, the bootstrap node and the gateway each in its own network
namespace, every packet through `tests.netem`'s link emulator (`tests.netbed`).

    python -m benchmarks.wan [--rtts 10,50,100] [--rounds 2] [--failover-rtt 50] [--hops] [--draft-model REF]
                             [--tasks T] [--out benchmarks/results]

Per RTT (the same between every two hosts; the one measured is reported): 2 peers of the default model at their
default precision (0:15 and 15:30, one thread each) on two hosts, and on a third three gateways taking turns at one
streaming greedy chat: `relay` (SWARM_PUSH=false: the gateway sends each step to each peer and takes its answer, 2 x
RTT a token), `push` (the default: hidden states go from peer to peer, (hops + 1) x one-way = 1.5 x RTT) and
`push_spec` (push and GATEWAY_SPECULATIVE=on); with `--draft-model REF` a fourth, `push_draft` (push_spec with
GATEWAY_DRAFT_MODEL=REF: drafts from that local model where prompt lookup finds none). Tasks (`--tasks`, default
quote,chat; `chat_sampled`, the story at temperature 0.7, adds with --draft-model a gateway `push_draft_greedy`
whose drafter drafts greedily for it, SWARM_DRAFT_SAMPLED=0): `quote` (repeat a ~400-token passage: drafts by prompt
lookup pay) and `chat` (a free story: nothing to look up). Reported: decode ms per token and tok/s, push ÷ relay and
speculative ÷ push per round (medians), the compute a token costs (the relay's time less its 2 x RTT) and push's
time ÷ its floor (1.5 x RTT + that compute; the goal is <= 1.15), and each gateway's count of pushed steps. JSON on
stdout and in OUT/wan.json.

Routes by measured hops (`--hops`): 0:15 on two hosts, "near" (20 ms RTT from the gateway, 200 ms from the peer
of 15:30) and "far" (60 ms from the gateway, 10 ms from it), 15:30 on "b" (60 ms from the gateway). Gateways:
`push` (the default: routes count the hops peers measured and announced, so far → b, 30 + 5 + 30 ms a token in
the network), `push_client_rtt` (push, but allowed only near and b: the chain that the client's own round trips
choose, 10 + 100 + 30 ms) and `relay` (push off: near → b, 20 + 60 ms). Reported: ms per token of a free chat
each, push ÷ push_client_rtt tok/s per round (median), the routes each gateway took, what each peer measured.

Failover across hosts (`--failover-rtt`, 0: skipped): 0:15 on one host, 15:30 on two (the second 20 ms farther each
way, so routes take the first); per round a fresh gateway streams a greedy chat of 48 tokens and, after its 8th
token, the link of the host serving 15:30 is cut (its process runs on). Reported per round: whether the text equals
an uncut run's, the decode's median inter-token latency, and the time the cut added (the longest gap after it, less
that median).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import emit, machine, median, versions
from benchmarks.speculative import SAMPLED_CHAT, TASKS, interleave
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.netbed import NetBed

WAN_TASKS = {name: TASKS[name] for name in ("quote", "chat")} | {"chat_sampled": SAMPLED_CHAT}


def start_swarm(bed: NetBed, spans: dict[str, str]) -> list[str]:
    """The bootstrap node on host "boot" and a peer of the default model per host and span, each ready; the
    bootstrap's multiaddrs."""
    boot = bed.spawn("boot", "bootstrap", ["-m", "swarm.dht", "--host", bed.address("boot"), "--port", "31337"])
    boot.wait_for(r"DHT bootstrap node ready")
    initial = re.findall(r"^\s+(/ip4/\S+)$", boot.log(), flags=re.MULTILINE)
    peers = [bed.spawn(host, f"peer-{host}", ["-m", "swarm.server", "--blocks", span, "--num-threads", "1",
                                              "--host", bed.address(host), "--initial-peers", *initial])
             for host, span in spans.items()]
    for proc in peers:
        proc.wait_for(r"peer ready: .* peer_id=(\S+)", timeout=600)
    return initial


MODES = {  # gateway → its environment
    "relay": {"SWARM_PUSH": "false", "GATEWAY_SPECULATIVE": "off"},
    "push": {"SWARM_PUSH": "true", "GATEWAY_SPECULATIVE": "off"},
    "push_spec": {"SWARM_PUSH": "true", "GATEWAY_SPECULATIVE": "on"},
}


async def pushed_steps(socket: str) -> float:
    """The gateway's swarm_client_pushed_steps (steps computed from a peer's push) from its /metrics."""
    import httpx

    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket), base_url="http://gateway") as http:
        text = (await http.get("/metrics")).text
    return float(re.search(r"^swarm_client_pushed_steps (\S+)$", text, flags=re.MULTILINE).group(1))


def start_gateway(bed: NetBed, name: str, initial: list[str], env: dict[str, str] | None = None) -> str:
    """A gateway on host "gw" joined to the swarm at `initial` (with `env` besides), started; its Unix socket."""
    socket = str(bed.workdir / f"{name}.sock")
    bed.spawn("gw", f"gateway-{name}", ["-m", "uvicorn", "app.main:app", "--uds", socket],
              {"SWARM_INITIAL_PEERS": " ".join(initial), **(env or {})}
              ).wait_for(r"Application startup complete", timeout=600)
    return socket


def ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The median over rounds of a's decode tok/s ÷ b's."""
    return round(median([x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(a, b, strict=True)]), 3)


async def run_rtt(rtt_ms: float, rounds: int, workdir: Path, draft_model: str = "",
                  tasks: tuple[str, ...] = ("quote", "chat")) -> dict[str, Any]:
    hosts = ["boot", "a", "b", "gw"]
    modes = dict(MODES)
    if draft_model:
        modes["push_draft"] = {**MODES["push_spec"], "GATEWAY_DRAFT_MODEL": draft_model}
        if "chat_sampled" in tasks:  # the same drafter drafting greedily for sampled text (its drafts kept p(d))
            modes["push_draft_greedy"] = {**modes["push_draft"], "SWARM_DRAFT_SAMPLED": "0"}
    with NetBed(hosts, workdir, delay_ms=rtt_ms / 2) as bed:
        initial = start_swarm(bed, {"a": "0:15", "b": "15:30"})
        sockets = {mode: start_gateway(bed, mode, initial, env) for mode, env in modes.items()}
        measured = bed.rtt_ms("gw", "a")
        runs = await interleave(dict(sockets), {name: WAN_TASKS[name] for name in tasks}, rounds, {"rtt_ms": rtt_ms})
        pushed = {mode: await pushed_steps(socket) for mode, socket in sockets.items()}
    out: dict[str, Any] = {"rtt_ms_measured": round(measured, 1),
                           "client_relay_floor_ms_per_token": round(2 * measured, 1),
                           "push_floor_ms_per_token": round(3 * measured / 2, 1),
                           "pushed_steps": pushed}
    for name, modes in runs.items():
        entry: dict[str, Any] = {}
        for mode, results in modes.items():
            tok_s = median([r["decode_tok_s"] for r in results])
            entry[mode] = {"decode_tok_s": round(tok_s, 2), "ms_per_token": round(1000 / tok_s, 1),
                           "ttft_s": round(median([r["ttft_s"] for r in results]), 3),
                           "kept": median([r["kept"] for r in results]),
                           "rejected": median([r["rejected"] for r in results])}

        entry["push_to_relay"] = ratio(modes["push"], modes["relay"])
        entry["spec_to_push"] = ratio(modes["push_spec"], modes["push"])
        if "push_draft" in modes:
            entry["draft_to_push"] = ratio(modes["push_draft"], modes["push"])
        if "push_draft_greedy" in modes:
            entry["draft_greedy_to_push"] = ratio(modes["push_draft_greedy"], modes["push"])
        # the goal's floor: (hops + 1) one-way delays + compute, compute = the relay's time less its 2 x RTT
        compute = entry["relay"]["ms_per_token"] - 2 * measured
        entry["compute_ms_per_token"] = round(compute, 1)
        entry["push_to_floor"] = round(entry["push"]["ms_per_token"] / (1.5 * measured + compute), 3)
        if "temperature" not in WAN_TASKS[name]:  # sampled texts differ between runs
            entry["identical_text"] = all(len({r["text"] for r in group}) == 1
                                          for group in zip(*modes.values(), strict=True))
        out[name] = entry
    return out


HOPS_MODES = {  # gateway → its environment, beside SWARM_ALLOWED_PEERS for push_client_rtt
    "push": {"SWARM_PUSH": "true", "GATEWAY_SPECULATIVE": "off"},
    "push_client_rtt": {"SWARM_PUSH": "true", "GATEWAY_SPECULATIVE": "off"},
    "relay": {"SWARM_PUSH": "false", "GATEWAY_SPECULATIVE": "off"},
}


async def swarm_view(socket: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket), base_url="http://gateway",
                                 timeout=60) as http:
        return (await http.get("/v1/swarm")).json()


async def run_hops(rounds: int, workdir: Path) -> dict[str, Any]:
    hosts = ["boot", "near", "far", "b", "gw"]
    with NetBed(hosts, workdir, delay_ms=10) as bed:
        bed.slow("far", 20)  # 30 ms each way to the gateway
        bed.slow("b", 20)
        bed.pair("near", "b", 100)
        bed.pair("far", "b", 5)
        spans = {"near": "0:15", "far": "0:15", "b": "15:30"}
        initial = start_swarm(bed, spans)
        first = start_gateway(bed, "probe", initial)
        for _ in range(120):  # until near and far announce their round trips to b
            peers = {p["peer_id"]: p for p in (await swarm_view(first))["peers"]}
            if sum(bool(p["next_rtt"]) for p in peers.values()) >= 2:
                break
            await asyncio.sleep(1)
        measured = {p["peer_id"]: dict(p["next_rtt"]) for p in peers.values()}
        of_b = next(pid for pid, p in peers.items() if p["start"] == 15)
        near_and_b = " ".join(pid for pid, hops in measured.items() if pid == of_b or hops.get(of_b, 0) > 0.1)
        sockets = {mode: start_gateway(bed, mode, initial,
                                       {**env, **({"SWARM_ALLOWED_PEERS": near_and_b}
                                                  if mode == "push_client_rtt" else {})})
                   for mode, env in HOPS_MODES.items()}
        await asyncio.sleep(4)  # the views have probed the records
        rtts = {host: round(bed.rtt_ms("gw", host), 1) for host in spans}
        rtts.update({f"{a}-b": round(bed.rtt_ms(a, "b"), 1) for a in ("near", "far")})
        runs = await interleave(dict(sockets), {"chat": WAN_TASKS["chat"]}, rounds, {"hops": True})
        routes = {mode: sorted({" ".join(r["route"]) for r in (await swarm_view(socket))["recent_routes"]})
                  for mode, socket in sockets.items()}
    modes = runs["chat"]
    out: dict[str, Any] = {"rtt_ms_measured": rtts, "announced_rtt_s": measured, "routes": routes}
    for mode, results in modes.items():
        tok_s = median([r["decode_tok_s"] for r in results])
        out[mode] = {"decode_tok_s": round(tok_s, 2), "ms_per_token": round(1000 / tok_s, 1)}
    out["push_to_push_client_rtt"] = ratio(modes["push"], modes["push_client_rtt"])
    out["push_to_relay"] = ratio(modes["push"], modes["relay"])
    out["identical_text"] = all(len({r["text"] for r in group}) == 1 for group in zip(*modes.values(), strict=True))
    return out


FAILOVER_TOKENS = 48
CUT_AFTER = 8


async def stream_times(socket: str, cut=None) -> tuple[str, list[float]]:
    """A greedy streaming chat through the gateway on `socket`: its text and each token's arrival time; `cut()` is
    called after the CUT_AFTER-th token."""
    import json
    import time

    import httpx

    body = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": WAN_TASKS["chat"]["content"]}],
            "max_tokens": FAILOVER_TOKENS, "temperature": 0, "logit_bias": {"2": -100}, "stream": True}
    text, times = "", []
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket), base_url="http://gateway",
                                 timeout=300) as http, http.stream("POST", "/v1/chat/completions", json=body) as answer:
        async for line in answer.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta:
                text += delta
                times.append(time.perf_counter())
                if len(times) == CUT_AFTER and cut is not None:
                    cut()
    return text, times


async def run_failover(rtt_ms: float, rounds: int, workdir: Path) -> dict[str, Any]:
    hosts = ["boot", "a", "b", "b2", "gw"]
    with NetBed(hosts, workdir, delay_ms=rtt_ms / 2) as bed:
        initial = start_swarm(bed, {"a": "0:15", "b": "15:30", "b2": "15:30"})
        bed.slow("b2", 20)

        reference, times = await stream_times(start_gateway(bed, "reference", initial))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        out: dict[str, Any] = {"rtt_ms_measured": round(bed.rtt_ms("gw", "a"), 1),
                               "uncut_median_itl_ms": round(1000 * median(gaps), 1), "rounds": []}
        for round_ in range(rounds):
            text, times = await stream_times(start_gateway(bed, f"round-{round_}", initial), cut=lambda: bed.cut("b"))
            bed.heal("b")
            gaps = [b - a for a, b in itertools.pairwise(times)]
            usual = median(gaps[:CUT_AFTER - 1] + gaps[CUT_AFTER + 4:])
            out["rounds"].append({"identical_text": text == reference, "tokens": len(times),
                                  "median_itl_ms": round(1000 * usual, 1),
                                  "added_ms": round(1000 * (max(gaps[CUT_AFTER - 1:]) - usual), 1)})
            await asyncio.sleep(2 * rtt_ms / 1000 + 3)  # the healed host announces itself again
    out["median_added_ms"] = round(median([r["added_ms"] for r in out["rounds"]]), 1)
    out["all_identical"] = all(r["identical_text"] for r in out["rounds"])
    return out


async def run(args) -> dict[str, Any]:
    reason = NetBed.available()
    if reason is not None:
        raise SystemExit(f"no test bed here: {reason}")
    resolve_model(DEFAULT_MODEL_ID)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rtt in [float(r) for r in args.rtts.split(",") if r]:
            results[f"rtt_{rtt:g}ms"] = await run_rtt(rtt, args.rounds, Path(tmp) / f"rtt-{rtt:g}", args.draft_model,
                                                      tuple(args.tasks.split(",")))
        if args.hops:
            results["hops"] = await run_hops(args.rounds, Path(tmp) / "hops")
        if args.failover_rtt:
            results[f"failover_rtt_{args.failover_rtt:g}ms"] = await run_failover(
                args.failover_rtt, args.rounds, Path(tmp) / "failover")
    return {"benchmark": "wan", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "peers": "2 hosts (0:15, 15:30), default precision, 1 thread",
                         "rounds": args.rounds, "link": "tests.netem: one-way delay = RTT / 2, no jitter or loss",
                         "draft_model": args.draft_model or None,
                         "tasks": {k: WAN_TASKS[k] | {"content": WAN_TASKS[k]["content"][:60]}
                                   for k in args.tasks.split(",")}},
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtts", default="10,50,100", help="round-trip times in ms, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--failover-rtt", type=float, default=50.0, help="RTT of the failover run in ms (0: none)")
    parser.add_argument("--hops", action="store_true", help="also: routes by the hops peers measured (see above)")
    parser.add_argument("--draft-model", default="", help="also a gateway drafting with this local model (push_draft)")
    parser.add_argument("--tasks", default="quote,chat", help=f"of {', '.join(WAN_TASKS)} (chat_sampled: the story "
                        "at temperature 0.7; with --draft-model also push_draft_greedy, SWARM_DRAFT_SAMPLED=0)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tasks = "" if args.tasks == "quote,chat" else "_" + args.tasks.replace(",", "_")
    emit("wan" + ("_draft" if args.draft_model else "") + tasks, asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
