"""The pushed chain search (swarm.client.routing `_hop_links`) and the relayed search's pruning pass
(swarm.client.pruning `bound`) in C: swarm_kernels/route_search.c.

Compiled at first use like the CPU kernels (swarm_kernels.cpu.compile_library: the cache, the checks) but portable
(no -march=native) and without contracted multiply-adds, so it computes the same float64 costs as the numpy version
and finds the same chain. Both return None when they cannot run (no compiler; `SWARM_NATIVE_ROUTE=0` chooses the
numpy version too); the router then searches with numpy as before.

    found = pushed_chain(starts, ends, start, end, fixed, per_block, source, target, saving)
    # None: not available or not trusted; else ((span, first block, end block) of each link, cost) or NO_CHAIN
    through, best = bound(starts, ends, start, end, fixed, per_block, free)  # (or None)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("route_search.c")
FLAGS = ("-O2", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11", "-lm")
NO_CHAIN = ((), float("inf"))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SWARM_NATIVE_ROUTE", "1") == "0":
        return None
    from swarm_kernels.cpu import compile_library

    try:
        library = compile_library(SOURCE, FLAGS)
    except Exception:  # (e.g. no cache directory): numpy searches, and no build is tried again
        logger.warning("the C route search could not be built; routes are searched with numpy", exc_info=True)
        return None
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.route_pushed.restype = i64
    library.route_pushed.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr,
                                     ptr]
    library.route_workspace.restype = i64
    library.route_workspace.argtypes = [i64, i64, i64, i64]
    library.route_bound.restype = None
    library.route_bound.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    library.route_bound_workspace.restype = i64
    library.route_bound_workspace.argtypes = [i64, i64]
    return library


_local = threading.local()  # each thread's workspace, kept between searches (fresh memory costs page faults)


def _workspace(slots: int) -> np.ndarray:
    work = getattr(_local, "work", None)
    if work is None or len(work) < slots:
        work = _local.work = np.empty(max(slots, 2 * len(work) if work is not None else 0), dtype=np.int64)
    return work


def available() -> bool:
    """Whether the C search can run (building it first if it was not: ~1 s the first time on a machine)."""
    return _library() is not None


_build: threading.Thread | None = None


def ready() -> bool:
    """Whether the C search is built and loaded, without waiting: the first ask starts its build on a thread of its
    own (a route is computed on the event loop, which must not wait for a compiler) and the caller searches with
    numpy until it is done."""
    global _build
    if _library.cache_info().currsize:
        return _library() is not None
    if _build is None or not _build.is_alive():
        _build = threading.Thread(target=_library, name="route-search-build", daemon=True)
        _build.start()
    return False


def _trusted(starts: np.ndarray, ends: np.ndarray, start: int, end: int, *costs: np.ndarray) -> bool:
    """Whether spans' blocks and costs are what the C code trusts: indices in range, every cost finite and below
    1e100 (no sum over a chain overflows: without an inf - inf, there is no NaN, whose handling differs)."""
    m = len(starts)
    return (0 <= start < end < 1 << 31 and m < 1 << 30 and len(ends) == m and all(len(c) == m for c in costs)
            and all(not c.size or bool(np.abs(c).max() < 1e100) for c in costs)
            and (not m or (min(starts.min(), ends.min()) >= 0 and max(starts.max(), ends.max()) < 1 << 31)))


def bound(starts: np.ndarray, ends: np.ndarray, start: int, end: int, fixed: np.ndarray, per_block: np.ndarray,
          free: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The relayed search's pruning pass (`swarm.client.pruning.bound`, plain: no limit, no savings) over spans over
    blocks [starts, ends) with their costs and free KV: each span's cheapest chain through it (inf: none, or
    dominated) and the cheapest chain's cost (inf: no chain), the same float64 values as numpy's; None when the C
    code is not available or the inputs are not what it trusts."""
    library = _library()
    if library is None:
        return None
    fixed, per_block, free = (np.ascontiguousarray(a, dtype=np.float64) for a in (fixed, per_block, free))
    starts, ends = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends))
    if not _trusted(starts, ends, start, end, fixed, per_block, free):
        return None
    work = _workspace(library.route_bound_workspace(end - start, len(starts)))
    through, best = np.empty(len(starts)), np.zeros(1)
    library.route_bound(start, end, len(starts), starts.ctypes.data, ends.ctypes.data, fixed.ctypes.data,
                        per_block.ctypes.data, free.ctypes.data, work.ctypes.data, through.ctypes.data,
                        best.ctypes.data)
    return through, float(best[0])


def pushed_chain(starts: np.ndarray, ends: np.ndarray, start: int, end: int, fixed: np.ndarray,
                 per_block: np.ndarray, source: np.ndarray, target: np.ndarray, saving: np.ndarray
                 ) -> tuple[tuple[tuple[int, int, int], ...], float] | None:
    """The best chain over blocks [start, end) (`swarm.client.routing._hop_links`: spans over blocks [starts, ends)
    with their fixed and per-block costs, hops source → target saving `saving`): its links as (span, first block, end
    block) and its cost; NO_CHAIN when none exists; None when the C search is not available or the inputs are not
    what it trusts (then the caller searches with numpy)."""
    library = _library()
    if library is None:
        return None
    m, h = len(starts), len(source)
    fixed, per_block, saving = (np.ascontiguousarray(a, dtype=np.float64) for a in (fixed, per_block, saving))
    starts, ends, source, target = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, ends, source, target))
    if not _trusted(starts, ends, start, end, fixed, per_block) or h >= 1 << 30 or len(target) != h \
            or len(saving) != h or (h and not np.abs(saving).max() < 1e100):
        return None
    if h and (min(source.min(), target.min()) < 0 or max(source.max(), target.max()) >= m):
        return None
    inside = np.minimum(ends, end) - np.maximum(starts, start)
    updates = int(inside[inside > 0].sum())  # (a span's entry improves at most once a boundary inside it)
    if updates >= 1 << 31:  # (the C code's log of them is indexed by int32)
        return None
    work = _workspace(library.route_workspace(end - start, m, h, updates))
    chain, total = np.zeros((3, end - start), dtype=np.int64), np.zeros(1)
    links = library.route_pushed(start, end, m, starts.ctypes.data, ends.ctypes.data, fixed.ctypes.data,
                                 per_block.ctypes.data, h, source.ctypes.data, target.ctypes.data, saving.ctypes.data,
                                 updates, work.ctypes.data, chain[0].ctypes.data, chain[1].ctypes.data,
                                 chain[2].ctypes.data, total.ctypes.data)
    if links == 0:
        return NO_CHAIN
    return tuple((int(k), int(p), int(q)) for k, p, q in chain[:, :links].T.tolist()), float(total[0])
