"""Admission of generations: at most `max_concurrent` hold a slot; the others wait in a bounded queue and are admitted
round-robin across clients (an API key, or the client address without auth), so that one client's many requests do
not push another client's single request to the back. A full queue or a wait beyond the timeout is a 429.

A freed slot passes straight to the next waiting client in turn (the count of held slots does not drop, so no
newcomer can take it first). When the queue is full, a newcomer takes the place of the newest request of the client
with the most waiting, if that client has more waiting than the newcomer's would. Everything here runs on the event
loop; a waiter that is cancelled (its client disconnected) leaves the queue, and one admitted as it was cancelled
hands its slot on.
"""

from __future__ import annotations

import asyncio
from collections import deque

from app.errors import APIError


class Admission:
    def __init__(self, max_concurrent: int, max_queued: int = 256, timeout: float = 30.0):
        self.max_concurrent, self.max_queued, self.timeout = max_concurrent, max_queued, timeout
        self.active = 0  # slots held
        self.queued = 0  # requests waiting
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}  # per client, in turn order: the first is next

    async def acquire(self, client: str) -> None:
        """Take a slot, waiting in the queue for one if none is free. The caller must `release` it."""
        if self.active < self.max_concurrent and not self._queues:
            self.active += 1
            return
        waiter = self._enqueue(client)
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except TimeoutError:
            if _admitted(waiter):  # admitted as the timeout struck: the slot is ours
                return
            self._withdraw(client, waiter)
            raise APIError(429, f"no generation slot came free within {self.timeout:g} s (the gateway is at its "
                                f"concurrency limit of {self.max_concurrent}); retry later", code="queue_timeout",
                           retry_after=1) from None
        except BaseException:
            if _admitted(waiter):
                self.release()
            else:
                self._withdraw(client, waiter)
            raise

    def release(self) -> None:
        """Give back a slot: to the next waiting client in turn, else to the pool."""
        while self._queues:
            client, waiters = next(iter(self._queues.items()))
            waiter = waiters.popleft()
            self.queued -= 1
            del self._queues[client]
            if waiters:
                self._queues[client] = waiters  # to the back of the round
            if not waiter.done():  # done: cancelled, its owner not yet run to withdraw it
                waiter.set_result(None)
                return
        self.active -= 1

    def _enqueue(self, client: str) -> asyncio.Future[None]:
        if self.queued >= self.max_queued and not self._evict_for(client):
            raise APIError(429, f"the gateway is at its concurrency limit of {self.max_concurrent} and "
                                f"{self.queued} requests already wait for a slot; retry later", code="overloaded",
                           retry_after=1)
        waiter = asyncio.get_running_loop().create_future()
        self._queues.setdefault(client, deque()).append(waiter)
        self.queued += 1
        return waiter

    def _evict_for(self, client: str) -> bool:
        """Refuse the newest request of the client with the most waiting, if it has more than `client` would."""
        hog = max(self._queues, key=lambda c: len(self._queues[c]), default=None)
        own = len(self._queues.get(client, ()))
        if hog is None or hog == client or len(self._queues[hog]) <= own + 1:
            return False
        waiters = self._queues[hog]
        while waiters:
            waiter = waiters.pop()
            self.queued -= 1
            if not waiter.done():
                waiter.set_exception(APIError(
                    429, "the gateway's queue is full and this client has the most requests waiting in it; retry "
                         "later", code="overloaded", retry_after=1))
                break
        if not waiters:
            del self._queues[hog]
        return self.queued < self.max_queued

    def _withdraw(self, client: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._queues.get(client)
        if waiters is None or waiter not in waiters:  # already taken out (admitted, refused or skipped)
            return
        waiters.remove(waiter)
        self.queued -= 1
        if not waiters:
            del self._queues[client]


def _admitted(waiter: asyncio.Future[None]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None
