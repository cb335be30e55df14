"""The content-addressed store (swarm.model.store): verified on the way in and out, identical tensors stored once,
least-recently-used eviction that never takes a running peer's tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from swarm.model.manifest import load_manifest, read_header
from swarm.model.store import PARTIAL_TTL, PIN_TTL, CorruptObject, ObjectStore, digest_of, process_token


@pytest.fixture
def store(tmp_path):
    return ObjectStore(tmp_path / "store")


def test_put_and_get_verify_the_bytes(store):
    data = b"weights" * 100
    digest = digest_of(data)
    store.put(digest, data)
    assert store.get(digest) == data
    with pytest.raises(CorruptObject):
        store.put(digest_of(b"other"), data)  # bytes that are not what they claim are never stored
    path = store.path(digest)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1  # a flipped byte on disk
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject):
        store.get(digest)
    assert not store.has(digest)  # dropped: the next use fetches it again
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_eviction_is_least_recently_used_and_spares_pinned_objects(store):
    objects = [bytes([i]) * 1000 for i in range(5)]
    digests = [digest_of(o) for o in objects]
    for i, (digest, data) in enumerate(zip(digests, objects, strict=True)):
        store.put(digest, data)
        os.utime(store.path(digest), ns=(i * 10**9, i * 10**9))  # put in order, oldest first
    store.get(digests[0])  # used now: the newest
    store.pin([digests[1]])  # this process serves it
    removed = store.evict(3000)
    assert removed == [digests[2], digests[3]]  # the oldest unpinned ones, until the store fits
    assert store.size() == 3000 and all(store.has(d) for d in (digests[0], digests[1], digests[4]))
    assert store.evict(0) == [digests[4], digests[0]]  # all but the pinned one


def test_pins_of_a_process_that_is_gone_do_not_count(store):
    data = b"x" * 100
    digest = digest_of(data)
    store.put(digest, data)
    child = subprocess.run([sys.executable, "-c", f"""
from swarm.model.store import ObjectStore
ObjectStore({str(store.root)!r}).pin([{digest!r}])
"""], cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), check=True)
    assert child.returncode == 0
    time.sleep(0.1)
    assert store.in_use() == set()  # its pin file named a dead pid
    assert store.evict(0) == [digest]


def test_a_fine_tune_shares_the_tensors_it_did_not_change(store, tiny_model_dir, tmp_path, monkeypatch):
    """The tiny Llama and a copy with one block changed, both put in one store: only the changed tensors add."""
    import shutil

    from safetensors.torch import save_file

    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model_dir("llama")
    tuned = tmp_path / "tuned"
    shutil.copytree(model, tuned)
    file = next(tuned.glob("*.safetensors"))
    tensors = load_file(file)
    for name in [n for n in tensors if ".layers.5." in n]:
        tensors[name] = tensors[name] * 1.01
    save_file(tensors, file, metadata={"format": "pt"})
    total = 0
    for directory in (model, tuned):
        manifest = load_manifest(directory)
        for digest, (path, offset, length) in manifest["locations"].items():
            with open(path, "rb") as f:
                f.seek(offset)
                store.put(digest, f.read(length))
            total += length
    stored = store.size()
    one = sum(length for _, _, length in load_manifest(model)["locations"].values())
    assert one < stored < total  # deduplicated: one model plus block 5's tensors
    _, header = read_header(next(model.glob("*.safetensors")))
    block5 = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if ".layers.5." in k)
    assert stored - one == pytest.approx(block5, rel=0.05)  # its norms may equal another block's: stored once


def dead_token() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{child.pid}-{process_token().split('-')[1]}"  # a process of our pid namespace, gone


def test_a_dead_processs_partial_fetch_is_taken_over_and_a_live_ones_is_not(store):
    data = b"tensor bytes " * 1000
    digest = digest_of(data)
    store.partials.mkdir(parents=True)
    (store.partials / f"{digest}.{dead_token()}").write_bytes(data[:5000])
    parent = f"{os.getppid()}-{process_token().split('-')[1]}"
    live = store.partials / f"{digest_of(b'x')}.{parent}"  # another fetch, of a process alive
    live.write_bytes(b"x")
    part = store.partial(digest)
    assert part.name == f"{digest}.{process_token()}" and part.read_bytes() == data[:5000]  # resumed at 5000
    assert store.partial(digest_of(b"x")).read_bytes() == b"" and live.exists()
    with open(part, "ab") as f:
        f.write(data[5000:])
    with pytest.raises(CorruptObject):  # a wrong file stays where it is (the fetcher finds who sent what)
        store.put_file(digest_of(b"other"), part)
    assert store.put_file(digest, part) == store.path(digest) and store.get(digest) == data and not part.exists()
    (store.partials / f"{digest}.{dead_token()}").write_bytes(b"left over")
    store.evict(10**9)
    assert not list(store.partials.glob(f"{digest}.*")) and live.exists()  # a dead process's partial file goes


def test_processes_of_another_pid_namespace_count_while_their_files_are_fresh(store):
    """A container sharing the store: its pids mean nothing here, so its pins count while refreshed, and its partial
    file is left alone while it grows; stale ones are a dead process's."""
    data = b"abc" * 100
    digest = digest_of(data)
    store.put(digest, data)
    store.pins.mkdir(parents=True)
    other = f"{os.getpid()}-{int(process_token().split('-')[1]) + 1}"  # our pid, another namespace: not checkable
    pin = store.pins / f"{other}.json"
    pin.write_text(json.dumps([digest]))
    partial = store.partials / f"{digest_of(b'y')}.{other}"
    store.partials.mkdir(parents=True)
    partial.write_bytes(b"y")
    assert store.in_use() == {digest} and store.evict(0) == [] and partial.exists()
    assert store.partial(digest_of(b"y")).read_bytes() == b""  # not taken over: it is being written
    stale = time.time() - PIN_TTL - PARTIAL_TTL
    os.utime(pin, (stale, stale))
    os.utime(partial, (stale, stale))
    assert store.in_use() == set() and store.evict(0) == [digest] and not partial.exists()
    with pytest.raises(ValueError):
        store.partial("../" * 30)
