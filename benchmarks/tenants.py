"""What API keys in the store, their limits and usage metering cost the gateway (`app.keystore`, `app.tenants`).

    python -m benchmarks.tenants [--requests 300] [--rounds 5] [--streams 16] [--stream-rounds 3] [--out DIR]

1. Overhead per request: the gateway over the unit tests' instant fake backend, in process (httpx's ASGI
   transport), one request at a time, with no store (`GATEWAY_DB` empty: no keys, nothing metered) and with a store
   key that has every limit set (requests and tokens per minute, a budget, concurrency) and a usage row committed
   before each answer ends. Rounds interleave the two; per round, the p50 of each and their difference.
2. Throughput on the path users run: two `uvicorn app.main:app` gateways joined to one swarm (2 int4 peers of the
   default model), one open and one with the keyed store, taking turns at N concurrent streaming chats
   (`benchmarks.serve`'s client); aggregate tok/s and their ratio per round.
JSON on stdout and in OUT/tenants.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.keystore import KeyStore, Limits
from app.main import create_app
from app.settings import GatewaySettings
from benchmarks.common import emit, machine, median, versions
from benchmarks.serve import free_port, run_streams
from swarm.model.source import DEFAULT_MODEL_ID
from tests.launcher import LocalSwarm
from tests.unit.test_gateway import FakeBackend

GENEROUS = Limits(rpm=10**7, tpm=10**9, budget=1e15, budget_period="month", max_concurrent=10**4)


class Gateway:
    def __init__(self, db: str, key: str | None):
        self.app = create_app(GatewaySettings(gateway_db=db), backend=FakeBackend())
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def __aenter__(self) -> Gateway:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://bench",
                                      headers=self.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self._lifespan.__aexit__(*exc)

    async def timed(self, count: int) -> list[float]:
        body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        times = []
        for _ in range(count):
            start = time.perf_counter()
            response = await self.http.post("/v1/chat/completions", json=body)
            times.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
        return times


async def overhead(requests: int, rounds: int, tmp: Path) -> dict[str, Any]:
    store = KeyStore(tmp / "bench.db")
    _, key = store.create("bench", GENEROUS)
    per_round: dict[str, list[float]] = {"open": [], "keyed": []}
    async with Gateway("", None) as open_, Gateway(str(tmp / "bench.db"), key) as keyed:
        for gateway in (open_, keyed):
            await gateway.timed(50)  # warm-up
        for round_ in range(rounds):
            for name, gateway in (("open", open_), ("keyed", keyed))[:: 1 if round_ % 2 == 0 else -1]:
                per_round[name].append(statistics.median(await gateway.timed(requests)) * 1000)
    rows = sum(1 for _ in store.usage())
    differences = [k - o for k, o in zip(per_round["keyed"], per_round["open"], strict=True)]
    return {"p50_ms_open": round(median(per_round["open"]), 3), "p50_ms_keyed": round(median(per_round["keyed"]), 3),
            "overhead_p50_ms": round(median(differences), 3), "overhead_runs_ms": [round(d, 3) for d in differences],
            "usage_rows_written": rows}


async def throughput(streams: int, rounds: int, tokens: int, tmp: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from swarm.model.source import resolve_model

    eos = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path).eos_token_id
    db = tmp / "serve.db"
    store = KeyStore(db)
    _, key = store.create("bench", GENEROUS)
    swarm = LocalSwarm(tmp / "swarm")
    swarm.peer_env.pop("SWARM_PEER_QUANT", None)
    runs: dict[str, list[float]] = {"open": [], "keyed": []}
    try:
        swarm.start_bootstrap()
        for proc in [swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--quant", "int4", "--num-threads", "1", wait=False)
                     for blocks in ("0:15", "15:30")]:
            LocalSwarm.peer_id(proc)
        common = {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers), "GATEWAY_MAX_CONCURRENT": str(streams + 8)}
        ports = {"open": free_port(), "keyed": free_port()}
        swarm.start_gateway(ports["open"], {**common, "GATEWAY_DB": ""})
        swarm.start_gateway(ports["keyed"], {**common, "GATEWAY_DB": str(db)})
        headers = {"open": None, "keyed": {"Authorization": f"Bearer {key}"}}
        for name in runs:
            await run_streams(ports[name], 2, 8, -1, eos, headers=headers[name])
        for round_ in range(rounds):
            for name in ("open", "keyed")[:: 1 if round_ % 2 == 0 else -1]:
                result = await run_streams(ports[name], streams, tokens, round_, eos, headers=headers[name])
                runs[name].append(result["aggregate_tok_s"])
                print({"round": round_, "config": name, "aggregate_tok_s": round(result["aggregate_tok_s"], 2)},
                      flush=True)
    finally:
        swarm.stop()
    ratios = [k / o for k, o in zip(runs["keyed"], runs["open"], strict=True)]
    return {"streams": streams, "tokens": tokens, "tok_s_open": round(median(runs["open"]), 2),
            "tok_s_keyed": round(median(runs["keyed"]), 2), "ratio_keyed_to_open": round(median(ratios), 3),
            "ratio_runs": [round(r, 3) for r in ratios], "usage_rows_written": sum(1 for _ in store.usage())}


async def run(args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = {"overhead": await overhead(args.requests, args.rounds, Path(tmp))}
        if args.streams:
            result["throughput"] = await throughput(args.streams, args.stream_rounds, args.tokens, Path(tmp))
    return {"benchmark": "tenants", "machine": machine(), "versions": versions(),
            "settings": {"requests": args.requests, "rounds": args.rounds, "limits": GENEROUS.__dict__},
            "results": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams of the throughput part (0: skip)")
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    emit("tenants", asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
