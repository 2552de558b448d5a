#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build, check and time the CUDA backend, with gsplat
# measured in the same run when it is installed.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      (default: ${TMPDIR:-/tmp}/fieldkit_gpu_check/<UTC time>)
#
# Steps (each logs to OUT_DIR/<step>.log; a failing step is reported and the others still run):
#   env        GPU, driver, nvcc, torch, gsplat versions
#   compile    nvcc compile check of kernels/cuda/*.cu and kernels/lm/lm_cache_cuda.cu for sm_80 +
#              sm_90 (the CI tests), the LM glue as C++, the model of the LM cache's positions
#   build      JIT builds of the fieldkit_cuda and fieldkit_lm_cuda extensions, timed (cached afterwards)
#   parity     tests/test_backend_cuda.py: cuda-marked parity tests and the gsplat peer tests;
#              tests/test_lm_cuda.py: the CUDA LM gradient cache against the CPU build (layout,
#              values, products, determinism) and the LM on CUDA tensors end to end
#   sanitizer-{memcheck,racecheck,synccheck,initcheck}
#              compute-sanitizer on a small forward + backward (float32 and float64, D = 4 and 8,
#              tile sizes 16 / 8 / 32) and the LM cache (build and products on the scenes of
#              tests/test_lm_cuda.py), torch's caching allocator off so out-of-bounds accesses
#              inside pooled blocks are caught
#   bench      benchmarks/rasterize.py --device cuda: scenes (a)-(c), cuda/gsplat/torch, CUDA events
#   bench-sizes (not run by default) benchmarks/rasterizer.py --backends torch,cuda,gsplat (garden fixture; synchronised
#              wall clock, peak RSS) -> OUT_DIR/rasterizer.json
#   events     cuda vs gsplat forward / backward timed with CUDA events (median of 20 after 3 warm-ups)
#
# STEPS="build parity" (space-separated) runs a subset, e.g. to fit a time limit per call.
# Needs: a CUDA build of torch, nvcc matching it, ninja; optional: gsplat, ../shared/data/garden.
# The repository root is put on PYTHONPATH, so an editable install is not required.
# Exit status: the number of failed steps (0: everything passed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TMPDIR:-/tmp}/fieldkit_gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
summary=()

step() {  # step NAME COMMAND...: run, log, summarise
    local name=$1
    shift
    local start status
    start=$(date +%s)
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then
        status="ok"
    else
        status="FAILED (exit $?)"
        failed=$((failed + 1))
    fi
    local line="$name: $status in $(($(date +%s) - start)) s"
    summary+=("$line")
    echo "   $line (log: $OUT/$name.log)"
    tail -n 8 "$OUT/$name.log" | sed 's/^/   | /'
}

env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    command -v nvcc && nvcc --version | tail -n 2
    command -v compute-sanitizer && compute-sanitizer --version | head -n 2
    "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
if importlib.util.find_spec("gsplat"):
    import gsplat
    print("gsplat", gsplat.__version__)
else:
    print("gsplat not installed (peer columns will be skipped)")
from fieldkit.render.backends import cpu, gsplat as peer
print("cpu backend:", cpu.is_available(), "| gsplat backend:", peer.is_available())
EOF
}

build() {
    "$PY" - <<'EOF'
import time
start = time.perf_counter()
from fieldkit.render.backends import cuda
ok, reason = cuda.is_available()
print(f"fieldkit_cuda available: {ok} {reason}")
print(f"load() took {cuda.build_seconds} s; wall {time.perf_counter() - start:.1f} s")
start = time.perf_counter()
from fieldkit.optim import lm_native
lm_ok, lm_reason = lm_native.is_available("cuda")
print(f"fieldkit_lm_cuda available: {lm_ok} {lm_reason}")
print(f"load() took {lm_native._CUDA_EXTENSION.build_seconds} s; wall {time.perf_counter() - start:.1f} s")
raise SystemExit(0 if ok and lm_ok else 1)
EOF
}

# A small forward + backward through every CUDA kernel (run under compute-sanitizer).
SMALL_RUN='
import torch
from fieldkit.cameras import Cameras, intrinsics_matrix, look_at_w2c
from fieldkit.render import rasterize
from fieldkit.render.backends import cuda
ok, reason = cuda.is_available(); assert ok, reason
for dtype in (torch.float32, torch.float64):
    g = torch.Generator().manual_seed(0)
    n, W, H = 3000, 70, 45
    w2c = torch.stack([look_at_w2c(torch.tensor([0.0, 0.0, -3.0 - c]), torch.zeros(3), torch.tensor([0.0, -1.0, 0.0])) for c in range(2)])
    K = torch.stack([intrinsics_matrix(60.0, 60.0, W / 2, H / 2)] * 2)
    cams = Cameras(w2c, K, W, H).to("cuda", dtype)
    leaves = [t.to("cuda", dtype).requires_grad_(True) for t in (
        (torch.rand(n, 3, generator=g) - 0.5) * 2, torch.randn(n, 4, generator=g),
        torch.rand(n, 3, generator=g) * 0.08 + 0.005, torch.rand(n, generator=g), torch.rand(n, 4, 3, generator=g))]
    for tile_size in (16, 8, 32):
        out = rasterize(*leaves, cams, sh_degree=1, backend="cuda", tile_size=tile_size)
        (out.rgb.square().sum() + out.alpha.sum() + out.depth.sum()).backward()
    # D = 8: the compositing path that accumulates in the output image
    m2d = torch.rand(2, n, 2, generator=g).to("cuda", dtype) * torch.tensor([W, H], device="cuda", dtype=dtype)
    con = torch.tensor([0.05, 0.0, 0.05]).to("cuda", dtype).expand(2, n, 3).contiguous()
    radii = torch.full((2, n, 2), 10, dtype=torch.int32, device="cuda")
    isect = cuda.intersect_tiles_cuda(m2d, radii, torch.rand(2, n, generator=g).to("cuda", dtype), W, H)
    feats = torch.rand(2, n, 8, generator=g).to("cuda", dtype).requires_grad_(True)
    img, alpha = cuda.composite_tiles_cuda(m2d, con, torch.full((2, n), 0.5, device="cuda", dtype=dtype), feats, isect, W, H, torch.zeros(2, 8, device="cuda", dtype=dtype))
    img.sum().backward()
# The LM gradient cache (kernels/lm): build (count + fill) and the three products.
import sys
sys.path.insert(0, "tests")
from test_lm_cuda import CASES, cache_inputs
from fieldkit.optim import lm_native
ok, reason = lm_native.is_available("cuda"); assert ok, reason
lm_ext = lm_native.extension("cuda")
for dtype in (torch.float32, torch.float64):
    for case in CASES:
        args = [a.to("cuda") if torch.is_tensor(a) else a for a in cache_inputs(case, dtype)]
        out = lm_ext.build_cache(*args, True)
        V, P, W, H = args[0].shape[0], out[7].numel() - 1, args[7], args[8]
        pairs, cache = args[:3], out[2:7]
        lm_ext.cache_jvp(*pairs, *cache, out[7], out[8], torch.randn(V, 9, device="cuda", dtype=dtype), W, H)
        lm_ext.cache_vjp(*pairs, *cache, torch.randn(P, 3, device="cuda", dtype=dtype), W, H)
        lm_ext.hessian_blocks(*pairs, *cache, torch.rand(P, 6, device="cuda", dtype=dtype), W, H)
        lm_ext.build_cache(*args, False)
torch.cuda.synchronize()
print("small run ok")
'

sanitize() {
    local tool=$1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -c "$SMALL_RUN"
}

events() {
    "$PY" - <<'EOF'
import statistics, sys
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from rasterizer import DEFAULT_DATA, load_scene
from fieldkit.render import rasterize
from fieldkit.render.backends import gsplat as peer

if not DEFAULT_DATA.is_file():
    raise SystemExit(f"{DEFAULT_DATA} not found: no event timings")
backends = ["cuda"] + (["gsplat"] if peer.is_available()[0] else [])
print(f"# {torch.cuda.get_device_name(0)}; CUDA events, median of 20 after 3 warm-ups; garden fixture, 1 camera")
print("| backend | N | res | fwd ms | bwd ms | fwd+bwd ms |")
print("|---|---:|---:|---:|---:|---:|")
for n in (100_000,):
    for W, H in ((648, 420), (1296, 840)):
        for backend in backends:
            means, quats, scales, opacities, colors, cams = load_scene(DEFAULT_DATA, n, W, H, "cuda")
            w = torch.randn(1, H, W, 3, device="cuda")
            fwd, bwd = [], []
            for i in range(23):
                params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                out = rasterize(*params, cams, backend=backend)
                e1.record()
                ((out.rgb * w).sum() + out.alpha.sum()).backward()
                e2.record()
                torch.cuda.synchronize()
                if i >= 3:
                    fwd.append(e0.elapsed_time(e1)); bwd.append(e1.elapsed_time(e2))
            f, b = statistics.median(fwd), statistics.median(bwd)
            print(f"| {backend} | {n:,} | {W}x{H} | {f:.2f} | {b:.2f} | {f + b:.2f} |", flush=True)
EOF
}

want() { [[ " ${STEPS:-env compile build parity sanitizer bench events} " == *" $1 "* ]]; }

want env && step env env_info
want compile && step compile "$PY" -m pytest -q -s tests/test_backend_cuda.py tests/test_lm_cuda.py \
    -k "compiles or sort_keys or position_arithmetic" -p no:cacheprovider
want build && step build build
want parity && step parity "$PY" -m pytest -q -rs tests/test_backend_cuda.py tests/test_hashgrid.py tests/test_lm_cuda.py \
    -p no:cacheprovider ${PARITY_K:+-k "$PARITY_K"}
if want sanitizer; then
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck synccheck initcheck; do
            step "sanitizer-$tool" sanitize "$tool"
        done
    else
        summary+=("sanitizer: FAILED (compute-sanitizer not on PATH)")
        failed=$((failed + 1))
    fi
fi
# --mem-limit-gb 0: the benchmark's address-space cap would break CUDA initialisation.
want bench && step bench "$PY" benchmarks/rasterize.py --device cuda --json "$OUT/rasterize.json"
want bench-sizes && step bench-sizes "$PY" benchmarks/rasterizer.py --backends torch,cuda,gsplat --sizes 10000,100000 \
    --resolutions 648x420,1296x840 --repeats 5 --mem-limit-gb 0 --json "$OUT/rasterizer.json"
want events && step events events

echo
echo "== summary ($OUT)"
printf '   %s\n' "${summary[@]}"
exit "$failed"
