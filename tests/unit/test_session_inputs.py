"""What a client session keeps for failover replay: every link's inputs for the positions cached so far."""

from __future__ import annotations

import torch

from swarm.client.session import InferenceSession


def test_kept_inputs_follow_steps_and_rewinds_and_grow_without_recopying_each_step():
    session = InferenceSession(None, [object()], max_length=1000, batch_size=1, step_timeout=1.0)  # type: ignore[list-item]
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(1, 40, 8, generator=g)
    session.remember(0, expected, 0, 0.01)  # a prefill
    buffers = set()
    for _ in range(300):  # decode steps: the buffer is reallocated O(log n) times, not once per step
        token = torch.randn(1, 1, 8, generator=g)
        session.remember(0, token, expected.shape[1], 0.01)
        expected = torch.cat([expected, token], 1)
        buffers.add(session._inputs[0].data_ptr())
    kept = session._inputs[0]
    assert torch.equal(kept[:, : expected.shape[1]], expected) and len(buffers) <= 4
    rewound = torch.randn(1, 3, 8, generator=g)  # a step at an earlier position (regeneration) overwrites the rest
    session.remember(0, rewound, 100, 0.01)
    assert torch.equal(session._inputs[0][:, :103], torch.cat([expected[:, :100], rewound], 1))
    session.remember(0, rewound[:, :1], 0, 0.01)  # back to the start
    assert torch.equal(session._inputs[0][:, :1], rewound[:, :1])


class RecordingStream:
    """A stream that records what it was sent (swarm.client.stream.PeerStream's sending side)."""

    def __init__(self, name: str, push_key: str = "a" * 32):
        self.name, self.push_key, self.steps, self.sent = name, push_key, 0, []
        self.link = type("L", (), {"peer": type("P", (), {"peer_id": name})()})()

    def number(self):
        from swarm.protocol import Hop

        self.steps += 1
        return Hop(self.name, self.push_key, self.steps)

    def expect(self, like) -> None:
        pass

    async def send(self, hidden, position, group=None, number=None, hops=None) -> None:
        self.sent.append((number, [hop.peer_id for hop in hops or []]))


async def test_a_pushed_step_names_the_links_after_it_up_to_one_without_push_and_at_most_max_push_hops():
    from swarm.protocol import MAX_PUSH_HOPS

    streams = [RecordingStream(f"Qm{i}") for i in range(MAX_PUSH_HOPS + 3)]
    session = InferenceSession(None, streams, max_length=100, batch_size=1, step_timeout=1.0)  # type: ignore[arg-type]
    numbered: dict = {}
    hidden = torch.zeros(1, 1, 4)
    await session._send(0, hidden, 0, None, numbered)
    assert streams[0].sent == [(1, [f"Qm{i}" for i in range(1, MAX_PUSH_HOPS + 1)])], "16 links after it at most"
    streams[5].push_key = ""  # a replacement that takes no pushes
    await session._send(2, hidden, 0, None, numbered)
    assert streams[2].sent == [(1, ["Qm3", "Qm4"])], "the list stops before a link without push"
    await session._send(5, hidden, 0, None, numbered)
    assert streams[5].sent == [(None, [])], "that link gets a plain step"
    await session._send(1, hidden, 0, None, None)
    assert streams[1].sent == [(None, [])], "relaying: plain steps"
