"""The parts of a model a client runs itself: input embeddings, final norm and LM head (tied or not).

What some families do around their blocks is read from the config, not written per family: learned absolute
position embeddings added to the token embeddings (GPT-2, OPT: a sibling Embedding of the blocks, with OPT's offset),
`embedding_multiplier` (Granite), and on the logits `logit_scale` (Cohere), `logits_scaling` (Granite) and
`final_logit_softcapping` (Gemma 2 / 3). Gemma's sqrt(hidden) embedding scale lives in its embedding module already.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.model.anatomy import (
    UnsupportedModelError,
    checkpoint_for,
    find_anatomy,
    is_encoder,
    load_config,
    load_parts,
    skeleton,
)
from swarm.model.source import ModelSource
from swarm_kernels import packed, quant


def native_head() -> bool:
    """Whether a client's LM head runs on the native int8 kernel where that kernel holds its weight exactly
    (`quant.exact_native_int8`; SWARM_NATIVE_HEAD=0: never). The default model's head is its Q8_0 embedding
    table: in float32 for oneDNN 113 MB read per call, in the kernel's int8 28 MB + 7 MB of scales and minima, the same
    values. Its logits then differ from oneDNN's by the order of the sums only (~1e-5), and a row's are the same bits
    alone or batched, as with oneDNN (on a CPU with AMX: the same in any call of five rows or more, and within float32
    rounding of those of fewer; swarm_kernels/cpu_amx.h)."""
    return os.environ.get("SWARM_NATIVE_HEAD", "1") != "0"


class CodedEmbedding(nn.Module):
    """An embedding table read from the int8 codes of its tied LM head (`swarm_kernels.quant.exact_native_int8`): each
    looked-up row is code * scale + minimum rounded once to float32, the table's own values, so the float32 table
    (113 MB for the default model) need not be kept."""

    def __init__(self, head: quant.NativeLinear):
        super().__init__()
        self.head = head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        return quant.exact_values(head.qweight[input_ids], head.scale[input_ids], head.minimum[input_ids])


class LocalHead(nn.Module):
    is_encoder = False

    def __init__(self, config: PretrainedConfig, embeddings: nn.Module, norm: nn.Module, lm_head: nn.Linear,
                 position_embeddings: nn.Embedding | None = None, device: str | torch.device = "cpu"):
        """device: where the embedding and the head compute (their tensors in and out stay on the CPU, where the
        client sends, receives and samples); the native and packed heads are the CPU's."""
        super().__init__()
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.config = config
        self.embeddings, self.norm = embeddings, norm
        self.lm_head: nn.Module = lm_head  # a NativeLinear or PackedLinear below where those run it
        self.position_embeddings = position_embeddings
        self.num_blocks: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = lm_head.weight.shape[0]
        self._dtype = lm_head.weight.dtype
        native = quant.exact_native_int8(lm_head) if on_cpu and native_head() and packed.fits(lm_head) else None
        if native is not None:  # a quarter of the bytes, the same values (see `native_head`)
            native.follows_activations = False  # float32 activations always: the logits are what users see
            self.lm_head = native
            if (type(embeddings) is nn.Embedding and embeddings.max_norm is None
                    and embeddings.weight.shape == lm_head.weight.shape
                    and torch.equal(embeddings.weight, lm_head.weight)):  # tied: the table is read from the codes
                self.embeddings = CodedEmbedding(native)
        elif on_cpu and packed.fits(lm_head) and packed.available():  # 2.6x faster for 8 rows of a round (packed)
            self.lm_head = packed.PackedLinear(lm_head)
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", None) or 1.0)
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)
        self.logits_scaling = float(getattr(config, "logits_scaling", None) or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if not on_cpu:
            self.to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The config's end-of-sequence token(s), as a tuple whatever form the config gives them in."""
        eos = self.config.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        """input_ids: [B, T] of tokens at positions position.. → hidden [B, T, H] on the CPU, the input of block 0."""
        return self._embed(input_ids, lambda device: torch.arange(position, position + input_ids.shape[1],
                                                                  device=device)[None])

    @torch.inference_mode()
    def embed_rows(self, input_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """input_ids: [B, 1], row b's one token at positions[b] → hidden [B, 1, H]: what `embed` gives each row alone
        (the same lookups and sums), in one call."""
        return self._embed(input_ids, lambda device: torch.tensor(positions, device=device)[:, None])

    def _embed(self, input_ids: torch.Tensor, positions: Callable[[torch.device], torch.Tensor]) -> torch.Tensor:
        """The token embeddings of input_ids [B, T] (scaled), plus learned position embeddings where the model has
        them, at `positions(device)` ([1, T] or [B, 1]: broadcast against the rows and tokens; made only then)."""
        input_ids = input_ids.to(self.device)
        hidden = self.embeddings(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        if self.position_embeddings is not None:
            offset = int(getattr(self.position_embeddings, "offset", 0))  # OPT's learned positions start at 2
            at = positions(input_ids.device) + offset
            hidden = hidden + nn.Embedding.forward(self.position_embeddings, at)
        return hidden.cpu()  # the same tensor where it is on the CPU already

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, H], the output of the last block → float32 logits [B, T, V] on the CPU."""
        logits = self.lm_head(self.norm(hidden.to(self.device, self.dtype))).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.cpu()


class EncoderHead(nn.Module):
    """The client's part of an encoder-only model: its embeddings module (words, positions, token types, norm)."""

    is_encoder = True

    def __init__(self, config: PretrainedConfig, embeddings: nn.Module):
        super().__init__()
        self.config = config
        self.embeddings = embeddings
        self.num_blocks: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.embeddings.parameters()).dtype

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        if position:
            raise ValueError("an encoder embeds a whole input at once, from position 0")
        return self.embeddings(input_ids=input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.config.model_type} is an encoder-only model: it makes embeddings, not logits")


def load_head(source: ModelSource, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> LocalHead | EncoderHead:
    """The client's part of the model at `source`; device: where a generating model's embedding and head compute (an
    encoder's embeddings stay on the CPU)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the head's device is {device}, but torch sees no CUDA device")
    config = load_config(source.path)
    model = skeleton(config, dtype)
    anatomy = find_anatomy(model, config)
    if is_encoder(config):
        parts = [anatomy.embeddings]
        (embeddings,) = load_parts(checkpoint_for(source.path, model, anatomy, parts), model, anatomy, parts, dtype)
        return EncoderHead(config, embeddings)
    parts = [anatomy.embeddings, anatomy.final_norm, anatomy.lm_head]
    if anatomy.position_embeddings:
        parts.append(anatomy.position_embeddings)
    loaded = load_parts(checkpoint_for(source.path, model, anatomy, parts), model, anatomy, parts, dtype)
    embeddings, norm, lm_head = loaded[:3]
    positions = loaded[3] if anatomy.position_embeddings else None
    if not isinstance(lm_head, nn.Linear) or not isinstance(positions, nn.Embedding | None):
        raise UnsupportedModelError(f"{config.model_type}: the LM head is a {type(lm_head).__name__}, the position "
                                    f"embeddings a {type(positions).__name__}: expected Linear and Embedding")
    return LocalHead(config, embeddings, norm, lm_head, position_embeddings=positions, device=device)
