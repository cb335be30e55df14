"""The cyclic garbage collector of a long-running process: it should not walk what the process loaded to serve.

A peer holding SmolLM2's 30 blocks has ~380,000 objects the collector tracks, and a full (generation 2) collection
walks every one: 150 ms on a 2-core Xeon, while every session through the process waits (the collector holds the
GIL). Python runs one whenever the objects that outlived younger collections reach a quarter of the long-lived ones,
so the more a process loaded, the longer each pause. Measured through `make serve` (16 chats, 2 rounds): the gateway
made 7 full collections (1.0 s in all, the longest 655 ms) and its embedded peer 9 (1.2 s, the longest 448 ms), nearly
all while they loaded; while serving they are rare (none in those rounds), but each would stall every session.

`settle()`, once a process has loaded what it serves: one collection, then `gc.freeze()` (what is left moves to a
permanent generation that collections skip; reference counting still frees it when it is dropped). Later full
collections walk only what was allocated since. Called again after a new load (a peer moving to other blocks): the
frozen objects are unfrozen and collected first, so reference cycles of what was dropped are freed then.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect, then freeze what survives; returns how many objects are frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
