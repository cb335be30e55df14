"""Read chosen tensors from a model directory's safetensors files, without touching the others.

A peer that hosts blocks 15..29 asks for exactly those tensors: `safe_open` maps the files and copies out only the
requested entries, so the other blocks are never materialised in its memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open


class Checkpoint:
    """Index of tensor name → safetensors file for one model directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self.files = {name: self.path / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(file, framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {self.path}")

    def resolve(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint's name for a module's tensor: checkpoints saved from the base model lack its prefix, and
        checkpoints of an encoder saved with a task head carry one (`bert.`, `roberta.`) that the base model lacks."""
        if name in self.files:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.files:
            return name[len(prefix) + 1 :]
        if not prefix:
            depth = name.count(".") + 1
            candidates = [key for key in self.files if key.endswith("." + name) and key.count(".") == depth]
            if len(candidates) == 1:
                return candidates[0]
        return None

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load the named tensors (names as in the checkpoint), casting floating ones to `dtype`."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    # a copy, always: a tensor that views the file's memory map keeps the whole file mapped (and every
                    # page read so far resident) for as long as it lives, e.g. a norm weight next to quantized blocks
                    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                    tensors[name] = tensor.to(cast, copy=True)
        return tensors
