"""A user-space link emulator between network namespaces (this kernel has no netem qdisc).

    python -m tests.netem --delay-ms 25 [--jitter-ms 2] [--mbit 100] [--loss 0] NS=ADDR [NS=ADDR ...]

Each namespace NS gets a TUN device `swarmtun` holding ADDR/24 as its only route to the others; this process holds
every TUN's file descriptor, reads each IPv4 packet a host sends, and writes it to the TUN of the host it is addressed
to after the link's one-way delay (± jitter), serialised at the bandwidth cap per direction, or drops it (loss). So
hosts talk over real TCP/IP between their own addresses, and every packet pays the link. Commands on stdin, one per
line: `cut ADDR` (every packet to or from that host is dropped: its links are down), `heal ADDR`, `delay MS`, `slow
ADDR MS` (that host's links take MS more each way), `pair ADDR ADDR MS` (the link between those two hosts takes MS
each way, whatever the others take). It prints
`ready` once every TUN is up, and stops at end of input or SIGTERM. Bounded: at most `--queue` packets in flight
(more are dropped, as a full router queue would).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
DEVICE = "swarmtun"
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def open_tun(namespace: str, address: str) -> int:
    """A TUN device in `namespace` with `address`/24, up; its file descriptor (this process stays in its own
    namespace)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _enter(f"/var/run/netns/{namespace}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(home)
    for command in (["ip", "addr", "add", f"{address}/24", "dev", DEVICE], ["ip", "link", "set", DEVICE, "up"],
                    ["ip", "link", "set", "lo", "up"]):
        subprocess.run(["ip", "netns", "exec", namespace, *command], check=True)
    return fd


class Emulator:
    def __init__(self, tuns: dict[str, int], delay: float, jitter: float, bits_per_second: float | None,
                 loss: float, queue: int):
        self.tuns, self.by_fd = tuns, {fd: address for address, fd in tuns.items()}
        self.delay, self.jitter, self.rate, self.loss, self.queue = delay, jitter, bits_per_second, loss, queue
        self.cut: set[str] = set()
        self.extra: dict[str, float] = {}  # per host: one-way delay added to its links
        self.pairs: dict[frozenset[str], float] = {}  # per pair of hosts: their link's one-way delay
        self._pending: list[tuple[float, int, int, bytes]] = []  # (due, sequence, fd, packet)
        self._free_at: dict[tuple[str, str], float] = {}  # per direction: when its last packet is serialised
        self._sequence = 0
        self._random = random.Random(0)

    def command(self, line: str) -> None:
        verb, _, arg = line.strip().partition(" ")
        if verb == "cut":
            self.cut.add(arg)
        elif verb == "heal":
            self.cut.discard(arg)
        elif verb == "delay":
            self.delay = float(arg) / 1000
        elif verb == "slow":  # slow ADDR MS: that host's links take MS more each way
            address, _, extra = arg.partition(" ")
            self.extra[address] = float(extra) / 1000
        elif verb == "pair":  # pair ADDR ADDR MS: that link takes MS each way
            first, second, delay = arg.split()
            self.pairs[frozenset((first, second))] = float(delay) / 1000

    def receive(self, fd: int, now: float) -> None:
        for _ in range(64):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return
            self._route(self.by_fd[fd], packet, now)

    def _route(self, source: str, packet: bytes, now: float) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # IPv4 only
        destination = ".".join(str(b) for b in packet[16:20])
        fd = self.tuns.get(destination)
        if (fd is None or source in self.cut or destination in self.cut or len(self._pending) >= self.queue
                or (self.loss and self._random.random() < self.loss)):
            return
        link = (source, destination)
        sent = now
        if self.rate:
            sent = max(now, self._free_at.get(link, now)) + len(packet) * 8 / self.rate
            self._free_at[link] = sent
        delay = self.pairs.get(frozenset(link))
        if delay is None:
            delay = self.delay + self.extra.get(source, 0.0) + self.extra.get(destination, 0.0)
        due = sent + max(0.0, delay + (self._random.uniform(-self.jitter, self.jitter) if self.jitter else 0))
        self._sequence += 1
        heapq.heappush(self._pending, (due, self._sequence, fd, packet))

    def deliver(self, now: float) -> float | None:
        """Write the packets due; the seconds until the next one (None: none pending)."""
        while self._pending and self._pending[0][0] <= now:
            _, _, fd, packet = heapq.heappop(self._pending)
            try:
                os.write(fd, packet)
            except OSError:
                pass  # its host is gone
        return self._pending[0][0] - now if self._pending else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every link")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap per direction (0: none)")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped")
    parser.add_argument("--queue", type=int, default=20000, help="packets in flight at most")
    parser.add_argument("hosts", nargs="+", help="NAMESPACE=ADDRESS")
    args = parser.parse_args()
    tuns = {}
    for host in args.hosts:
        namespace, address = host.split("=")
        tuns[address] = open_tun(namespace, address)
    emulator = Emulator(tuns, args.delay_ms / 1000, args.jitter_ms / 1000, args.mbit * 1e6 or None, args.loss,
                        args.queue)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    poller = select.poll()
    for fd in [*tuns.values(), stdin]:
        poller.register(fd, select.POLLIN)
    buffered = b""
    while True:
        wait = emulator.deliver(time.monotonic())
        for fd, _ in poller.poll(None if wait is None else max(0.0, wait) * 1000):
            if fd == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return
                buffered += data
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    emulator.command(line.decode())
            else:
                emulator.receive(fd, time.monotonic())


if __name__ == "__main__":
    main()
