"""swarm.heap.settle: what a process loaded is frozen out of full collections; a later settle frees what was dropped."""

from __future__ import annotations

import gc
import weakref

from swarm import heap
from swarm.model.span import release_freed_memory


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


def test_settle_collects_then_freezes_and_the_next_settle_frees_cycles_dropped_since():
    try:
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        kept = Node()
        heap.settle()
        assert gone() is None  # collected before the freeze, not frozen with the rest
        assert not any(o is kept for o in gc.get_objects())  # in no generation a collection walks
        dropped = weakref.ref(kept)
        del kept
        gc.collect()
        assert dropped() is not None  # frozen: a full collection skips it (what settle saves the process)
        heap.settle()  # a peer loading other blocks settles again
        assert dropped() is None
        also = Node()
        heap.settle()
        again = weakref.ref(also)
        del also
        release_freed_memory()  # as load_span calls it: the frozen cycle freed, the rest frozen again
        assert again() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
