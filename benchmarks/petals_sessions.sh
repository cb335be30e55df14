#!/usr/bin/env bash
# benchmarks/petals_sessions.py with the real Petals 2.2 running: sets Petals up if needed
# (../shared/petals/petals_setup.sh, ~3 min the first time), starts its DHT and ONE server holding all 30 blocks on
# 127.0.0.1 (reaped on exit), then runs N concurrent sessions on both sides.
#   benchmarks/petals_sessions.sh [--sessions 1,4,8] [--rounds 3] [--tokens 48] [--configs fp32_1x2] [--out DIR]
set -u  # petals_swarm.sh polls with commands that fail until ready: no errexit or pipefail here
cd "$(dirname "$0")/.." || exit 1
. ../shared/petals/petals_swarm.sh
petals_need_setup
petals_start_dht
petals_start_server p0 0:30
.venv/bin/python -m benchmarks.petals_sessions --petals-maddr "$PETALS_MADDR" --petals-py "$PETALS_PY" \
  --petals-model "$PETALS_MODEL" --petals-prefix "$PETALS_PREFIX" "$@"
