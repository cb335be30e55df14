"""The client's lockstep decode groups (swarm.client.decoding) with fake sessions: no peers, no network."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.client.decoding import DecodeGroups

H, V = 4, 6


class FakeHead:
    def __init__(self):
        self.logit_rows: list[int] = []

    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        return input_ids.float()[..., None].expand(*input_ids.shape, H) + position

    def embed_rows(self, input_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """A round's tokens [k, 1] at their positions, as LocalHead.embed_rows (decode() checks each row's value)."""
        return input_ids.float()[..., None].expand(*input_ids.shape, H) + torch.tensor(positions)[:, None, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.logit_rows.append(hidden.shape[0])
        return hidden[..., :1].expand(*hidden.shape[:2], V) * 2


class FakeSession:
    """What DecodeGroups uses of an InferenceSession: its chain key, position, closed flag and step."""

    batch_size, pushing, repair_due = 1, False, None

    def __init__(self, name: str, chain: tuple[str, ...] = ("a", "b"), delay: float = 0.01,
                 fail: Exception | None = None, handles: bool = False):
        self.name = name
        self.streams = [SimpleNamespace(link=SimpleNamespace(peer=SimpleNamespace(peer_id=p), start=i, end=i + 1),
                                        handle=i if handles else None, closed=False)
                        for i, p in enumerate(chain)]
        self.position = 5
        self.closed = False
        self.delay, self.fail = delay, fail
        self.tags: list[tuple[str, int]] = []
        self.cancelled = 0

    @property
    def chain_key(self) -> tuple[str, ...]:
        return tuple(f"{s.link.peer.peer_id}:{s.link.start}:{s.link.end}" for s in self.streams)

    async def step(self, hidden: torch.Tensor, position=None, group=None) -> torch.Tensor:
        self.tags.append(group)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        self.position += 1
        return hidden + 1


async def run_in_thread(fn, *args):
    return fn(*args)


async def decode(groups: DecodeGroups, session: FakeSession, tokens: int, pause: float = 0.0,
                 sampler=None) -> list[float]:
    out = []
    for t in range(tokens):
        position = session.position
        logits, choice = await groups.step(session, torch.tensor([[t]]), sampler)
        assert logits.shape == (1, V) and (sampler is None or choice == ("chose", float(logits[0, 0])))
        out.append(float(logits[0, 0]))
        assert out[-1] == 2 * (t + position + 1)  # this session's own row came back, not another member's
        if pause:
            await asyncio.sleep(pause)
    return out


async def test_sessions_of_a_chain_form_one_group_per_peer_and_advance_in_rounds():
    head = FakeHead()
    groups = DecodeGroups(head, run_in_thread)
    sessions = [FakeSession(f"s{i}") for i in range(8)]
    await asyncio.gather(*(decode(groups, s, 5) for s in sessions))
    chain = sessions[0].chain_key
    sizes = sorted(len(g) for g in groups.groups(chain))
    assert sizes == [4, 4], sizes  # two peers in the chain: two groups, dealt evenly
    # every round of a group carried all its members under one tag, whose size is the round's
    for members in groups.groups(chain):
        rounds = list(zip(*(s.tags for s in members), strict=True))
        assert all(len({tag for tag in r}) == 1 and r[0][1] == len(members) for r in rounds)
    assert groups.rows == 40 and groups.rounds == 10
    assert set(head.logit_rows) == {4}  # one LM-head call per round, for all its members


async def test_each_members_sampler_runs_on_its_own_row_in_the_rounds_head_job():
    jobs = []

    async def counting_run(fn, *args):
        jobs.append(fn)
        return fn(*args)

    groups = DecodeGroups(FakeHead(), counting_run, max_groups=1)
    sessions = [FakeSession(f"s{i}") for i in range(4)]
    await asyncio.gather(*(decode(groups, s, 3, sampler=lambda row: ("chose", float(row[0, 0]))) for s in sessions))
    assert groups.rounds == 3 and len(jobs) == 2 * 3  # embeddings, then head + samplers: two jobs per round


class RandomHead(FakeHead):
    """Logits of 50 tokens drawn from each row's own hidden value (distinct per member and round)."""

    @torch.inference_mode()  # as LocalHead.logits: an inference tensor, which refuses in-place writes outside it
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.logit_rows.append(hidden.shape[0])
        return torch.stack([torch.randn(1, 50, generator=torch.Generator().manual_seed(int(h[0, 0]) * 7 + 1))
                            for h in hidden])


async def test_plain_greedy_samplers_of_a_round_choose_in_one_argmax_what_each_would_choose_alone(monkeypatch):
    import swarm.client.decoding as decoding
    from swarm_kernels.sampling import LogitsAdjustments, Sampler, SamplingParams, choose_greedy

    calls, sampled = [], []

    def spy(logits, biases):
        tokens = choose_greedy(logits, biases)  # raising here would send every row to its own sampler
        calls.append(len(biases))
        return tokens

    def sampler_call(self, logits, *args):
        sampled.append(self)
        return real_call(self, logits, *args)

    real_call = Sampler.__call__
    monkeypatch.setattr(decoding, "choose_greedy", spy)

    def samplers():
        return [Sampler(1, 50, adjust=LogitsAdjustments(logit_bias=((3, 4.0),))), Sampler(1, 50),
                Sampler(1, 50, SamplingParams(temperature=0.8, seed=3)), Sampler(1, 50, logprobs=2),
                Sampler(1, 50, adjust=LogitsAdjustments(logit_bias=((0, -1e9), (9, 1.5))))]

    groups = DecodeGroups(RandomHead(), run_in_thread, max_groups=1)
    sessions = [FakeSession(f"s{i}", delay=0.0) for i in range(5)]
    grouped, alone = samplers(), samplers()
    for t in range(3):
        monkeypatch.setattr(Sampler, "__call__", sampler_call)
        steps = await asyncio.gather(*(groups.step(s, torch.tensor([[t + 10 * i]]), grouped[i])
                                       for i, s in enumerate(sessions)))
        monkeypatch.setattr(Sampler, "__call__", real_call)
        for i, (row, choice) in enumerate(steps):
            expected = alone[i](row.clone())  # the row as the head gave it: the biases were undone
            assert torch.equal(choice.token_ids, expected.token_ids), (t, i)
            assert (choice.logprobs is None) == (expected.logprobs is None)
    assert groups.rounds == 3 and calls == [5, 5, 5]  # one pass a round for the three plain greedy rows (0, 1, 4)
    assert {id(s) for s in sampled} == {id(grouped[2]), id(grouped[3])}  # only the others ran their own samplers


async def test_when_the_rounds_greedy_pass_fails_each_row_is_chosen_by_its_own_sampler_and_it_is_logged_once(
        monkeypatch, caplog):
    import swarm.client.decoding as decoding
    from swarm_kernels.sampling import Sampler

    def broken(logits, biases):
        raise RuntimeError("the greedy pass broke")

    monkeypatch.setattr(decoding, "choose_greedy", broken)
    decoding._warn_greedy_failed.cache_clear()
    groups = DecodeGroups(RandomHead(), run_in_thread, max_groups=1)
    sessions = [FakeSession(f"s{i}", delay=0.0) for i in range(3)]
    for t in range(2):
        grouped, alone = [Sampler(1, 50) for _ in sessions], [Sampler(1, 50) for _ in sessions]
        steps = await asyncio.gather(*(groups.step(s, torch.tensor([[t + 10 * i]]), grouped[i])
                                       for i, s in enumerate(sessions)))
        for i, (row, choice) in enumerate(steps):
            assert torch.equal(choice.token_ids, alone[i](row.clone()).token_ids)
    assert groups.rounds == 2
    assert [r.getMessage() for r in caplog.records].count(
        "a round's greedy rows could not be chosen together; each row's sampler chooses") == 1
    decoding._warn_greedy_failed.cache_clear()


async def test_a_sampler_that_fails_fails_only_its_own_member():
    """A request's sampler raising (its parameters, its grammar) in the round's head job: the others get their
    tokens."""
    def broken(row):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1)
    sessions = [FakeSession(f"s{i}") for i in range(3)]
    chose = lambda row: ("chose", float(row[0, 0]))  # noqa: E731
    results = await asyncio.gather(decode(groups, sessions[0], 1, sampler=chose),
                                   decode(groups, sessions[1], 1, sampler=broken),
                                   decode(groups, sessions[2], 1, sampler=chose), return_exceptions=True)
    assert isinstance(results[1], RuntimeError) and groups.rounds == 1
    assert results[0] == [2 * 6] and results[2] == [2 * 6]


async def test_a_single_session_runs_alone_without_waiting_and_max_groups_caps_the_groups():
    # waits of 30 s: a lone session that waited for anyone would take minutes, not the few ms its 20 steps take
    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1, straggle=30.0, join_wait=30.0)
    lone = FakeSession("lone", delay=0.0)
    start = asyncio.get_running_loop().time()
    await decode(groups, lone, 20)
    assert asyncio.get_running_loop().time() - start < 10 and lone.tags[0][1] == 1
    lone.closed = True  # done: not waited for (one that stops asking is left out after `straggle`, tested below)
    sessions = [FakeSession(f"s{i}") for i in range(6)]
    await asyncio.gather(*(decode(groups, s, 3) for s in sessions))
    assert [len(g) for g in groups.groups(sessions[0].chain_key)] == [6]  # one group of 6 (max_groups), lone out


async def test_a_session_starting_late_joins_its_group_at_the_next_round():
    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1)
    first, second = FakeSession("first", delay=0.05), FakeSession("second", delay=0.05)
    task = asyncio.ensure_future(decode(groups, first, 30))  # 1.5 s of rounds: `second` starts well within them
    await asyncio.sleep(0.07)  # `first` is in its second round (or later, on a busy machine)
    await decode(groups, second, 3)
    await task
    joined = [tag for tag in first.tags if tag[1] == 2]
    assert joined == second.tags  # from its first step on, second ran in first's rounds


async def test_members_that_stop_asking_are_left_out_after_straggle():
    # straggle 0.3 s: waited at least that, and clearly less than join_wait (30 s), which is not for idle members
    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1, straggle=0.3, join_wait=30.0)
    busy, quick = FakeSession("busy", delay=0.0), FakeSession("quick", delay=0.0)
    await asyncio.gather(decode(groups, busy, 1), decode(groups, quick, 1))
    start = asyncio.get_running_loop().time()
    await decode(groups, quick, 1)  # busy does not ask: quick waits straggle, then goes alone
    assert 0.29 <= asyncio.get_running_loop().time() - start < 10
    assert quick.tags[-1][1] == 1 and busy not in groups.groups(quick.chain_key)[0]
    busy.closed = True  # a closed member is not waited for at all
    groups2 = DecodeGroups(FakeHead(), run_in_thread, max_groups=1, straggle=5.0)
    a, b = FakeSession("a", delay=0.0), FakeSession("b", delay=0.0)
    await asyncio.gather(decode(groups2, a, 1), decode(groups2, b, 1))
    b.closed = True
    await asyncio.wait_for(decode(groups2, a, 1), 1.0)


async def test_a_members_failure_is_its_own_and_a_cancelled_caller_cancels_its_step():
    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1)
    good, bad = FakeSession("good"), FakeSession("bad", fail=RuntimeError("peer failed"))
    results = await asyncio.gather(decode(groups, good, 1), decode(groups, bad, 1), return_exceptions=True)
    assert isinstance(results[1], RuntimeError) and results[0] == [2 * 6]
    slow, other = FakeSession("slow", delay=5.0), FakeSession("other", delay=0.05)
    waiting = asyncio.ensure_future(decode(groups, slow, 1))
    done = asyncio.ensure_future(decode(groups, other, 1))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await done
    await asyncio.sleep(0)
    assert slow.cancelled == 1


async def test_a_session_whose_chain_changed_moves_to_the_groups_of_its_new_chain():
    groups = DecodeGroups(FakeHead(), run_in_thread)
    moving, staying = FakeSession("moving"), FakeSession("staying")
    await asyncio.gather(decode(groups, moving, 1), decode(groups, staying, 1))
    old = moving.chain_key
    moving.streams[1].link.peer.peer_id = "c"  # its second peer was replaced (failover)
    await asyncio.gather(decode(groups, moving, 1), decode(groups, staying, 1))
    assert [len(g) for g in groups.groups(old)] == [1]
    assert [len(g) for g in groups.groups(moving.chain_key)] == [1]


async def test_sessions_dropped_by_their_callers_leave_their_groups():
    import gc

    groups = DecodeGroups(FakeHead(), run_in_thread)
    sessions = [FakeSession(f"s{i}") for i in range(4)]
    chain = sessions[0].chain_key
    await asyncio.gather(*(decode(groups, s, 2) for s in sessions))
    assert sum(len(g) for g in groups.groups(chain)) == 4
    del sessions
    gc.collect()
    assert groups.groups(chain) == [] and len(groups._member_of) == 0  # nothing of theirs is kept alive


async def test_sessions_closed_since_their_last_round_do_not_unbalance_the_next_groups():
    groups = DecodeGroups(FakeHead(), run_in_thread)
    old = [FakeSession(f"old{i}") for i in range(6)]
    await asyncio.gather(*(decode(groups, s, 1) for s in old))
    chain = old[0].chain_key
    finished, going_on = groups.groups(chain)  # 3 and 3
    for s in finished:
        s.closed = True  # its caller still holds it
    new = [FakeSession(f"new{i}") for i in range(8)]
    await asyncio.gather(*(decode(groups, s, 2) for s in new + going_on))
    sizes = sorted(len(g) for g in groups.groups(chain))
    assert len(sizes) == 2 and sizes[1] - sizes[0] <= 1, sizes  # 11 sessions dealt 5/6, not 4 new + 7


async def test_a_round_of_groupable_sessions_goes_in_group_frames_and_what_they_leave_steps_alone(monkeypatch):
    """Members whose peers name handles travel in group frames (swarm.client.grouped); a member the frame left out
    (refused, failed, its check failed) steps alone, untagged; one that is not groupable steps alone, tagged."""
    framed: list[list[str]] = []

    async def fake_step_together(sessions, hidden, group, wanted):
        framed.append([s.name for s in sessions])
        outs = []
        for j, session in enumerate(sessions):
            if session.name == "refused":
                outs.append(None)
            else:
                session.position += 1
                outs.append(hidden[j : j + 1] + 1)
        return outs

    monkeypatch.setattr("swarm.client.decoding.step_together", fake_step_together)
    groups = DecodeGroups(FakeHead(), run_in_thread, max_groups=1)
    framed_ok, refused = FakeSession("ok", handles=True), FakeSession("refused", handles=True)
    plain = FakeSession("plain")  # its peers name no handles: its own frames
    await asyncio.gather(*(decode(groups, s, 2) for s in (framed_ok, refused, plain)))
    assert framed == [["ok", "refused"]] * 2 and groups.framed == 2
    assert framed_ok.tags == [] and refused.tags == [None, None]  # stepped alone after the frame, untagged
    assert [tag[1] for tag in plain.tags] == [3, 3]  # alone with the round's tag
    off = DecodeGroups(FakeHead(), run_in_thread, max_groups=1, frames=False)
    a, b = FakeSession("a", handles=True), FakeSession("b", handles=True)
    await asyncio.gather(decode(off, a, 1), decode(off, b, 1))
    assert off.framed == 0 and len(framed) == 2 and a.tags[0][1] == 2
