"""Model anatomy: find a causal LM's parts from its HF config, and load only the parts one process needs.

The model class transformers picks for the config is instantiated on the meta device (no memory), and its parts are
found by structure, not by per-family code: the decoder blocks are the ModuleList with `num_hidden_layers` entries,
the embeddings and LM head come from `get_input_embeddings()` / `get_output_embeddings()`, the final norm and the
rotary module are the blocks' siblings whose class names say so. A peer then materialises only its blocks
(`load_span`) and a client only the head (`load_head`), reading just those tensors from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from swarm.model.weights import Checkpoint
from swarm_kernels.filecache import cache_root, compute_once

logger = logging.getLogger(__name__)

# Families whose decoder blocks run unchanged under swarm.model.span.BlockSpan, each checked by a test against the
# same model run whole by transformers (tests/unit/test_span.py builds a tiny one of each from its config class).
# Others are refused with this list rather than silently computed wrong: e.g. bloom (ALiBi biases built outside the
# blocks and a layer norm on the embeddings) is not supported.
SUPPORTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gptj",
    "gpt_neox", "falcon", "opt", "mixtral", "qwen2_moe", "qwen3_moe", "stablelm", "starcoder2", "olmo", "olmo2",
    "granite", "cohere", "smollm3", "glm",
)


# Encoder-only families (embeddings): blocks on peers without a KV cache, the embeddings module on the client.
ENCODER_FAMILIES = ("bert", "roberta")


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
    position_embeddings: str | None = None  # learned absolute positions added to the token embeddings (GPT-2, OPT)
    attn_implementation: str = "sdpa"


def load_config(path: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES + ENCODER_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_FAMILIES)} "
            f"(generation) and {', '.join(ENCODER_FAMILIES)} (embeddings)"
        )
    return config


def is_encoder(config: PretrainedConfig) -> bool:
    return config.model_type in ENCODER_FAMILIES


def skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The whole model with parameters on the meta device; buffers (rotary frequencies) are real but tiny.
    SDPA attention where the family has it, else transformers' eager attention (then spans pass explicit masks)."""
    auto = AutoModel if is_encoder(config) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        try:
            return auto.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except ValueError as e:
            if "scaled_dot_product_attention" not in str(e):
                raise
            return auto.from_config(config, dtype=dtype, attn_implementation="eager")


def find_anatomy(model: PreTrainedModel, config: PretrainedConfig) -> Anatomy:
    names = {id(module): name for name, module in model.named_modules()}
    blocks_name = next(
        (n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == config.num_hidden_layers),
        None,
    )
    if blocks_name is None:
        raise UnsupportedModelError(f"no list of {config.num_hidden_layers} blocks in {type(model).__name__}")
    parent_name = blocks_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if is_encoder(config):  # e.g. BertModel: embeddings (words, positions, token types, norm) → encoder.layer
        return Anatomy(model_type=config.model_type, num_blocks=config.num_hidden_layers, blocks=blocks_name,
                       embeddings=names[id(model.get_input_embeddings())].rpartition(".")[0], final_norm="",
                       lm_head="", rotary=None, base_prefix="", tied_embeddings=False,
                       attn_implementation=model.config._attn_implementation)
    siblings = {f"{parent_name}.{n}" if parent_name else n: type(m).__name__ for n, m in parent.named_children()}
    norms = [n for n, cls in siblings.items() if "norm" in cls.lower()]
    rotary = [n for n, cls in siblings.items() if "rotary" in cls.lower()]
    if len(norms) != 1:
        raise UnsupportedModelError(f"cannot tell the final norm of {type(model).__name__} among {norms}")
    token_embeddings = model.get_input_embeddings()
    positions = [f"{parent_name}.{n}" if parent_name else n for n, m in parent.named_children()
                 if isinstance(m, nn.Embedding) and m is not token_embeddings]
    if len(positions) > 1:
        raise UnsupportedModelError(f"cannot tell the position embeddings of {type(model).__name__} among {positions}")
    unsupported = [n for n, m in parent.named_children() if n in ("project_in", "project_out") and m is not None]
    if unsupported:
        raise UnsupportedModelError(f"{type(model).__name__} projects around its blocks ({unsupported}): not supported")
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
        position_embeddings=positions[0] if positions else None,
        attn_implementation=model.config._attn_implementation,
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


def checkpoint_for(path: Path, model: nn.Module, anatomy: Anatomy, parts: list[str]) -> Checkpoint:
    """The checkpoint to read the parts from: the model directory itself when its tensor names are the model's,
    else (a family whose checkpoints use legacy names or per-expert tensors that transformers renames and fuses on
    load: GPT-NeoX, Mixtral, Qwen-MoE, ...) a canonical copy made once by transformers' own loader and cached.
    Making that copy loads the whole model once on this machine."""
    checkpoint = Checkpoint(path)
    names = [f"{part}.{key}" for part in parts for key in model.get_submodule(part).state_dict()]
    missing = [name for name in names
               if checkpoint.resolve(name, anatomy.base_prefix) is None
               and not (anatomy.tied_embeddings and name.startswith(anatomy.lm_head + "."))]
    if not missing:
        return checkpoint
    logger.info("%s names %d tensors differently from %s (e.g. %s): using a canonical copy", path, len(missing),
                type(model).__name__, missing[0])
    return Checkpoint(canonical_dir(Path(path)))


def canonical_dir(path: Path) -> Path:
    """A safetensors copy of the model at `path` under the names of transformers' own model classes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        h.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    target = cache_root() / "canonical" / f"{path.resolve().name}-{h.hexdigest()[:16]}"
    return compute_once(target, lambda out: _canonicalize(path, out),
                        ready=lambda path: (path / "model.safetensors").is_file())


def _canonicalize(path: Path, out: Path) -> None:
    from safetensors.torch import save_file

    logger.info("writing a canonical copy of %s into %s (once)", path, out)
    auto = AutoModel if is_encoder(AutoConfig.from_pretrained(path)) else AutoModelForCausalLM
    model = auto.from_pretrained(path)
    out.mkdir()
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():  # tied tensors share storage: save_file wants them apart
        key = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(path / "config.json", out / "config.json")
    (out / "swarm-canonical.json").write_text(json.dumps({"source": str(path)}))
