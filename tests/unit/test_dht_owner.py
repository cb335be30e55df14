"""A DHT node's child process (and its p2pd) ends when the process that started it is killed (swarm.dht.OwnedDHT)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
STARTER = """
from swarm.dht import start_dht
dht = start_dht()
print(dht.pid, flush=True)
import time
time.sleep(120)
"""


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_dht_node_and_its_p2pd_end_when_their_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    node, daemons = None, []
    try:
        assert select.select([starter.stdout], [], [], 60)[0], "the DHT node did not start within 60 s"
        node = psutil.Process(int(starter.stdout.readline()))
        daemons = [p for p in node.children(recursive=True) if p.name() == "p2pd"]
        assert daemons, "the node's p2pd was not found"
        os.kill(starter.pid, signal.SIGKILL)  # it cannot stop its node now
        starter.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(p) for p in [node, *daemons]):
            time.sleep(0.1)
        assert _gone(node) and all(_gone(p) for p in daemons)
    finally:
        if starter.poll() is None:
            starter.kill()
        for process in [node, *daemons] if node is not None else []:  # what this test started, by PID, if left
            if not _gone(process):
                process.kill()
