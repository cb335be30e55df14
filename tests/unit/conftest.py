"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from swarm_kernels import cpu
from tests.unit.test_native_kernels import NATIVE_BUILDS, native_library


@pytest.fixture(params=NATIVE_BUILDS)
def native_build(request, monkeypatch):
    """QuantLinear's native kernel, running the build of this parameter (also the one kernel_rounding asks for its
    order of the sums)."""
    if not cpu.available():
        pytest.skip("no working C compiler for swarm_kernels/cpu_affine.c")
    library = native_library(request.param)
    monkeypatch.setattr(cpu, "_library", lambda: library)
    return library
