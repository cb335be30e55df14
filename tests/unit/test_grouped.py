"""Group frames on the client's side (swarm.client.grouped) with fake sessions and streams: no peers, no network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swarm.client.grouped import groupable, step_together
from swarm.protocol import ErrorCode, PeerError

H = 4


class FakeStream:
    """A link's stream: group_step adds `add` to every row; rows whose handle is in `refuse` are refused."""

    def __init__(self, peer: str, i: int, handle: int | None, add: float, frames: list, refuse=(), fail=False):
        self.link = SimpleNamespace(peer=SimpleNamespace(peer_id=peer), start=i, end=i + 1)
        self.handle, self.add, self.frames, self.refuse, self.fail = handle, add, frames, set(refuse), fail
        self.closed = False

    async def group_step(self, hidden, handles, positions, group, timeout, probe=None):
        self.frames.append((self.link.peer.peer_id, list(handles), list(positions), group))
        if self.fail:
            raise PeerError("the carrier's peer failed", ErrorCode.INTERNAL, self.link.peer.peer_id)
        taken = [handle not in self.refuse for handle in handles]
        return hidden + self.add, taken


class FakeSession:
    batch_size, push, repair_due = 1, False, None

    def __init__(self, k: int, frames: list, chain=("a", "b"), refuse=None, fail_link=None, check_fails=False,
                 due=None):
        self.streams = [FakeStream(peer, i, 100 * i + k, 10.0 ** i, frames, (refuse or {}).get(i, ()),
                                   fail_link == i) for i, peer in enumerate(chain)]
        self.position, self.closed, self.check_fails = 5 + k, False, check_fails
        self.due = check_fails if due is None else due  # whether a link's step is drawn for a check
        self.remembered: list[tuple[int, float, int]] = []
        self.draws: list[int] = []  # links whose step had its draw
        self.checked: list[tuple[int, float, float]] = []  # (link, input, output) of each check run

    @property
    def pushing(self) -> bool:
        return False

    @property
    def chain_key(self):
        return tuple(f"{s.link.peer.peer_id}:{s.link.start}:{s.link.end}" for s in self.streams)

    def link_timeout(self, i, new_tokens):
        return 5.0

    def link_probe(self, i, new_tokens):
        return None

    def remember(self, i, hidden, position, seconds):
        self.remembered.append((i, float(hidden[0, 0, 0]), position))

    def verify_due(self, i):
        self.draws.append(i)
        return self.due

    async def check(self, i, hidden, position, out):
        self.checked.append((i, float(hidden[0, 0, 0]), float(out[0, 0, 0])))
        if self.check_fails and i == 1:
            raise PeerError("found wrong by another replica", ErrorCode.INTERNAL, self.streams[i].link.peer.peer_id)


def rows(k: int) -> torch.Tensor:
    return torch.arange(k, dtype=torch.float32)[:, None, None].expand(k, 1, H).clone()


async def test_rows_go_through_every_link_in_one_frame_each_and_every_member_keeps_its_inputs():
    frames: list = []
    sessions = [FakeSession(k, frames) for k in range(3)]
    outs = await step_together(sessions, rows(3), ("round", 3))
    # one frame per link, on the first member's stream, naming every member's handle and position
    assert frames == [("a", [0, 1, 2], [5, 6, 7], ("round", 3)), ("b", [100, 101, 102], [5, 6, 7], ("round", 3))]
    for k, (session, out) in enumerate(zip(sessions, outs, strict=True)):
        assert out is not None and float(out[0, 0, 0]) == k + 1 + 10  # its own row, through both links
        assert session.position == 6 + k
        assert session.remembered == [(0, k, 5 + k), (1, k + 1, 5 + k)]  # each link's input, at its position


async def test_a_refused_row_a_failed_check_and_a_caller_gone_leave_their_sessions_unmoved_to_step_alone():
    frames: list = []
    sessions = [FakeSession(0, frames, refuse={1: [101]}), FakeSession(1, frames),  # the carrier refuses 101
                FakeSession(2, frames, check_fails=True), FakeSession(3, frames)]
    outs = await step_together(sessions, rows(4), ("round", 4), wanted=lambda j: j != 3)
    assert outs[0] is not None and session_positions(sessions) == [6, 6, 7, 8]
    assert outs[1] is None and outs[2] is None and outs[3] is None
    assert frames[1][1] == [100, 101, 102, 103]  # refused at the second link, after the first computed it


async def test_a_failed_frame_sends_every_member_alone_and_members_not_groupable_are_left_out():
    frames: list = []
    sessions = [FakeSession(k, frames, fail_link=1) for k in range(2)]
    assert await step_together(sessions, rows(2), ("round", 2)) == [None, None]
    assert session_positions(sessions) == [5, 6]
    other_chain = FakeSession(1, frames, chain=("a", "c"))
    no_handle = FakeSession(2, frames)
    no_handle.streams[1].handle = None
    frames.clear()
    sessions = [FakeSession(0, frames), other_chain, no_handle]
    outs = await step_together(sessions, rows(3), ("round", 3))
    assert [out is not None for out in outs] == [True, False, False]
    assert [handles for _, handles, _, _ in frames] == [[0], [100]]
    assert not groupable(no_handle) and groupable(other_chain)


async def test_each_member_draws_once_per_link_and_only_the_rows_drawn_are_checked():
    frames: list = []
    sessions = [FakeSession(0, frames), FakeSession(1, frames, due=True), FakeSession(2, frames),
                FakeSession(3, frames, check_fails=True)]
    outs = await step_together(sessions, rows(4), ("round", 4))
    assert [session.draws for session in sessions] == [[0, 1], [0, 1], [0, 1], [0, 1]]
    # a drawn row is checked with its own input and output of that link; the others never are
    assert sessions[1].checked == [(0, 1.0, 2.0), (1, 2.0, 12.0)] and sessions[0].checked == sessions[2].checked == []
    assert sessions[3].checked == [(0, 3.0, 4.0), (1, 4.0, 14.0)]  # found wrong at the second link: steps alone
    assert [out is not None for out in outs] == [True, True, True, False]
    assert session_positions(sessions) == [6, 7, 8, 8]


async def test_a_check_that_raises_other_than_a_peer_error_is_not_swallowed():
    frames: list = []
    broken = FakeSession(1, frames, due=True)

    async def check(i, hidden, position, out):
        raise RuntimeError("a bug in the check")

    broken.check = check  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug in the check"):
        await step_together([FakeSession(0, frames), broken], rows(2), ("round", 2))


def session_positions(sessions) -> list[int]:
    return [session.position for session in sessions]


def _answer(rows_status, out: torch.Tensor, tensors: int = 1):
    from swarm.codec import make_response

    return make_response({"type": "result", "rows": rows_status}, (out,) * tensors)


@pytest.mark.parametrize("answer", ["short", "position", "bool", "nan", "shape", "dtype", "two_tensors", "list"])
async def test_a_peers_malformed_group_answer_is_its_failure(answer):
    """What a peer answers to a group frame is checked like a step's answer: a status per row (the next position or
    a code), one tensor of the input's shape and dtype, finite in every row taken; anything else is a PeerError
    (the members then step alone, where a lying peer is failed over)."""
    from tests.hostile.test_peer_frames import frame, stream

    s, reader = stream()
    hidden = torch.randn(3, 1, 8)
    rows_status: list = [6, "bad_request", 8]
    out = hidden + 1
    tensors = 1
    if answer == "short":
        rows_status = rows_status[:2]
    elif answer == "position":
        rows_status[2] = 9
    elif answer == "bool":
        rows_status[0] = True
    elif answer == "nan":
        out[2, 0, 0] = float("nan")
    elif answer == "shape":
        out = torch.randn(3, 2, 4)
    elif answer == "dtype":
        out = out.to(torch.float16)
    elif answer == "two_tensors":
        tensors = 2
    else:
        rows_status[1] = ["bad_request", "a reason"]
    reader.feed_data(frame(_answer(rows_status, out, tensors)))
    with pytest.raises(PeerError):
        await s.group_step(hidden, [1, 2, 3], [5, 6, 7], ("round", 3), timeout=5)
    await s.close()


async def test_a_group_answer_with_refused_rows_is_read_and_nan_in_a_refused_row_does_not_matter():
    from tests.hostile.test_peer_frames import frame, stream

    s, reader = stream()
    hidden = torch.randn(3, 1, 8)
    out = hidden + 1
    out[1] = float("nan")  # a refused row's contents are not read
    reader.feed_data(frame(_answer([6, "moved", 8], out)))
    got, taken = await s.group_step(hidden, [1, 2, 3], [5, 6, 7], ("round", 3), timeout=5)
    assert taken == [True, False, True] and torch.equal(got[0], out[0]) and torch.equal(got[2], out[2])
    await s.close()
