"""Fair shares of a peer's capacity between its clients, so that one client cannot lock the others out.

A client is the remote peer id of a stream; a gateway, which carries all its users' sessions under its one id, is one
client. What a client can hold on a peer for long is session slots (--max-sessions) and KV tokens (the budget);
queued compute is bounded by its sessions (a stream sends its next step after the answer to its last one) and
served in turns between clients (swarm.server.scheduler), and streams that are not sessions yet are capped and
timed out by the handler.

For a resource of capacity C used by N clients (holding some of it, or waiting for some; the asking client
included), a client's share is C / N, and a client asking for `need` more of it:
- gets free capacity, up to all of it: a lone client (a gateway on its own peers) keeps every limit it had; except
  that while other clients wait, nobody takes free capacity past their share (it goes to those within theirs);
- without free capacity, is refused at once when it is past its share and others use the peer: waiting would only
  hold a stream for capacity that goes to others first, and the refusal (`capacity`) sends its client elsewhere. A
  lone client waits for capacity as before (--admission-wait);
- within its share, makes room: the client holding the most, when that is more than its share, loses its
  longest-idle session, one session at a time until the request fits or nobody is past their share. The session is
  ended with `capacity`; its client replays it on another peer from the inputs it keeps (a gateway's parked chat
  is the typical longest-idle session: replaying it costs a prefill, and nothing else is lost). What is still
  missing is waited for, up to --admission-wait.

Making room always works for a request within its share when a resource is full: the shares add up to C, so with
the asker below its own, someone else is above theirs. A client that takes everything while the peer is quiet is
therefore cut down to its share the moment another client needs the peer, at its own sessions' expense only, and
the other client is served at once instead of after the admission wait (or never, if the sessions are held up to
the idle timeout). Limits: peer ids cost nothing, so a client with k identities holds k shares; shares only keep a
single identity from taking everything (a peer that must serve only known clients has --allowed-clients).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Holdings:
    """One resource of the peer now: its capacity, what is free, and what each client holds."""

    name: str  # for the client's error message: "sessions", "KV tokens"
    capacity: int
    free: int
    held: Mapping[str, int]


class FairShares:
    """Who waits for capacity now; refusals and evictions by the rule above."""

    def __init__(self) -> None:
        self.waiting: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def waiting_for_capacity(self, client: str) -> Iterator[None]:
        self.waiting[client] += 1
        try:
            yield
        finally:
            self.waiting[client] -= 1
            if not self.waiting[client]:
                del self.waiting[client]

    def _users(self, resource: Holdings, client: str) -> set[str]:
        return {c for c, held in resource.held.items() if held > 0} | set(self.waiting) | {client}

    def refusal(self, client: str, need: int, resource: Holdings) -> str | None:
        """Why `client` may not have `need` more of `resource` now (None: it may take it if free, or wait for it)."""
        users = self._users(resource, client)
        share = resource.capacity / len(users)
        held = resource.held.get(client, 0)
        if len(users) == 1 or held + need <= share:
            return None
        if need <= resource.free and not any(self.waiting[c] for c in users - {client}):
            return None
        return (f"this peer's {resource.name} are shared by {len(users)} clients: this client holds {held} of "
                f"{resource.capacity}, past its share of {share:.0f}; retry later or elsewhere")

    def to_evict(self, client: str, need: int, resource: Holdings) -> str | None:
        """The client that must give up a session so that `client` gets `need` more of `resource`: the one holding the
        most, if that is past its share and `client` stays within its own. None when nobody must."""
        if need <= resource.free:
            return None
        users = self._users(resource, client)
        share = resource.capacity / len(users)
        if resource.held.get(client, 0) + need > share:
            return None
        others = [c for c in users if c != client]
        victim = max(others, key=lambda c: resource.held.get(c, 0), default=None)
        return victim if victim is not None and resource.held.get(victim, 0) > share else None
