"""How the text service opens a session: headroom for a next turn where the peers can hold it, none where not; which
parked session a prompt reuses, taken or forked."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from swarm.client.textgen import SwarmTextService
from swarm.protocol import NoChainError


class FakeClient:
    model_id = "m"

    def __init__(self, holds: int):
        self.holds = holds  # the longest session any chain can hold
        self.head = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192), eos_token_ids=(0,),
                                    vocab_size=100)
        self.decoder = self.head
        self.asked: list[int] = []

    async def inference_session(self, max_length, batch_size=1):
        self.asked.append(max_length)
        if max_length > self.holds:
            raise NoChainError("m", [(0, 30)])
        return SimpleNamespace(max_length=max_length)


@pytest.mark.parametrize(("holds", "asked"), [(4096, [1124]), (500, [1124, 100]), (50, [1124, 100])])
async def test_headroom_only_where_peers_can_hold_it(holds, asked):
    client = FakeClient(holds)
    service = SwarmTextService(client, tokenizer=None)
    if holds < 100:
        with pytest.raises(NoChainError):
            await service._session_for(list(range(60)), 40, 1)
    else:
        session, start = await service._session_for(list(range(60)), 40, 1)
        assert start == 0 and session.max_length == asked[-1]
    assert client.asked == asked


def test_a_chat_template_that_refuses_the_messages_is_a_value_error_with_its_reason():
    import jinja2

    class Tokenizer:
        def apply_chat_template(self, messages, **kwargs):
            raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant")

    service = SwarmTextService(FakeClient(100), tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="roles must alternate"):
        service.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


class FakeStream:
    """A session's stream to one peer: parked once the service parks its session; `ended` once the peer freed it."""

    def __init__(self):
        self.closed = self.ended = self.parked = False

    async def park(self):
        self.parked = True

    async def unpark(self, timeout):
        assert self.parked and not self.ended
        self.parked = False


class FakeSession(SimpleNamespace):
    step_timeout = 5.0

    async def close(self):
        self.closed_by_service = True


def _service_opening_fake_sessions() -> tuple[FakeClient, SwarmTextService]:
    client = FakeClient(4096)

    async def inference_session(max_length, batch_size=1):
        client.asked.append(max_length)
        return FakeSession(max_length=max_length, streams=[FakeStream()], position=0)

    client.inference_session = inference_session
    return client, SwarmTextService(client, tokenizer=None)


async def test_a_parked_session_is_reused_only_by_the_tenant_that_parked_it():
    """Prefix reuse is per tenant (API key, else client address): another tenant's first token must not come sooner
    because someone else sent the same prefix."""
    _, service = _service_opening_fake_sessions()
    history = list(range(40))
    parked = FakeSession(max_length=2048, streams=[FakeStream()], position=len(history))
    await service._park(history, parked, tenant="key:alice")
    other, start = await service._session_for([*history, 99], 10, 1, tenant="key:bob")
    assert other is not parked and start == 0  # bob computes his whole prompt
    same, start = await service._session_for([*history, 99], 10, 1, tenant="key:alice")
    assert same is parked and start == len(history)  # alice continues where she stopped


async def test_a_burst_sharing_a_system_prompt_reuses_it_once_as_many_sessions_finished():
    """16 chats at once from one tenant, each starting with the same system prompt: once 16 have finished and been
    parked, the next 16 each take one (the shared prefix not computed again), none computes it from scratch (where
    the peers cannot fork)."""
    client, service = _service_opening_fake_sessions()

    async def cannot_fork(parent, tokens, max_length):
        return None

    service._fork = cannot_fork
    system = list(range(1000, 1028))  # 28 tokens every chat starts with
    for i in range(16):
        tokens = [*system, i, i + 1, 7, 7]
        await service._park(tokens, FakeSession(max_length=2048, streams=[FakeStream()],
                                                position=len(tokens)), tenant="addr:1")
    starts = [(await service._session_for([*system, 100 + i, 5], 48, 1, tenant="addr:1"))[1] for i in range(16)]
    assert starts == [len(system)] * 16 and client.asked == []


async def test_a_shared_prefix_forks_the_parked_session_and_leaves_it_for_its_own_next_turn():
    """Where the peers fork: a burst of 16 chats sharing one parked conversation's system prompt all start from a
    copy of it (nothing queues for parked sessions), and that conversation's next turn still takes its own session;
    a prompt that continues everything a parked session holds takes it without a fork."""
    client, service = _service_opening_fake_sessions()
    system = list(range(1000, 1028))
    conversation = [*system, 1, 2, 3, 4]
    parked = FakeSession(max_length=2048, streams=[FakeStream()], position=len(conversation))
    await service._park(conversation, parked, tenant="addr:1")
    forks = []

    async def fork(parent, tokens, max_length):
        forks.append((parent, tokens, max_length))
        return FakeSession(max_length=max_length, streams=[FakeStream()], position=tokens)

    service._fork = fork
    opened = [await service._session_for([*system, 100 + i, 5], 48, 1, tenant="addr:1") for i in range(16)]
    assert [start for _, start in opened] == [len(system)] * 16 and client.asked == []
    assert all(session is not parked for session, _ in opened) and len({id(s) for s, _ in opened}) == 16
    assert [(p, t) for p, t, _ in forks] == [(parked, len(system))] * 16 and service.forked_sessions == 16
    assert forks[0][2] >= len(system) + 2 + 48  # room for the request (and a next turn)
    again, start = await service._session_for([*conversation, 9, 9], 48, 1, tenant="addr:1")
    assert again is parked and start == len(conversation) and len(forks) == 16  # its own turn: taken, not forked
    service.fork_sessions = False  # SWARM_FORK_SESSIONS=0: the old way, the parked session taken
    await service._park(conversation, parked, tenant="addr:1")
    taken, start = await service._session_for([*system, 77, 5], 48, 1, tenant="addr:1")
    assert taken is parked and start == len(system) and len(forks) == 16


async def test_a_parked_session_being_forked_is_not_taken_meanwhile():
    """A take rewinds the session: while a fork of it is being copied, a request whose own fork failed opens a new
    session instead of taking it."""
    client, service = _service_opening_fake_sessions()
    system = list(range(1000, 1028))
    conversation = [*system, 1, 2, 3, 4]
    parked = FakeSession(max_length=2048, streams=[FakeStream()], position=len(conversation))
    await service._park(conversation, parked, tenant="t")
    release, calls = asyncio.Event(), []

    async def fork(parent, tokens, max_length):
        calls.append(tokens)
        if len(calls) == 1:
            await release.wait()
            return FakeSession(max_length=max_length, streams=[FakeStream()], position=tokens)
        return None  # the second fork fails (e.g. the peer is full)

    service._fork = fork
    slow = asyncio.ensure_future(service._session_for([*system, 50, 5], 48, 1, tenant="t"))
    while not calls:
        await asyncio.sleep(0)
    other, start = await service._session_for([*system, 60, 5], 48, 1, tenant="t")
    assert other is not parked and start == 0 and len(client.asked) == 1  # a new session: nothing taken
    release.set()
    forked, start = await slow
    assert forked is not parked and start == len(system)
    assert [entry.session for entry in service._parked] == [parked]  # still there, untouched


async def test_parked_sessions_are_parked_on_their_peers_and_one_they_freed_is_dropped_not_reused():
    """A parked session is parked on each of its peers (they may free it for room, swarm.protocol: park); one a peer
    has freed (its stream ended) is closed and dropped at the next request, which opens a new session."""
    client, service = _service_opening_fake_sessions()
    history = list(range(40))
    kept, freed = (FakeSession(max_length=2048, streams=[FakeStream(), FakeStream()], position=len(history))
                   for _ in range(2))
    await service._park(history, kept, tenant="t")
    await service._park(history, freed, tenant="t")  # the most recent: the one a next turn would take
    assert all(stream.parked for session in (kept, freed) for stream in session.streams)
    freed.streams[1].ended = True
    session, start = await service._session_for([*history, 99], 10, 1, tenant="t")
    assert session is kept and start == len(history) and client.asked == []
    assert getattr(freed, "closed_by_service", False) and not service._parked
    session, start = await service._session_for([*history, 98], 10, 1, tenant="t")
    assert start == 0 and len(client.asked) == 1  # nothing parked is left: a new session
