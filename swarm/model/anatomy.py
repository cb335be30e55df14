"""Model anatomy: find a causal LM's parts from its HF config, and load only the parts one process needs.

The model class transformers picks for the config is instantiated on the meta device (no memory), and its parts are
found by structure, not by per-family code: the decoder blocks are the ModuleList with `num_hidden_layers` entries,
the embeddings and LM head come from `get_input_embeddings()` / `get_output_embeddings()`, the final norm and the
rotary module are the blocks' siblings whose class names say so. A peer then materialises only its blocks
(`load_span`) and a client only the head (`load_head`), reading just those tensors from safetensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from swarm.model.weights import Checkpoint

logger = logging.getLogger(__name__)

# Families whose decoder blocks run unchanged under swarm.model.span.BlockSpan, each checked by a test against the
# same model run whole by transformers. Others are refused with this list rather than silently computed wrong.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Anatomy:
    """Dotted module paths of a causal LM's parts, as named in its state dict."""

    model_type: str
    num_blocks: int
    blocks: str
    embeddings: str
    final_norm: str
    lm_head: str
    rotary: str | None
    base_prefix: str  # "model" for LlamaForCausalLM: checkpoints saved from the base model lack it
    tied_embeddings: bool


def load_config(path: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return config


def skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model with parameters on the meta device; buffers (rotary frequencies) are real but tiny."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def find_anatomy(model: nn.Module, config: PretrainedConfig) -> Anatomy:
    names = {id(module): name for name, module in model.named_modules()}
    blocks_name = next(
        (n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers),
        None,
    )
    if blocks_name is None:
        raise UnsupportedModelError(f"no list of {config.num_hidden_layers} blocks in {type(model).__name__}")
    parent_name = blocks_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    siblings = {f"{parent_name}.{n}" if parent_name else n: type(m).__name__ for n, m in parent.named_children()}
    norms = [n for n, cls in siblings.items() if "norm" in cls.lower()]
    rotary = [n for n, cls in siblings.items() if "rotary" in cls.lower()]
    if len(norms) != 1:
        raise UnsupportedModelError(f"cannot tell the final norm of {type(model).__name__} among {norms}")
    head = model.get_output_embeddings()
    return Anatomy(
        model_type=config.model_type,
        num_blocks=config.num_hidden_layers,
        blocks=blocks_name,
        embeddings=names[id(model.get_input_embeddings())],
        final_norm=norms[0],
        lm_head=names[id(head)],
        rotary=rotary[0] if rotary else None,
        base_prefix=parent_name,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def load_parts(
    checkpoint: Checkpoint, model: nn.Module, anatomy: Anatomy, paths: list[str], dtype: torch.dtype
) -> list[nn.Module]:
    """Materialise the modules at `paths` with their checkpoint tensors (and nothing else)."""
    wanted: dict[str, str] = {}  # state-dict name -> checkpoint name
    for path in paths:
        for key in model.get_submodule(path).state_dict():
            full = f"{path}.{key}"
            found = checkpoint.resolve(full, anatomy.base_prefix)
            if found is None and anatomy.tied_embeddings and path == anatomy.lm_head:
                found = checkpoint.resolve(f"{anatomy.embeddings}.{key}", anatomy.base_prefix)
            if found is None:
                raise FileNotFoundError(f"tensor {full} is missing from {checkpoint.path}")
            wanted[full] = found
    tensors = checkpoint.load(set(wanted.values()), dtype)
    modules = []
    for path in paths:
        module = model.get_submodule(path)
        state = {key: tensors[wanted[f"{path}.{key}"]] for key in module.state_dict()}
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False).eval()
        modules.append(module)
    return modules
