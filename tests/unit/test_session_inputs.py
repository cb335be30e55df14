"""What a client session keeps for failover replay: every link's inputs for the positions cached so far."""

from __future__ import annotations

import torch

from swarm.client.session import InferenceSession


def test_kept_inputs_follow_steps_and_rewinds_and_grow_without_recopying_each_step():
    session = InferenceSession(None, [object()], max_length=1000, batch_size=1, step_timeout=1.0)  # type: ignore[list-item]
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(1, 40, 8, generator=g)
    session._remember(0, expected, 0, 0.01)  # a prefill
    buffers = set()
    for _ in range(300):  # decode steps: the buffer is reallocated O(log n) times, not once per step
        token = torch.randn(1, 1, 8, generator=g)
        session._remember(0, token, expected.shape[1], 0.01)
        expected = torch.cat([expected, token], 1)
        buffers.add(session._inputs[0].data_ptr())
    kept = session._inputs[0]
    assert torch.equal(kept[:, : expected.shape[1]], expected) and len(buffers) <= 4
    rewound = torch.randn(1, 3, 8, generator=g)  # a step at an earlier position (regeneration) overwrites the rest
    session._remember(0, rewound, 100, 0.01)
    assert torch.equal(session._inputs[0][:, :103], torch.cat([expected[:, :100], rewound], 1))
    session._remember(0, rewound[:, :1], 0, 0.01)  # back to the start
    assert torch.equal(session._inputs[0][:, :1], rewound[:, :1])
