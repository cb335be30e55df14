"""A content-addressed store of tensors: one file per SHA-256 of a tensor's bytes, shared by every peer of this
machine and every model (identical tensors are stored once), verified whenever read, bounded by a byte budget with
least-recently-used eviction of what no running peer uses.

    store = ObjectStore()                      # cache_root()/store, or $SWARM_STORE_DIR
    store.put(digest, data)                    # refused (CorruptObject) unless sha256(data) == digest; atomic
    store.get(digest)                          # the bytes, checked again: a flipped byte is found, the object dropped
    store.pin(digests)                         # this process uses them: eviction leaves them alone
    store.evict(budget_bytes)                  # least recently used first, never a pinned object
    part = store.partial(digest)               # a file to fetch into, chunk by chunk: a dead process's is adopted
    store.put_file(digest, part)               # its streamed hash checked, then renamed into place

Objects are written to a temporary sibling and renamed into place (swarm_kernels.filecache.write_atomically), so readers
never see half an object. A read refreshes the object's mtime: eviction goes by it. Processes are named by a token,
`<pid>-<pid namespace>` (containers sharing a store may have the same pids). Pins are one file per process
(`pins/<token>.json`); a dead process's pins no longer count. A tensor being fetched grows in
`partial/<digest>.<token>` (so a fetch holds one chunk in memory, not the tensor); a process that fetches a digest
whose partial file a dead process left (a peer killed mid-fetch, restarted) takes it over and resumes at its end.
Eviction removes dead processes' partial files too. A process of another pid namespace counts as alive while its
files are touched: a partial file as it grows, pins by `refresh()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from swarm_kernels.filecache import cache_root, make_dirs, write_atomically

DIGEST_LENGTH = 64
PIN_TTL = 600.0  # seconds: a pin of another pid namespace's process counts while touched within this (refresh())
PARTIAL_TTL = 900.0  # seconds: so does another namespace's partial file while written to within this


class CorruptObject(ValueError):
    """Bytes whose SHA-256 is not the one they were asked or stored for."""


def digest_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_digest(digest: str) -> bool:
    return len(digest) == DIGEST_LENGTH and all(c in "0123456789abcdef" for c in digest)


class ObjectStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or os.environ.get("SWARM_STORE_DIR") or cache_root() / "store")
        self.objects = self.root / "objects"
        self.pins = self.root / "pins"
        self.partials = self.root / "partial"
        self.pinned: list[str] = []  # what this process pinned last

    def path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise ValueError(f"not a SHA-256 digest: {digest[:80]!r}")
        return self.objects / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes | memoryview) -> Path:
        """Store `data` under `digest` (a no-op when it is there already)."""
        if digest_of(data) != digest:
            raise CorruptObject(f"bytes do not hash to {digest}")
        target = self.path(digest)
        if not target.is_file():
            make_dirs(target.parent)
            write_atomically(target, lambda tmp: tmp.write_bytes(data))
        (self.partials / f"{digest}.{process_token()}").unlink(missing_ok=True)  # a fetch of it given up on
        return target

    def get(self, digest: str) -> bytes:
        """The object's bytes, verified; a corrupt object is removed and CorruptObject raised (fetch it again)."""
        target = self.path(digest)
        data = target.read_bytes()
        if digest_of(data) != digest:
            target.unlink(missing_ok=True)
            raise CorruptObject(f"stored object {digest} was corrupt and is dropped")
        with contextlib.suppress(OSError):  # another process may have evicted it meanwhile: the bytes are read
            os.utime(target)  # used now: the last to be evicted
        return data

    def partial(self, digest: str) -> Path:
        """This process's partial file for `digest`: a dead process's, taken over, if there is one; else empty."""
        self.path(digest)  # the digest is checked
        make_dirs(self.partials)
        mine = self.partials / f"{digest}.{process_token()}"
        if not mine.exists():
            for other in self.partials.glob(f"{digest}.*"):
                if not _alive(other.suffix[1:], other, PARTIAL_TTL):
                    with contextlib.suppress(OSError):  # another process may take it over first
                        other.rename(mine)
                        break
        if not mine.exists():
            mine.touch(mode=0o600)
        return mine

    def put_file(self, digest: str, part: Path) -> Path:
        """Move a fetched file into the store as `digest`; CorruptObject (the file left in place) unless its bytes
        hash to it."""
        target = self.path(digest)
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise CorruptObject(f"bytes do not hash to {digest}")
        make_dirs(target.parent)
        os.replace(part, target)
        return target

    def size(self) -> int:
        """Bytes of the objects and of the partial files."""
        total = 0
        for file in [*self._files(), *(self.partials.glob("*.*") if self.partials.is_dir() else [])]:
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        return total

    def pin(self, digests: Iterable[str]) -> None:
        """Pin `digests` (and only them) for the rest of this process's life (a peer's span)."""
        self.pinned = sorted(set(digests))
        make_dirs(self.pins)
        write_atomically(self.pins / f"{process_token()}.json", lambda tmp: tmp.write_text(json.dumps(self.pinned)))

    def refresh(self) -> None:
        """This process is alive: for processes of other pid namespaces, which cannot check its pid (run it more
        often than PIN_TTL). A pin file another process found stale and removed is written again."""
        pin = self.pins / f"{process_token()}.json"
        with contextlib.suppress(OSError):
            if pin.exists():
                os.utime(pin)
            elif self.pinned:
                self.pin(self.pinned)

    def in_use(self) -> set[str]:
        used: set[str] = set()
        for pin in self.pins.glob("*.json") if self.pins.is_dir() else []:
            if not _alive(pin.stem, pin, PIN_TTL):
                pin.unlink(missing_ok=True)  # its process is gone
                continue
            with contextlib.suppress(OSError, ValueError):
                used.update(str(d) for d in json.loads(pin.read_text()))
        return used

    def evict(self, budget_bytes: int) -> list[str]:
        """Remove least recently used objects that no live process pins until the store holds at most
        `budget_bytes` (or only pinned objects are left); the digests removed."""
        stats = []
        for file in self._files():
            with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
                stat = file.stat()
                stats.append((stat.st_mtime_ns, stat.st_size, file))
        stats.sort(key=lambda s: s[0])
        total = sum(size for _, size, _ in stats)
        used, removed = self.in_use(), []
        for part in self.partials.glob("*.*") if self.partials.is_dir() else []:
            if not _alive(part.suffix[1:], part, PARTIAL_TTL):  # a dead process's unfinished fetch
                part.unlink(missing_ok=True)
            else:  # a live one's: it counts, and cannot go
                with contextlib.suppress(FileNotFoundError):
                    total += part.stat().st_size
        for _, size, file in stats:
            if total <= budget_bytes:
                break
            if file.name in used:
                continue
            total -= size
            file.unlink(missing_ok=True)
            removed.append(file.name)
        return removed

    def _files(self) -> list[Path]:
        if not self.objects.is_dir():
            return []
        return [f for f in self.objects.glob("??/*") if f.is_file() and valid_digest(f.name)]


def process_token() -> str:
    """`<pid>-<pid namespace>`: the pid alone is not unique among processes sharing a store from several containers."""
    return f"{os.getpid()}-{_namespace()}"


def _namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(token: str, path: Path, ttl: float) -> bool:
    """Whether the process of a token is alive: by its pid in our pid namespace; in another (a container sharing
    the store), while its file was touched within `ttl` seconds. Not a token of ours: no."""
    pid, _, namespace = token.partition("-")
    if not (pid.isdigit() and namespace.isdigit() and int(pid) > 0):
        return False
    if int(namespace) != _namespace():
        try:
            return time.time() - path.stat().st_mtime < ttl
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # alive, another user's
    return True
