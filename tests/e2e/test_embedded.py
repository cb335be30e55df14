"""Zero config: `uvicorn app.main:app` starts its own DHT and a peer with every block of the default model."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import httpx
import psutil

from tests.e2e.test_gateway import MODEL, free_port
from tests.launcher import LocalSwarm


def test_zero_config_gateway_serves_and_stops_its_embedded_peer(tmp_path):
    with LocalSwarm(tmp_path) as swarm:
        port = free_port()
        proc = swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": "", "EMBEDDED_NUM_THREADS": "1"})
        children = [c for c in psutil.Process(proc.pid).children() if "swarm.server" in " ".join(
            c.cmdline())]
        assert len(children) == 1, "expected exactly one embedded peer process"
        # its sessions from the gateway come through a Unix socket in a directory only this user can enter
        argv = children[0].cmdline()
        sockets = Path(argv[argv.index("--local-socket") + 1])
        assert stat.S_IMODE(sockets.stat().st_mode) == 0o700 and sockets.stat().st_uid == os.geteuid()
        [socket] = sockets.iterdir()
        assert stat.S_ISSOCK(socket.lstat().st_mode) and stat.S_IMODE(socket.lstat().st_mode) == 0o600
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                "temperature": 0}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["complete_chain"] is True
        # the chat's session (parked now, for reuse) came through that socket: the peer holds a connection on it
        # besides its listening one
        on_socket = [c for c in psutil.Process(children[0].pid).net_connections(kind="unix")
                     if c.laddr == str(socket)]
        assert len(on_socket) >= 2, on_socket
        proc.stop()  # SIGTERM; uvicorn re-raises it after a graceful shutdown, so the exit code is -15
        assert "Application shutdown complete" in proc.log()
        assert not children[0].is_running() or children[0].status() == psutil.STATUS_ZOMBIE
        assert not sockets.exists()  # (the gateway's temporary directory; the peer's own removal: test_local_socket)


def embedded_peers(gateway_pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(gateway_pid).children() if "swarm.server" in " ".join(c.cmdline())]


def test_a_crashed_embedded_peer_is_started_again_and_one_whose_gateway_is_killed_stops(tmp_path):
    """The embedded peer killed (SIGKILL): the gateway kills what its group left, starts it again and answers again;
    the gateway killed (SIGKILL, so it cannot stop the peer): the peer notices its parent is gone and stops, with
    its own children."""
    with LocalSwarm(tmp_path) as swarm:
        port = free_port()
        proc = swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": "", "EMBEDDED_NUM_THREADS": "1"})
        [first] = embedded_peers(proc.pid)
        group = [first, *first.children(recursive=True)]
        first.kill()
        deadline = time.monotonic() + 180
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                "temperature": 0}
        while True:
            assert time.monotonic() < deadline, proc.log()[-3000:]
            time.sleep(2)
            if [p.pid for p in embedded_peers(proc.pid)] in ([], [first.pid]):
                continue
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
            if response.status_code == 200:
                break
        assert "the embedded peer" in proc.log() and "started again" in proc.log()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in group)  # nothing of it left
        [second] = embedded_peers(proc.pid)
        second_group = [second, *second.children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)
        gone = psutil.wait_procs(second_group, timeout=60)[1]
        assert not gone, [p.cmdline() for p in gone]
