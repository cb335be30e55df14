"""A late decode step makes the client ask its peer whether it lives: a peer that answers neither is given up in
about `after` + the probe's time, not the full step timeout; a slow step that still comes is taken, even while the
probe is out."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from swarm.codec import make_response
from swarm.protocol import PeerError
from tests.hostile.test_peer_frames import frame, stream


async def test_a_peer_silent_to_its_step_and_to_the_probe_is_given_up_early():
    s, _ = stream()
    probed = []

    async def dead() -> bool:
        probed.append(time.monotonic())
        await asyncio.sleep(0.2)  # the probe's own timeout
        return False

    began = time.monotonic()
    with pytest.raises(PeerError, match="nor a liveness probe"):
        await s.step(torch.randn(1, 1, 8), 0, timeout=30, probe=(0.3, dead))
    assert len(probed) == 1 and 0.25 < probed[0] - began < 1.0
    assert time.monotonic() - began < 2.0, "not the 30 s step timeout"
    await s.close()


@pytest.mark.parametrize("probe_answers", [None, True])  # None: the probe never returns
async def test_a_late_answer_is_taken_while_the_probe_is_out_and_after_it_said_alive(probe_answers):
    s, reader = stream()
    hidden = torch.randn(1, 1, 8)

    async def alive() -> bool:
        if probe_answers is None:
            await asyncio.sleep(60)
        return True

    async def answer_late() -> None:
        await asyncio.sleep(0.5)
        reader.feed_data(frame(make_response({"type": "result", "position": 1}, (hidden + 1,))))

    late = asyncio.ensure_future(answer_late())
    assert torch.equal(await s.step(hidden, 0, timeout=10, probe=(0.2, alive)), hidden + 1)
    await late
    await s.close()


async def test_a_live_peer_that_never_answers_still_times_out():
    s, _ = stream()

    async def alive() -> bool:
        return True

    began = time.monotonic()
    with pytest.raises(PeerError, match=r"did not answer within 0\.6 s"):
        await s.step(torch.randn(1, 1, 8), 0, timeout=0.6, probe=(0.2, alive))
    assert time.monotonic() - began < 1.5
    await s.close()


async def test_sessions_asking_about_the_same_late_peer_share_one_probe(monkeypatch):
    from swarm.client import router as router_module
    from swarm.client.router import Router

    calls = []

    async def slow_probe(p2p, peer_id, timeout):
        calls.append(peer_id)
        await asyncio.sleep(0.2)
        raise TimeoutError

    monkeypatch.setattr(router_module, "probe", slow_probe)
    router = Router(None, None, "m", 30)
    first = asyncio.ensure_future(router.alive("QmA"))
    await asyncio.sleep(0)
    first.cancel()  # a session that stops waiting leaves the others their answer
    assert await asyncio.gather(*(router.alive("QmA") for _ in range(15)), router.alive("QmB")) == [False] * 16
    assert sorted(calls) == ["QmA", "QmB"]
    assert await router.alive("QmA") is False and len(calls) == 3, "a later question probes again"
    await router.close()


async def test_a_prompt_chunk_may_take_longer_with_its_tokens_while_its_peer_says_it_lives():
    """A long context's prompt chunk can cost a busy 2-core peer more than the 30 s step timeout (an 8k-token prompt
    was answered with 'no live peers serve blocks 0:30' while its only peer was computing it): a chunk's timeout
    grows with its tokens, and the peer is probed after one step timeout (a dead one is still given up then)."""
    from types import SimpleNamespace

    from swarm.client.session import FailoverPolicy, InferenceSession

    asked = []

    class Router:
        def opened(self, peers):
            pass

        async def alive(self, peer_id):
            asked.append(peer_id)
            return True

    stream = SimpleNamespace(link=SimpleNamespace(peer=SimpleNamespace(peer_id="p")))
    session = InferenceSession(None, [stream], 8192, 1, 30.0, Router(), FailoverPolicy())  # type: ignore[arg-type]
    assert session.link_timeout(0, 1) == 30.0 and session.link_probe(0, 1) is None  # no decode step timed yet
    assert session.link_timeout(0, 100) == 30.0 and session.link_timeout(0, 1024) == 240.0
    assert session.chunk_timeout(1024) == 240.0  # a replay's chunk too
    after, alive = session.link_probe(0, 1024)
    assert after == 30.0 and await alive() and asked == ["p"]
    session._latency[0] = 0.05  # a decode step's timeout and probe follow the link's usual step, as before
    assert session.link_timeout(0, 1) == 5.0 and session.link_probe(0, 1)[0] == 1.0


async def test_a_dead_peer_is_given_up_at_one_step_timeout_during_a_long_prompt_chunk():
    """A prompt chunk's longer timeout does not keep a dead peer: it is probed after one step timeout and given up
    when the probe fails (here a 0.3 s step timeout, a 1024-token chunk's 2.4 s timeout)."""
    from types import SimpleNamespace

    from swarm.client.session import FailoverPolicy, InferenceSession

    class Router:
        def opened(self, peers):
            pass

        async def alive(self, peer_id):
            return False

    link = SimpleNamespace(peer=SimpleNamespace(peer_id="p"))
    session = InferenceSession(None, [SimpleNamespace(link=link)], 8192, 1, 0.3, Router(),  # type: ignore[arg-type]
                               FailoverPolicy())
    s, _ = stream()
    timeout, probe = session.link_timeout(0, 1024), session.link_probe(0, 1024)
    assert timeout == pytest.approx(2.4)
    began = time.monotonic()
    with pytest.raises(PeerError, match="nor a liveness probe"):
        await s.step(torch.randn(1, 1024, 8), 0, timeout=timeout, probe=probe)
    assert time.monotonic() - began < 1.5, "given up at the probe, not the chunk's timeout"
    await s.close()
