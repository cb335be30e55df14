"""Start and reap a real local swarm (bootstrap DHT node + peers) as separate processes on 127.0.0.1.

Used by the e2e fixtures and the benchmarks. Readiness is polled from each process's log (no fixed sleeps); a
process that dies while starting fails the caller at once with its log. Every process is started in its own
process group, so stopping it also stops the DHT child and p2pd daemon it spawned.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT = 180.0


def _terminate_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies, even if it is killed and cannot reap."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ProcessFailed(RuntimeError):
    pass


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True, cwd=cwd or Path(__file__).resolve().parent.parent,
                                     preexec_fn=_terminate_with_parent)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match:
        """Poll the log until `pattern` appears; raise with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group if it does not exit in time."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the group we created: this process's DHT child and p2pd
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()
        return self.proc.returncode


class LocalSwarm:
    """A bootstrap node plus any number of peers, all logging under `workdir`."""

    def __init__(self, workdir: Path, peer_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unquantized unless a test asks otherwise: most tests compare the swarm token by token with fp32
        # transformers, which an int8 peer (the CPU default) only approximates.
        self.peer_env = {"SWARM_PEER_QUANT": "none", **(peer_env or {})}
        self.processes: list[ManagedProcess] = []
        self.initial_peers: list[str] = []

    def start_bootstrap(self) -> list[str]:
        proc = self._spawn("bootstrap", ["-m", "swarm.dht"])
        proc.wait_for(r"DHT bootstrap node ready")
        self.initial_peers = re.findall(r"^\s+(/ip4/\S+)$", proc.log(), flags=re.MULTILINE)
        return self.initial_peers

    def start_peer(self, model: str, blocks: str, *extra: str, wait: bool = True,
                   env: dict[str, str] | None = None) -> ManagedProcess:
        """Start `python -m swarm.server` for `blocks` of `model`; with wait, return once it has announced."""
        argv = ["-m", "swarm.server", "--model", model, "--blocks", blocks, "--num-threads", "1",
                "--initial-peers", *self.initial_peers, *extra]
        proc = self._spawn(f"peer-{blocks.replace(':', '-')}-{len(self.processes)}", argv, env)
        if wait:
            proc.wait_for(r"peer ready: .* peer_id=(\S+)")
        return proc

    def start_placed_peer(self, model: str, *extra: str, wait: bool = True,
                          env: dict[str, str] | None = None) -> ManagedProcess:
        """Start `python -m swarm.server` without --blocks: the peer chooses its span."""
        argv = ["-m", "swarm.server", "--model", model, "--initial-peers", *self.initial_peers, *extra]
        proc = self._spawn(f"peer-placed-{len(self.processes)}", argv, env)
        if wait:
            proc.wait_for(r"peer ready: .* peer_id=(\S+)")
        return proc

    @staticmethod
    def peer_id(proc: ManagedProcess) -> str:
        return proc.wait_for(r"peer ready: .* peer_id=(\S+)").group(1)

    def start_gateway(self, port: int, env: dict[str, str], cwd: Path | None = None) -> ManagedProcess:
        """`uvicorn app.main:app` on 127.0.0.1:port (the code of the checkout `cwd`, by default this one); returns once
        the app has started (its swarm is ready)."""
        argv = ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
        proc = self._spawn(f"gateway-{port}", argv, env, cwd)
        proc.wait_for(r"Application startup complete")
        return proc

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, *args], self.workdir / f"{name}.log", {**self.peer_env,
                                                                                           **(env or {})}, cwd)
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
