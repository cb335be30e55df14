"""The responses /v1/responses keeps (app.responses_api), in memory: each one's conversation so far, the response object
and its input items, for the API key that made it, for `ttl` seconds (at most `capacity`, the oldest finished ones
forgotten first); an index of their items' ids (`item_reference`s); and the tasks computing background responses,
which are cancelled with their response (deleted) or when the gateway stops, each closing its generation to its end."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any


@dataclasses.dataclass
class StoredResponse:
    since: float
    owner: str
    messages: list[dict[str, Any]]  # the conversation so far, as chat messages (what a next turn continues from)
    response: dict[str, Any]  # the response object, as sent (GET /v1/responses/{id})
    items: list[dict[str, Any]]  # its input items, with ids (GET /v1/responses/{id}/input_items)


class ConversationStore:
    """Responses by id (their conversations as chat messages, without instructions; the response objects and their
    input items), in memory, with a TTL and a capacity. Each belongs to the API key that made it: another key's
    `previous_response_id` (or GET, or DELETE) is not found (as OpenAI's are per organization); without auth there
    are no keys, and every caller shares them."""

    def __init__(self, capacity: int = 1000, ttl: float = 3600.0):
        self.capacity, self.ttl = capacity, ttl
        self._items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._holder: dict[str, tuple[str, dict[str, Any]]] = {}  # an item's id → (the response holding it, it)
        self._running: dict[str, asyncio.Task[None]] = {}  # background responses being computed

    def run(self, response_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Compute a background response (its entry already stored, in progress) in a task of its own. Until it ends,
        its entry is neither expired nor pushed out by others (admission bounds how many run)."""
        task = self._running[response_id] = asyncio.create_task(work, name=f"background {response_id}")
        task.add_done_callback(lambda done: self._running.pop(response_id, None) if self._running.get(response_id)
                               is done else None)

    async def cancel(self, response_id: str) -> None:
        """Stop a background response's computation, if it still runs, and wait for it to end (its entry stored
        cancelled, unless it was forgotten meanwhile)."""
        task = self._running.get(response_id)
        if task is not None:
            _stop(task)
            await asyncio.wait({task})  # (this caller's own cancellation is not passed on to the task)

    async def stop(self) -> None:
        """Cancel every background response still running, and wait for their ends (the gateway is stopping)."""
        for response_id in list(self._running):
            await self.cancel(response_id)

    def entry(self, response_id: str, owner: str = "") -> StoredResponse | None:
        self._expire()
        entry = self._items.get(response_id)
        return None if entry is None or entry.owner != owner else entry

    def item(self, item_id: str, owner: str = "") -> dict[str, Any] | None:
        """An input or output item of a response stored by `owner` (an `item_reference`), by its id."""
        holder, item = self._holder.get(item_id, (None, None))
        return item if holder is not None and self.entry(holder, owner) is not None else None

    def put(self, response_id: str, messages: list[dict[str, Any]], owner: str = "",
            response: dict[str, Any] | None = None, items: list[dict[str, Any]] | None = None) -> None:
        self._unindex(response_id)
        entry = self._items[response_id] = StoredResponse(time.monotonic(), owner, messages, response or {},
                                                          items or [])
        self._items.move_to_end(response_id)
        self._holder.update((item["id"], (response_id, item)) for item in _held(entry) if "id" in item)
        self._expire()
        if (excess := len(self._items) - self.capacity) > 0:  # the oldest finished ones go
            for oldest in [rid for rid in self._items if rid not in self._running][:excess]:
                self._forget(oldest)

    def delete(self, response_id: str, owner: str = "") -> bool:
        if self.entry(response_id, owner) is None:
            return False
        self._forget(response_id)
        return True

    def _forget(self, response_id: str) -> None:
        """Deleted, expired or pushed out: gone, its items too, and its computation if it is a background one still
        running (which then stores nothing)."""
        self._unindex(response_id)
        del self._items[response_id]
        task = self._running.get(response_id)
        if task is not None:  # (it stays listed until it has ended: `stop` waits for it)
            _stop(task)

    def _unindex(self, response_id: str) -> None:
        entry = self._items.get(response_id)
        for item in _held(entry) if entry is not None else ():
            if self._holder.get(item.get("id", ""), (None,))[0] == response_id:
                del self._holder[item["id"]]

    def _expire(self) -> None:
        now, expired = time.monotonic(), []
        for response_id, entry in self._items.items():  # oldest first
            if now - entry.since <= self.ttl:
                break
            if response_id not in self._running:  # (a background one still running is kept)
                expired.append(response_id)
        for response_id in expired:
            self._forget(response_id)


def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a background response's task once: a second cancel would cut its generation's closing short."""
    if not task.cancelling() and not task.done():
        task.cancel()


def _held(entry: StoredResponse) -> list[dict[str, Any]]:
    """A stored response's items: its input items, then its output items."""
    return [*entry.items, *entry.response.get("output", [])]
