"""A ~1.1B random-weight Llama (TinyLlama's shape) through a real swarm of CUDA peers on one GPU.

    python scripts/gpu_swarm_check.py [--workdir DIR] [--out DIR]

Two chains, each of two peers (blocks 0:11 and 11:22): fp32 unquantized, and the CUDA default (bf16 + nf4). The
client's head runs on the CPU. Per chain, the logits of every generated step are compared with transformers' own
forward of the same tokens (no cache) on the GPU and on the CPU: the fp32 chain must agree within LOGITS_RTOL of the
logits' scale and pick the same greedy token at every step; the nf4 chain's agreement is reported. transformers'
`generate()` tokens are reported too. Decode tok/s per chain (median of rounds) and of the local model.
JSON on stdout (and DIR/gpu_swarm.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.swarm_runs import chain_of
from swarm.client import SwarmClient
from swarm.client.session import InferenceSession
from tests.launcher import LocalSwarm

NEW_TOKENS = 24
PROMPT_TOKENS = 32
LOGITS_RTOL = 1e-3  # of the logits' standard deviation


def build_model(path: Path, device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    small = device == "cpu"  # a dry run of this script on a machine without a GPU
    config = LlamaConfig(hidden_size=256 if small else 2048, intermediate_size=512 if small else 5632,
                         num_attention_heads=8 if small else 32, num_key_value_heads=4,
                         num_hidden_layers=22, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                         tie_word_embeddings=False, initializer_range=0.01)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # larger-than-default init so that a random model's next-token choice is not a near-tie everywhere
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(path)


@torch.inference_mode()
def full_logits(path: Path, tokens: list[int], device: str) -> torch.Tensor:
    """transformers' forward over all tokens at once, no cache → float32 logits [T, V] on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    logits = model(torch.tensor([tokens], device=device), use_cache=False).logits[0].float().cpu()
    del model
    return logits


async def swarm_generate(client, chain, prompt: list[int]) -> tuple[list[int], torch.Tensor, float]:
    """Greedy NEW_TOKENS through the chain → tokens, logits [NEW_TOKENS, V], decode tok/s."""
    session = await InferenceSession.open(client.p2p, chain, max_length=len(prompt) + NEW_TOKENS)
    async with session:
        steps = [(await client.prefill(session, torch.tensor([prompt]))).reshape(-1)]
        first = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            steps.append((await client.decode(session, steps[-1].argmax().reshape(1))).reshape(-1))
        rate = (NEW_TOKENS - 1) / (time.perf_counter() - first)
    logits = torch.stack(steps).float()
    return logits.argmax(-1).tolist(), logits, rate


@torch.inference_mode()
def local_generate(path: Path, prompt: list[int], device: str) -> tuple[list[int], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    # decode speed of the local model, for scale
    sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
    sync()
    rate = NEW_TOKENS / (time.perf_counter() - start)
    del model
    return tokens, rate


async def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp())
    model_dir = workdir / "tinyllama-random"
    build_model(model_dir, args.device)
    prompt = torch.randint(0, 32000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(5)).tolist()
    local_tokens, local_rate = local_generate(model_dir, prompt, args.device)
    chains_spec = {"fp32": ["--dtype", "float32", "--quant", "none"],
                   "auto": ["--dtype", "auto", "--quant", "auto"]}  # CUDA: bf16 + nf4
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (cpu dry run)"
    result: dict = {"gpu": gpu, "model": "llama 22 x 2048 (TinyLlama shape), random",
                    "new_tokens": NEW_TOKENS, "local_decode_tok_s": round(local_rate, 2)}
    with LocalSwarm(workdir / "swarm", peer_env={"SWARM_PEER_QUANT": "auto"}) as swarm:
        swarm.start_bootstrap()
        procs = {(name, blocks): swarm.start_peer(str(model_dir), blocks, "--device", args.device, *extra,
                                                   wait=False)
                 for name, extra in chains_spec.items() for blocks in ("0:11", "11:22")}
        ids = {name: {} for name in chains_spec}
        for (name, blocks), proc in procs.items():
            ids[name][blocks] = LocalSwarm.peer_id(proc)
        client = await SwarmClient.connect(swarm.initial_peers, str(model_dir))
        try:
            spans = {s.peer_id: s for s in await client.spans()}
            result["announced"] = {name: [f"{spans[p].device}/{spans[p].dtype}/{spans[p].quant}"
                                          for p in peers.values()] for name, peers in ids.items()}
            runs = {}
            for name, peers in ids.items():
                chain = await chain_of(client, peers)
                await swarm_generate(client, chain, prompt)  # warm-up
                rates = []
                for _ in range(args.rounds):
                    tokens, logits, rate = await swarm_generate(client, chain, prompt)
                    rates.append(rate)
                runs[name] = (tokens, logits, rates)
        finally:
            await client.close()
    for name, (tokens, logits, rates) in runs.items():
        entry: dict = {"decode_tok_s_median": round(statistics.median(rates), 2),
                       "decode_tok_s": [round(r, 2) for r in rates],
                       "tokens_equal_generate": tokens == local_tokens,
                       "first_difference_from_generate": next(
                           (i for i, (a, b) in enumerate(zip(tokens, local_tokens, strict=True)) if a != b), None)}
        sequence = prompt + tokens[:-1]  # the inputs of every step this chain took
        for where in ("cuda", "cpu") if args.device == "cuda" else ("cpu",):
            want = full_logits(model_dir, sequence, where)[len(prompt) - 1:]
            scale = want.std().item()
            diff = (logits - want).abs().max(dim=-1).values
            top2 = want.topk(2, dim=-1).values
            entry[f"vs_transformers_{where}"] = {
                "max_abs_logit_diff": round(diff.max().item(), 6), "logits_std": round(scale, 4),
                "greedy_agreement": (logits.argmax(-1) == want.argmax(-1)).float().mean().item(),
                "min_top2_margin": round((top2[:, 0] - top2[:, 1]).min().item(), 5)}
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out, "gpu_swarm.json").write_text(text + "\n")
    where = "vs_transformers_cuda" if args.device == "cuda" else "vs_transformers_cpu"
    check = result["fp32"][where]
    assert check["greedy_agreement"] == 1.0, f"the fp32 swarm picks other tokens than transformers: {check}"
    assert check["max_abs_logit_diff"] <= LOGITS_RTOL * check["logits_std"], f"fp32 logits differ: {check}"


if __name__ == "__main__":
    main()
