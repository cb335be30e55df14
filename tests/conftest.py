"""Shared fixtures: tiny random-weight models saved as HF directories (session-scoped, built once)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_model

# every gateway the tests start (in process or not) meters into a throwaway store, never the user's; a test that makes
# keys gives its gateway a store of its own
os.environ.setdefault("GATEWAY_DB", os.path.join(tempfile.mkdtemp(prefix="swarm-tests-"), "gateway.db"))
torch.set_num_threads(1)  # peers started by e2e fixtures share the 2 cores with this process


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
