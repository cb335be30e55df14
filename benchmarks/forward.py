"""One span's forward in process with this checkout's native kernel against another checkout's, side by side.

    python -m benchmarks.forward --baseline DIR [--rows 1,4,16,40,256] [--runs 7] [--threads 2] [--quant int4]
                                 [--out benchmarks/results]

Loads SmolLM2's 30 blocks once (`--quant`, as a peer does) and times, per row count, a decode round of that many
sessions (rows ≤ 16: each session holds 20 tokens, 3 rounds per run, nothing committed) or one prefill chunk of
that many tokens (rows > 16), with cpu_affine.c compiled from this checkout and from DIR (e.g. `git worktree add
DIR REV`) in turn, interleaved run by run; the kernel on `--threads` threads as a peer runs it. Prints JSON (median
milliseconds per forward, and new ÷ baseline) and writes OUT/forward.json. A diagnostic of the kernel: what users
see is `benchmarks/serve.py` through HTTP.
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
from swarm.model import segments
from swarm.model.precision import Precision
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.span import load_span
from swarm_kernels import cpu


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


def run(args) -> dict[str, Any]:
    torch.set_num_threads(1)
    baseline = Path(args.baseline) / "swarm_kernels" / "cpu_affine.c"
    libraries = {"new": _kernel(cpu.SOURCE, args.threads), "baseline": _kernel(baseline, args.threads)}
    span = load_span(resolve_model(DEFAULT_MODEL_ID), 0, 30, precision=Precision("cpu", torch.float32, args.quant))
    counts = [int(n) for n in args.rows.split(",")]
    times: dict[int, dict[str, list[float]]] = {n: {name: [] for name in libraries} for n in counts}
    saved = cpu._library
    try:
        for n in counts:
            for run_ in range(args.runs):
                order = list(libraries) if run_ % 2 == 0 else list(reversed(libraries))
                for name in order:
                    cpu._library = lambda name=name: libraries[name]
                    times[n][name].append(_time(span, n))
    finally:
        cpu._library = saved
    results = {str(n): {"new_ms": round(statistics.median(t["new"]), 2),
                        "baseline_ms": round(statistics.median(t["baseline"]), 2),
                        "new_over_baseline": round(statistics.median(a / b for a, b in zip(t["new"], t["baseline"],
                                                                                             strict=True)), 3),
                        "new_runs_ms": [round(v, 2) for v in t["new"]],
                        "baseline_runs_ms": [round(v, 2) for v in t["baseline"]]} for n, t in times.items()}
    return {"benchmark": "forward", "machine": machine(), "versions": versions(),
            "settings": {"model": DEFAULT_MODEL_ID, "blocks": "0:30", "quant": args.quant, "threads": args.threads,
                         "runs": args.runs, "baseline": str(args.baseline),
                         "avx512f": "avx512f" in _flags()},
            "results": results}


def _flags() -> set[str]:
    try:
        return {w for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forward", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the revision to compare (its kernel source)")
    parser.add_argument("--rows", default="1,4,16,40,256")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="the kernel's threads (a peer's default: every CPU)")
    parser.add_argument("--quant", default="int4", choices=["int4", "int8"])
    parser.add_argument("--out", default=None, help="also write DIR/forward.json")
    emit("forward", run(parser.parse_args()), parser.parse_args().out)


if __name__ == "__main__":
    main()
