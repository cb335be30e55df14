#!/bin/bash
# Entry point of the swarm-llm images: `bootstrap`, `peer` or `gateway` (extra arguments go to the program) or the
# `health-*` probes of their HEALTHCHECKs. Settings come from the environment (docker/README.md).
set -euo pipefail
BOOTSTRAP_DIR=${SWARM_BOOTSTRAP_DIR:-/bootstrap}  # the bootstrap's key and multiaddr file (a shared volume)

# the multiaddr(s) to join: $SWARM_INITIAL_PEERS, else the bootstrap's file (waiting for it and its port)
initial_peers() {
  if [ -n "${SWARM_INITIAL_PEERS:-}" ]; then echo "$SWARM_INITIAL_PEERS" | tr ',' ' '; return; fi
  local file=$BOOTSTRAP_DIR/maddr
  for _ in $(seq 300); do
    if [ -s "$file" ]; then
      local maddr host port; maddr=$(cat "$file"); host=$(cut -d/ -f3 <<<"$maddr"); port=$(cut -d/ -f5 <<<"$maddr")
      if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then echo "$maddr"; return; fi
    fi
    sleep 1
  done
  echo "no reachable bootstrap multiaddr in $file after 300 s (set SWARM_INITIAL_PEERS)" >&2; exit 1
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  bootstrap)
    # A key kept on the volume gives a fixed peer id; with the fixed port, the multiaddr survives restarts.
    key=${SWARM_DHT_IDENTITY:-$BOOTSTRAP_DIR/identity.key}
    announce=${SWARM_DHT_ANNOUNCE_HOST:-$SWARM_DHT_HOST}; [ "$announce" = 0.0.0.0 ] && announce=127.0.0.1
    peer_id=$(python -c 'import sys; from swarm.dht import load_identity, owner_peer_id
print(owner_peer_id(load_identity(sys.argv[1])[1].get_public_key().to_bytes()))' "$key")
    echo "/ip4/$announce/tcp/$SWARM_DHT_PORT/p2p/$peer_id" > "$BOOTSTRAP_DIR/maddr.tmp"
    mv "$BOOTSTRAP_DIR/maddr.tmp" "$BOOTSTRAP_DIR/maddr"
    exec python -m swarm.dht --host "$SWARM_DHT_HOST" --port "$SWARM_DHT_PORT" --identity "$key" "$@" ;;
  peer)
    if [ -z "${SWARM_PEER_INITIAL_PEERS:-}" ] && ! [[ " $* " =~ \ (--initial-peers|-h|--help)[\ =] ]]; then
      found=$(initial_peers) || exit 1; read -ra peers <<<"$found"; set -- --initial-peers "${peers[@]}" "$@"
    fi
    exec python -m swarm.server "$@" ;;
  gateway)
    if ! [[ " $* " =~ \ (-h|--help)\  ]]; then SWARM_INITIAL_PEERS=$(initial_peers) || exit 1; fi
    export SWARM_INITIAL_PEERS
    exec uvicorn app.main:app --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" "$@" ;;
  health-bootstrap)
    host=$SWARM_DHT_HOST; [ "$host" = 0.0.0.0 ] && host=127.0.0.1
    exec 3<>"/dev/tcp/$host/$SWARM_DHT_PORT" ;;
  health-peer)
    exec python -m swarm.server.health "$SWARM_PEER_HEALTH_FILE" ;;
  health-gateway)
    host=$GATEWAY_HOST; [ "$host" = 0.0.0.0 ] && host=127.0.0.1
    exec python -c 'import json, sys, urllib.request
health = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/health", timeout=5))
print(health); sys.exit(0 if health.get("complete_chain") else 1)' "$host:$GATEWAY_PORT" ;;
  *) echo "usage: swarm-entrypoint bootstrap|peer|gateway|health-bootstrap|health-peer|health-gateway [ARGS]" >&2
     exit 2 ;;
esac
