#!/usr/bin/env bash
# The teacher's cost on one CUDA device (issue 20): DeiT-S <- DeiT III-B at batch 128, bf16,
# inductor, random weights, synthetic batches. Under 8 minutes with cold compiles (each step
# capped by `timeout`; a step that runs out leaves the others' results).
#
#   bash benchmarks/gpu_teacher_cost.sh        # results under $OUT (default benchmarks/results)
#
#  1. logits: deit_small_vitkd_kd.vkd with only its logit term (nkd; mimic and generate
#     removed), so every logit-only option applies. One process, `vitkdl bench --configs`:
#     the compiled step (the recipe as written: on CUDA its teacher is held in bf16), the
#     plain teacher (f: fp32 weights, autocast casts them every step), bf16 (h: the recipe's
#     own step, reported as it), fp8 (i: when torchao and an FP8 GPU are there, else the
#     reason), cached logits (j: the teacher's logits an input of the step), the masked
#     teacher (k: keep = 0.5, MaskedKD), the floor, and the compiled step's breakdown (the
#     teacher's share of the step).
#  2. shallow: the same recipe with only its shallow mimicking (blocks 0 and 1): the teacher
#     stops after block 1 (early exit, g: the recipe's own step) against the plain teacher.
#  3. probe: `vitkdl explain --probe` on 2 synthetic batches of 128 with a random-weights
#     teacher file (each term's share of the loss and gradient, the teacher's top-1, and the
#     bf16-held teacher's fidelity against fp32: tap cosines, top-1 agreement), then again
#     with `teacher.precision=fp8` (its fidelity against bf16; a clean error without torchao).
#     Bench's (h) and (i) carry the same fidelity figures on the bench batch.
# Then one line per figure in $OUT/gpu_teacher_cost_summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/vitkdl_inductor}"
RECIPE=recipes/deit_small_vitkd_kd.vkd
COMMON=(--device cuda --batch 128 --no-loader --steps 20 --warmup 3 --json)
step() { echo "== $(date +%T) $*" >&2; }

step "1/3 logits: the teacher's options on the nkd-only recipe"
timeout 270 vitkdl bench "$RECIPE" --set '~distill.mimic' --set '~distill.generate' \
    --floor compiled --configs teacher_plain,teacher_bf16,teacher_fp8,cached_logits,masked \
    "${COMMON[@]}" > "$OUT/gpu_teacher_logits.json"

step "2/3 shallow: early exit against the plain teacher"
timeout 120 vitkdl bench "$RECIPE" --set '~distill.generate' --set '~distill.nkd' \
    --floor compiled --no-breakdown --configs early_exit,teacher_plain \
    "${COMMON[@]}" > "$OUT/gpu_teacher_shallow.json"

step "3/3 probe: 2 synthetic batches, a random-weights teacher"
WEIGHTS="$OUT/deit3_base_random.safetensors"
timeout 60 python - "$WEIGHTS" <<'PY'
import sys, timm
from safetensors.torch import save_file
model = timm.create_model("deit3_base_patch16_224")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
PY
timeout 60 vitkdl explain "$RECIPE" --probe --batches 2 --device cuda --json \
    --set data.source=synthetic --set data.size=256 --set "teacher.weights=$WEIGHTS" \
    > "$OUT/gpu_teacher_probe.json"
timeout 60 vitkdl explain "$RECIPE" --probe --batches 2 --device cuda --json \
    --set data.source=synthetic --set data.size=256 --set "teacher.weights=$WEIGHTS" \
    --set teacher.precision=fp8 > "$OUT/gpu_teacher_probe_fp8.json"
rm -f "$WEIGHTS"

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text()) if p.exists() and p.stat().st_size else None
    except json.JSONDecodeError:
        return None
rows = {}
for tag, name in (("logits", "gpu_teacher_logits.json"), ("shallow", "gpu_teacher_shallow.json")):
    r = load(name)
    if not r:
        continue
    rows[f"{tag}: device"] = r["device_name"]
    for key, c in r["configs"].items():
        same = c["details"].get("same_as")
        rows[f"{tag}: {key} ms (img/s)"] = (
            f"{c['ms_per_step']:.2f} ({c['images_per_second']:.0f})"
            + (f" = {same}" if same else "")
        )
    for key, v in r["ratios"].items():
        if v is not None and (key.startswith("teacher") or key.endswith("_vs_plain")
                              or key == "cached_vs_student_only"):
            rows[f"{tag}: {key}"] = round(v, 3)
        if c["details"].get("fidelity"):
            rows[f"{tag}: {key} fidelity"] = c["details"]["fidelity"]
    rows[f"{tag}: notes"] = [n for n in r["notes"] if "not measured" in n]
for tag, name in (("probe", "gpu_teacher_probe.json"), ("probe fp8", "gpu_teacher_probe_fp8.json")):
    probe = load(name)
    if not probe or "probe" not in probe:
        continue
    p = probe["probe"]
    rows[f"{tag}: terms (loss share, grad share)"] = {
        t["name"]: [round(t["loss_share"], 3), round(t["grad_share"], 3)] for t in p["terms"]
    }
    rows[f"{tag}: teacher top-1 (random weights)"] = p.get("teacher_top1")
    rows[f"{tag}: fidelity"] = p.get("fidelity")
(out / "gpu_teacher_cost_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
for k, v in rows.items():
    print(f"{k}: {v}")
PY
step "done; results in $OUT"
