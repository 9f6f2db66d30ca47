#!/usr/bin/env bash
# One GPU session (about 12 minutes on one H100 with cold caches): everything issue 13 asks to
# see run on a real GPU, in order of value, each step's output under $OUT (default
# benchmarks/results). Stops nothing on a failure: each step reports and the next one runs.
#
#   bash benchmarks/gpu_session.sh            # all steps
#   SKIP_BASE=1 bash benchmarks/gpu_session.sh  # without the DeiT-B <- DeiT III-L bench
#
#  1. DDP + torch.compile in one NCCL process against the plain compiled step (same losses),
#     and an FSDP2 step with clipping (benchmarks/gpu_checks.py -> gpu_checks.json)
#  2. the quickstart on CUDA, compile = auto, TORCH_LOGS=recompiles,graph_breaks
#     (-> gpu_quickstart.log, gpu_quickstart_summary.json: recompiles and graph breaks counted)
#  3. vitkdl bench DeiT-S <- DeiT III-B at batch 128, bf16, with the loader (-> gpu_deit_small_b128.json)
#  4. the same for DeiT-B <- DeiT III-L (-> gpu_deit_base_b128.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/vitkdl_inductor}"
python -m pip install -q -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_card.txt"
step() { echo "== $(date +%T) $*" >&2; }

step "1/4 DDP + compile, FSDP2 + clipping"
timeout 300 python benchmarks/gpu_checks.py --device cuda --out "$OUT/gpu_checks.json"

step "2/4 quickstart on CUDA (compile = auto)"
RUNS=$(mktemp -d)
TORCH_LOGS=recompiles,graph_breaks timeout 420 vitkdl run recipes/quickstart.vkd --device cuda \
    --out "$RUNS" --set train.epochs=10 > "$OUT/gpu_quickstart.log" 2>&1
python - "$RUNS" "$OUT" <<'PY'
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
log = (out / "gpu_quickstart.log").read_text()
rows = [json.loads((p / "summary.json").read_text()) for p in runs.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "summary.json").exists()]
report = {"runs": rows, "recompile_lines": log.count("Recompiling"),
          "graph_break_lines": log.count("Graph break")}
(out / "gpu_quickstart_summary.json").write_text(json.dumps(report, indent=2) + "\n")
print({r["recipe"]: (r["top1"], r["images_per_second"], r["compile"]) for r in rows},
      "recompiles:", report["recompile_lines"], "graph breaks:", report["graph_break_lines"])
PY

step "3/4 bench DeiT-S <- DeiT III-B, batch 128"
timeout 480 bash benchmarks/run_gpu.sh gpu_deit_small_b128

if [ -z "${SKIP_BASE:-}" ]; then
    step "4/4 bench DeiT-B <- DeiT III-L, batch 128"
    timeout 480 bash benchmarks/run_gpu.sh gpu_deit_base_b128
fi
step "done; results in $OUT"
