"""Faults a peer can be told to show, for tests of the clients that must survive it (never on by default).

    --fault-nan-after N    every forward after the N-th answers NaN hidden states (a peer gone bad)
    --fault-wrong-after N  every forward after the N-th answers wrong hidden states of the right shape and scale (its
                           output negated: a peer that lies; only verification catches it)
    --fault-step-delay S   every forward sleeps S seconds first (a slow peer)
    --fault-push-wrong     pushes wrong hidden states (negated) to the next peer of a chain while it answers its
                           client the right ones (a peer that lies along the chain only)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class Faults:
    nan_after: int = 0
    step_delay: float = 0.0
    wrong_after: int = 0
    push_wrong: bool = False

    def __bool__(self) -> bool:
        return bool(self.nan_after or self.step_delay or self.wrong_after or self.push_wrong)

    def announce(self) -> None:
        if self.nan_after:
            logger.warning("fault injection: this peer answers NaN after %d steps", self.nan_after)
        if self.wrong_after:
            logger.warning("fault injection: this peer answers wrong hidden states after %d steps", self.wrong_after)
        if self.step_delay:
            logger.warning("fault injection: every forward sleeps %.3f s", self.step_delay)
        if self.push_wrong:
            logger.warning("fault injection: this peer pushes wrong hidden states to the next peers")

    def pushed(self, out: torch.Tensor) -> torch.Tensor:
        """What this peer pushes on to the next peer of a chain for its output `out`."""
        return -out if self.push_wrong else out

    def apply(self, out: torch.Tensor, forwards: int) -> torch.Tensor:
        """The output of the `forwards`-th forward as this faulty peer answers it (on the compute thread)."""
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.nan_after and forwards > self.nan_after:
            return torch.full_like(out, float("nan"))
        if self.wrong_after and forwards > self.wrong_after:
            return -out
        return out
