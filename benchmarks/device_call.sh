#!/usr/bin/env bash
# One `device` tool call on a GPU machine (see benchmarks/NOTES.md): install the carried wheels,
# build gsplat in the background, run benchmarks/gpu_check.sh, pack the logs into $OUT.
#   carry: .whl (gsplat + fieldkit's pure-Python deps), .devdata (copy of ../shared/data subsets)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FIELDKIT_SHARED_DATA=$PWD/.devdata PYTHON=python3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site
LOG=${OUT:-/tmp/out}/logs; mkdir -p "$LOG"
if [ "${GSPLAT_BUILD:-1}" = 1 ]; then
  ( s=$(date +%s); python3 -c "from gsplat.cuda._backend import _C; print('gsplat _C', _C)" >"$LOG/gsplat_build.log" 2>&1; echo "rc=$? in $(( $(date +%s) - s )) s" >>"$LOG/gsplat_build.log" ) &
  GS=$!
fi
bash benchmarks/gpu_check.sh "$LOG/check"; echo "gpu_check exit $?"
[ -n "${EXTRA:-}" ] && { bash -c "$EXTRA" 2>&1 | tee "$LOG/extra.log"; }
[ -n "${GS:-}" ] && { wait $GS; cat "$LOG/gsplat_build.log" | tail -30; }
tar czf "${OUT:-/tmp/out}/logs.tgz" -C "$LOG" .
