"""Shared fixtures: tiny random-weight models saved as HF directories (session-scoped, built once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_model

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
