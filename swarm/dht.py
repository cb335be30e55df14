"""Announce and discover spans in the hivemind DHT; `python -m swarm.dht` runs a bootstrap node.

Layout: key `spans_key(model_id)`, one subkey per peer (base58 peer id), value a SpanInfo dict, with an absolute
expiration time. A peer re-announces every few seconds; on clean shutdown it announces itself OFFLINE with an
expiration later than its last record, so clients stop routing to it at once.

    python -m swarm.dht [--host 127.0.0.1] [--port 0] [--identity FILE] [--initial-peers MADDR ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
from collections.abc import Sequence

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from swarm.protocol import DHT_MODELS_KEY, PeerState, SpanInfo, spans_key

logger = logging.getLogger(__name__)


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | None = None,
    client_mode: bool = False,
) -> DHT:
    """Start a DHT node (a child process with its own p2pd) listening on host:port; blocks until it is ready."""
    return DHT(
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


def visible_maddrs(dht: DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


async def announce(dht: DHT, info: SpanInfo, ttl: float) -> bool:
    """Store (or refresh) a peer's span record, and the model in the list of models; True if stored."""
    expiration = get_dht_time() + ttl
    stored = await dht.store(spans_key(info.model_id), subkey=info.peer_id, value=info.to_dict(),
                             expiration_time=expiration, return_future=True)
    await dht.store(DHT_MODELS_KEY, subkey=info.model_id, value={"num_blocks": info.num_blocks},
                    expiration_time=expiration, return_future=True)
    return bool(stored)


async def withdraw(dht: DHT, info: SpanInfo, ttl: float) -> None:
    """Mark the peer offline, outliving (so overriding) its last announcement."""
    offline = dataclasses.replace(info, state=PeerState.OFFLINE.value, free_kv_tokens=0, active_sessions=0)
    await dht.store(spans_key(info.model_id), subkey=info.peer_id, value=offline.to_dict(),
                    expiration_time=get_dht_time() + ttl + 1, return_future=True)


async def get_spans(dht: DHT, model_id: str) -> list[SpanInfo]:
    """Online peers of a model; malformed records (or records not keyed by their own peer) are skipped."""
    found = await dht.get(spans_key(model_id), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    spans = []
    for subkey, item in found.value.items():
        try:
            info = SpanInfo.from_dict(item.value)
        except ValueError as e:
            logger.debug("skipping a span record of %s: %s", model_id, e)
            continue
        if info.online and info.peer_id == subkey and info.model_id == model_id:
            spans.append(info)
    return spans


async def list_models(dht: DHT) -> dict[str, int]:
    """Model ids announced in this swarm → their number of blocks."""
    found = await dht.get(DHT_MODELS_KEY, latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    models = {}
    for model_id, item in found.value.items():
        if isinstance(model_id, str) and isinstance(item.value, dict) and isinstance(item.value.get("num_blocks"), int):
            models[model_id] = item.value["num_blocks"]
    return models


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm.dht", description="Run a bootstrap DHT node.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    parser.add_argument("--identity", default=None, help="private key file, for a peer id that survives restarts")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of other bootstrap nodes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    dht = start_dht(args.initial_peers, args.host, args.port, args.identity)
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
    dht.shutdown()


if __name__ == "__main__":
    main()
