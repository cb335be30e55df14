"""Wire types and constants shared by swarm clients and peers.

Everything that crosses the network between a client and a peer, or sits in the DHT, is defined here, so that both
sides agree on names, limits and record layouts. Versioned: a peer refuses a client of another PROTOCOL_VERSION.

The inference RPC is one persistent bidirectional stream per (session, peer) carrying hivemind `ExpertRequest` /
`ExpertResponse` protobufs: `metadata` is a msgpack dict, `tensors` the hidden states.

    client → peer   {"type": "open", "version", "session_id", "max_length", "batch_size", "blocks": [s, e],
                     "push_key"?: 32 hex, "fork"?: [handle, tokens, session_id]}
    peer → client   {"type": "opened", "session_id", "blocks": [s, e], "max_length", "handle"?: int,
                     "forked"?: tokens, "parks"?: true}
    client → peer   {"type": "step", "position": P, "group"?: [id, size]}  + tensors=[hidden [batch, new_tokens,
                    hidden_size]]; `group` (optional, decode steps): the client sent this step together with
                    size - 1 others under the same id; the peer batches them in one forward, waiting (a bounded time)
                    for all of them
    peer → client   {"type": "result", "position": P + new_tokens}  + tensors=[hidden of the same shape]
    peer → client   {"type": "error", "code", "message"}  (then the peer closes the stream and frees the session)

A step at `position` P < the session's current length rewinds the cache to P first (replay, regeneration).

`fork` (prefix sharing): the new session starts with a copy of the first `tokens` cached tokens of the session the
peer named `handle` and its client opened as `session_id` (the same client's, over the same blocks and batch size,
holding at least that many; a handle names a session of one peer process's span only, and the id makes a stale
handle fail rather than name another session), so its first step is at position `tokens`; the peer confirms with
`forked`. A peer that does not name `forked` has not
copied anything (an older peer): the client closes that session and prefills from scratch. A peer with no room for a
fork refuses it at once (CAPACITY) rather than make it wait: its client can take the source or open a new session.

    client → peer   {"type": "park"}  (no tensors, no answer)
    client → peer   {"type": "unpark"}  (no tensors)
    peer → client   {"type": "unparked"}

`park`: the client keeps the session only to reuse its cache (a chat's next turn, a shared system prompt) and lets
the peer free it when room is needed: a new session or a growing one takes a parked session's slot and KV first
(least recently stepped first, never the source of the fork being opened); the freed session ends with a CAPACITY
error. Its next step un-parks it, and so does `unpark`, answered once the peer will no longer free it (a client
taking a parked session back waits for that answer, so that it never steps one freed meanwhile). Park frames go only
to a peer whose `opened` said `parks` (an older one would take them for malformed steps). A peer announces its parked
sessions as free capacity (`active_sessions`, `free_kv_tokens` leave them out).

Group steps (a client's lockstep group of one-row decode sessions on the same blocks of a peer, swarm.client.decoding):
one frame on any member's stream carries every member's next token, and one frame answers them all, instead of a
frame each way per session.

    client → peer   {"type": "group_step", "handles": [h, ...], "positions": [P, ...], "group": [id, size]}
                    + tensors=[hidden [k, 1, hidden_size]]: row j is the step of the session the peer named
                    `handle` h_j when it opened it (k <= MAX_GROUP_ROWS; every session this client's, over the
                    same blocks as the carrying one, open, no step of it in flight, none named twice)
    peer → client   {"type": "result", "rows": [P_j + 1 | code, ...]} + tensors=[hidden [k, 1, H]]: row j's
                    output, or the code of why row j was refused (its row is then zeros): that session's own
                    stream goes on, and the client steps it alone
A malformed group frame is an error of the carrying stream (it ends, as for a malformed step). Peers that name no
`handle` in their `opened` answer are not sent group frames.

Server-to-server push (sessions opened with a `push_key`, a secret the client drew for that link): a step may carry
`"step": n` (the n-th numbered step of this stream, 1, 2, ...) and `"next": [[peer_id, push_key, n'], ...]` (at
most MAX_PUSH_HOPS), the links after this one. The peer then sends its output straight to the next link's peer over
PUSH_HANDLER, a stream of frames {"type": "push", "key", "step", "position", "group"?, "next"} + tensors=[hidden]
(no answers; outputs over swarm.server.push.MAX_PUSH_BYTES are not pushed), and that peer computes the step as if
its client had sent it, provided it is the step after the client's last numbered one and the client has not sent
an unnumbered step since (it has stopped pushing). The client still sends every link its step itself once the
previous link has answered (the push only wins the race where it is faster; a peer that cannot reach the next one
costs nothing more than the relay). A numbered step that arrives twice (pushed and from the client) is computed
once and answered once; its result carries `"input_digest"` (blake2b-64 of the input the peer used) and
`"pushed"` (whether the input came by push). An answer whose digest or position is not the step's own (a push that
differed from what the previous peer answered, or an answer to a push the client did not send) makes the client
replace that link's stream by a new one to the same peer without push, rebuilt from its kept inputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1

# Handler names: the same strings on both sides, independent of any class name.
INFERENCE_HANDLER = "swarm.v1.inference"
INFO_HANDLER = "swarm.v1.info"
PUSH_HANDLER = "swarm.v1.push"  # hidden states from the previous peer of a session's chain (see above)

# Server-to-server push: a link's secret, the links a step may name after it.
PUSH_KEY = re.compile(r"[0-9a-f]{32}")
MAX_PUSH_HOPS = 16

# Bounds of a step's `group` hint: the id's length, the group's size.
MAX_GROUP_ID = 64
MAX_GROUP_SIZE = 1024
MAX_GROUP_ROWS = 256  # rows of one group frame (its handles and positions fit the metadata's 4 KiB)

# Batch size at which peers measure `SpanInfo.batch_throughput`.
BATCH_PROBE = 8

# Dtypes a peer accepts for hidden states on the wire.
WIRE_DTYPES = ("float32", "float16", "bfloat16")

# DHT layout: one key per model, one subkey per peer (its peer id + owner marker, see swarm.dht), a SpanInfo dict.
DHT_KEY_PREFIX = "swarm.v1.spans"


MANIFEST_HANDLER = "swarm.v1.manifest"  # a model's manifest and config, by content id (swarm.model.fetch)
FETCH_HANDLER = "swarm.v1.fetch"  # a chunk of a tensor's bytes, by its SHA-256


def providers_key(content_id: str) -> str:
    """DHT key under which every peer that can serve a model's tensors names itself (and the model's name)."""
    return f"{DHT_KEY_PREFIX}.content.{content_id}"


def spans_key(model_id: str) -> str:
    """DHT key under which every peer serving `model_id` announces its span."""
    return f"{DHT_KEY_PREFIX}.{model_id}"


class PeerState(StrEnum):
    JOINING = "joining"  # loading its blocks (`target`): counted by placement, not routed to yet
    ONLINE = "online"
    DRAINING = "draining"  # leaving its span for `target`: live sessions finish, new ones go elsewhere
    OFFLINE = "offline"  # announced on clean shutdown so that clients stop routing here before the record expires


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed message, wrong shape / dtype / position
    VERSION = "version_mismatch"
    CAPACITY = "capacity"  # too many sessions or KV budget exhausted: retry later or elsewhere
    MOVED = "moved"  # the peer is leaving these blocks (rebalancing): reopen the session elsewhere
    TIMEOUT = "idle_timeout"
    FORBIDDEN = "forbidden"  # the peer serves an allowlist of clients
    INTERNAL = "internal"


@dataclass(frozen=True)
class SpanInfo:
    """What a peer announces about itself: the blocks it serves and what routing needs to choose it."""

    peer_id: str
    model_id: str
    start: int
    end: int
    num_blocks: int  # blocks in the whole model, so that a client knows what "complete" means
    hidden_size: int
    dtype: str
    quant: str
    max_length: int
    kv_budget_tokens: int
    free_kv_tokens: int
    active_sessions: int
    version: int = PROTOCOL_VERSION
    state: str = PeerState.ONLINE.value
    public_name: str = ""
    throughput: float = 0.0  # decode tokens/s of one session through ONE block (measured), 0 when unknown
    batch_throughput: float = 0.0  # decode tokens/s through one block summed over a batch of BATCH_PROBE sessions
    device: str = "cpu"
    decode_forwards: int = 0  # batched decode forwards run so far
    decode_rows: int = 0  # session steps those forwards carried (rows / forwards = mean batch)
    queued_steps: int = 0  # steps waiting for the compute thread when announced
    pending_streams: int = 0  # streams not sessions yet (opening, or waiting for capacity)
    target_start: int = 0  # while joining or draining: the blocks it is moving to
    target_end: int = 0
    software: str = ""  # package version of the peer
    movable: bool = False  # it placed itself (no --blocks) and may move to rebalance the swarm
    content_id: str = ""  # sha256:<64 hex> of the weights it serves (swarm.model.manifest); "" from older peers
    push: bool = False  # takes pushed hidden states from the previous peer of a chain, and pushes to the next
    # (peer id, seconds): round trips it measured to peers that may come next in a chain (swarm.server.latency),
    # at most MAX_NEXT_RTT, so that routes with push can count the true hop between two peers
    next_rtt: tuple[tuple[str, float], ...] = ()
    # what its int8/int4 CPU blocks multiply with: float32, or int8 (--activations); a reader's verification takes a
    # mode it does not know for the loosest there is (as with quant)
    activations: str = "float32"
    kv_dtype: str = "float32"  # what its sessions' KV caches hold (--kv-dtype); verification's tolerance counts it
    updated_at: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SpanInfo:
        """Parse a record from the DHT or an info RPC (untrusted: anyone may write one): every field's type,
        finiteness and bounds (SPAN_SCHEMA), then the block ranges; raises ValueError on anything malformed."""
        if not isinstance(data, dict) or len(data) > 4 * len(SPAN_SCHEMA):
            raise ValueError("a span record must be a dict of its fields")
        fields: dict[str, Any] = {}
        for name, spec in SPAN_SCHEMA.items():
            if name in data:
                fields[name] = spec.parse(name, data[name])
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - fields.keys()
        if missing:
            raise ValueError(f"span record lacks {sorted(missing)}")
        info = cls(**fields)
        if not info.start < info.end <= info.num_blocks:
            raise ValueError(f"span record has an invalid block range: {info.start}:{info.end}/{info.num_blocks}")
        if not (0 <= info.target_start <= info.target_end <= info.num_blocks):
            raise ValueError(f"span record has an invalid target: {info.target_start}:{info.target_end}")
        if info.kv_budget_tokens and info.free_kv_tokens > info.kv_budget_tokens:
            raise ValueError("span record has more free KV tokens than its budget")
        if 0 < info.throughput < MIN_THROUGHPUT or 0 < info.batch_throughput < MIN_THROUGHPUT:
            raise ValueError(f"span record's throughput is 0 (unknown) or at least {MIN_THROUGHPUT:g} tokens/s")
        if info.content_id and not CONTENT_ID.fullmatch(info.content_id):
            raise ValueError("span record's content_id is not sha256:<64 lowercase hex>")
        return info

    @property
    def routable(self) -> bool:
        """Takes new sessions (a draining peer still serves the sessions it has, a joining one none yet)."""
        return self.state == PeerState.ONLINE and self.version == PROTOCOL_VERSION

    @property
    def blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Int:
    low: int
    high: int

    def parse(self, name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= self.high:
            raise ValueError(f"'{name}' must be an integer in {self.low}..{self.high}")
        return value


@dataclass(frozen=True)
class _Real:
    low: float
    high: float

    def parse(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not self.low <= value <= self.high:
            raise ValueError(f"'{name}' must be a finite number in {self.low:g}..{self.high:g}")
        return float(value)


@dataclass(frozen=True)
class _Text:
    max_length: int
    choices: tuple[str, ...] = ()

    def parse(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or len(value) > self.max_length or not value.isprintable():
            raise ValueError(f"'{name}' must be printable text of at most {self.max_length} characters")
        if self.choices and value not in self.choices:
            raise ValueError(f"'{name}' must be one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class _RoundTrips:
    """(peer id, seconds) pairs: at most `count`, distinct peer ids, finite round trips in 0..`high` seconds."""
    count: int
    high: float

    def parse(self, name: str, value: Any) -> tuple[tuple[str, float], ...]:
        if not isinstance(value, list | tuple) or len(value) > self.count:
            raise ValueError(f"'{name}' must be a list of at most {self.count} [peer id, seconds] pairs")
        pairs = []
        for pair in value:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"'{name}' must be a list of [peer id, seconds] pairs")
            pairs.append((_Text(128).parse(name, pair[0]), _Real(0.0, self.high).parse(name, pair[1])))
        if len({peer for peer, _ in pairs}) < len(pairs):
            raise ValueError(f"'{name}' names a peer twice")
        return tuple(pairs)


@dataclass(frozen=True)
class _Bool:
    def parse(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{name}' must be a boolean")
        return value


MAX_BLOCKS = 4096  # blocks of one model (the largest open models have ~128)
MAX_NEXT_RTT = 4  # round trips to next peers one record carries
# tokens/s through ONE block for ONE session: 1 µs per block and token is beyond any hardware serving one session
MAX_THROUGHPUT = 1e6
# ... and below this (not 0: unknown) a speed is a way to make costs infinite (1 / 5e-324 overflows), not hardware
MIN_THROUGHPUT = 1e-3
_COUNT = _Int(0, 1 << 53)

# Every field of a span record: what a reader accepts (a record from the DHT or a probe is anyone's writing).
CONTENT_ID = re.compile(r"sha256:[0-9a-f]{64}")  # as swarm.model.manifest writes it
SPAN_SCHEMA: dict[str, _Int | _Real | _Text | _Bool | _RoundTrips] = {
    "peer_id": _Text(128), "model_id": _Text(256), "start": _Int(0, MAX_BLOCKS), "end": _Int(1, MAX_BLOCKS),
    "num_blocks": _Int(1, MAX_BLOCKS), "hidden_size": _Int(1, 1 << 17), "dtype": _Text(16, WIRE_DTYPES),
    "quant": _Text(16), "max_length": _Int(1, 1 << 24), "kv_budget_tokens": _Int(0, 1 << 40),
    "free_kv_tokens": _Int(0, 1 << 40), "active_sessions": _Int(0, 1 << 24), "version": _Int(0, 1 << 16),
    "state": _Text(16, tuple(s.value for s in PeerState)), "public_name": _Text(64),
    "throughput": _Real(0.0, MAX_THROUGHPUT), "batch_throughput": _Real(0.0, MAX_THROUGHPUT * BATCH_PROBE),
    "device": _Text(16), "decode_forwards": _COUNT, "decode_rows": _COUNT, "queued_steps": _Int(0, 1 << 24),
    "pending_streams": _Int(0, 1 << 24), "target_start": _Int(0, MAX_BLOCKS), "target_end": _Int(0, MAX_BLOCKS),
    "software": _Text(64), "movable": _Bool(), "updated_at": _Real(0.0, 1e11), "content_id": _Text(71),
    "push": _Bool(), "next_rtt": _RoundTrips(MAX_NEXT_RTT, 10.0), "activations": _Text(16),
    "kv_dtype": _Text(16),
}


@dataclass(frozen=True)
class OpenRequest:
    """First message of an inference stream."""

    session_id: str
    max_length: int
    batch_size: int
    start: int
    end: int
    version: int = PROTOCOL_VERSION
    push_key: str = ""  # a secret drawn by the client: who knows it may push this session's steps (see above)
    fork: tuple[int, int, str] | None = None  # (handle, tokens, session_id): start from that session's first tokens

    def to_dict(self) -> dict[str, Any]:
        data = {
            "type": "open",
            "version": self.version,
            "session_id": self.session_id,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "blocks": [self.start, self.end],
        }
        if self.push_key:
            data["push_key"] = self.push_key
        if self.fork is not None:
            data["fork"] = list(self.fork)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenRequest:
        """Parse an open message; raises ValueError with a message fit for the client."""
        if data.get("type") != "open":
            raise ValueError(f"the first message of a session must be 'open', got {data.get('type')!r}")
        blocks = data.get("blocks")
        if not (isinstance(blocks, list | tuple) and len(blocks) == 2):
            raise ValueError("'blocks' must be [start, end]")
        fields = {
            "session_id": data.get("session_id"),
            "max_length": data.get("max_length"),
            "batch_size": data.get("batch_size"),
            "start": blocks[0],
            "end": blocks[1],
            "version": data.get("version"),
        }
        for name, value in fields.items():
            expected = str if name == "session_id" else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"'{name}' must be {expected.__name__}, got {value!r}")
        push_key = data.get("push_key", "")
        if push_key and not (isinstance(push_key, str) and PUSH_KEY.fullmatch(push_key)):
            raise ValueError("'push_key' must be 32 lowercase hex digits")
        fork = data.get("fork")
        if fork is not None:
            if not (isinstance(fork, list | tuple) and len(fork) == 3):
                raise ValueError("'fork' must be [handle, tokens, session_id]")
            fork = (_Int(0, (1 << 63) - 1).parse("fork handle", fork[0]),
                    _Int(1, 1 << 24).parse("fork tokens", fork[1]), _Text(128).parse("fork session_id", fork[2]))
        return cls(**fields, push_key=push_key, fork=fork)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hop:
    """A link after this one, as a step names it for server-to-server push: where its peer is, the link's key, and
    the number its stream gives this step."""

    peer_id: str
    key: str
    step: int

    def to_wire(self) -> list[Any]:
        return [self.peer_id, self.key, self.step]


def parse_hops(value: Any) -> list[Hop]:
    """A step's `next` (untrusted): at most MAX_PUSH_HOPS [peer_id, push_key, step] triples."""
    if not isinstance(value, list | tuple) or len(value) > MAX_PUSH_HOPS:
        raise ValueError(f"'next' must be a list of at most {MAX_PUSH_HOPS} links")
    hops = []
    for item in value:
        if (not isinstance(item, list | tuple) or len(item) != 3 or not isinstance(item[0], str)
                or not 0 < len(item[0]) <= 128 or not item[0].isalnum() or not isinstance(item[1], str)
                or not PUSH_KEY.fullmatch(item[1]) or not isinstance(item[2], int) or isinstance(item[2], bool)
                or not 0 < item[2] < 1 << 53):
            raise ValueError("each of 'next' must be [peer id, push_key of 32 hex, step number]")
        hops.append(Hop(item[0], item[1], item[2]))
    return hops


def parse_step_number(value: Any) -> int | None:
    """A step's optional `step` number (untrusted)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 53:
        raise ValueError("'step' must be a positive integer")
    return value


class SwarmError(Exception):
    """Base of every error the swarm raises to its users."""


class PeerError(SwarmError):
    """A peer refused or failed a request; `code` is an ErrorCode when the peer said why."""

    def __init__(self, message: str, code: str = ErrorCode.INTERNAL, peer_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.peer_id = peer_id


class NoChainError(SwarmError):
    """No set of live peers covers every block of the model right now."""

    def __init__(self, model_id: str, missing: list[tuple[int, int]]):
        spans = ", ".join(f"{s}:{e}" for s, e in missing)
        super().__init__(f"no live peers serve blocks {spans} of {model_id}")
        self.model_id = model_id
        self.missing = missing


def parse_group(group: object) -> tuple[str, int] | None:
    """A step's optional `group`: [id, size] of the group of decode steps its client sent it with."""
    if group is None:
        return None
    if (not isinstance(group, list | tuple) or len(group) != 2 or not isinstance(group[0], str)
            or not 0 < len(group[0]) <= MAX_GROUP_ID or not isinstance(group[1], int) or isinstance(group[1], bool)
            or not 1 <= group[1] <= MAX_GROUP_SIZE):
        raise PeerError(f"'group' must be [id of 1..{MAX_GROUP_ID} characters, size 1..{MAX_GROUP_SIZE}]",
                        ErrorCode.BAD_REQUEST)
    return group[0], group[1]


# The environment variable a gateway sets for the peer it embeds (swarm.embedded): the gateway's pid, which the peer
# watches, stopping once its parent is gone (swarm.server.peer).
PARENT_ENV = "SWARM_PARENT_PID"
