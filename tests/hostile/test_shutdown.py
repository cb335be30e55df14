"""SIGTERM of the gateway (with its embedded swarm) or of a peer leaves no process behind: checked on the process
tree taken before the signal, not on a log line."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from tests.launcher import LocalSwarm

GONE_WITHIN = 30.0  # seconds: the peers' SIGTERM withdrawal (bounded at 5 s per step) and the DHT's own shutdown


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {p.name()}" for p in alive]
        time.sleep(0.2)


@pytest.mark.parametrize("role, to_group", [("gateway", False), ("peer", False), ("gateway", True)])
def test_sigterm_leaves_no_process_of_its_tree(tmp_path, tiny_model_dir, role, to_group):
    """`to_group`: SIGTERM to every process of its group at once (`kill -- -PGID`, a service manager): its p2pd goes
    first, the DHT child's graceful shutdown hangs and ignores SIGTERM, so it must be killed (swarm.dht.stop_dht)."""
    with LocalSwarm(tmp_path) as swarm:
        if role == "gateway":  # no SWARM_INITIAL_PEERS: it starts its own DHT and peer (the default model: the
            resolve_model(DEFAULT_MODEL_ID)  # gateway needs a tokenizer, which the tiny models lack)
            proc = swarm.start_gateway(0, {"SWARM_MODEL": DEFAULT_MODEL_ID})
        else:
            swarm.start_bootstrap()
            proc = swarm.start_peer(str(tiny_model_dir("llama")), "0:6")
        processes = tree(proc.pid)
        assert len(processes) >= 3, processes  # its DHT child and p2pd daemon(s) at least
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher starts it as the leader of its own group
        else:
            proc.signal(signal.SIGTERM)
        left = wait_gone(processes, GONE_WITHIN)
        assert not left, f"still running {GONE_WITHIN:.0f} s after SIGTERM: {left}"
