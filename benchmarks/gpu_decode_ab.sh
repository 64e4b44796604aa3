#!/usr/bin/env bash
# The GPU pipeline's experiments, A/B, in one GPU job (issue 12): the pipeline's tests on CUDA, then the model-only
# loop fed by the pipeline with each experiment of GpuDecodeLoader (pinned byte batches, nested padding, batches in
# the AMP dtype, all three) beside the model-only ceiling; the trainer's --gpu-decode (3 epochs) as committed and
# with three of those experiments (benchmarks/trainer_probe.py), beside the CPU-decode trainer and, with
# TIMM_TRAIN=path/to/timm/train.py, timm's train.py; the fed baseline again, to show the noise; last a profile of the
# fed loop beside model-only: are the SMs idle (host gaps) or shared with the pipeline?
# A summary line per step in $OUT/summary.txt as it goes; gpu_decode.json and the logs in $OUT.
#
#   bash benchmarks/gpu_decode_ab.sh              # GPU machine, with shared/data/imagenet_sample carried
#   DRY_RUN=1 bash benchmarks/gpu_decode_ab.sh    # CPU rehearsal: the tests on CPU, toy sizes
#
# PYTHON (default python3), IMAGENET (default: gpu_decode.py's search), WORK_DIR (gpu_decode.py's --work-dir),
# COPIES (default 16), WINDOW (steps of the model-only and fed loops, default 40), TIMM_TRAIN; TESTS_S (150) and AB_S (420) cap the two parts, so the job stays under 10 minutes;
# STEP_S (100) caps each step; TESTS (space-separated pytest paths) replaces the two test files; STEPS (space-separated gpu_decode.py steps) replaces the list above, e.g. the job
# after run 6 (RESULTS section 9): STEPS="model_only trainer_gpu_decode trainer_cpu_decode timm_train
# model_gpu_loader_same_priority profile_trainer_gpu_decode profile_model_gpu_loader".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_results/decode_ab}
mkdir -p "$OUT"
export OUT
summary=$OUT/summary.txt
py=${PYTHON:-python3}
start=$SECONDS
read -r -a tests <<<"${TESTS:-tests/data/test_gpu_decode.py tests/test_mixing.py}"
timeout -k 5 "${TESTS_S:-150}" "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" >"$OUT/tests.log" 2>&1
echo "tests (${tests[*]}): exit $? in $((SECONDS - start)) s | $(tail -n 1 "$OUT/tests.log")" | tee -a "$summary"
if [ -n "${STEPS:-}" ]; then
  read -r -a steps <<<"$STEPS"
else
  steps=(model_only model_gpu_loader_same_priority model_gpu_loader_pinned model_gpu_loader_nested
         model_gpu_loader_half model_gpu_loader_pinned_nested_half trainer_gpu_decode trainer_gpu_decode_half
         trainer_gpu_decode_pinned_half trainer_gpu_decode_pinned_nested_half trainer_cpu_decode)
  [ -n "${TIMM_TRAIN:-}" ] && steps+=(timm_train)
  steps+=(model_gpu_loader_same_priority profile_model_gpu_loader)
fi
args=(--copies "${COPIES:-16}" --window "${WINDOW:-40}" --step-timeout "${STEP_S:-100}" --steps "${steps[@]}")
[ -n "${TIMM_TRAIN:-}" ] && args+=(--timm-train "$TIMM_TRAIN")
[ -n "${IMAGENET:-}" ] && args+=(--imagenet "$IMAGENET")
[ -n "${WORK_DIR:-}" ] && args+=(--work-dir "$WORK_DIR")
[ -n "${DRY_RUN:-}" ] && args+=(--dry-run)
start=$SECONDS
timeout -k 5 "${AB_S:-420}" "$py" benchmarks/gpu_decode.py "${args[@]}" >"$OUT/ab.log" 2>&1
rc=$?
echo "benchmarks/gpu_decode.py ${args[*]}: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
grep -E '^(== |\|)' "$OUT/ab.log" | tee -a "$summary"
exit "$rc"
