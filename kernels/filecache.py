"""Files and directories computed once per machine and shared by every process: under a file lock, written atomically.

    path = compute_once(target, build)      # build(tmp) writes a file or a directory at tmp, a path that does not exist
    with locked(target):                     # a read-modify-write of a shared file, one process at a time
        write_atomically(target, lambda tmp: tmp.write_text(text))

`compute_once` returns at once when `target` is ready; else it takes the target's lock (a hidden `.NAME.lock` file
beside it: the `filelock` package, flock on POSIX), checks again (a process that held the lock first may have built it
meanwhile), and has `build` write into a temporary sibling that is renamed into place: no process ever reads half a
file, and a build that fails (an exception, a killed compiler) leaves nothing behind but the lock file. Processes that
start together build once; the others wait on the lock and find the result.

Used for the native kernel's shared library (kernels/cpu.py), the GGUF conversion and the canonical checkpoint copies
(swarm/model/gguf_cache.py, swarm/model/anatomy.py) and the peers' throughput measurements
(swarm/server/throughput.py). Everything lives under `cache_root()`: $SWARM_CACHE_DIR, else ~/.cache/swarm.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """Where the caches live: $SWARM_CACHE_DIR, else ~/.cache/swarm."""
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm")


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold `target`'s lock for the block: other processes (and threads) taking it wait until the block ends."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path(target)):
        yield


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` makes a file or a directory at `tmp`, a fresh path beside `target`, which is then renamed to
    `target` (replacing what was there); if `write` or the rename fails, whatever it wrote is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp = scratch / target.name
        write(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"writing {target} made nothing at {tmp}")
        if target.is_dir() and not target.is_symlink():  # a rename replaces files and empty directories only
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compute_once(target: Path, build: Callable[[Path], None],
                 ready: Callable[[Path], bool] = Path.exists) -> Path:
    """`target`, built by `build` (as `write_atomically` runs it) unless `ready(target)` already; one process at a
    time builds, and a process that waited for the lock finds the target ready and builds nothing."""
    if ready(target):
        return target
    with locked(target):
        if not ready(target):
            write_atomically(target, build)
    return target
