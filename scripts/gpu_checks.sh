#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command: a developer session's lent GPU, or an operator's
# rented box before a fleet rollout.
#
#   scripts/gpu_checks.sh OUT_DIR STEP[:SECONDS]...
#
# Measured 2026-11-23 on an H100: tests ~3 min (the compiled tiny engine), bench-4b 335 s,
# vram-4b 110 s, vram-9b 159 s; the FP8 compiled stages need over 5 min of compiling.
# Steps: tests, bench-4b, bench-4b-fp8, bench-9b, vram-4b, vram-4b-compiled, vram-9b, cold-4b
# (see the case below). Each step runs under its own time limit (SECONDS, else its default) with its
# output in OUT_DIR/STEP.log and its JSON beside it; a step that fails or runs out of time is
# reported and the next one still runs, so one bug does not cost the whole GPU lease. The
# figures go into BENCHMARKS.md and benchmarks/profiles/.
#
# On a machine without the project installed (the lent dev GPU has torch but not diffusers,
# transformers 5, torchao, spandrel, pydantic(-settings), boto3), install the project's pinned
# versions first, or carry their wheels and run with PYTHONPATH=<wheels dir>:$PWD. Keep that
# machine's own torch and huggingface_hub (a carried huggingface_hub 2.x needs httpx2).
set -u

out=${1:?usage: gpu_checks.sh OUT_DIR STEP[:SECONDS]...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
# Profiles are named for the card: h100-klein-4b-bf16.json on an "NVIDIA H100 80GB HBM3".
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($2)}')
card=${card:-gpu}

run_step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    # SIGINT first: Python unwinds and the scripts keep what they measured so far.
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    grep -E "^\|| s/image|images/s|fits=|passed|failed|Error|error" "$out/$name.log" | tail -n 40
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | head -n 3

for spec in "$@"; do
    name=${spec%%:*}
    limit=${spec#*:}
    [ "$limit" = "$spec" ] && limit=""
    case $name in
    tests)
        run_step "$name" "${limit:-400}" "$python" -m pytest -m gpu -q -p no:cacheprovider \
            tests/test_quantize.py tests/test_engine_speed.py
        ;;
    bench-4b)
        run_step "$name" "${limit:-420}" "$python" scripts/bench_gpu.py --model klein-4b \
            --json "$out/$name.json"
        ;;
    bench-4b-fp8)
        run_step "$name" "${limit:-600}" "$python" scripts/bench_gpu.py --model klein-4b \
            --quantization fp8 --skip-plain --skip-upscale --json "$out/$name.json"
        ;;
    bench-9b)
        run_step "$name" "${limit:-600}" "$python" scripts/bench_gpu.py --model klein-9b \
            --skip-upscale --json "$out/$name.json"
        ;;
    vram-4b)
        run_step "$name" "${limit:-300}" "$python" scripts/benchmark_vram.py --model klein-4b \
            --quantization none --random-weights --output "$out/$card-klein-4b-bf16.json"
        ;;
    vram-4b-compiled)
        run_step "$name" "${limit:-600}" "$python" scripts/benchmark_vram.py --model klein-4b \
            --quantization none --random-weights --compile \
            --output "$out/$card-klein-4b-bf16-compiled.json"
        ;;
    cold-4b)
        # Needs moto[server] importable (carry its wheels): the job queue and bucket are local.
        run_step "$name" "${limit:-600}" "$python" scripts/bench_cold_start.py --save-random klein-4b \
            --save-dir /tmp/klein-4b-random --size 1024 --runs 2 --json "$out/$name.json"
        ;;
    vram-9b)
        run_step "$name" "${limit:-400}" "$python" scripts/benchmark_vram.py --model klein-9b \
            --quantization fp8 --random-weights --output "$out/$card-klein-9b-fp8.json"
        ;;
    *)
        echo "unknown step: $name" >&2
        exit 2
        ;;
    esac
done
