"""scripts/gpu_serve_check.py (issue 23's HTTP benchmark on a GPU) run the way it is tried without one: a small
model of the same kind on CPU peers, through real gateways, every configuration to the end with its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.model.source import resolve_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_serve_check_runs_every_configuration_on_the_cpu(tmp_path):
    tokenizer = resolve_model().path  # the default model's tokenizer and chat template
    out = tmp_path / "out"
    subprocess.run([sys.executable, "scripts/gpu_serve_check.py", "--device", "cpu", "--tokenizer", str(tokenizer),
                    "--streams", "1,3", "--tokens", "12", "--warm-tokens", "6", "--rounds", "2",
                    "--configs", "bf16,bf16_head_cuda,nf4",
                    "--workdir", str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, check=True, timeout=600)
    result = json.loads((out / "gpu_serve.json").read_text())
    assert result["failed"] == {}
    assert result["rounds"] == {"bf16": 2, "bf16_head_cuda": 2, "nf4": 2}
    for name in ("bf16", "bf16_head_cuda", "nf4"):
        figures = result["results"][name]
        assert figures["1"]["aggregate_tok_s"] > 0 and figures["3"]["ttft_p50_s"] > 0
        assert len(figures["3"]["ratio_runs"]) == 2
    assert result["model"]["vocab"] == 49152 and result["model"]["shape"]["num_hidden_layers"] == 4
