"""Files and directories computed once per machine and shared by every process: under a file lock, written atomically.

    path = compute_once(target, build)      # build(tmp) writes a file or a directory at tmp, a path that does not exist
    with locked(target):                     # a read-modify-write of a shared file, one process at a time
        write_atomically(target, lambda tmp: tmp.write_text(text))

`compute_once` returns at once when `target` is ready; else it takes the target's lock (a hidden `.NAME.lock` file
beside it, held with flock), checks again (a process that held the lock first may have built it
meanwhile), and has `build` write into a temporary sibling that is renamed into place: no process ever reads half a
file, and a build that fails (an exception, a killed compiler) leaves nothing behind but the lock file. Processes that
start together build once; the others wait on the lock and find the result.

Used for the native kernel's shared library (cpu.py), the GGUF conversion and the canonical checkpoint copies
(swarm/model/gguf_cache.py, swarm/model/anatomy.py) and the peers' throughput measurements
(swarm/server/throughput.py). Everything lives under `cache_root()`: $SWARM_CACHE_DIR, else ~/.cache/swarm.

What another local user could plant there is not trusted: directories are created 0700; a lock file is opened without
following a symlink (nor truncated), so a link planted as a lock cannot make us write elsewhere; and what is loaded as
code (the native kernel's shared library) must pass `check_private` first: a regular file (not a link) owned by this
user, in directories owned by this user, none writable by group or others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_root() -> Path:
    """Where the caches live: $SWARM_CACHE_DIR, else ~/.cache/swarm."""
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm")


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def make_dirs(path: Path) -> None:
    """`path` and its missing parents, created readable and writable by this user only."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):  # Path.mkdir(parents=True) would make the parents with the default mode
        directory.mkdir(mode=0o700, exist_ok=True)


def check_private(path: Path, *, up_to: Path | None = None) -> None:
    """Raise PermissionError unless `path` is a regular file (not a link) or a directory owned by this user and not
    writable by group or others, and so is each directory above it up to `up_to` (included)."""
    current = path
    while True:
        info = os.lstat(current)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise PermissionError(f"{current} is not a regular file or directory (a symbolic link?)")
        if info.st_uid != os.getuid():
            raise PermissionError(f"{current} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(f"{current} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")
        if up_to is None or current == up_to or current.parent == current:
            return
        current = current.parent


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold `target`'s lock for the block: other processes (and threads: each takes the lock through its own open
    file) wait until the block ends. A symbolic link in the lock's place is an error (OSError), never followed."""
    make_dirs(target.parent)
    fd = os.open(lock_path(target), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` makes a file or a directory at `tmp`, a fresh path beside `target`, which is then renamed to
    `target` (replacing what was there); if `write` or the rename fails, whatever it wrote is removed."""
    make_dirs(target.parent)
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
