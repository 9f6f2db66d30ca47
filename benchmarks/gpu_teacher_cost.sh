#!/usr/bin/env bash
# The teacher's cost on one CUDA device (issue 20, item 1): DeiT-S <- DeiT III-B at batch 128,
# bf16, inductor, random weights. Under 8 minutes with cold compiles (two benches, capped).
#
#   bash benchmarks/gpu_teacher_cost.sh        # results under $OUT (default benchmarks/results)
#
#  1. shallow: deit_small_vitkd_kd.vkd with only its shallow mimicking term (generate and nkd
#     removed): the teacher stops after block 1 (2 of 12 blocks). One process gives the
#     compiled step, the teacher's early-exit forward (the breakdown's teacher part, compiled
#     alone) and the full teacher's inference (the floor's, compiled alone): their ratio is
#     the early exit's saving on the teacher.
#  2. full: the same mimicking plus nkd, which reads the teacher's logits, so the whole
#     teacher runs (nkd itself costs next to nothing): the compiled step only.
# Then one line per figure, and the ratio of the two steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/vitkdl_inductor}"
RECIPE=recipes/deit_small_vitkd_kd.vkd
COMMON=(--device cuda --batch 128 --no-loader --steps 20 --warmup 3 --json)
step() { echo "== $(date +%T) $*" >&2; }

step "1/2 shallow recipe: the teacher stops after block 1"
timeout 300 vitkdl bench "$RECIPE" --set '~distill.generate' --set '~distill.nkd' \
    --floor compiled "${COMMON[@]}" > "$OUT/gpu_teacher_shallow.json"

step "2/2 the same mimicking + nkd: the full teacher"
timeout 150 vitkdl bench "$RECIPE" --set '~distill.generate' --no-breakdown --floor eager \
    "${COMMON[@]}" > "$OUT/gpu_teacher_full.json"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
shallow, full = load("gpu_teacher_shallow.json"), load("gpu_teacher_full.json")
rows = {}
if shallow:
    c = shallow["configs"]
    rows["shallow step (compiled) ms"] = c["compiled"]["ms_per_step"]
    rows["shallow step images/s"] = c["compiled"]["images_per_second"]
    b = shallow.get("breakdown") or {}
    rows["early-exit teacher forward ms (2 of 12 blocks)"] = b.get("teacher_forward_ms")
    rows["full teacher inference ms (floor)"] = c["floor"]["details"].get("teacher_inference_ms")
    if rows["early-exit teacher forward ms (2 of 12 blocks)"] and rows["full teacher inference ms (floor)"]:
        rows["teacher: early exit / full"] = round(
            rows["early-exit teacher forward ms (2 of 12 blocks)"]
            / rows["full teacher inference ms (floor)"], 3)
if full:
    c = full["configs"]
    rows["full-teacher step (compiled) ms"] = c["compiled"]["ms_per_step"]
    rows["full-teacher step images/s"] = c["compiled"]["images_per_second"]
if shallow and full:
    rows["step speed-up from early exit"] = round(
        full["configs"]["compiled"]["ms_per_step"] / shallow["configs"]["compiled"]["ms_per_step"], 3)
(out / "gpu_teacher_cost_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
for k, v in rows.items():
    print(f"{k}: {v}")
PY
step "done; results in $OUT"
