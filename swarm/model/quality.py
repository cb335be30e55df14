"""How much a quantized span changes a model's predictions: next-token agreement and perplexity on a text.

Used by the accuracy tests of quantization and by benchmarks/quant.py. The text runs through the client's head and
one or more spans in a single prefill, exactly as a peer computes it (same span code, same KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.model.head import LocalHead
from swarm.model.span import BlockSpan


@torch.inference_mode()
def chain_logits(head: LocalHead, spans: list[BlockSpan], input_ids: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
    """input_ids [1, T] → float32 logits [T, V] through `spans` (which must cover every block, in order).

    `chunk`: feed the text `chunk` tokens at a time through the spans' KV caches, as decoding sessions do (a kernel
    may take another path for a few rows than for a long prefill); None: one prefill."""
    hidden = head.embed(input_ids)
    for span in spans:
        cache = span.new_cache(input_ids.shape[1])
        step = chunk or input_ids.shape[1]
        outs = [span(hidden[:, start : start + step].to(span.device, span.dtype), cache, start).to("cpu", torch.float32)
                for start in range(0, input_ids.shape[1], step)]
        hidden = torch.cat(outs, dim=1)
    return head.logits(hidden)[0]


@dataclass(frozen=True)
class Agreement:
    tokens: int
    top1_agreement: float  # fraction of positions whose argmax equals the reference's
    perplexity: float
    reference_perplexity: float
    max_abs_logit_diff: float

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.reference_perplexity - 1


def compare(reference: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor) -> Agreement:
    """reference, logits: [T, V] over input_ids [1, T]; perplexity of tokens 1..T-1."""
    targets = input_ids[0, 1:]

    def ppl(x: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(x[:-1].float(), targets).exp().item()

    return Agreement(
        tokens=int(targets.numel()),
        top1_agreement=(reference.argmax(-1) == logits.argmax(-1)).float().mean().item(),
        perplexity=ppl(logits),
        reference_perplexity=ppl(reference),
        max_abs_logit_diff=(reference - logits).abs().max().item(),
    )
