"""How the text service sizes a new session: headroom for a next turn where the peers can hold it, none where not."""

from __future__ import annotations

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
