"""A content-addressed store of tensors: one file per SHA-256 of a tensor's bytes, shared by every peer of this
machine and every model (identical tensors are stored once), verified whenever read, bounded by a byte budget with
least-recently-used eviction of what no running peer uses.

    store = ObjectStore()                      # cache_root()/store, or $SWARM_STORE_DIR
    store.put(digest, data)                    # refused (CorruptObject) unless sha256(data) == digest; atomic
    store.get(digest)                          # the bytes, checked again: a flipped byte is found, the object dropped
    store.pin(digests)                         # this process uses them: eviction leaves them alone
    store.evict(budget_bytes)                  # least recently used first, never a pinned object

Objects are written to a temporary sibling and renamed into place (kernels.filecache.write_atomically), so readers
never see half an object. A read refreshes the object's mtime: eviction goes by it. Pins are one file per process
(`pins/<pid>.json`); a dead process's pins no longer count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from kernels.filecache import cache_root, make_dirs, write_atomically

DIGEST_LENGTH = 64


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

    def size(self) -> int:
        total = 0
        for file in self._files():
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        return total

    def pin(self, digests: Iterable[str]) -> None:
        """Pin `digests` for the rest of this process's life (a peer's span)."""
        make_dirs(self.pins)
        write_atomically(self.pins / f"{os.getpid()}.json", lambda tmp: tmp.write_text(json.dumps(sorted(set(
            digests)))))

    def in_use(self) -> set[str]:
        used: set[str] = set()
        for pin in self.pins.glob("*.json") if self.pins.is_dir() else []:
            try:
                pid = int(pin.stem)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                pin.unlink(missing_ok=True)  # its process is gone
                continue
            except PermissionError:
                pass  # alive, another user's
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
