"""A peer's measured compute speed, per block, cached on disk per model / precision / hardware.

`throughput` is decode tokens/s of one session through one block: a span of n blocks takes n / throughput seconds per
token. `batch_throughput` is the same with BATCH_PROBE sessions batched, counting every session's token, so that a
client can tell how much a peer slows down as it takes more sessions. Both are measured on the peer's own span
(decode steps after a 128-token prefix, median of several), through the same compute path as real steps, so whatever
slows the peer down (another tenant, an injected fault) shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.protocol import BATCH_PROBE
from swarm.server.backend import Session, SpanBackend
from swarm_kernels import cpu as native_cpu
from swarm_kernels.filecache import cache_root, locked, write_atomically

logger = logging.getLogger(__name__)

MAX_ENTRIES = 64
CACHE_FILE = "throughput.json"  # under swarm_kernels.filecache.cache_root()


@dataclass(frozen=True)
class Throughput:
    single: float  # tokens/s through one block, one session
    batched: float  # tokens/s through one block, BATCH_PROBE sessions together


def hardware_key(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    kernel = native_cpu.threads()
    return f"{cpu} x{torch.get_num_threads()} threads" + (f", kernel x{kernel}" if kernel > 1 else "")


def cache_key(model_id: str, device: str, dtype: str, quant: str) -> str:
    return f"{model_id}|{device}|{dtype}|{quant}|{hardware_key(device)}|torch {torch.__version__}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_or_measured(key: str, measure: Callable[[], Throughput], refresh: bool = False,
                       path: Path | None = None) -> Throughput:
    """The cached measurement under `key`, else (or with refresh) a new one, stored for the next start. Peers of one
    machine measure one at a time (a file lock): peers started together would otherwise slow each other's
    measurements down, and the slowed figure would be cached; the ones that waited find the first one's figure."""
    path = path or cache_root() / CACHE_FILE
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(path))  # released when the block ends
        except OSError as e:
            logger.warning("no lock for throughput measurements in %s: %s", path.parent, e)
        return _cached_or_measured(key, measure, refresh, path)


def _cached_or_measured(key: str, measure: Callable[[], Throughput], refresh: bool, path: Path) -> Throughput:
    entry = _read_cache(path).get(key) if not refresh else None
    if isinstance(entry, dict):
        try:
            found = Throughput(float(entry["single"]), float(entry["batched"]))
            if found.single > 0 and found.batched > 0:
                logger.info("throughput from %s: %.1f tok/s per block (%.1f batched)", path, found.single,
                            found.batched)
                return found
        except (KeyError, TypeError, ValueError):
            pass
    found = measure()
    data = _read_cache(path)
    data.pop(key, None)
    data[key] = {"single": found.single, "batched": found.batched, "measured_at": time.time()}
    data = dict(list(data.items())[-MAX_ENTRIES:])  # the most recent ones (tests measure many throwaway models)
    try:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))  # no peer reads half a file
    except OSError as e:
        logger.warning("could not cache the throughput measurement in %s: %s", path, e)
    return found


def measure(step: Callable[[int], None], num_blocks: int, repeats: int = 5) -> Throughput:
    """Time `step(batch)` (one decode step of `batch` sessions through `num_blocks` blocks) for batch 1 and
    BATCH_PROBE; the median of `repeats` after a warm-up."""

    def seconds(batch: int) -> float:
        step(batch)  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    single = num_blocks / seconds(1)
    batched = BATCH_PROBE * num_blocks / seconds(BATCH_PROBE)
    logger.info("measured throughput: %.1f tok/s per block (%.1f with %d sessions batched)", single, batched,
                BATCH_PROBE)
    return Throughput(single, batched)


def probe(backend: SpanBackend, prefix: int = 128) -> Callable[[int], None]:
    """For measuring a peer before it serves: a function running one decode step of `batch` sessions (at most
    BATCH_PROBE) over the backend's whole span after `prefix` cached tokens, through its real compute path (faults
    included), on the calling thread (the backend's compute thread: `await backend.run(measure, ...)`)."""
    span = backend.span
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(span.device, span.dtype)

    sessions = [Session(f"probe:{i}", "probe", 1, prefix + 1, slice(0, len(span.blocks)), span.new_cache(prefix + 1))
                for i in range(BATCH_PROBE)]
    if not span.encoder:
        for session in sessions:
            span(randn(1, prefix, span.hidden_size), session.cache, 0)

    def step(batch: int) -> None:
        if span.encoder:
            backend.compute(sessions[0], randn(batch, 1, span.hidden_size), 0, served=False)
        else:
            backend.compute_batch([(s, randn(1, 1, span.hidden_size), prefix) for s in sessions[:batch]],
                                  served=False)
        if span.device.type == "cuda":
            torch.cuda.synchronize()

    return step
