#!/usr/bin/env bash
# The GPU suite (one CUDA device): the paper's pairs at batch 128, bf16 (precision = auto),
# inductor, with model FLOPs utilisation. Results in benchmarks/results/gpu_*.json and a
# Markdown summary on stdout. Each bench compiles about six graphs (the step, its three parts,
# the floor's two): allow 5-10 minutes per pair on a cold inductor cache.
#
#   bash benchmarks/run_gpu.sh                      # both pairs
#   bash benchmarks/run_gpu.sh gpu_deit_small_b128  # one of them
#
# The loader is timed with the recipe's 8 workers on generated ImageNet-sized JPEGs unless
# VITKDL_BENCH_IMAGES names a real ImageNet root; VITKDL_BENCH_WORKERS overrides the workers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
IMAGES="${VITKDL_BENCH_IMAGES:-${TMPDIR:-/tmp}/vitkdl_bench_images}"
[ -d "$IMAGES/train" ] || python benchmarks/make_imagefolder.py "$IMAGES" --per-class 128 >/dev/null
WORKERS=()
[ -n "${VITKDL_BENCH_WORKERS:-}" ] && WORKERS=(--set "data.workers=$VITKDL_BENCH_WORKERS")
ONLY="${1:-}"

bench() {  # NAME RECIPE ARGS...
    local name=$1; shift
    [ -z "$ONLY" ] || [ "$ONLY" = "$name" ] || return 0
    echo "== $name: vitkdl bench $*" >&2
    vitkdl bench "$@" --device cuda --batch 128 --set "data.root=$IMAGES" ${WORKERS[@]+"${WORKERS[@]}"} \
        --json > "$OUT/$name.json"
}

bench gpu_deit_small_b128 recipes/deit_small_vitkd_kd.vkd   # DeiT-S <- DeiT III-B
bench gpu_deit_base_b128 recipes/deit_base_vitkd_kd.vkd     # DeiT-B <- DeiT III-L

python benchmarks/summarize.py "$OUT"/gpu_*.json
