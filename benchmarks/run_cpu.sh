#!/usr/bin/env bash
# The CPU suite: `vitkdl bench` on the quickstart pair and on reduced DeiT pairs (real widths,
# 224 px, fewer blocks, small batches), results in benchmarks/results/cpu_*.json and a Markdown
# summary on stdout. About 7 minutes on a 2-core machine with a warm inductor cache, a few more cold.
#
# One CPU thread throughout (--threads 1; the trainer would take both cores for the DeiT pairs):
# on a machine shared with other work, two OpenMP threads stall at every parallel region whose
# other thread lost its core, which swamps the differences measured here (see the README).
#   bash benchmarks/run_cpu.sh
#
# The imagefolder loader is timed on a small generated folder of ImageNet-sized JPEGs (set
# VITKDL_BENCH_IMAGES to a real ImageNet root to time that instead).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
IMAGES="${VITKDL_BENCH_IMAGES:-${TMPDIR:-/tmp}/vitkdl_bench_images}"
[ -d "$IMAGES/train" ] || python benchmarks/make_imagefolder.py "$IMAGES" >/dev/null

bench() {  # NAME RECIPE ARGS...
    local name=$1; shift
    echo "== $name: vitkdl bench $*" >&2
    vitkdl bench "$@" --device cpu --threads 1 --floor best --json > "$OUT/$name.json"
}

bench cpu_quickstart recipes/quickstart.vkd
bench cpu_deit_tiny_d4_b16 recipes/deit_tiny_vitkd_kd.vkd --set student.depth=4 \
    --set teacher.depth=4 --batch 16 --set "data.root=$IMAGES" --steps 5 --warmup 2
bench cpu_deit_small_d2_b8 recipes/deit_small_vitkd_kd.vkd --set student.depth=2 \
    --set teacher.depth=2 --batch 8 --set "data.root=$IMAGES" --steps 5 --warmup 2

python benchmarks/summarize.py "$OUT"/cpu_*.json
