"""A test bed of hosts: each in its own network namespace with its own address on a private network, every packet
between them passing `tests.netem`'s user-space link emulator (one-way delay, jitter, bandwidth, loss, cut links).

    with NetBed(["boot", "peer1", "peer2", "client"], delay_ms=25) as bed:    # 50 ms RTT between any two hosts
        bed.rtt_ms("client", "peer1")                                       # measured (ping)
        proc = bed.spawn("peer1", "peer", ["-m", "swarm.server", "--host", bed.address("peer1"), ...], log)
        bed.cut("peer1"); bed.heal("peer1")

Namespaces, TUN devices and the emulator are created and removed here (root is needed: `NetBed.available()` says
why not). Processes run in a host's namespace by `ip netns exec` (which execs: the PID is the process's own).
Nothing leaves the namespaces: the private network is 10.213.0.0/24, reachable only from inside them; the test
process reaches a gateway through a Unix socket (`uvicorn --uds`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.launcher import ManagedProcess

SUBNET = "10.213.0"
_RTT_PROBE = """
import socket, statistics, sys, time
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    try:
        socket.create_connection((sys.argv[1], 9), timeout=5).close()
    except ConnectionRefusedError:
        times.append(1000 * (time.perf_counter() - start))
print(statistics.median(times))
"""


_BEDS = itertools.count()


class NetBed:
    def __init__(self, hosts: list[str], workdir: Path, delay_ms: float = 0.0, jitter_ms: float = 0.0,
                 mbit: float = 0.0, loss: float = 0.0):
        self.hosts = hosts
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tag = f"swb{os.getpid()}n{next(_BEDS)}"  # two beds of one process never share a namespace
        self.namespaces = {host: f"{self.tag}-{i}" for i, host in enumerate(hosts)}
        self.addresses = {host: f"{SUBNET}.{i + 1}" for i, host in enumerate(hosts)}
        self.settings = (delay_ms, jitter_ms, mbit, loss)
        self.emulator: subprocess.Popen | None = None
        self.processes: list[ManagedProcess] = []

    @staticmethod
    def available() -> str | None:
        """None when namespaces and TUN devices can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2)"
        if not os.path.exists("/dev/net/tun"):
            return "no /dev/net/tun"
        probe = f"swbprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.decode().strip()}"
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
        return None

    def address(self, host: str) -> str:
        return self.addresses[host]

    def __enter__(self) -> NetBed:
        try:
            for namespace in self.namespaces.values():
                subprocess.run(["ip", "netns", "add", namespace], check=True)
            delay, jitter, mbit, loss = self.settings
            argv = [sys.executable, "-m", "tests.netem", "--delay-ms", str(delay), "--jitter-ms", str(jitter),
                    "--mbit", str(mbit), "--loss", str(loss),
                    *(f"{self.namespaces[h]}={self.addresses[h]}" for h in self.hosts)]
            self.emulator = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             cwd=Path(__file__).resolve().parent.parent, text=True)
            assert self.emulator.stdout is not None
            line = self.emulator.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the link emulator did not start (exit {self.emulator.poll()})")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def spawn(self, host: str, name: str, args: list[str], env: dict[str, str] | None = None,
              python: str = sys.executable) -> ManagedProcess:
        """`python args...` in `host`'s namespace (this interpreter, or `python`: another virtualenv's)."""
        argv = ["ip", "netns", "exec", self.namespaces[host], python, *args]
        proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", env)
        self.processes.append(proc)
        return proc

    def run(self, host: str, command: list[str], timeout: float = 30) -> str:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *command], check=True,
                              capture_output=True, text=True, timeout=timeout).stdout

    def rtt_ms(self, source: str, destination: str, count: int = 5) -> float:
        """The round trip from `source` to `destination` as measured: the median time a TCP connection to a closed
        port of it takes to be refused (SYN there, RST back: one round trip; no ping needed)."""
        out = self.run(source, [sys.executable, "-c", _RTT_PROBE, self.addresses[destination], str(count)])
        return float(out.strip())

    def _tell(self, line: str) -> None:
        assert self.emulator is not None and self.emulator.stdin is not None
        self.emulator.stdin.write(line + "\n")
        self.emulator.stdin.flush()

    def cut(self, host: str) -> None:
        """Drop every packet to or from `host` (its links are down; its processes run on)."""
        self._tell(f"cut {self.addresses[host]}")

    def heal(self, host: str) -> None:
        self._tell(f"heal {self.addresses[host]}")

    def slow(self, host: str, extra_ms: float) -> None:
        """Add `extra_ms` each way to every link of `host`."""
        self._tell(f"slow {self.addresses[host]} {extra_ms}")

    def pair(self, first: str, second: str, one_way_ms: float) -> None:
        """The link between `first` and `second` takes `one_way_ms` each way (neither the base delay nor `slow`)."""
        self._tell(f"pair {self.addresses[first]} {self.addresses[second]} {one_way_ms}")

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.emulator is not None:
            if self.emulator.stdin is not None:
                self.emulator.stdin.close()
            try:
                self.emulator.wait(5)
            except subprocess.TimeoutExpired:
                self.emulator.kill()
                self.emulator.wait()
            self.emulator = None
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
