#!/usr/bin/env bash
# Every GPU check and benchmark in one call (about 15-19 minutes on one H100; budget 25). Run from the repository
# root on a machine with a CUDA GPU and the package's dependencies (pip install -e ".[test]"):
#
#   bash benchmarks/gpu_all.sh            # logs to ${OUT:-/tmp}/gpu_all_logs, results to benchmarks/results/
#
# 1. the test suite, including the tests marked gpu (device_map="auto" with float32/float16/bfloat16 on CUDA);
# 2. the latency benchmark at LLaVA-1.5-7B geometry, float16, SDPA: TTFT, decode, generate, memory, largest batch
#    (verified by a run at that batch), roofline ratios, and a host-sync audit per generate() -> latency_cuda.json;
# 3. the same in bfloat16 -> latency_cuda_bfloat16.json;
# 4. LLaVA-1.6-7B geometry (672 x 672: 5 crops, 2928 image tokens), float16, 3 repeats, RC at 320/640/960 tokens,
#    dynamic, G-Prune at its default, verified largest batch, sync audit -> latency_next_cuda.json (about 3-4
#    minutes); then the README latency tables are regenerated from all;
# 5. the RC step against the vision tower and the released structure at batch 1 and 16 -> rc_step_cuda.json
#    (README's rc_step table is left on the CPU result; rerun rc_step.py with --update-readme to switch it).
# A failing step does not stop the others; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
logs=${OUT:-/tmp}/gpu_all_logs
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME TIMEOUT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$logs/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start))s"
    else
        echo "   FAILED (exit $?) in $((SECONDS - start))s; tail of $logs/$name.log:"
        tail -n 30 "$logs/$name.log"
        failed+=("$name")
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/nvidia-smi.txt"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

step tests 300 "$python" -m pytest -q -rs
step latency_fp16 420 "$python" benchmarks/latency.py --geometry llava-1.5-7b --device cuda --dtype float16 \
    --repeats 5 --verify-largest-batch --sync-audit
step latency_bf16 360 "$python" benchmarks/latency.py --geometry llava-1.5-7b --device cuda --dtype bfloat16 \
    --repeats 3 --output benchmarks/results/latency_cuda_bfloat16.json
step latency_next_fp16 420 "$python" benchmarks/latency.py --geometry llava-1.6-7b --device cuda --dtype float16 \
    --repeats 3 --verify-largest-batch --sync-audit --output benchmarks/results/latency_next_cuda.json
step readme 60 "$python" benchmarks/latency.py --readme-only
step rc_step 240 "$python" benchmarks/rc_step.py --batch-sizes 1 16 --repeats 5 --device cuda --dtype float16
# LLaVA-OneVision-7B geometry (1152 x 1152: 10 crops, 7371 image tokens), float16: TTFT vs roofline per variant
step latency_onevision_fp16 300 "$python" benchmarks/latency_onevision.py --geometry llava-onevision-7b --device cuda \
    --dtype float16 --repeats 3

cp benchmarks/results/*.json "$logs/" 2>/dev/null
git diff --stat -- README.md benchmarks/results | tee "$logs/changed.txt"
if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; commit benchmarks/results/*.json and README.md"
