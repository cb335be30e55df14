"""A peer's move between spans, without the network: drain, hand-off, reload, and recovery from a failed load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm.protocol import ErrorCode, OpenRequest, PeerError, PeerState
from swarm.server.backend import Limits, SpanBackend
from swarm.server.memory import KVBudget
from swarm.server.peer import Peer


def make_backend(tiny_model_dir, start: int, end: int) -> SpanBackend:
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), start, end)
    return SpanBackend(span, Limits(max_length=64), KVBudget(1000))


@pytest.fixture
def peer(tiny_model_dir, monkeypatch):
    peer = Peer.__new__(Peer)  # no DHT, no weights of a real model: just the moving parts
    peer.settings = SimpleNamespace(drain_timeout=0.5, prefetch=True)
    peer.backend = make_backend(tiny_model_dir, 0, 3)
    peer.handler = SimpleNamespace(backend=peer.backend)
    peer.start, peer.end, peer.state, peer.target, peer.moves = 0, 3, PeerState.ONLINE, (0, 0), 0
    peer.peer_id = "me"
    announced = []

    async def announce():
        announced.append((peer.state, peer.start, peer.end, peer.target))

    peer._announce = announce
    peer.announced = announced
    prepared = []

    async def prepare(start, end, peer_id, keep=None):  # a model fetched by its id gets the new blocks here
        prepared.append((start, end, peer.state))
        peer.kept = keep
        if getattr(peer, "fail_next_prepare", False):
            raise FileNotFoundError("no peer of the swarm provides these blocks")

    repinned = []
    peer.sharing = SimpleNamespace(prepare=prepare, repin=lambda start, end: repinned.append((start, end)))
    peer.repinned = repinned
    peer.prepared = prepared
    loads = []

    async def load(start, end):
        loads.append((start, end))
        if getattr(peer, "fail_next_load", False):
            peer.fail_next_load = False
            raise MemoryError("no room for the new blocks")
        return make_backend(tiny_model_dir, start, end)

    peer._load = load
    peer.loads = loads
    yield peer
    if peer.backend is not None:
        peer.backend.shutdown()


async def test_a_move_drains_hands_off_and_serves_the_new_span(peer):
    old = peer.backend
    live = old.open(OpenRequest("s", 32, 1, 0, 3))
    await old.step(live, torch.randn(1, 4, 64), 0)
    await peer.move_to(3, 6)
    assert peer.prepared == [(3, 6, PeerState.ONLINE)]  # the new blocks were fetched while the old still served
    assert peer.kept == (0, 3)  # and the old ones stayed pinned meanwhile
    states = [a[0] for a in peer.announced]
    assert states == [PeerState.DRAINING, PeerState.JOINING, PeerState.ONLINE]
    assert peer.announced[0][3] == (3, 6)  # draining, with where it goes
    assert (peer.start, peer.end, peer.moves) == (3, 6, 1) and peer.handler.backend is peer.backend
    assert peer.backend.span.start == 3 and not old.sessions  # the live session was handed off after 0.5 s
    with pytest.raises(PeerError) as info:
        await old.step(live, torch.randn(1, 1, 64), 4)
    assert info.value.code == ErrorCode.MOVED


async def test_without_prefetch_the_new_blocks_are_not_fetched_before_draining(peer):
    peer.settings.prefetch = False
    await peer.move_to(3, 6)
    assert peer.prepared == [] and peer.loads == [(3, 6)]  # Peer._load fetches them, after the drain
    assert (peer.start, peer.end, peer.state) == (3, 6, PeerState.ONLINE)


async def test_a_move_whose_target_changed_during_a_long_prefetch_does_not_happen(peer, monkeypatch):
    from swarm.server import peer as peer_module

    monkeypatch.setattr(peer_module, "RECHECK_AFTER", 0.0)  # every prefetch counts as long

    async def recheck():  # another peer filled the hole meanwhile: nothing to do now
        return None

    await peer.move_to(3, 6, recheck=recheck)
    assert peer.prepared == [(3, 6, PeerState.ONLINE)] and peer.loads == [] and peer.announced == []
    assert (peer.start, peer.end, peer.state) == (0, 3, PeerState.ONLINE) and peer.repinned == [(0, 3)]

    async def same():
        return 3, 6

    await peer.move_to(3, 6, recheck=same)  # still the best: it moves
    assert (peer.start, peer.end, peer.moves) == (3, 6, 1) and peer.loads == [(3, 6)]


async def test_a_failed_prefetch_leaves_the_peer_on_its_span_pinned(peer):
    peer.fail_next_prepare = True
    with pytest.raises(FileNotFoundError):
        await peer.move_to(3, 6)
    assert (peer.start, peer.end, peer.state) == (0, 3, PeerState.ONLINE) and peer.announced == []
    assert peer.repinned == [(0, 3)] and peer.loads == []


async def test_a_failed_load_serves_the_old_span_again(peer):
    peer.fail_next_load = True
    await peer.move_to(3, 6)
    assert peer.loads == [(3, 6), (0, 3)]
    assert (peer.start, peer.end, peer.state) == (0, 3, PeerState.ONLINE)
    assert peer.backend is not None and peer.handler.backend is peer.backend and peer.backend.span.start == 0


@pytest.mark.parametrize(("quant", "num_threads", "expected"), [
    ("int4", 0, (1, "cpus")),  # the native kernel on every CPU the process may use, torch on one
    ("int8", 3, (1, 3)),
    ("none", 2, (2, 1)),  # oneDNN's float32 linears: torch's threads, the kernel unused
])
def test_num_threads_go_to_the_native_kernel_or_to_torch(monkeypatch, quant, num_threads, expected):
    from swarm.model.precision import Precision
    from swarm.server import peer as peer_module

    monkeypatch.setattr(peer_module, "available_cpus", lambda: 5)
    peer = Peer.__new__(Peer)
    peer.settings = SimpleNamespace(num_threads=num_threads)
    peer.precision = Precision("cpu", torch.float32, quant)
    torch_threads, kernel_threads = expected
    assert peer.threads() == (torch_threads, 5 if kernel_threads == "cpus" else kernel_threads)


def test_available_cpus_is_the_affinity_mask():
    import os

    from swarm.server.peer import available_cpus

    assert available_cpus() == min(16, len(os.sched_getaffinity(0)))


def test_kv_dtype_auto_is_float16_only_where_the_native_attention_reads_it():
    from swarm.model.precision import Precision
    from swarm_kernels import attention

    config = SimpleNamespace(num_attention_heads=9, hidden_size=576)  # SmolLM2's head size, 64
    cpu = SimpleNamespace(precision=Precision("cpu", torch.float32, "int4"), config=config)
    gpu = SimpleNamespace(precision=Precision("cuda", torch.bfloat16, "nf4"), config=config)
    assert Peer._kv_dtype(cpu, "auto") == ("float16" if attention.kv16(64) else "float32")
    assert Peer._kv_dtype(SimpleNamespace(precision=cpu.precision, config=SimpleNamespace(
        num_attention_heads=4, hidden_size=20, head_dim=5)), "auto") == "float32"  # a head size it cannot read
    assert Peer._kv_dtype(gpu, "auto") == Peer._kv_dtype(gpu, "float32") == "float32"
    assert Peer._kv_dtype(cpu, "float16") == "float16" and Peer._kv_dtype(cpu, "float32") == "float32"
    with pytest.raises(ValueError, match="float32 blocks on the CPU"):
        Peer._kv_dtype(gpu, "float16")
