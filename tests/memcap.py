"""Run a command under a memory cap (a child memory cgroup, v1 or v2) and report whether it stayed under it.

    cap = MemoryCap.create("convert", limit_bytes=700 << 20)     # None (and MemoryCap.why_not()) where not possible
    done = cap.run([sys.executable, "-m", ...])                  # the command and its children are all in the cgroup
    cap.peak_bytes(); cap.oom_kills(); cap.remove()

The cap counts every process the command starts (their anonymous memory, and page cache the kernel reclaims before
it kills anything): a command whose memory cannot fit is killed by the kernel's OOM killer, which `oom_kills()` sees.
Only the cgroup this file made is written to, and it is removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _own_memory_cgroup() -> tuple[Path, int] | None:
    """(directory of this process's memory cgroup, cgroup version)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            return base / path.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::"):
            for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                directory = base / line[3:].lstrip("/")
                if (directory / "cgroup.controllers").is_file() and "memory" in (
                        directory / "cgroup.controllers").read_text().split():
                    return directory, 2
    return None


class MemoryCap:
    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @staticmethod
    def why_not() -> str | None:
        if os.geteuid() != 0:
            return "memory cgroups need root"
        if _own_memory_cgroup() is None:
            return "no writable memory cgroup (v1 or v2) on this machine"
        return None

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryCap | None:
        if cls.why_not() is not None:
            return None
        parent, version = _own_memory_cgroup()  # type: ignore[misc]
        path = parent / f"swarm-test-{name}-{os.getpid()}"
        try:
            path.mkdir()
            cap = cls(path, version)
            if version == 1:
                (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit_bytes))  # no escape into swap either
            else:
                (path / "memory.max").write_text(str(limit_bytes))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            return cap
        except OSError:
            if path.is_dir():
                path.rmdir()
            return None

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        procs = self.path / "cgroup.procs"
        return subprocess.run(argv, preexec_fn=lambda: procs.write_text(str(os.getpid())), **kwargs)

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        file = self.path / name
        return int(file.read_text()) if file.exists() else None

    def oom_kills(self) -> int:
        if self.version == 1:
            text = (self.path / "memory.oom_control").read_text()
        else:
            text = (self.path / "memory.events").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        if self.path.is_dir():
            self.path.rmdir()
