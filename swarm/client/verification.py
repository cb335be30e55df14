"""Checking untrusted peers' answers on a second replica: when, against what tolerance, and who is wrong.

A peer can answer a step with hidden states of the right shape, dtype and scale that are simply wrong (it skipped
its blocks, or lies on purpose); shape and finiteness checks never catch that. So a session re-runs some steps of a
link on another replica of the same blocks, from the inputs it already keeps for replay (the link's inputs up to the
step and the step itself, as one prefill on a fresh verification session), and compares the step's output:

- **when** (`VerificationPolicy`, `PeerHealth.verify_due`): every step of a peer until it has passed `warmup` checks
  (its first prefill is checked before the first token is released), then a fraction that falls with its clean
  record, 1 / (1 + checks passed), down to `rate`; `rate` 0 turns verification off. A check costs a forward over the
  session's history on the verifier.
- **waiting or not**: a warm-up check holds the step's output until it passed (a new peer's lie never reaches the
  next link or a token). Later checks (`background`) run beside the decoding, one at a time per session, so that a
  check does not stall the session (nor the decode group it advances with, swarm.client.decoding); a peer found
  wrong is banned at once, and at the session's next step its link is replaced by replay and the links after it
  recompute their caches from the new link's outputs. Tokens released between the lie and the check's verdict are
  not taken back (nor are tokens of steps no check sampled: sampling bounds how long a liar goes unnoticed, it does
  not vouch for every token).
- **tolerance** (`tolerance`): relative L2 distance ‖a − b‖ / ‖b‖ of the two outputs, bounded by what the two peers'
  announced precisions allow: same dtype and quantization, float32 activations → float32 rounding differences only
  (different kernels and batch shapes); otherwise the larger of their precisions' typical error (int8 activations:
  always, see `tolerance`). Wrong hidden states are off by O(1).
- **who is wrong** (`judge`): on a mismatch a third replica decides; the side that disagrees with it is reported
  FAILED (banned). Without a third opinion both are: a suspect peer is not worth keeping. The session then fails
  the link over by replay, so the step is recomputed on an honest peer before its token is released.

A peer that is the only server of its blocks cannot be checked (nothing to compare with): its steps pass unverified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.protocol import SpanInfo

# Relative L2 error of a span's hidden states against float32 (order of magnitude, per precision); the tolerance
# for two peers of different precisions is a multiple of the larger one.
PRECISION_ERROR = {"none": 1e-4, "int8": 3e-2, "int4": 6e-2, "nf4": 0.15}
HALF_ERROR = 1e-2  # bfloat16 / float16 activations
# int8/int4 blocks with int8 activations (--activations int8) against float32 ones, over SmolLM2's 30 blocks: 5.5e-2
# for a 256-token text, 3e-2 for chat prompts' prefills and up to 6.4e-2 for the 40 decode steps after them (each
# side on its own cache, as a verifier replays a link)
# (an unknown mode counts as the loosest level there is)
ACTIVATIONS_ERROR = {"float32": 0.0, "int8": 8e-2}
# float16 KV caches (--kv-dtype) against float32 ones, SmolLM2's 30 int4 blocks: 3.5e-4 for a prefill chunk after
# 100 tokens, up to 5.8e-4 for the 20 decode steps after it (a link replayed on a float16 cache: 1.4e-4)
KV_ERROR = {"float32": 0.0, "float16": 2e-3}
SAME_PRECISION = 1e-3  # same dtype and quantization: rounding differences of kernels and batch shapes only
MARGIN = 2.0


@dataclass(frozen=True)
class VerificationPolicy:
    rate: float = 0.01  # steps checked once a peer has a clean record (0: verification off)
    warmup: int = 3  # checks a peer must pass before its steps are sampled at falling rates
    background: bool = True  # once a peer passed its warm-up, its checks run beside the decoding (see the module)


def _error_level(info: SpanInfo) -> float:
    level = PRECISION_ERROR.get(info.quant, max(PRECISION_ERROR.values()))
    if info.dtype != "float32":
        level = max(level, HALF_ERROR)
    # int8 activations add their own error to the weights' (e.g. an int4 checkpoint that is not lossless)
    loosest = max(*PRECISION_ERROR.values(), *ACTIVATIONS_ERROR.values())
    return level + ACTIVATIONS_ERROR.get(info.activations, loosest) + KV_ERROR.get(info.kv_dtype, loosest)


def tolerance(first: SpanInfo, others: list[SpanInfo]) -> float:
    """How far (relative L2) a peer's output may be from the same step computed by a chain of `others`. Two peers of
    int8 activations are not held to rounding: a verifier replays a link's history as one prefill where the peer
    decoded it a token at a time, and a last-bit difference there moves activations across their int8 grid (1e-2 to
    3e-2 apart over SmolLM2's 30 blocks)."""
    mine = (first.dtype, first.quant, first.activations, first.kv_dtype)
    if all((o.dtype, o.quant, o.activations, o.kv_dtype) == mine for o in others) and first.activations == "float32":
        return SAME_PRECISION
    return MARGIN * max(_error_level(info) for info in [first, *others])


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ‖a − b‖ / ‖b‖ (float64; inf for a shape mismatch or non-finite values)."""
    if a.shape != b.shape:
        return float("inf")
    a64, b64 = a.double(), b.double()
    scale = float(b64.norm())
    value = float((a64 - b64).norm()) / max(scale, 1e-30)
    return value if value == value else float("inf")  # NaN → inf


def judge(peer_out: torch.Tensor, verifier_out: torch.Tensor, third_out: torch.Tensor | None,
          peer_tol: float, verifier_tol: float) -> tuple[bool, bool]:
    """After a mismatch between a peer and a verifier, (peer is wrong, verifier is wrong) by a third opinion
    (None: none exists, both are taken for wrong). `peer_tol` bounds peer vs third, `verifier_tol` verifier vs
    third."""
    if third_out is None:
        return True, True
    peer_agrees = distance(peer_out, third_out) <= peer_tol
    verifier_agrees = distance(verifier_out, third_out) <= verifier_tol
    return not peer_agrees, not verifier_agrees
