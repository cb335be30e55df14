"""Usage rows survive the gateway being killed (SIGKILL) under load: every answer a client received whole has its
row in the store, because a generation's row is committed before the answer's last byte is sent (the `[DONE]` of
a stream, the body of a plain answer); what can be missing is only the rows of requests still in flight at the
kill, which no client saw end. A real `uvicorn tests.hostile.gateway_app:app` with a key from the SQLite store, on
127.0.0.1; its generations are slowed so that some are always in flight.

Run: .venv/bin/python -m pytest tests/hostile/test_usage_durability.py
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import httpx

from app.keystore import KeyStore
from tests.hostile.test_gateway_http import free_port
from tests.launcher import ManagedProcess

CLIENTS = 6


def test_no_answered_request_loses_its_usage_row_when_the_gateway_is_killed(tmp_path):
    db = tmp_path / "gateway.db"
    store = KeyStore(db)
    key_id, key = (lambda made: (made[0].id, made[1]))(store.create("load"))
    port = free_port()
    process = ManagedProcess("gateway", [sys.executable, "-m", "uvicorn", "tests.hostile.gateway_app:app", "--host",
                                         "127.0.0.1", "--port", str(port)], tmp_path / "uvicorn.log",
                             {"GATEWAY_DB": str(db), "FAKE_STEP_SECONDS": "0.01"})
    answered: list[tuple[str, int, int]] = []  # request id, prompt and completion tokens, as the client got them
    started = threading.Semaphore(0)
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                stream = (number + i) % 2 == 1
                body = {"model": "fake/model-1", "messages": [{"role": "user", "content": f"c{number} r{i}"}],
                        "max_tokens": 8 + i % 7, "stream": stream, "stream_options": {"include_usage": True}}
                if not stream:
                    del body["stream_options"]
                started.release()
                try:
                    response = http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError:
                    return  # killed mid-request: this one was never answered
                usage = _usage(response.text, stream)
                if response.status_code == 200 and usage is not None:
                    answered.append((response.headers["x-request-id"], usage["prompt_tokens"],
                                     usage["completion_tokens"]))

    try:
        process.wait_for(r"Uvicorn running on", timeout=180)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.signal(signal.SIGKILL)
        process.proc.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        stop.set()
        process.stop()
    got = {row.request_id: row for row in store.usage()}
    assert len(answered) >= 60
    missing = [request_id for request_id, _, _ in answered if request_id not in got]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no usage row"
    for request_id, prompt, completion in answered:
        row = got[request_id]
        assert (row.key_id, row.prompt_tokens, row.completion_tokens, row.status) == (key_id, prompt, completion,
                                                                                        "ok")
    # rows the clients never saw answered: at most one per client (the request each had in flight at the kill)
    assert len(got) - len(answered) <= CLIENTS


def _usage(text: str, stream: bool) -> dict | None:
    """The answer's usage, if it arrived whole (a stream: its usage chunk and then [DONE])."""
    if not stream:
        try:
            return json.loads(text)["usage"]
        except (ValueError, KeyError):
            return None
    lines = [line for line in text.splitlines() if line.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        return None
    return json.loads(lines[-2][6:]).get("usage")
