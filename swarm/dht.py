"""Announce and discover spans in the hivemind DHT; `python -m swarm.dht` runs a bootstrap node.

Layout: key `spans_key(model_id)`, one subkey per peer, value a SpanInfo dict, with an absolute expiration time.
A peer re-announces every few seconds; on clean shutdown it announces itself OFFLINE with an expiration later than
its last record, so clients stop routing to it at once.

Records are signed. Every node validates with hivemind's RSASignatureValidator, and a peer's subkey is its base58
peer id followed by `[owner:<its RSA public key>]`: only the holder of that key can store under that subkey (no one
can overwrite another peer's record), and readers accept a record only if the peer id is the one derived from the
owner key (no one can forge a record in another peer's name). A peer's RSA key is its libp2p identity, kept in
`--identity FILE` across restarts.

    python -m swarm.dht [--host 127.0.0.1] [--port 0] [--identity FILE] [--initial-peers MADDR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence

import base58
import multihash
import psutil
from cryptography.hazmat.primitives import serialization
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.protocol import PROTOCOL_VERSION, PeerState, SpanInfo, providers_key, spans_key

logger = logging.getLogger(__name__)


def load_identity(path: str | None) -> tuple[str, RSAPrivateKey]:
    """An RSA libp2p identity: read from `path`, created there first if missing; None → a fresh throwaway key.
    Returns the file to hand to hivemind and the key for signing records."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix="swarm-identity-", suffix=".key")
        os.close(fd)
        os.unlink(path)
        P2P.generate_identity(path)
    elif not os.path.exists(path):
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        der = crypto_pb2.PrivateKey.FromString(f.read()).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return path, key


def owner_peer_id(owner_public_key: bytes) -> str:
    """The libp2p peer id of an RSA public key in OpenSSH form (as in the `[owner:...]` marker)."""
    public = RSAPublicKey.from_bytes(owner_public_key)._public_key
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def owner_marker(key: RSAPrivateKey) -> bytes:
    """The `[owner:...]` marker of records signed with `key`."""
    return RSASignatureValidator(key).local_public_key


class BytesSubkeysValidator(RecordValidatorBase):
    """Refuse records whose subkey is not bytes. Every subkey this project writes is bytes, and hivemind's storage
    fails (TypeError in a heap) when one key holds str and bytes subkeys with equal expiration times: refusing
    other types on every honest node closes that door to a hostile writer."""

    _REGULAR = b"\xc0"  # msgpack nil: how hivemind marks a record without subkey
    _BIN = (0xC4, 0xC5, 0xC6)  # msgpack bin 8/16/32

    def validate(self, record: DHTRecord) -> bool:
        return record.subkey == self._REGULAR or (bool(record.subkey) and record.subkey[0] in self._BIN)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, BytesSubkeysValidator)


class OwnedDHT(DHT):
    """hivemind's DHT node, whose child process ends (with its p2pd) once the process that started it is gone: killed
    with SIGKILL, that process could not stop it, and the node would stay behind holding its port and its peers."""

    def run(self) -> None:  # in the child
        threading.Thread(target=_end_without_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
        super().run()


def _end_without_parent(parent: int, period: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(period)
    logger.warning("the process that started this DHT node (pid %d) is gone: stopping", parent)
    for child in psutil.Process().children(recursive=True):  # its p2pd: this process started it
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(1)


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | None = None,
    client_mode: bool = False,
    signing_key: RSAPrivateKey | None = None,
) -> DHT:
    """Start a DHT node (a child process with its own p2pd) listening on host:port; blocks until it is ready.
    Every node validates signed records; `signing_key` is the key this node signs its own records with."""
    return OwnedDHT(
        record_validators=[RSASignatureValidator(signing_key), BytesSubkeysValidator()],
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        identity_path=identity_path,
        client_mode=client_mode,
        start=True,
        # With only loopback multiaddrs, probing NAT or mapping ports is pointless and slow.
        use_auto_relay=False,
        use_relay=False,
        auto_nat=False,
        nat_port_map=False,
    )


def stop_dht(dht: DHT, grace: float = 5.0) -> None:
    """Shut the DHT node's child process down, and kill it (then wait up to `grace` seconds) if it is still there:
    hivemind's own shutdown ends with SIGTERM, which a child forked from a process with its own SIGTERM handler
    (uvicorn's, a peer's) does not obey; when its p2pd went first (the whole process group signalled, as
    `kill -- -PGID` or a service manager does), the graceful path hangs and the child would be left orphaned."""
    dht.shutdown()
    if dht.is_alive():
        dht.kill()
        dht.join(grace)


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def record_subkey(peer_id: str, owner: bytes) -> bytes:
    """The subkey of a peer's record: its id, then its owner marker (RSASignatureValidator.local_public_key)."""
    return peer_id.encode() + owner


async def announce(dht: DHT, info: SpanInfo, ttl: float, owner: bytes) -> bool:
    """Store (or refresh) a peer's signed span record; True if stored."""
    expiration = get_dht_time() + ttl
    stored = await dht.store(spans_key(info.model_id), subkey=record_subkey(info.peer_id, owner),
                             value=info.to_dict(), expiration_time=expiration, return_future=True)
    return bool(stored)


async def withdraw(dht: DHT, info: SpanInfo, ttl: float, owner: bytes) -> None:
    """Mark the peer offline, outliving (so overriding) its last announcement."""
    offline = dataclasses.replace(info, state=PeerState.OFFLINE.value, free_kv_tokens=0, active_sessions=0)
    await dht.store(spans_key(info.model_id), subkey=record_subkey(info.peer_id, owner), value=offline.to_dict(),
                    expiration_time=get_dht_time() + ttl + 1, return_future=True)


def _owned_by(subkey: object, peer_id: str) -> bool:
    """Whether a record's subkey is `<peer_id>[owner:<key>]` with peer_id derived from that key."""
    if not isinstance(subkey, bytes):
        return False
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(subkey)
    if match is None or subkey[: match.start()] != peer_id.encode():
        return False
    try:
        return owner_peer_id(match.group(1)) == peer_id
    except Exception:  # a malformed key in someone's subkey
        return False


MAX_RECORDS = 4096  # span records read per model and refresh; beyond them, the rest are not parsed
READ_BUDGET = 16 * 1024  # bytes/s one reader (a client's view, a peer's placement) spends re-reading span records
# a peer's span record on the wire (msgpack): ~570 bytes with its content id, ~800 with 4 measured hops (next_rtt)
RECORD_BYTES = 800


def read_period(base: float, records: int, budget: float = READ_BUDGET) -> float:
    """Seconds between two reads of a model's span records: `base`, stretched in a large swarm so that a reader's
    DHT traffic stays within `budget` bytes/s whatever the swarm's size (a read returns every record: at a fixed
    period the traffic would grow with the peers). 1,000 peers: a client's 3 s becomes ~49 s."""
    return max(base, min(records, MAX_RECORDS) * RECORD_BYTES / budget)

dropped_records = 0  # records skipped as malformed or forged since start (every reader in this process)


async def get_spans(dht: DHT, model_id: str, num_blocks: int | None = None) -> list[SpanInfo]:
    """Peers of a model that are joining, online or draining (routing takes only `routable` ones). Every record is
    anyone's writing: each is parsed in its own guard, and offline, unsigned, malformed or forged records (not owned
    by their peer id), or of another model or block count (`num_blocks`, when the reader knows it), are skipped."""
    global dropped_records
    found = await dht.get(spans_key(model_id), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    spans = []
    for subkey, item in list(found.value.items())[:MAX_RECORDS]:
        try:
            info = SpanInfo.from_dict(getattr(item, "value", None))
            if not _owned_by(subkey, info.peer_id):
                raise ValueError("not signed by the peer it names")
            if info.model_id != model_id or (num_blocks is not None and info.num_blocks != num_blocks):
                raise ValueError(f"of another model or block count ({info.model_id}, {info.num_blocks} blocks)")
        except Exception as e:  # any record, however malformed, costs only itself
            dropped_records += 1
            logger.debug("skipping a span record of %s: %s", model_id, e)
            continue
        if info.state != PeerState.OFFLINE and info.version == PROTOCOL_VERSION:
            spans.append(info)
    return spans


async def announce_provider(dht: DHT, content_id: str, peer_id: str, model_id: str, ttl: float, owner: bytes) -> None:
    """Name this peer as one that serves the tensors of the model with `content_id` (swarm.model.fetch)."""
    await dht.store(providers_key(content_id), subkey=record_subkey(peer_id, owner),
                    value={"peer_id": peer_id, "model_id": model_id}, expiration_time=get_dht_time() + ttl,
                    return_future=True)


async def get_providers(dht: DHT, content_id: str) -> list[tuple[str, str]]:
    """(peer id, model name) of the peers that announce the tensors of `content_id`; records not signed by the peer
    they name, or malformed, are skipped (as span records are)."""
    found = await dht.get(providers_key(content_id), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    providers = []
    for subkey, item in list(found.value.items())[:MAX_RECORDS]:
        value = getattr(item, "value", None)
        if not isinstance(value, dict):
            continue
        peer_id, model_id = value.get("peer_id"), value.get("model_id")
        if (isinstance(peer_id, str) and isinstance(model_id, str) and len(peer_id) <= 128 and 0 < len(model_id) <= 256
                and model_id.isprintable() and _owned_by(subkey, peer_id)):
            providers.append((peer_id, model_id))
    return providers


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.dht", description="Run a bootstrap DHT node.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    parser.add_argument("--identity", default=None, help="private key file, for a peer id that survives restarts")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of other bootstrap nodes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    identity, key = load_identity(args.identity) if args.identity else (None, None)
    dht = start_dht(args.initial_peers, args.host, args.port, identity, signing_key=key)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    maddrs = visible_maddrs(dht)
    print("Pass these to peers and clients as --initial-peers:", flush=True)
    for maddr in maddrs:
        print(f"  {maddr}", flush=True)
    logger.info("DHT bootstrap node ready: %s", " ".join(maddrs))
    stop.wait()
    logger.info("shutting down")
    stop_dht(dht)


if __name__ == "__main__":
    main()
