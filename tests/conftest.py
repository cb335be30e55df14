"""Shared fixtures: tiny random-weight models saved as HF directories (session-scoped, built once)."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hivemind.utils import mpfuture

from tests.tiny_models import make_tiny_model

# every gateway the tests start (in process or not) meters into a throwaway store, never the user's, removed when the
# run ends; a test that makes keys gives its gateway a store of its own
if "GATEWAY_DB" not in os.environ:
    _scratch = tempfile.mkdtemp(prefix="swarm-tests-")
    os.environ["GATEWAY_DB"] = os.path.join(_scratch, "gateway.db")
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
torch.set_num_threads(1)  # peers started by e2e fixtures share the 2 cores with this process


def _set_event_threadsafe(self: mpfuture.MPFuture) -> None:
    """hivemind's MPFuture._set_event_threadsafe less its last resort. When a future's result comes (on hivemind's
    backend thread) while the event loop it was made in is not running, hivemind runs that loop on the backend
    thread (`loop.run_until_complete`). A gateway's or peer's loop always runs; pytest-asyncio's session loop is idle
    between tests, and a DHT future a test left behind then makes the next test find its loop "already running"
    (seen twice in a row in CI, 2026-12-04), or resumes the loop's other tasks on the wrong thread. Here the event is
    set by the loop itself, when it runs next."""
    loop = self._loop
    if loop is None or loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        self._aio_event.set()
        return
    try:
        loop.call_soon_threadsafe(self._aio_event.set)
    except RuntimeError:  # closed meanwhile
        pass


mpfuture.MPFuture._set_event_threadsafe = _set_event_threadsafe  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family → directory of a saved tiny model of that family."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = make_tiny_model(family, root / f"tiny-{family}")
        return built[family]

    return get
