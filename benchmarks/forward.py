"""One span's forward in process, this checkout against variants of it, side by side.

    python -m benchmarks.forward [--configs new,baseline,no_records] [--baseline DIR] [--rows 1,4,16,40,256]
                                 [--runs 7] [--threads 2] [--quant int4] [--out benchmarks/results]

Loads SmolLM2's 30 blocks once (`--quant`, as a peer does) and times, per row count, a decode round of that many
sessions (rows ≤ 16: each session holds 20 tokens, 3 rounds per run, nothing committed) or one prefill chunk of
that many tokens (rows > 16), each configuration in turn, interleaved run by run; the kernel on `--threads` threads
as a peer runs it. Configurations: `new` (this checkout), `baseline` (cpu_affine.c compiled from the checkout DIR,
e.g. `git worktree add DIR REV`), `no_records` (decode rows' cache buffers reserved and checked per layer and row
instead of from their caches' records, DecodeRows.check_caches off), `no_rope` (the rotary embedding by torch's
expression and the keys appended after it, instead of one native call each for the queries and the keys),
`per_call_checks` (the lean path's projections checked on every call by affine_linear, not once by cpu.Weight),
`int8_activations` (4-bit projections with int8 activations: swarm_kernels/cpu_a8.c), `no_amx` (calls of five rows or
more kept off the CPU's tile unit where the kernel would take it: swarm_kernels/cpu_amx.h), `unfused` (each layer's
calls one by one from Python instead of two fused native calls: swarm_kernels/fused.py; `baseline`, `no_records`,
`no_rope` and `per_call_checks` are variants of those calls one by one, so they run unfused too), `int8_unfused`
(int8 activations, the calls one by one), `generic_prefill` (prefill chunks through the layers' own modules instead of
the lean path's rows: swarm.model.lean, SWARM_LEAN_PREFILL=0). Prints
JSON (median milliseconds per forward, and each configuration ÷ the first) and writes OUT/forward.json. A
diagnostic: what users see is `benchmarks/serve.py` through HTTP.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import emit, machine, versions
from benchmarks.kernels import isa
from swarm.model import segments
from swarm.model.precision import Precision
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.span import load_span
from swarm_kernels import attention, cpu


def _kernel(source: Path, threads: int) -> ctypes.CDLL:
    library = cpu.build(tuple(cpu.FLAGS), source)
    if library is None:
        raise SystemExit(f"{source} did not build")
    cpu.set_threads(threads, library)
    return library


def _time(span: Any, rows: int) -> float:
    """Milliseconds of one forward of `rows` decode rows (rows ≤ 16) or of a `rows`-token prefill chunk."""
    g = torch.Generator().manual_seed(rows)
    hidden = span.hidden_size
    if rows > 16:
        cache = span.new_cache(rows)
        x = torch.randn(1, rows, hidden, generator=g)
        start = time.perf_counter()
        span.forward(x, cache, 0)
        return 1000 * (time.perf_counter() - start)
    caches = [span.new_cache(64) for _ in range(rows)]
    for cache in caches:
        span.forward(torch.randn(1, 20, hidden, generator=g), cache, 0)
    x = torch.randn(1, rows, hidden, generator=g)
    start = time.perf_counter()
    for _ in range(3):
        span.forward_mixed(x, [segments.Segment(c, c.length, 1) for c in caches])
    return 1000 * (time.perf_counter() - start) / 3


# configurations of the layers' calls one by one from Python (what they change is there, not in the fused calls)
STEP_BY_STEP = ("unfused", "baseline", "no_records", "no_rope", "per_call_checks", "int8_unfused")


def run(args) -> dict[str, Any]:
    torch.set_num_threads(1)
    names = args.configs.split(",")
    if "baseline" in names and not args.baseline:
        raise SystemExit("the baseline configuration needs --baseline DIR")
    libraries = {name: _kernel(Path(args.baseline) / "swarm_kernels" / "cpu_affine.c" if name == "baseline"
                               else cpu.SOURCE, args.threads) for name in names}
    if "int8_activations" in names:  # its repacked weights and fused calls made at load, beside float32's
        cpu.set_activations("int8")
    span = load_span(resolve_model(DEFAULT_MODEL_ID), 0, 30, precision=Precision("cpu", torch.float32, args.quant))
    if not span.prepare_lean():  # its check runs in the activations of the first configuration
        raise SystemExit("the lean decode path failed its check: nothing here would time it")
    cpu.set_activations("float32")
    counts = [int(n) for n in args.rows.split(",")]
    times: dict[int, dict[str, list[float]]] = {n: {name: [] for name in names} for n in counts}
    saved, check_caches, rope = cpu._library, attention.DecodeRows.check_caches, attention.rope
    tile_unit = {name: cpu.amx(library) > 0 for name, library in libraries.items()}  # SWARM_AMX=0: stays off
    layers = span._lean.layers if span._lean else []
    fused = [(layer.attention_block, layer.down_residual, layer.first, layer.int8_parts) for layer in layers]
    weight_call = cpu.Weight.__call__
    prefill = span._lean.prefill

    def per_call_checks(weight: cpu.Weight, x: torch.Tensor) -> torch.Tensor:
        codes, scale, minimum, bias = weight.tensors
        return cpu.affine_linear(x, codes, weight.bits, scale, minimum, bias)

    try:
        for n in counts:
            for run_ in range(args.runs):
                for name in names if run_ % 2 == 0 else list(reversed(names)):
                    cpu._library = lambda name=name: libraries[name]  # type: ignore[assignment]
                    attention.DecodeRows.check_caches = (  # type: ignore[method-assign]
                        (lambda *a, **k: False) if name == "no_records" else check_caches)
                    attention.rope = (lambda *a, **k: False) if name == "no_rope" else rope
                    call = per_call_checks if name == "per_call_checks" else weight_call
                    cpu.Weight.__call__ = call  # type: ignore[method-assign,assignment]
                    cpu.set_activations("int8" if name.startswith("int8_") else "float32")
                    span._lean.prefill = name != "generic_prefill"
                    for other, library in libraries.items():  # one library loaded once: the fused calls' too
                        cpu.set_amx(name != "no_amx" and tile_unit[other], library)
                    for layer, parts in zip(layers, fused, strict=True):
                        layer.attention_block, layer.down_residual, layer.first, layer.int8_parts = (
                            (None, None, None, (None, None, None)) if name in STEP_BY_STEP else parts)
                    times[n][name].append(_time(span, n))
    finally:
        cpu._library, attention.DecodeRows.check_caches = saved, check_caches  # type: ignore[method-assign]
        attention.rope = rope
        cpu.Weight.__call__ = weight_call  # type: ignore[method-assign]
        cpu.set_activations("float32")
        for other, library in libraries.items():
            cpu.set_amx(tile_unit[other], library)
        for layer, parts in zip(layers, fused, strict=True):
            layer.attention_block, layer.down_residual, layer.first, layer.int8_parts = parts
        span._lean.prefill = prefill
    first = names[0]
    results = {str(n): {name: {"median_ms": round(statistics.median(t[name]), 2),
                               f"over_{first}": round(statistics.median(a / b for a, b in zip(t[name], t[first],
                                                                                            strict=True)), 3),
                               "runs_ms": [round(v, 2) for v in t[name]]} for name in names}
               for n, t in times.items()}
    return {"benchmark": "forward", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "blocks": "0:30", "quant": args.quant, "threads": args.threads,
                         "runs": args.runs, "configs": names, "baseline": args.baseline,
                         "isa": isa()},
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="new,baseline",
                        help="comma-separated: new, baseline, no_records, no_rope, per_call_checks, "
                        "int8_activations, no_amx, unfused, int8_unfused, generic_prefill")
    parser.add_argument("--baseline", default=None, help="a checkout of the revision to compare (its kernel source)")
    parser.add_argument("--rows", default="1,4,16,40,256")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="the kernel's threads (a peer's default: every CPU)")
    parser.add_argument("--quant", default="int4", choices=["int4", "int8"])
    parser.add_argument("--out", default=None, help="also write DIR/forward.json")
    args = parser.parse_args()
    emit("forward", run(args), args.out)


if __name__ == "__main__":
    main()
