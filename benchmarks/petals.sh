#!/usr/bin/env bash
# benchmarks/petals.py with the real Petals 2.2 running: sets Petals up if needed (../shared/petals/petals_setup.sh,
# ~3 min the first time), starts its DHT and 2 servers on 127.0.0.1 (reaped on exit), then runs the comparison.
#   benchmarks/petals.sh [--rounds 5] [--tokens 32] [--configs fp32_2,int4_2,embedded] [--out benchmarks/results]
set -u  # petals_swarm.sh polls with commands that fail until ready: no errexit or pipefail here
cd "$(dirname "$0")/.." || exit 1
. ../shared/petals/petals_swarm.sh
petals_need_setup
petals_start_dht
petals_start_server p0 0:15
petals_start_server p1 15:30
.venv/bin/python -m benchmarks.petals --petals-maddr "$PETALS_MADDR" --petals-py "$PETALS_PY" \
  --petals-model "$PETALS_MODEL" --petals-prefix "$PETALS_PREFIX" "$@"
