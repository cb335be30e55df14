#!/usr/bin/env bash
# The CUDA checks, in one run of a few minutes on a machine with a GPU:
#   1. the `gpu` tests (kernel parity of bitsandbytes int8/nf4 and the reference on CUDA),
#   2. benchmarks.kernels on CUDA (time and error of every kernel per weight shape),
#   3. an 8B-shaped random-weight span: span vs transformers, decode step bf16 vs nf4 vs int8 (scripts/gpu_span_check.py),
#   4. a ~1.1B random-weight Llama through two chains of CUDA peers vs transformers on the GPU (scripts/gpu_swarm_check.py);
#   and, only when asked (STEPS=gpu_serve; ~6 minutes alone): 1, 16 and 64 chats through the gateway to an 8B-shaped
#   random Llama on 2 CUDA peers (scripts/gpu_serve_check.py, with the tokenizer in $TOKENIZER_DIR: tokenizer.json,
#   tokenizer_config.json and chat_template.jinja copied from the default model's directory here, which
#   `python -c "from swarm.model.source import resolve_model; print(resolve_model().path)"` prints).
# Every step runs even when an earlier one fails; the exit status says whether all passed. Results go to $OUT (or
# ./gpu-results): logs and JSON.
#
#   PYTHON=python3 OUT=/tmp/gpu scripts/gpu_check.sh
#
# It installs nothing. On this workplace's GPU machines (torch 2.11 + CUDA 13, transformers 5.17, no network) the
# missing packages travel as cp312 wheels in the git-ignored .whl/ (40 MiB on 2026-12-04): bitsandbytes==0.50.2
# (without its CUDA 11/12, ROCm and XPU libraries: 7 MiB instead of 43), hivemind==1.1.12, base58, varint, netaddr,
# prefetch_generator, ConfigArgParse, py-cid, py-multibase, py-multicodec, py-multihash, morphys, python-baseconv,
# blake3, mmh3, cryptography, cffi, pycparser, pydantic, pydantic_core, pydantic-settings, typing-inspection,
# annotated-types, python-dotenv, typing_extensions, and for the gateway transformers==5.24.0, fastapi, starlette,
# uvicorn, opentelemetry-api, sniffio (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux...; pip wheel for the sdist-only ones), then:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

STEPS=${STEPS:-gpu_tests kernels_cuda gpu_span gpu_swarm}  # a subset reruns just those
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name ($(date +%T))"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "--- $name: ok in $((SECONDS - start)) s"
  else
    echo "--- $name: FAILED (exit $?) in $((SECONDS - start)) s"
    status=1
  fi
  tail -n 25 "$OUT/$name.log"
}

"$PYTHON" - <<'EOF'
import torch, importlib.metadata as md
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "bitsandbytes", "hivemind"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF

# limits sum to ~8 minutes, so that the whole script fits one 10-minute command
step gpu_tests 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/unit/test_kernels.py
step kernels_cuda 100 "$PYTHON" -m benchmarks.kernels --device cuda --runs 7 --out "$OUT"
step gpu_span 120 "$PYTHON" scripts/gpu_span_check.py --out "$OUT"
WORK="${TMPDIR:-/tmp}/gpu-swarm"
step gpu_swarm 180 "$PYTHON" scripts/gpu_swarm_check.py --out "$OUT" --workdir "$WORK"
step gpu_serve 540 "$PYTHON" scripts/gpu_serve_check.py --tokenizer "${TOKENIZER_DIR:-.gpu/tokenizer}" --out "$OUT" \
  --workdir "${TMPDIR:-/tmp}/gpu-serve" --deadline 400
for log in "$WORK"/swarm/*.log; do  # the peers' own last words, for a failed swarm step
  [ -f "$log" ] && { echo "--- $log"; tail -n 8 "$log"; }
done
echo "=== done: status $status"
exit $status
