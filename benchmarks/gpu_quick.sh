#!/usr/bin/env bash
# The GPU numbers that matter most, in under 6 minutes on one H100/H200 (device time is short: 15 minutes per
# session, start-up included). Each result is written to OUT_DIR as soon as it is measured, most valuable first, so a
# run cut off early still has them:
#
#   bash benchmarks/gpu_quick.sh OUT_DIR                  # CUDA, LLaVA-1.5-7B / LLaVA-1.6-7B geometry, float16
#   bash benchmarks/gpu_quick.sh OUT_DIR --device cpu     # dry run at the scaled CPU geometries (slow, ratios only)
#
# env.txt               GPU, driver, torch and transformers versions
# a_ttft_llava15.json   (a) TTFT stock vs RC at 64 tokens and adaptive, batch 1 and 8; the step's share of TTFT at
#                       batch 1 and of the vision tower at batch 16 (eager) [latency.py --ttft-only]
# d_ttft_next.json      (d) LLaVA-1.6-7B (2,928 image tokens) TTFT batch 1 and 8 for RC at 320 and G-Prune
# c_rc_step.json        (c) the RC step against the vision tower (and the released code's cost structure where
#                       scikit-learn is installed) [rc_step.py]
# e_gpu_tests.txt       (e) the tests marked gpu (CUDA-graph replay of the fixed-budget steps among them)
# b_step_compile.json   (b) the step shares with the method compiled (fullgraph, CUDA graph) and not; last, as its
#                       cold inductor compile is the slowest and least certain step [step_compile.py]
# log.txt               every step's output, and which steps failed or were skipped
#
# Random weights, SDPA; no download, nothing to install: it needs only torch (>= 2.11), transformers (>= 5.17) and
# the package's base dependencies (no scikit-learn, hypothesis or matplotlib). Every step has a time limit, the
# limits add up to less than the overall budget (QUICK_BUDGET_S, default 340 s on CUDA; tests/test_gpu_quick.py
# checks the sum), and a step is skipped when less than 20 s of the budget would be left for it. Exits non-zero if a
# step failed or was skipped.
#
# Adding steps: append `step NAME LIMIT_SECONDS COMMAND...` lines at the end of this file (keep the sum of the limits
# under the budget); the summary and exit status come from the EXIT trap, after the last step.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_quick.sh OUT_DIR [--device cuda|cpu]}
device=cuda
if [[ "${2:-}" == "--device" ]]; then device=${3:?--device needs cuda or cpu}; fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/log.txt"
: >"$log"
failed=()

if [[ "$device" == cuda ]]; then
    g15=llava-1.5-7b; gnext=llava-1.6-7b; dtype=float16; repeats=5; next_variants="stock rc-320 gprune"
    compile_args=(--batches 1 16 --backend inductor); rc_step_args=(--batch-sizes 1 16 --repeats 3)
    budget=${QUICK_BUDGET_S:-340}; scale=1
else  # dry run: the scaled geometries of latency.py on one CPU thread
    g15=cpu-small; gnext=cpu-next-small; dtype=float32; repeats=1; next_variants="stock rc-142 gprune"
    compile_args=(--batches 1 2 --backend aot_eager); rc_step_args=(--batch-sizes 1 --repeats 1)
    budget=${QUICK_BUDGET_S:-7200}; scale=20
    export OMP_NUM_THREADS=1
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...: run within its limit and what is left of the budget
    local name=$1 limit=$(($2 * scale))
    shift 2
    local left=$((budget - SECONDS))
    if ((left < 20)); then
        echo "== $name SKIPPED: ${left}s of the ${budget}s budget left" | tee -a "$log"
        failed+=("$name(skipped)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    local status=$?
    if ((status == 0)); then
        echo "   ok in $((SECONDS - start))s" | tee -a "$log"
    else
        echo "   FAILED (exit $status) in $((SECONDS - start))s" | tee -a "$log"
        failed+=("$name")
    fi
}

{
    [[ "$device" == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
    git rev-parse HEAD 2>/dev/null
} >"$out/env.txt" 2>&1

finish() {
    echo "total ${SECONDS}s; results in $out" | tee -a "$log"
    if ((${#failed[@]})); then
        echo "failed or skipped: ${failed[*]}" | tee -a "$log"
        exit 1
    fi
}
trap finish EXIT

step a_ttft_llava15 80 "$python" benchmarks/latency.py --geometry "$g15" --device "$device" --dtype "$dtype" \
    --ttft-only --variants stock rc-64 rc-dynamic --prepass-batches 1 16 --repeats "$repeats" \
    --output "$out/a_ttft_llava15.json"
# shellcheck disable=SC2086  # the variants are words
step d_ttft_next 70 "$python" benchmarks/latency.py --geometry "$gnext" --device "$device" --dtype "$dtype" \
    --ttft-only --variants $next_variants --prepass-batches 1 --repeats "$((repeats > 3 ? 3 : repeats))" \
    --output "$out/d_ttft_next.json"
# rc_step.py writes benchmarks/results/rc_step_<device>.json; a CPU dry run keeps the committed CPU result.
committed=benchmarks/results/rc_step_$device.json
saved=$(mktemp)
[[ -f "$committed" ]] && cp "$committed" "$saved"
step c_rc_step 40 "$python" benchmarks/rc_step.py --device "$device" --dtype "$dtype" "${rc_step_args[@]}"
[[ -f "$committed" ]] && cp "$committed" "$out/c_rc_step.json"
if [[ "$device" == cpu && -s "$saved" ]]; then cp "$saved" "$committed"; fi
rm -f "$saved"
step e_gpu_tests 40 bash -c "set -o pipefail; '$python' -m pytest -q -rs -m gpu -p no:cacheprovider tests/ \
    | tee '$out/e_gpu_tests.txt'"
step b_step_compile 100 "$python" benchmarks/step_compile.py --geometry "$g15" --device "$device" --dtype "$dtype" \
    "${compile_args[@]}" --repeats "$repeats" --output "$out/b_step_compile.json"

# ---- vLLM serving (issue 26; benchmarks/vllm_serving.py, docs/serving.md) ---------------------------------------
# f_vllm_serving.json: throughput and TTFT of stock vs compressed LLaVA-1.5-7B geometry (random weights) served by
# vLLM with the llava-rc plugin, 16 concurrent requests per round, variants alternating; the plugin's encoder
# overhead. Runs only when VLLM_PYTHON names a Python with vLLM 0.32 and this package installed (the official
# `vllm` wheel pins its own torch, so it lives in its own environment); last, so it only uses what the budget leaves.
if [[ -n "${VLLM_PYTHON:-}" ]]; then
    if [[ "$device" == cuda ]]; then vllm_args=(--geometry llava-1.5-7b --dtype float16 --rounds 3)
    else vllm_args=(--geometry cpu-small --dtype float32 --rounds 1); fi
    step f_vllm_serving 150 "$VLLM_PYTHON" benchmarks/vllm_serving.py "${vllm_args[@]}" --requests 16 \
        --output "$out/f_vllm_serving.json"
else
    echo "== f_vllm_serving not run: set VLLM_PYTHON to a Python with vLLM 0.32 and llava-rc" | tee -a "$log"
fi
