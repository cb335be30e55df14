"""Every other supported family through two real peers (slow: `make test-all`; the default run covers six families
through peers in tests/e2e/test_families.py and all of them in-process in tests/unit/test_span.py)."""

from __future__ import annotations

import pytest

from swarm.model.anatomy import ENCODER_FAMILIES, SUPPORTED_FAMILIES
from tests.e2e.conftest import TINY_PEER_ARGS
from tests.e2e.test_families import FAMILIES, MORE_FAMILIES, check_family
from tests.launcher import LocalSwarm

pytestmark = pytest.mark.slow

OTHERS = [f for f in SUPPORTED_FAMILIES if f not in (*FAMILIES, *MORE_FAMILIES) and f not in ENCODER_FAMILIES]


@pytest.mark.parametrize("family", OTHERS)
async def test_family_through_two_peers_equals_transformers(tmp_path, tiny_model_dir, family):
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(str(tiny_model_dir(family)), blocks, *TINY_PEER_ARGS, wait=False)
                 for blocks in ("0:3", "3:6")]
        for proc in procs:
            LocalSwarm.peer_id(proc)
        await check_family(swarm, tiny_model_dir, family)
