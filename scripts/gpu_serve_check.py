"""Many users on a GPU: N concurrent streaming chats through `uvicorn app.main:app` over HTTP, the gateway joined to
two CUDA peers (blocks 0:16 and 16:32) of an 8B-shaped random-weight Llama on one GPU.

    python scripts/gpu_serve_check.py --tokenizer DIR [--streams 1,16,64] [--configs bf16,nf4,bf16_head_cuda]
                                      [--rounds 3] [--warm-tokens N] [--deadline S] [--workdir DIR] [--out DIR]
                                      [--device cpu]

The model has Llama-3-8B's blocks (32 of hidden 4096, MLP 14336, 32 query and 8 KV heads, rope theta 500000) with
random bf16 weights, and the tokenizer and chat template in DIR (SmolLM2's: 49152 tokens, so its head is 49152 x 4096
where Llama 3's is 128256 x 4096); it is built on the GPU and saved once. Each configuration is a gateway of its own
on 2 peers (and a bootstrap node) of its kind, all running for the whole benchmark: `bf16` (--dtype bfloat16 --quant
none) and `nf4` (bitsandbytes' 4-bit weights, the CUDA default); `bf16_head_cuda` is a second gateway on the bf16
peers with its embedding and head on the GPU (GATEWAY_HEAD_DEVICE=cuda; elsewhere the gateway's embedding, head,
sampling and detokenizing run on the CPU). After an unmeasured warm-up run at every stream count (--warm-tokens),
rounds interleave configurations and stream counts as benchmarks.serve does (the same streams: ~40-token prompts,
greedy, `--tokens` new tokens each, the special tokens suppressed, so that every stream runs to its length); a new
round starts only while the last one's duration still fits before --deadline seconds from the start. JSON on stdout
and in OUT/gpu_serve.json. `--device cpu` runs it with a small model of the same kind (how this script is tried
without a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mib, versions
from benchmarks.serve import free_port, run_streams, summarize
from tests.launcher import LocalSwarm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
PEER_READY = r"peer ready: .* peer_id=(\S+)"
# the peers' flags; a configuration's peers may serve another configuration's gateway too (its own, all resident)
PEERS = {"bf16": ["--dtype", "bfloat16", "--quant", "none"], "nf4": ["--dtype", "bfloat16", "--quant", "nf4"]}
# name → (its peers, its gateway's environment)
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "bf16": ("bf16", {}), "nf4": ("nf4", {}),
    "bf16_head_cuda": ("bf16", {"GATEWAY_HEAD_DEVICE": "cuda"}),  # the gateway's embedding and head on the GPU
}


def build_model(path: Path, tokenizer_dir: Path, device: str) -> dict[str, Any]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    small = device == "cpu"
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_hidden_layers=4) if small else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32)
    config = LlamaConfig(**shape, num_key_value_heads=8 if not small else 4, vocab_size=len(tokenizer),
                         max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    parameters = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return {"shape": shape, "vocab": len(tokenizer), "parameters": parameters, "dtype": "bfloat16"}


def gpu_memory_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


async def served_model(port: int) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"http://127.0.0.1:{port}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


async def run(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp())
    model_dir = workdir / "llama-8b-shape-random"
    timings: dict[str, float] = {}
    model = build_model(model_dir, args.tokenizer, args.device)
    timings["build_model_s"] = round(time.monotonic() - started, 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    # a random model picks special tokens as readily as any: all of them suppressed, so every stream runs its length
    bias = {"logit_bias": {str(i): -100 for i in sorted({*tokenizer.all_special_ids, eos})}}
    counts = [int(n) for n in args.streams.split(",")]
    names = args.configs.split(",")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {n: [] for n in counts} for name in names}
    swarms: dict[str, LocalSwarm] = {}
    gateways: dict[str, tuple[int, Any]] = {}
    configs = {n: {"peers": PEERS[CONFIGS[n][0]], "gateway_env": CONFIGS[n][1]} for n in names}
    blocks = ["0:16", "16:32"] if args.device == "cuda" else ["0:2", "2:4"]
    result: dict[str, Any] = {"benchmark": "gpu_serve", "versions": versions(),
                              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "none (cpu run)",
                              "model": model, "settings": {"tokens": args.tokens, "streams": counts,
                                                           "configs": configs, "blocks": blocks, "greedy": True}}
    failed: dict[str, str] = {}  # configuration → what ended it (the others go on)

    def fail(name: str, when: str, e: Exception) -> None:
        failed[name] = f"{when}: {type(e).__name__}: {str(e)[-2000:]}"
        print(json.dumps({"config": name, "failed": failed[name]}), flush=True)

    try:
        peers: dict[str, list[Any]] = {}
        for kind in dict.fromkeys(CONFIGS[name][0] for name in names):  # every swarm's peers load at once
            swarm = swarms[kind] = LocalSwarm(workdir / kind)
            swarm.peer_env.pop("SWARM_PEER_QUANT", None)
            swarm.start_bootstrap()
            # sessions of every gateway of these peers fit at once (a gateway keeps finished ones for reuse)
            peers[kind] = [swarm.start_peer(str(model_dir), span, "--device", args.device, "--throughput", "1000",
                                            "--max-sessions", str(4 * max(counts) + 16), *PEERS[kind], wait=False)
                           for span in blocks]
        for name in names:
            try:
                for proc in peers[CONFIGS[name][0]]:
                    proc.wait_for(PEER_READY, timeout=args.ready_timeout)
            except Exception as e:  # reported; the other configurations go on
                fail(name, "peers", e)
        timings["peers_ready_s"] = round(time.monotonic() - started, 1)
        for name in names:
            if name in failed:
                continue
            port = free_port()
            kind, gateway_env = CONFIGS[name]
            env = {"SWARM_MODEL": str(model_dir), "SWARM_INITIAL_PEERS": " ".join(swarms[kind].initial_peers),
                   "GATEWAY_MAX_CONCURRENT": str(max(counts) + 8), **gateway_env}
            if args.device == "cpu":  # a run without a GPU: the same path, the head where there is one
                env.pop("GATEWAY_HEAD_DEVICE", None)
            try:
                gateways[name] = (port, swarms[kind].start_gateway(port, env))
            except Exception as e:
                fail(name, "gateway", e)
        timings["gateways_ready_s"] = round(time.monotonic() - started, 1)
        if not gateways:
            raise RuntimeError(f"no configuration started: {failed}")
        model_id = await served_model(next(iter(gateways.values()))[0])
        result["gpu_memory_used_mib_loaded"] = gpu_memory_used_mib()
        # warm-up: every path and batch size once, at the measured length (on the H200, 8-token warm-ups at every
        # count still left the first measured one-chat run ~3x slower than the later ones)
        for name, (port, _) in gateways.items():
            try:
                for n in counts:
                    await run_streams(port, n, args.warm_tokens or args.tokens, -1, eos, bias, model=model_id)
            except Exception as e:
                fail(name, "warm-up", e)
        timings["warm_s"] = round(time.monotonic() - started, 1)
        last = 0.0
        for round_ in range(args.rounds):
            if round_ and time.monotonic() + last > started + args.deadline:
                break
            begun = time.monotonic()
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                for n in counts:
                    if name in failed:
                        continue
                    try:
                        figures = await run_streams(gateways[name][0], n, args.tokens, round_, eos, bias,
                                                    model=model_id)
                    except Exception as e:  # it ends this configuration's runs, not the others'
                        fail(name, f"round {round_}, {n} streams", e)
                        continue
                    runs[name][n].append(figures)
                    print(json.dumps({"round": round_, "config": name, **{
                        k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}}), flush=True)
            last = time.monotonic() - begun
        result["failed"] = failed
        result["gpu_memory_used_mib_after"] = gpu_memory_used_mib()
        result["peak_rss_mib"] = {name: peak_rss_mib(proc.pid) for name, (_, proc) in gateways.items()}
        timings["total_s"] = round(time.monotonic() - started, 1)
        result["timings"] = timings
        # every count of a configuration has the same rounds (a failure drops that configuration's later runs)
        done = {name: {n: rounds[: min(len(r) for r in by_count.values())] for n, rounds in by_count.items()}
                for name, by_count in runs.items()}
        result["rounds"] = {name: len(by_count[counts[0]]) for name, by_count in done.items()}
        result["results"] = summarize({name: by_count for name, by_count in done.items() if by_count[counts[0]]},
                                      counts)
        if args.out:  # before the processes are stopped, which may take a while
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "gpu_serve.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for swarm in swarms.values():
            swarm.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_serve_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a directory with tokenizer.json and template")
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-tokens", type=int, default=0, help="new tokens per stream of the unmeasured warm-up "
                                                                     "run at every stream count (0: --tokens)")
    parser.add_argument("--configs", default="bf16,nf4", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds from the start after which no round "
                                                                       "starts that would not end before it")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
