"""A model's manifest and content id (swarm.model.manifest): reproducible, sensitive to one changed weight, shared
across models block by block; and what the protocol and the router do with a peer announcing other weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm.client.router import Router
from swarm.model.manifest import build_manifest, content_id, load_manifest, shared_tensors
from swarm.protocol import SpanInfo


@pytest.fixture
def model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    return tiny_model_dir("llama")


def fine_tuned(model, tmp_path, block: int):
    """A copy of `model` with one weight of one block changed (a fine-tune of that block)."""
    copy = tmp_path / "tuned"
    shutil.copytree(model, copy)
    file = next(copy.glob("*.safetensors"))
    tensors = load_file(file)
    name = f"model.layers.{block}.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, file, metadata={"format": "pt"})
    return copy


def test_the_content_id_is_reproducible_and_independent_of_where_the_model_lies(model, tmp_path):
    first = content_id(model)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    assert content_id(model) == first
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model, moved)
    assert content_id(moved) == first  # hashed again (another directory), same weights, same id
    manifest = load_manifest(model)
    assert manifest["num_blocks"] == len(manifest["blocks"]) == 6
    assert {t["name"] for t in manifest["block_manifests"][0]["tensors"]} >= {"self_attn.q_proj.weight",
                                                                              "mlp.down_proj.weight"}
    assert build_manifest(model)["content_id"] == first  # the cache holds what a fresh computation gives


def test_one_changed_weight_changes_its_block_and_the_id_and_nothing_else(model, tmp_path):
    original, tuned = load_manifest(model), load_manifest(fine_tuned(model, tmp_path, block=2))
    assert tuned["content_id"] != original["content_id"]
    changed = [i for i, (a, b) in enumerate(zip(original["blocks"], tuned["blocks"], strict=True)) if a != b]
    assert changed == [2] and tuned["head"] == original["head"]
    shared, total = shared_tensors(original, tuned)
    down = next(t for t in tuned["block_manifests"][2]["tensors"] if t["name"] == "mlp.down_proj.weight")
    assert total - shared == torch.Size(down["shape"]).numel() * 4  # only that tensor is new to a store


def test_span_records_accept_a_content_id_only_in_its_form():
    record = SpanInfo("peer", "m", 0, 2, 2, 8, "float32", "none", 64, 100, 100, 0).to_dict()
    assert SpanInfo.from_dict({**record, "content_id": "sha256:" + "ab" * 32}).content_id == "sha256:" + "ab" * 32
    assert SpanInfo.from_dict(record).content_id == ""
    for bad in ("sha256:" + "AB" * 32, "sha256:" + "a" * 63, "md5:" + "a" * 64, "sha256:" + "g" * 64, 7):
        with pytest.raises(ValueError):
            SpanInfo.from_dict({**record, "content_id": bad})


def test_the_router_leaves_out_peers_that_announce_other_weights():
    mine, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64

    def span(peer: str, content: str) -> SpanInfo:
        return SpanInfo(peer, "m", 0, 2, 2, 8, "float32", "none", 64, 100, 100, 0, content_id=content)

    router = Router(None, None, "m", 2, content_id=mine)
    router.spans = [span("same", mine), span("other", other), span("older", "")]
    assert [s.peer_id for s in router.spans] == ["same", "older"]
    router.content_id = None  # a client that does not check sees them all
    assert len(router.spans) == 3


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2_moe", "bert"])
def test_every_kind_of_model_has_a_manifest(tiny_model_dir, tmp_path, monkeypatch, family):
    """Learned positions (gpt2, opt), a canonical copy (MoE experts), an encoder (no final norm, no LM head)."""
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    manifest = load_manifest(tiny_model_dir(family))
    assert len(manifest["block_manifests"]) == manifest["num_blocks"] == 6
    assert manifest["head_manifest"]["tensors"] and all(block["tensors"] for block in manifest["block_manifests"])
