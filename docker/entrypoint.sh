#!/usr/bin/env bash
# klein-worker container entrypoint: one worker process per visible GPU, supervised.
#
#   entrypoint.sh               supervise $WORKER_CMD (default `python -m worker`), one per GPU
#   entrypoint.sh healthcheck   exit 0 when every supervised worker answers /healthz (HEALTHCHECK)
#   entrypoint.sh CMD [ARG...]  run a one-off command instead (`python -m worker demo`, `bash`, ...)
#
# Each child gets CUDA_VISIBLE_DEVICES=<its GPU>, WORKER_ID=<prefix>-gpu<index> and, when METRICS_PORT
# is set, METRICS_PORT+<slot>. SIGTERM/SIGINT/SIGHUP are forwarded to every child as SIGTERM (the
# worker drains on it); after that nothing is restarted and the entrypoint exits 0 when all children
# exited 0. A child that exits 0 on its own (idle shutdown) is not restarted; one that fails is
# restarted with exponential backoff. Two failures end the container instead (the others drain), so
# that Vast shows it "exited" and the fleet replaces it rather than paying for a GPU that cannot serve:
#   - exit 3: the worker's boot found this machine cannot serve (no GPU, nothing fits, a missing
#     backend, a bad MODEL_PATH/token/weights); a restart would fail the same way;
#   - a crash loop: CRASH_LOOP_RESTARTS restarts in a row, each after less than RESTART_RESET_SECONDS.
#
# Environment (all optional):
#   WORKER_CMD                    command to supervise (word-split; default "python -m worker")
#   GPU_COUNT                     run on devices 0..N-1 instead of detecting (0: one CPU worker)
#   CUDA_VISIBLE_DEVICES          when set, one worker per listed device ("" or -1: one CPU worker)
#   WORKER_ID_PREFIX              worker id prefix; else WORKER_ID, vast-$CONTAINER_ID,
#                                 $VAST_CONTAINERLABEL, the hostname
#   RESTART_BACKOFF_SECONDS       first restart delay (default 1; decimals allowed)
#   RESTART_BACKOFF_MAX_SECONDS   delay cap (default 60); the delay doubles per consecutive failure
#   RESTART_RESET_SECONDS         a child that ran this long starts over at the first delay (default 300)
#   MAX_RESTARTS                  give a slot up after this many restarts (default: never)
#   CRASH_LOOP_RESTARTS           end the container after this many quick restarts in a row (default 5;
#                                 0: never)
#   KLEIN_RUN_DIR                 where the healthcheck finds the ports (default /tmp/klein-worker)
#   HF_HUB_OFFLINE                set to 1 when the image has baked weights ($HF_HOME/klein-baked)
set -euo pipefail

readonly LOG_TAG="klein-entrypoint"
RUN_DIR="${KLEIN_RUN_DIR:-/tmp/klein-worker}"

log() { printf '%s: %s\n' "$LOG_TAG" "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

# Sets NOW_MS: milliseconds since the epoch, from bash's own clock. The supervisor loop runs no
# command substitutions: bash defers a trap while it waits on one, and the loop must stay responsive.
now_ms() {
    local t="${EPOCHREALTIME//[.,]/}"
    NOW_MS=$((t / 1000))
}

# "1.5" -> 1500; LC_ALL=C so a comma locale does not reject the dot.
to_ms() {
    local out
    LC_ALL=C printf -v out '%.0f' "${1}e3" 2>/dev/null || die "not a number of seconds: '$1'"
    echo "$out"
}

# Sets SECS: "1.500" for 1500.
ms_to_s() { printf -v SECS '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }

healthcheck() {
    # Ports of the supervised workers, written at start; a bare `METRICS_PORT` when run standalone.
    local ports_file="$RUN_DIR/ports" ports=()
    if [[ -s "$ports_file" ]]; then
        mapfile -t ports <"$ports_file"
    elif [[ -n "${METRICS_PORT:-}" ]]; then
        ports=("$METRICS_PORT")
    fi
    # No metrics endpoint configured: there is nothing to probe, so report healthy.
    ((${#ports[@]} > 0)) || exit 0
    exec python - "${ports[@]}" <<'PY'
import sys
import urllib.request

for port in sys.argv[1:]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
            if response.status != 200:
                sys.exit(f"worker on port {port}: HTTP {response.status}")
    except OSError as exc:
        sys.exit(f"worker on port {port}: {exc}")
PY
}

# Prints one device id per line; nothing means "no GPU, run one CPU worker".
detect_devices() {
    if [[ -n "${GPU_COUNT:-}" ]]; then
        local i
        for ((i = 0; i < GPU_COUNT; i++)); do echo "$i"; done
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        # The operator already chose the devices (docker --gpus, a shared host): split them up.
        [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]] && return 0
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | tr -d ' ' | grep -v '^$' || true
    elif command -v nvidia-smi >/dev/null 2>&1; then
        # A driver without a working GPU makes nvidia-smi fail: fall back to CPU rather than crash-loop.
        nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' \r' | grep -v '^$' || true
    fi
}

worker_id_prefix() {
    if [[ -n "${WORKER_ID_PREFIX:-}" ]]; then
        echo "$WORKER_ID_PREFIX"
    elif [[ -n "${WORKER_ID:-}" ]]; then
        echo "$WORKER_ID"
    elif [[ -n "${CONTAINER_ID:-}" ]]; then
        echo "vast-$CONTAINER_ID" # the worker's own default on Vast, kept for one-GPU boxes
    elif [[ -n "${VAST_CONTAINERLABEL:-}" ]]; then
        echo "$VAST_CONTAINERLABEL"
    else
        echo "${HOSTNAME:-worker}"
    fi
}

# A baked image (Dockerfile BAKE_MODEL) carries its weights: skip the hub round-trips at boot, and
# with them the need for a token. HF_HUB_OFFLINE=0 lets a different variant download.
if [[ -z "${HF_HUB_OFFLINE+set}" && -n "${HF_HOME:-}" && -e "$HF_HOME/klein-baked" ]]; then
    export HF_HUB_OFFLINE=1
fi

# ---- one-off modes ---------------------------------------------------------------------------------
if [[ "${1:-}" == "healthcheck" ]]; then
    healthcheck
fi
if (($# > 0)); then
    exec "$@"
fi

# ---- supervisor state (index = slot) ---------------------------------------------------------------
read -r -a CMD <<<"${WORKER_CMD:-python -m worker}"
((${#CMD[@]} > 0)) || die "WORKER_CMD is empty"

BACKOFF_MS="$(to_ms "${RESTART_BACKOFF_SECONDS:-1}")"
BACKOFF_MAX_MS="$(to_ms "${RESTART_BACKOFF_MAX_SECONDS:-60}")"
RESET_MS="$(to_ms "${RESTART_RESET_SECONDS:-300}")"
MAX_RESTARTS="${MAX_RESTARTS:-}"
[[ -z "$MAX_RESTARTS" || "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a whole number"
CRASH_LOOP_RESTARTS="${CRASH_LOOP_RESTARTS:-5}"
[[ "$CRASH_LOOP_RESTARTS" =~ ^[0-9]+$ ]] || die "CRASH_LOOP_RESTARTS must be a whole number"
readonly EXIT_CANNOT_SERVE=3 # the worker's boot-error status (worker/__main__.py)
FATAL_RC=0                   # set when a worker's failure ends the container

if [[ -n "${GPU_COUNT:-}" && ! "$GPU_COUNT" =~ ^[0-9]+$ ]]; then
    die "GPU_COUNT must be a whole number, got '$GPU_COUNT'"
fi
mapfile -t DEVICES < <(detect_devices)
PREFIX="$(worker_id_prefix)"
declare -a SLOT_DEVICE=() SLOT_ID=() SLOT_PORT=() SLOT_PID=() SLOT_STATE=() SLOT_RC=()
declare -a SLOT_DELAY=() SLOT_RESTART_AT=() SLOT_STARTED=() SLOT_RESTARTS=() SLOT_QUICK=()
STOPPING=0
TIMER_PID=""
readonly TICK_MS=1000 # longest the loop sleeps without looking at signals and children

if ((${#DEVICES[@]} == 0)); then
    SLOT_DEVICE=("")
    SLOT_ID=("$PREFIX-cpu")
else
    for i in "${!DEVICES[@]}"; do
        SLOT_DEVICE[i]="${DEVICES[i]}"
        # A numeric device keeps its index in the id (gpu3 stays gpu3); a UUID gets its position.
        if [[ "${DEVICES[i]}" =~ ^[0-9]+$ ]]; then
            SLOT_ID[i]="$PREFIX-gpu${DEVICES[i]}"
        else
            SLOT_ID[i]="$PREFIX-gpu$i"
        fi
    done
fi

mkdir -p "$RUN_DIR" 2>/dev/null || true
: >"$RUN_DIR/ports" 2>/dev/null || true
for i in "${!SLOT_DEVICE[@]}"; do
    SLOT_PID[i]=""
    SLOT_STATE[i]="new"
    SLOT_RC[i]=0
    SLOT_DELAY[i]="$BACKOFF_MS"
    SLOT_RESTART_AT[i]=0
    SLOT_STARTED[i]=0
    SLOT_RESTARTS[i]=0
    SLOT_QUICK[i]=0 # restarts in a row after a short run
    SLOT_PORT[i]=""
    if [[ -n "${METRICS_PORT:-}" ]]; then
        [[ "$METRICS_PORT" =~ ^[0-9]+$ ]] || die "METRICS_PORT must be a port number, got '$METRICS_PORT'"
        # One port per worker: they cannot share a listening socket.
        SLOT_PORT[i]=$((METRICS_PORT + i))
        echo "${SLOT_PORT[i]}" >>"$RUN_DIR/ports" 2>/dev/null || true
    fi
done

start_slot() {
    local i="$1"
    (
        if [[ -n "${SLOT_DEVICE[i]}" ]]; then export CUDA_VISIBLE_DEVICES="${SLOT_DEVICE[i]}"; fi
        export WORKER_ID="${SLOT_ID[i]}"
        if [[ -n "${SLOT_PORT[i]}" ]]; then export METRICS_PORT="${SLOT_PORT[i]}"; fi
        exec "${CMD[@]}"
    ) &
    SLOT_PID[i]=$!
    SLOT_STATE[i]="running"
    now_ms
    SLOT_STARTED[i]="$NOW_MS"
    log "started ${SLOT_ID[i]} (pid ${SLOT_PID[i]}, device '${SLOT_DEVICE[i]:-cpu}')"
    # A signal that landed while the child was being forked would otherwise miss it.
    if ((STOPPING)); then kill -TERM "${SLOT_PID[i]}" 2>/dev/null || true; fi
}

# Stop restarting and send every running worker SIGTERM (they drain).
drain_all() {
    local i
    STOPPING=1
    for i in "${!SLOT_STATE[@]}"; do
        case "${SLOT_STATE[i]}" in
            running) kill -TERM "${SLOT_PID[i]}" 2>/dev/null || true ;;
            backoff) SLOT_STATE[i]="done" ;; # was down already: it just stays down
        esac
    done
}

# shellcheck disable=SC2329 # invoked through the traps below
on_signal() {
    log "received SIG$1: draining (no more restarts)"
    drain_all
}

# A worker failure that restarting cannot mend: drain the others and exit with its status.
end_container() {
    local i="$1" rc="$2" why="$3"
    log "${SLOT_ID[i]} exited $rc: $why; ending the container (the others drain)"
    SLOT_STATE[i]="done"
    FATAL_RC="$rc"
    drain_all
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# A child ended: decide between done and a delayed restart.
on_exit() {
    local i="$1" rc="$2" now ran
    now_ms
    now="$NOW_MS"
    ran=$((now - SLOT_STARTED[i]))
    SLOT_PID[i]=""
    SLOT_RC[i]="$rc"
    if ((STOPPING)); then
        log "${SLOT_ID[i]} exited $rc while draining"
        SLOT_STATE[i]="done"
    elif ((rc == 0)); then
        log "${SLOT_ID[i]} exited 0 on its own: not restarting"
        SLOT_STATE[i]="done"
    elif ((rc == EXIT_CANNOT_SERVE)); then
        end_container "$i" "$rc" "this machine cannot serve (see the worker's log above)"
    elif [[ -n "$MAX_RESTARTS" ]] && ((SLOT_RESTARTS[i] >= MAX_RESTARTS)); then
        log "${SLOT_ID[i]} exited $rc after $MAX_RESTARTS restarts: giving up on it"
        SLOT_STATE[i]="done"
    else
        # A child that ran a good while was healthy: its next crash is a fresh incident.
        if ((ran >= RESET_MS)); then
            SLOT_DELAY[i]="$BACKOFF_MS"
            SLOT_QUICK[i]=0
        fi
        SLOT_QUICK[i]=$((SLOT_QUICK[i] + 1))
        if ((CRASH_LOOP_RESTARTS > 0 && SLOT_QUICK[i] > CRASH_LOOP_RESTARTS)); then
            end_container "$i" "$rc" "crash loop ($CRASH_LOOP_RESTARTS restarts in a row, each soon after its start)"
            return
        fi
        SLOT_RESTART_AT[i]=$((now + SLOT_DELAY[i]))
        ms_to_s "${SLOT_DELAY[i]}"
        log "${SLOT_ID[i]} exited $rc: restarting in ${SECS}s"
        SLOT_DELAY[i]=$((SLOT_DELAY[i] * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : SLOT_DELAY[i] * 2))
        SLOT_RESTARTS[i]=$((SLOT_RESTARTS[i] + 1))
        SLOT_STATE[i]="backoff"
    fi
}

# Sets SLOT to the slot running `pid`; fails for a pid that is not a worker (an old timer).
slot_of_pid() {
    local pid="$1" i
    for i in "${!SLOT_PID[@]}"; do
        if [[ "${SLOT_PID[i]}" == "$pid" ]]; then
            SLOT="$i"
            return 0
        fi
    done
    return 1
}

# `wait -n` can miss an exit that coincides with a trapped signal; a sweep with kill -0 catches it.
reap_exited() {
    local i rc
    for i in "${!SLOT_PID[@]}"; do
        if [[ "${SLOT_STATE[i]}" == "running" ]] && ! kill -0 "${SLOT_PID[i]}" 2>/dev/null; then
            rc=0
            wait "${SLOT_PID[i]}" 2>/dev/null || rc=$?
            on_exit "$i" "$rc"
        fi
    done
}

# Starts the restarts that are due, then arms one timer child so that `wait -n` wakes up for the
# next restart, or after TICK_MS at the latest: bash can hold a trap that lands just as `wait`
# begins until some child exits, and the tick bounds that delay.
schedule_restarts() {
    local i now next
    if [[ -n "$TIMER_PID" ]]; then
        kill "$TIMER_PID" 2>/dev/null || true
        wait "$TIMER_PID" 2>/dev/null || true
        TIMER_PID=""
    fi
    now_ms
    now="$NOW_MS"
    next=$((now + TICK_MS))
    for i in "${!SLOT_STATE[@]}"; do
        [[ "${SLOT_STATE[i]}" == "backoff" ]] || continue
        if ((SLOT_RESTART_AT[i] <= now)); then
            start_slot "$i"
        elif ((SLOT_RESTART_AT[i] < next)); then
            next="${SLOT_RESTART_AT[i]}"
        fi
    done
    ms_to_s $((next - now))
    sleep "$SECS" &
    TIMER_PID=$!
}

any_alive() {
    local s
    for s in "${SLOT_STATE[@]}"; do
        [[ "$s" == "running" || "$s" == "backoff" ]] && return 0
    done
    return 1
}

log "command: ${CMD[*]}; workers: ${SLOT_ID[*]}"
for i in "${!SLOT_DEVICE[@]}"; do start_slot "$i"; done

while any_alive; do
    schedule_restarts
    pid=""
    rc=0
    wait -n -p pid || rc=$?
    pid="${pid:-}"
    if [[ -z "$pid" && "$rc" == 127 ]]; then
        sleep 0.1 # no child to wait for yet (an exit still being reaped): do not spin
    elif [[ -n "$pid" ]]; then
        if [[ "$pid" == "$TIMER_PID" ]]; then
            TIMER_PID=""
        elif slot_of_pid "$pid"; then
            on_exit "$SLOT" "$rc"
        fi
    fi
    reap_exited
done

if [[ -n "$TIMER_PID" ]]; then kill "$TIMER_PID" 2>/dev/null || true; fi

status="$FATAL_RC"
for i in "${!SLOT_RC[@]}"; do
    ((status == 0)) || break
    if ((SLOT_RC[i] != 0)); then
        status="${SLOT_RC[i]}"
        break
    fi
done
log "all workers exited (status $status)"
exit "$status"
