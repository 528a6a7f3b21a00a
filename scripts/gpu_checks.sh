#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command: a developer session's lent GPU, or an operator's
# rented box before a fleet rollout.
#
#   scripts/gpu_checks.sh OUT_DIR STEP[:SECONDS]...
#   scripts/gpu_checks.sh OUT_DIR issue10        # issue 10's measurements, one call, ~9 min
#
# Measured 2026-11-23 on an H100: tests ~3 min (the compiled tiny engine), bench-4b 335 s,
# vram-4b 110 s, vram-9b 159 s; the FP8 compiled stages need over 5 min of compiling.
# Steps: deps, tests, bench-4b, bench-4b-fp8, bench-9b, vram-4b, vram-4b-compiled, vram-9b, cold-4b,
# cold-4b-cache, bench-4b-stages, attn-4b, fp8-4b-stages, fp8-9b-stages, static-4b, upscale-x4,
# textenc-4b, profile-4b (see the case below). Presets (issue 10, each one call within ~9.5 minutes):
#   issue10         deps, cold-4b-cache, bench-4b-stages             (limits 20+390+150 s)
#   issue10-fp8     deps, fp8-4b-stages, fp8-9b-stages               (limits 20+240+300 s)
#   issue10-static  deps, static-4b, profile-4b                      (limits 20+240+300 s)
#   issue10-regions deps, upscale-x4, textenc-4b, attn-4b            (limits 20+150+330+60 s)
# Each step runs under its own time limit (SECONDS, else its default) with its
# output in OUT_DIR/STEP.log and its JSON beside it; a step that fails or runs out of time is
# reported and the next one still runs, so one bug does not cost the whole GPU lease. The
# figures go into BENCHMARKS.md and benchmarks/profiles/.
#
# On a machine without the project installed (the lent dev GPU has torch and transformers 5 but
# not diffusers, torchao, spandrel, pydantic(-settings), boto3, moto), install the project's pinned
# versions first, or carry their wheels: `scripts/gpu_deps.sh` here (PyPI; 38 MiB into .whl/,
# under the 64 MiB carry limit), carry `.whl`, and the deps step installs them into /tmp/site for
# every later step (WHEELS=DIR for another folder). Keep that machine's own torch, transformers and
# huggingface_hub (a carried huggingface_hub 2.x needs httpx2); the FP8 steps also need the torchao
# wheel built for that machine's torch. The deps step checks the imports first (seconds), so a
# missing package fails at once instead of after a model build. Untested on a lent machine so far.
#
# GPU_CHECKS_DRY_RUN=1 prints each step's command instead of running it: tests/test_gpu_checks.py
# parses every one with its script's own argument parser, so a typo cannot cost a GPU lease.
set -u

out=${1:?usage: gpu_checks.sh OUT_DIR STEP[:SECONDS]...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The scripts import the repository's packages (measurement, worker, handlers, klein_facts) and no
# longer edit sys.path: on a machine without the project installed, the repository root serves them.
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python=${PYTHON:-python3}
# Profiles are named for the card: h100-klein-4b-bf16.json on an "NVIDIA H100 80GB HBM3".
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($2)}')
card=${card:-gpu}

run_step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    [ -n "${GPU_CHECKS_DRY_RUN:-}" ] && return 0
    local started=$SECONDS
    # SIGINT first: Python unwinds and the scripts keep what they measured so far.
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    grep -E "^\|| s/image|images/s|fits=|passed|failed|Error|error" "$out/$name.log" | tail -n 40
}

[ -n "${GPU_CHECKS_DRY_RUN:-}" ] || nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | head -n 3

steps=()
for spec in "$@"; do
    case $spec in
    issue10) steps+=(deps cold-4b-cache:390 bench-4b-stages:150) ;;
    issue10-fp8) steps+=(deps fp8-4b-stages:240 fp8-9b-stages:300) ;;
    issue10-static) steps+=(deps static-4b:240 profile-4b:300) ;;
    issue10-regions) steps+=(deps upscale-x4:150 textenc-4b:330 attn-4b:60) ;;
    *) steps+=("$spec") ;;
    esac
done

for spec in "${steps[@]}"; do
    name=${spec%%:*}
    limit=${spec#*:}
    [ "$limit" = "$spec" ] && limit=""
    case $name in
    deps)
        # Carried wheels (scripts/gpu_deps.sh, carry .whl) go into /tmp/site for every later step.
        if [ -d "${WHEELS:-.whl}" ]; then
            "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site "${WHEELS:-.whl}"/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
        fi
        run_step "$name" "${limit:-20}" "$python" -c "import torch, diffusers, transformers, spandrel, \
pydantic_settings, boto3, moto.server; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available())"
        ;;
    cold-4b-cache)
        # Issue 10: container start to first result, 4B BF16 from local disk (its pages dropped from
        # memory before each run; the boot reads the weights ahead while it imports); run 1 with an empty
        # COMPILE_CACHE (compiles and saves), run 2 with the bundle run 1 saved (a fresh process,
        # inductor's and dynamo's own caches in the same folder as on a restarted Vast instance),
        # run 3 with the bundle alone (a new container that fetched it from S3).
        [ -n "${GPU_CHECKS_DRY_RUN:-}" ] || rm -rf /tmp/klein-compile-cache
        run_step "$name" "${limit:-300}" "$python" scripts/bench_cold_start.py --save-random klein-4b \
            --save-dir /tmp/klein-4b-random --size 1024 --runs 3 --bundle-only-runs 1 --env TORCH_COMPILE=true \
            --env COMPILE_CACHE=/tmp/klein-compile-cache --drop-page-cache --json "$out/$name.json"
        [ -n "${GPU_CHECKS_DRY_RUN:-}" ] || ls -l /tmp/klein-compile-cache/*.bundle 2>&1 | tee -a "$out/$name.log"
        ;;
    bench-4b-stages)
        # Per-image time with per-stage CUDA-event times (text encoder, denoise, VAE decode, post):
        # plain diffusers, the engine eager, the engine compiled. Batch 1 keeps the compiled sizes
        # at 1024x1024:1, the bundle cold-4b-cache saved, so the compile is a cache hit here (run
        # alone, it compiles: ~3 min, raise the limit).
        run_step "$name" "${limit:-150}" "$python" scripts/bench_gpu.py --model klein-4b --runs 5 \
            --batch 1 --batch-runs 1 --skip-upscale --compile-cache /tmp/klein-compile-cache \
            --json "$out/$name.json"
        ;;
    fp8-4b-stages | fp8-9b-stages)
        # Compiled FP8 per image with per-stage times and its compile (boot) cost, 1024x1024
        # batch 1 only (the worker's default COMPILE_SIZES); the eager engine row beside it.
        model=klein-${name:4:2}
        model=${model%-}
        run_step "$name" "${limit:-300}" "$python" scripts/bench_gpu.py --model "$model" \
            --quantization fp8 --runs 5 --batch 1 --batch-runs 1 --skip-plain --skip-upscale \
            --compile-cache /tmp/klein-compile-cache --json "$out/$name.json"
        ;;
    static-4b)
        # Static-shape graphs (dynamic=False) for 1024x1024 batch 1: compile time and s/image, to
        # compare with bench-4b-stages' shape-generic compiled row (the worker's choice today).
        run_step "$name" "${limit:-240}" "$python" scripts/bench_gpu.py --model klein-4b --runs 5 \
            --batch 1 --batch-runs 1 --skip-plain --skip-upscale --compile-static \
            --compile-cache /tmp/klein-compile-cache --json "$out/$name.json"
        ;;
    upscale-x4)
        # COMPILE_REGIONS=upscaler: Real-ESRGAN x4 1024 -> 4096, tiled and untiled, eager and
        # compiled (its boot compile timed apart; reference ~0.20 s compiled vs 0.33 s untiled eager).
        run_step "$name" "${limit:-150}" "$python" scripts/bench_gpu.py --upscale-only --size 1024 \
            --json "$out/$name.json"
        ;;
    textenc-4b)
        # COMPILE_REGIONS=transformer,vae,text_encoder against bench-4b-stages' compiled row (the
        # default regions): the text_encoder stage time and the boot cost it adds.
        run_step "$name" "${limit:-330}" "$python" scripts/bench_gpu.py --model klein-4b --runs 5 \
            --batch 1 --batch-runs 1 --skip-plain --skip-upscale \
            --compile-regions transformer,vae,text_encoder --json "$out/$name.json"
        ;;
    profile-4b)
        # The ~35 ms of pipeline glue: one compiled 4B image under torch.profiler (GPU busy vs idle,
        # host syncs, top host ops; the full table in profile-4b.profile.txt). Compiles unless the
        # bundle of cold-4b-cache is still in /tmp (a warm machine): ~3 min, within the limit.
        run_step "$name" "${limit:-300}" "$python" scripts/bench_gpu.py --model klein-4b --runs 2 \
            --warmup 1 --batch 1 --batch-runs 1 --stage-runs 2 --skip-plain --skip-upscale --profile \
            --compile-cache /tmp/klein-compile-cache --json "$out/$name.json"
        ;;
    attn-4b)
        # The attention-backend lever: the eager engine with cuDNN attention (compare with the
        # "engine none" row of bench-4b-stages).
        run_step "$name" "${limit:-60}" "$python" scripts/bench_gpu.py --model klein-4b --runs 5 \
            --batch 2 --batch-runs 2 --skip-plain --skip-upscale --no-compile \
            --attention-backend _native_cudnn --json "$out/$name.json"
        ;;
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
