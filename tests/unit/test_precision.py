"""choose_precision: what `auto` resolves to on this machine, and clear errors for impossible choices."""

from __future__ import annotations

import pytest
import torch

from swarm.model.precision import choose_precision
from swarm.server.settings import PeerSettings


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_auto_on_cpu_is_fp32_with_int8_linears_or_int4_for_a_q4_checkpoint():
    p = choose_precision()
    assert (p.device, p.dtype, p.quant, p.kernel) == ("cpu", torch.float32, "int8", "native")
    assert (choose_precision(native_quant="q4_1").quant, choose_precision(native_quant="q4_1").kernel) == ("int4",
                                                                                                          "native")
    assert choose_precision(native_quant="q8_0").quant == "int8"
    assert choose_precision(quant="none", native_quant="q4_1").quant == "none"  # explicit choices win
    assert "int8 weights (native kernel)" in p.describe()


def test_explicit_choices_and_errors():
    p = choose_precision("cpu", "bfloat16", "nf4")
    assert (p.dtype, p.quant, p.kernel, p.dtype_name) == (torch.bfloat16, "nf4", "reference", "bfloat16")
    with pytest.raises(ValueError, match="--quant 'int3'"):
        choose_precision(quant="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            choose_precision(device="cuda")


def test_peer_flags_accept_every_quantization():
    for quant in ("auto", "none", "int8", "int4", "nf4"):
        assert PeerSettings(quant=quant).quant == quant
    with pytest.raises(ValueError):
        PeerSettings(quant="fp8")
