"""Forks of a session's prefix on a peer (SpanBackend.fork, Scheduler.run_first): copies answered before they run,
run before the round they are taken with in a budget of their own, holding back only their sessions' steps."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm.protocol import ErrorCode, PeerError
from swarm.server.backend import Limits, SpanBackend
from swarm.server.memory import KVBudget
from tests.unit.test_backend import open_request


@pytest.fixture
def pair(tiny_model_dir):
    """A backend of the whole tiny model, and another over the same span to compute references on."""
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    limits = Limits(max_sessions=8, max_length=64, prefill_chunk=8)
    backend, reference = SpanBackend(span, limits, KVBudget(4096)), SpanBackend(span, limits, KVBudget(4096))
    yield backend, reference
    backend.shutdown()
    reference.shutdown()


async def test_forks_copies_run_before_a_round_in_a_budget_of_their_own_and_hold_back_only_their_sessions():
    """The scheduler's order: jobs that sessions' steps must follow (forks' copies, run_first) run before the round
    they are taken with, up to FIRST_ROUNDS rounds' tokens a round; the steps of a session held by a copy not taken
    yet wait for it, other sessions' steps do not; other jobs run after the round."""
    from types import SimpleNamespace

    from swarm.server import scheduler as scheduler_module
    from swarm.server.scheduler import Scheduler, Step

    order: list[str] = []
    running = asyncio.Event()
    release = asyncio.Event()

    async def run_round(steps):
        order.append("round:" + "".join(step.session.key for step in steps))
        running.set()
        await release.wait()
        return [step.hidden for step in steps]

    async def run_job(fn):
        return fn()

    scheduler = Scheduler(run_round, run_job, max_batch_sessions=8, batch_wait=0.0, round_tokens=1,
                          max_groups_kept=4, is_open=lambda key: True)
    budget = scheduler_module.FIRST_ROUNDS * 1

    def job(name):
        def fn():
            order.append(name)
            return torch.empty(0)
        return fn

    d, e, f = (SimpleNamespace(key=k, client="c", blocks=range(0, 2)) for k in "def")
    loop = asyncio.get_running_loop()

    def decode(session):
        return scheduler.decode(Step(session, torch.zeros(1, 1, 4), 3, loop.create_future()))

    try:
        first = asyncio.ensure_future(decode(d))
        await running.wait()  # a round is running: what comes now is taken together afterwards
        copies = [scheduler.run_first(job("A"), budget, "c", (), lambda error: None),
                  scheduler.run_first(job("B"), budget, "c", (f,), lambda error: None)]
        later = asyncio.gather(decode(e), decode(f), scheduler.run(job("job"), 1, "c"))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, later, *copies)
        # A fills the round's copy budget; B waits for the next round, and so does f's step, which it holds
        assert order == ["round:d", "A", "round:e", "job", "B", "round:f"], order
        assert not scheduler._held
    finally:
        scheduler.close()


async def test_a_fork_returns_before_its_copy_and_its_first_step_follows_the_copy(pair):
    """A fork is answered once its copy is queued: the new session's first step, sent at once, joins the next round
    after the copy, and computes what the source computes from there, even where a step of the source that
    rewinds it was queued right after the fork (the copy runs before every step queued after it)."""
    backend, reference = pair
    g = torch.Generator().manual_seed(11)
    prefix, after, other = (torch.randn(1, n, 64, generator=g) for n in (6, 3, 2))
    source = backend.open(open_request(session_id="src", start=0, end=6))
    await backend.step(source, prefix, 0)
    fork = backend.open(open_request(session_id="fork", start=0, end=6))
    await backend.fork(fork, source.handle, 5, "src")
    assert fork.cache.length == 0 and fork.length == 5  # answered with the copy still queued
    rewinding = asyncio.ensure_future(backend.step(source, other, 2))  # the source's next turn rewinds it
    got = await backend.step(fork, after, 5)
    await rewinding
    alone = reference.open(open_request(session_id="alone", start=0, end=6))
    await reference.step(alone, prefix[:, :5], 0)
    torch.testing.assert_close(got, await reference.step(alone, after, 5), atol=1e-5, rtol=0)
    assert fork.cache.length == 8 and source.cache.length == 4 and fork.copying == 0


async def test_a_forks_copy_reads_a_source_closed_meanwhile_and_one_it_cannot_make_ends_moved(pair):
    """A source closed before its fork's copy ran (its client goes on with the fork alone, or the peer evicted it)
    is still copied: its cache stays as it was. A copy that cannot be made (here the source rewound below the
    forked tokens, as a step sent before the fork would) ends the fork as moved before its steps run, and costs
    the round's other steps nothing."""
    backend, reference = pair
    g = torch.Generator().manual_seed(12)
    prefix, after = torch.randn(1, 6, 64, generator=g), torch.randn(1, 2, 64, generator=g)
    closed, rewound, bystander = (backend.open(open_request(session_id=n, start=0, end=6))
                                  for n in ("closed", "rewound", "by"))
    for source in (closed, rewound):
        await backend.step(source, prefix, 0)
    await backend.step(bystander, torch.randn(1, 3, 64, generator=g), 0)
    gate = threading.Event()  # the compute thread is held: the copies and the steps are taken together after it
    blocker = asyncio.ensure_future(backend.scheduler.run(lambda: gate.wait(5) and torch.empty(0), 1, "x"))
    await asyncio.sleep(0.05)
    forks = [backend.open(open_request(session_id=f"fork-{s.session_id}", start=0, end=6))
             for s in (closed, rewound)]
    for fork, source in zip(forks, (closed, rewound), strict=True):
        await backend.fork(fork, source.handle, 5, source.session_id)
    backend.close(closed)
    rewound.cache.rewind(2)
    free = backend.budget.free
    steps = asyncio.gather(*(backend.step(fork, after, 5) for fork in forks),
                           backend.step(bystander, torch.randn(1, 1, 64, generator=g), 3), return_exceptions=True)
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    from_closed, from_rewound, other = await steps
    alone = reference.open(open_request(session_id="alone", start=0, end=6))
    await reference.step(alone, prefix[:, :5], 0)
    assert torch.equal(from_closed, await reference.step(alone, after, 5))
    assert isinstance(from_rewound, PeerError) and from_rewound.code == ErrorCode.MOVED
    assert "replay" in str(from_rewound) and forks[1].key not in backend.sessions
    assert isinstance(other, torch.Tensor) and torch.isfinite(other).all()
    assert backend.budget.free > free  # what the failed fork reserved is free again
    with pytest.raises(PeerError, match="cannot fork 9 tokens"):  # a fork beyond what the source will hold
        await backend.fork(backend.open(open_request(session_id="f2", start=0, end=6)), bystander.handle, 9,
                           "by")


async def test_held_steps_neither_fill_a_round_nor_let_one_clients_forks_starve_anothers():
    """Steps held behind forks' copies do not count as a round's worth queued (which would send another client's
    group without its late member), and first jobs count as their client's turn (a client forking every round does
    not keep another's copy waiting)."""
    from types import SimpleNamespace

    from swarm.server import scheduler as scheduler_module
    from swarm.server.scheduler import Scheduler, Step

    rounds: list[str] = []
    copies: list[str] = []
    gates = {name: asyncio.Event() for name in ("c0", "c1")}

    async def run_round(steps):
        rounds.append(",".join(step.session.key for step in steps))
        return [step.hidden for step in steps]

    async def run_job(fn):
        name = fn()
        if name in gates:
            await gates[name].wait()
        return torch.empty(0)

    scheduler = Scheduler(run_round, run_job, max_batch_sessions=3, batch_wait=5.0, round_tokens=1,
                          max_groups_kept=4, is_open=lambda key: True)
    big = scheduler_module.FIRST_ROUNDS + 1  # a copy over the budget: one a round
    loop = asyncio.get_running_loop()

    def session(key, client):
        return SimpleNamespace(key=key, client=client, blocks=range(0, 2))

    def copy(name, client, holds):
        def fn():
            copies.append(name)
            return name
        return scheduler.run_first(fn, big, client, holds, lambda error: None)

    def decode(s, group=None):
        return asyncio.ensure_future(scheduler.decode(Step(s, torch.zeros(1, 1, 4), 3, loop.create_future(), group)))

    f = [session(f"f{i}", "A") for i in range(3)]
    g1, g2 = session("g1", "B"), session("g2", "B")
    try:
        done = [copy(f"c{i}", "A", (f[i],)) for i in range(3)]
        await asyncio.sleep(0.01)  # c0 runs (held open)
        steps = [decode(f[1]), decode(f[2]), decode(g1, ("G", 2))]
        await asyncio.sleep(0.01)
        gates["c0"].set()  # c1 is taken next; f1 and f2 are still held: B's group must still wait for g2
        await asyncio.sleep(0.05)
        steps.append(decode(g2, ("G", 2)))
        await asyncio.sleep(0.01)
        gates["c1"].set()
        await asyncio.gather(*steps, *done)
        assert all("g2" in r for r in rounds if "g1" in r), rounds  # B's group went together
        # a client forking every round: B's copy, queued after A's five, runs second, not after all of A's
        copies.clear()
        gates.clear()
        more = [copy(f"a{i}", "A", ()) for i in range(5)]
        more.append(copy("b", "B", ()))
        await asyncio.gather(*more)
        assert copies.index("b") <= 1, copies
    finally:
        scheduler.close()
