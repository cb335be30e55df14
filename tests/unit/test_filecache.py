"""filecache: what processes racing to build one cache entry see, and what a failed build leaves behind."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from swarm_kernels.filecache import check_private, compute_once, lock_path, locked, make_dirs, write_atomically


def _slow_build(out: Path, log: Path) -> None:
    with log.open("a") as f:
        f.write("built\n")
    time.sleep(0.3)  # long enough for every racer to reach the lock while this one builds
    out.write_text("result")


def _race(target: str, log: str, start) -> None:
    start.wait()
    path = compute_once(Path(target), lambda out: _slow_build(out, Path(log)))
    assert path.read_text() == "result"


def test_processes_racing_build_once_and_all_find_the_result(tmp_path):
    target, log = tmp_path / "cache" / "thing.bin", tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    racers = [context.Process(target=_race, args=(str(target), str(log), start)) for _ in range(3)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(timeout=60)
    assert [racer.exitcode for racer in racers] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert target.read_text() == "result"


def test_threads_racing_build_a_directory_once(tmp_path):
    target, calls = tmp_path / "model", []

    def build(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        time.sleep(0.2)
        (out / "weights").write_text("w")

    threads = [threading.Thread(target=compute_once, args=(target, build),
                                kwargs={"ready": lambda p: (p / "weights").is_file()}) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert calls[0].parent.parent == tmp_path and calls[0].name == "model"  # built in a sibling, then renamed


def test_a_failed_build_leaves_nothing_half_written_and_the_next_one_builds(tmp_path):
    target = tmp_path / "model"

    def crash(out: Path) -> None:
        out.mkdir()
        (out / "half").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        compute_once(target, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path(target).name]  # the lock file only
    assert compute_once(target, lambda out: out.mkdir()) == target and target.is_dir()


def test_a_ready_target_is_not_rebuilt_and_a_stale_one_is_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old-layout").write_text("x")
    ready = lambda p: (p / "manifest").is_file()  # noqa: E731

    def build(out: Path) -> None:
        out.mkdir()
        (out / "manifest").write_text("new")

    compute_once(target, build, ready=ready)
    assert sorted(p.name for p in target.iterdir()) == ["manifest"]
    compute_once(target, lambda out: pytest.fail("rebuilt a ready target"), ready=ready)


def test_write_atomically_replaces_a_file_and_refuses_a_writer_that_wrote_nothing(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old")
    write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    with pytest.raises(FileNotFoundError, match="made nothing"):
        write_atomically(target, lambda tmp: None)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_locked_excludes_other_holders_until_the_block_ends(tmp_path):
    target, order = tmp_path / "shared.json", []

    def other() -> None:
        with locked(target):
            order.append("other")

    with locked(target):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join()
    assert order == ["first", "other"]


def test_cache_directories_are_made_private_and_a_planted_lock_link_is_not_followed(tmp_path):
    root = tmp_path / "cache"
    target = root / "kernels" / "lib.so"
    compute_once(target, lambda out: out.write_text("built"))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and stat.S_IMODE(os.stat(target.parent).st_mode) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("someone else's file")
    other = root / "kernels" / "other.so"
    lock_path(other).symlink_to(victim)  # planted where the next build's lock goes
    with pytest.raises(OSError):
        compute_once(other, lambda out: out.write_text("built"))
    assert victim.read_text() == "someone else's file" and not other.exists()


def test_check_private_refuses_links_other_owners_and_what_others_may_write(tmp_path):
    root = tmp_path / "cache"
    make_dirs(root / "kernels")
    library = root / "kernels" / "lib.so"
    library.write_text("code")
    library.chmod(0o700)
    check_private(library, up_to=root)  # ours and private: accepted
    library.chmod(0o722)
    with pytest.raises(PermissionError, match="writable by others"):
        check_private(library, up_to=root)
    library.chmod(0o700)
    (root / "kernels").chmod(0o777)  # a directory others may write: they could swap the file
    with pytest.raises(PermissionError, match="writable by others"):
        check_private(library, up_to=root)
    (root / "kernels").chmod(0o700)
    link = root / "kernels" / "link.so"
    link.symlink_to(library)
    with pytest.raises(PermissionError, match="symbolic link"):
        check_private(link, up_to=root)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(library, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534"):
            check_private(library, up_to=root)
